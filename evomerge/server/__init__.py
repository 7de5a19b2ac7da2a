"""The reference model service behind `evomerge serve`: completions, runtime LoRA and the merge service (FastAPI)."""
