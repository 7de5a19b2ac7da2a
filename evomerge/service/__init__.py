"""The black-box client: an async OpenAI-compatible HTTP client and the models it serves to fitness functions."""
