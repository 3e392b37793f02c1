"""generic adapter (skeleton)."""
