"""Tiny models the demos and tests build in seconds: a digits MLP and a character-level Llama with its skills."""
