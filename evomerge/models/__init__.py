"""Model loading and the small built-in architectures used by the demo and tests."""
