"""qwen_vl adapter (skeleton)."""
