"""edgeloop: edgeloop."""
