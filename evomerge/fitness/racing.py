"""Staged evaluation ("racing"): score a candidate on a small seeded subset of the fitness examples
first, and go on only while it could still matter.

MERGE³ (arXiv 2502.10436) cuts the fitness computation of evolutionary merging 50× by scoring on
reduced example sets; racing keeps the full set for the candidates that could still rank among a
population's best. Every candidate meets the same stages: one seeded permutation of the examples,
cut at fractions ``stages``. After each stage the rule asks whether the candidate could still beat
the population's k-th best fully scored member (the *rival*, which the controller sends with the
candidate: its fitness ``must_beat`` and its per-example scores). Two rules ask it; the candidate
stops when either says no.

**Paired** (the rival's per-example scores given, and ``paired`` on: the default): the candidate
and the rival were scored on the same examples, so the question is whether the mean over all
``N`` examples of the differences ``d = score − rival`` could still be above 0:

    stop when  mean(d) + z · sqrt(f · mean(d²) / n)  <  0,

with ``n`` the examples scored so far and ``f = (N − n) / (N − 1)`` the finite-population
correction (they are drawn without replacement). This is the blocking of F-race (Birattari et
al., GECCO 2002) and irace's paired tests: the examples both models get right or wrong alike
(most of them, for a candidate near the rival) cancel, so a candidate a few points worse stops
after a stage whose unpaired bound still spans ten points. ``mean(d²)`` is the variance of ``d``
when its mean is 0, the boundary the test guards (the score test; for 0/1 scores McNemar's,
``(wins − losses) / sqrt(wins + losses)`` against ``z``): unlike the sample variance it is 0 only
when the two agree on every example so far, which never stops a candidate, and a candidate that
lost every example so far stops only after more than ``z²`` of them (5 at z = 2).

**Unpaired** (always): a one-sided bound on the candidate's own mean over all ``N`` examples is
compared with ``must_beat``. It is the sharper of the two for a candidate unlike the rival, whose
differences vary more than its own scores do:

    stop when  upper  <  must_beat,

where ``upper`` is ``z`` standard errors above the mean so far, with the same ``f``. For scores in
a known range ``[lo, hi]`` (``bounds``; accuracies and exact match: ``[0, 1]``) it is the Wilson
score bound: the largest ``μ`` with

    (μ − mean)²  ≤  z² · f / n · (μ − lo)(hi − μ),

the variance a score in ``[lo, hi]`` with mean ``μ`` can at most have. A stage that is all wrong
has no spread, yet the bound stays above ``lo`` (on 20 of 200 examples at z = 2: 0.15), so it
stops only a candidate that even that much could not save; the normal bound ``mean + z·stderr``
would read it as certain. For scores of no known range (``bounds`` None: negative cross-entropy)
it is that normal bound, with the sample standard deviation.

Each rule alone wrongly stops a candidate that could in truth beat the rival with chance at most
about ``Φ(−z)`` (2.3 % at z = 2), so the two together at most twice that. A stopped candidate's
fitness is below the rival's: the paired estimate ``must_beat + mean(d)`` when the paired rule
stopped it (see :attr:`Raced.fitness`), its mean so far when the unpaired one did. It ranks below
the k-th best (what CMA-ES's ranking and Optuna's samplers need of it) and can never be the
run's best.

The stages are nested prefixes of the permutation and the last step is the whole set, so each
step scores only the examples the steps before it have not: every example is scored at most once,
and a candidate that survives every stage costs ``N`` examples, as without racing. Its per-example
scores are put together by index into the vector one call on all ``N`` returns, each step's
examples handed to the fitness in data order. The values are that call's as far as the fitness
scores an example independently of the others in its call: exactly when it scores each alone (a
service's requests) or row by row; the built-in LM fitnesses pad a batch to its longest row, so
there greedy answers and argmax choices are the same unless a near-tie flips, and log-likelihoods
agree to float rounding (``tests/fitness/test_lm.py`` checks batch sizes 1 to 16 to 1e-5).

Pure numpy: examples are sliced as the fitness functions take them (a mapping of equal-length
tensors or arrays, or a list of rows).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from evomerge.errors import PluginError


@dataclass(frozen=True)
class Raced:
    """One candidate's scores: ``per_example`` has one entry per fitness example, NaN where the
    racing stopped before scoring it; ``examples_scored`` counts the examples the fitness function
    was called on (each at most once: ``N`` for a candidate scored in full). ``estimate``: the
    fitness of a candidate the paired rule stopped (see :attr:`fitness`)."""

    per_example: np.ndarray
    scored: np.ndarray
    examples_scored: int
    estimate: float | None = None

    @classmethod
    def full(cls, scores: np.ndarray) -> "Raced":
        scores = np.asarray(scores, dtype=np.float64)
        return cls(scores, np.ones(len(scores), dtype=bool), len(scores))

    @property
    def fidelity(self) -> float:
        """The fraction of the examples the fitness is the mean of (1.0: all of them)."""
        return float(self.scored.mean()) if len(self.scored) else 1.0

    @property
    def fitness(self) -> float:
        """The mean over the examples scored (NaN when a score is NaN: the candidate failed). For a
        candidate the paired rule stopped: the rival's fitness plus the mean difference so far, the
        estimate of its full mean that uses the rival's scores as a control variate. Its raw partial
        mean could sit above the rival's fitness when the first stages happen to be easy ones."""
        if self.estimate is not None:
            return self.estimate
        kept = self.per_example[self.scored]
        return float(np.mean(kept)) if len(kept) else math.nan


def take(examples: Any, index: np.ndarray) -> Any:
    """The examples at ``index``, in the form the fitness function takes them."""
    if isinstance(examples, dict):
        return {key: column[index] for key, column in examples.items()}
    return [examples[i] for i in index]


def count(examples: Any) -> int:
    return len(next(iter(examples.values()))) if isinstance(examples, dict) else len(examples)


def _shrink(n: int, n_total: int, z: float) -> float:
    """``z² · f / n``: what both bounds scale a variance by, for ``n`` of ``n_total`` examples."""
    return z * z * (n_total - n) / (n_total - 1) / n


def upper_bound(scores: np.ndarray, n_total: int, z: float, bounds: tuple[float, float] | None = None) -> float:
    """The one-sided bound on the mean of all ``n_total`` examples (see the module docstring):
    Wilson's within ``bounds``, ``mean + z · stderr`` without."""
    n = len(scores)
    mean = float(np.mean(scores))
    if n >= n_total:
        return mean
    shrink = _shrink(n, n_total, z)
    if bounds is None:
        spread = float(np.var(scores, ddof=1)) if n > 1 else math.inf
        return mean + math.sqrt(shrink * spread)
    lo, hi = bounds
    p = (mean - lo) / (hi - lo)
    if p >= 1.0:  # the formula gives 1 here, less rounding: a perfect stage always goes on
        return hi
    upper = (p + shrink / 2 + math.sqrt(shrink * p * (1 - p) + shrink * shrink / 4)) / (1 + shrink)
    return lo + (hi - lo) * min(1.0, upper)


def paired_upper_bound(differences: np.ndarray, n_total: int, z: float) -> float:
    """The one-sided bound on the mean difference over all ``n_total`` examples from the paired
    rule's score test (see the module docstring): ``mean(d) + z · sqrt(f · mean(d²) / n)``."""
    n = len(differences)
    mean = float(np.mean(differences))
    if n >= n_total:
        return mean
    return mean + math.sqrt(_shrink(n, n_total, z) * float(np.mean(np.square(differences))))


@dataclass(frozen=True)
class Racing:
    """The stages and the confidence rule; ``Racing()`` (no stages) scores every candidate in full.
    ``bounds``: the range every per-example score lies in (None: not known); ``paired``: compare
    with the rival's per-example scores when the controller sends them (the module docstring)."""

    stages: tuple[float, ...] = ()
    z: float = 2.0
    seed: int = 0
    bounds: tuple[float, float] | None = (0.0, 1.0)
    paired: bool = True

    def stage_sizes(self, n_total: int) -> list[int]:
        """Example counts of the screening stages: at least 2 (a standard error needs two), fewer
        than all, growing; none when the examples are too few to screen."""
        sizes: list[int] = []
        for fraction in self.stages:
            size = max(2, math.ceil(fraction * n_total))
            if size < n_total and (not sizes or size > sizes[-1]):
                sizes.append(size)
        return sizes

    def order(self, n_total: int) -> np.ndarray:
        """The seeded order in which stages take examples: the same for every candidate."""
        return np.random.default_rng(self.seed).permutation(n_total)

    def race(
        self, score: Callable[[Any], np.ndarray], examples: Any, must_beat: float | None, rival: np.ndarray | None = None
    ) -> Raced:
        """Score ``examples`` with ``score`` (examples → one score per example) stage by stage.

        ``must_beat`` None (the population has fewer than k fully scored members yet, or racing
        is off): one call on all examples. ``rival``: the per-example scores of the member whose
        fitness ``must_beat`` is; with ``paired`` the rule compares the candidate with them.
        """
        n_total = count(examples)
        sizes = self.stage_sizes(n_total) if must_beat is not None else []
        if not sizes:
            return Raced.full(score(examples))
        rival = self._pairable(rival, n_total)
        order = self.order(n_total)
        per_example = np.full(n_total, np.nan)
        scored = np.zeros(n_total, dtype=bool)
        done = 0
        for size in [*sizes, n_total]:  # the last step scores the rest: the survivor's whole set
            index = np.sort(order[done:size])  # in data order, as a call on all of them takes them
            per_example[index] = score(take(examples, index))
            scored[index] = True
            done = size
            if done == n_total:
                break
            so_far = per_example[order[:done]]
            if not np.all(np.isfinite(so_far)):  # a NaN fails the candidate whatever follows
                break
            self._check_range(so_far)
            if rival is not None:
                # the rival's scores went through the run store's float32: so do these, and a
                # candidate that scores exactly as the rival does differs by exactly 0
                differences = so_far.astype(np.float32).astype(np.float64) - rival[order[:done]]
                if paired_upper_bound(differences, n_total, self.z) < 0:
                    return Raced(per_example, scored, done, estimate=must_beat + float(np.mean(differences)))
            if upper_bound(so_far, n_total, self.z, self.bounds) < must_beat:
                break
        return Raced(per_example, scored, done)

    def _pairable(self, rival: np.ndarray | None, n_total: int) -> np.ndarray | None:
        """The rival's scores when the paired rule applies: ``paired`` on, one finite score per example."""
        if not self.paired or rival is None:
            return None
        rival = np.asarray(rival, dtype=np.float64)
        return rival if rival.shape == (n_total,) and np.all(np.isfinite(rival)) else None

    def _check_range(self, scores: np.ndarray) -> None:
        """A score outside ``bounds`` would make the bound unsound: the run stops with what to fix."""
        if self.bounds is None:
            return
        lo, hi = self.bounds
        outside = scores[(scores < lo) | (scores > hi)]
        if len(outside):
            raise PluginError(
                f"fitness.racing.scores: the fitness gave a score of {outside[0]:g}, outside [{lo:g}, {hi:g}];"
                " set scores to the range its per-example scores lie in, or null for an unbounded score"
            )
