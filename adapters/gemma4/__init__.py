"""gemma4 adapter (skeleton)."""
