"""Code that runs in worker processes (installed as ``evomerge.workers``)."""
