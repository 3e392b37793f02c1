"""The adapter test kit, as a pytest plugin (entry point ``pytest11``): see CONTRIBUTING.md."""
