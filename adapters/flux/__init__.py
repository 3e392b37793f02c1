"""flux adapter (skeleton)."""
