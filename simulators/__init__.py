"""edgeloop: simulators."""
