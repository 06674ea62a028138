"""edgeloop: aggregator."""
