"""The feedback loop: rounds of sample → compare → feedback → train → evaluate → register,
each round versioned in a lineage registry (`runner` runs them; the other modules are the steps)."""
