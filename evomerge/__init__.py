"""evomerge: search for the best way to merge fine-tuned models.

The pure layers (``merge``, ``space``, ``strategies``, ``fitness``) import nothing heavier than
torch and numpy; Ray, HTTP and SQLite stay in the executor, workers and store.
"""

__version__ = "0.1.0"
