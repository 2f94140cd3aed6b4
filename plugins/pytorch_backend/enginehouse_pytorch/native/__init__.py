"""Native decoder implementations: architecture switches, layers, paged attention, loading."""
