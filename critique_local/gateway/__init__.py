"""The model gateway: the only door from a sandbox to a model (OpenAI-compatible)."""
