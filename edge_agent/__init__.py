"""edgeloop: edge_agent."""
