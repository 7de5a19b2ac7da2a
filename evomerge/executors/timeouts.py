"""How long a candidate may run before it is given up as hung (``workers.timeout``).

A fitness that never returns, or a merged model that loops for ever, would otherwise wedge a run:
the executor waits for it and nothing else happens. ``auto`` derives the limit from the run's own
evaluations: a multiple of a high quantile of the durations seen so far, never below a floor (a
few slow candidates are not hung ones), and a fixed cap until enough have finished to judge
(a run whose evaluations take longer than the cap sets ``workers.timeout`` itself).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

AUTO_CAP = 1800.0
"""``auto``'s limit before enough evaluations have finished to learn from (30 min)."""
AUTO_FLOOR = 60.0
"""``auto`` never gives up on a candidate sooner than this."""
AUTO_FACTOR = 5.0
AUTO_QUANTILE = 0.95
AUTO_MIN_SEEN = 3
"""Finished evaluations ``auto`` waits for before it trusts their durations."""


@dataclass
class CandidateTimeout:
    """The current limit on one candidate's running time, from ``workers.timeout``."""

    setting: Literal["auto"] | float | None
    durations: list[float] = field(default_factory=list)

    def observe(self, duration: float) -> None:
        """An evaluation finished (either way) after ``duration`` seconds."""
        self.durations.append(duration)

    def seconds(self) -> float | None:
        """The limit for a candidate starting now; None: wait for ever."""
        if self.setting != "auto":
            return self.setting
        if len(self.durations) < AUTO_MIN_SEEN:
            return AUTO_CAP
        slow = float(np.quantile(self.durations, AUTO_QUANTILE))
        return max(AUTO_FLOOR, AUTO_FACTOR * slow)

    @staticmethod
    def reason(seconds: float) -> str:
        """The error a timed-out candidate is recorded with."""
        return f"timed out after {seconds:g}s"
