"""A black-box worker's cache of service answers, held in the worker's memory.

Workers never write the run store: an answer the service gives is kept here and also handed back
with the evaluation that asked for it (``take_new`` → ``Evaluation.responses``); the controller
stores it in the run's ``api_responses`` table. A worker starts from what the run recorded
(``seed``: the executor's setup job), so a resumed run, or a worker on another node, never pays
twice for an answer the run already has. Answers are keyed by the merge's identity and the
request (``cache_key``), not by the name a service gave the merge.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any


def cache_key(identity: str, payload: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps([identity, payload], sort_keys=True).encode()).hexdigest()


class ResponseCache:
    """Answers by key; ``hits`` counts answers served from here (an evaluation's ``cached_responses``)."""

    def __init__(self) -> None:
        self._answers: dict[str, Any] = {}
        self._new: dict[str, Any] = {}
        self.hits = 0

    def seed(self, answers: dict[str, Any]) -> None:
        """Answers the run already recorded: served from here, never handed back again."""
        self._answers.update(answers)

    def get(self, key: str) -> Any | None:
        found = self._answers.get(key)
        self.hits += found is not None
        return found

    def put(self, key: str, answer: Any) -> None:
        if key not in self._answers:
            self._answers[key] = answer
            self._new[key] = answer

    def take_new(self) -> dict[str, Any]:
        """The answers put since the last call, for the evaluation that brought them."""
        new, self._new = self._new, {}
        return new
