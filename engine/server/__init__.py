"""The OpenAI-compatible server (``bastion serve``): app, API keys, limits."""
