"""M2N2 and the GA baseline: an archive that competes for examples and breeds by attraction.

Abrantes, Lange and Tang, "Competition and Attraction Improve Model Fusion" (GECCO 2025,
arXiv 2508.16204; authors' code ``SakanaAI/natural_niches``):

* the archive keeps P members and the P × N matrix of their per-example scores;
* fitness is shared per example: ``f_i = Σ_j c_j s_ij / z_j^α`` with ``z_j = Σ_k s_kj`` (a zero
  ``z_j`` counts as 1, as in the code), ``c_j`` = 1 for binary scores and the archive's best
  score on ``j`` for continuous ones;
* parent A is drawn ∝ fitness, parent B ∝ attraction to A, ``Σ_j max(F_Bj − F_Aj, 0)`` with
  ``F = c·s / z^α`` (the code's form of the paper's eq. 4);
* the child is the split-point SLERP of A and B (random split, mix ratio ~ U(0, 1)), optionally
  plus Gaussian noise; it joins the archive and the worst of the P + 1 (child included) leaves.

The GA baseline is the same loop with α = 0 and both parents drawn by fitness.

Deviations, all for robustness or scale: k children may be in flight, each inserted against the
archive as it is when its result arrives (k = 1 is the paper's loop); parents are drawn by fitness
where the code would divide by zero (all-zero fitness or attraction); empty archive slots are
filled before anyone is evicted and are never parents; NaN per-example scores count as 0 and a
failed child is dropped; negative scores (losses) are shifted by the archive's worst per example,
as the paper does for its diffusion run. Genomes are unit-cube recipe vectors, raw weight vectors
(``SearchSpec.weights``), or seed recipes (``SearchSpec.seed_recipes``) when the archive is too
large to hold in memory.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np
from pydantic import Field, model_validator

from evomerge.records import Candidate, Evaluation
from evomerge.space.interpolation import split_slerp_coefficients
from evomerge.space.genes import SearchSpec
from evomerge.strategies.base import SEED_RECIPES, Requirements, Strategy, StrategyOptions
from evomerge.space.seed_recipes import SeedRecipe


def claimed(scores: np.ndarray, alpha: float) -> np.ndarray:
    """``z_j^α`` per example, with examples nobody solves counting as 1 (the code's ε)."""
    z = scores.sum(axis=0)
    z[z <= 0] = 1.0
    return z if alpha == 1.0 else z**alpha


def capacities(scores: np.ndarray, binary: bool | None = None) -> np.ndarray:
    """1 per example for binary scores; the best score on each example for continuous ones."""
    if binary is None:
        binary = bool(np.all((scores == 0) | (scores == 1)))
    return np.ones(scores.shape[1]) if binary else scores.max(axis=0)


def shared_scores(scores: np.ndarray, alpha: float, binary: bool | None = None) -> np.ndarray:
    """``F = c · s / z^α``: each example's resource split among the members that solve it."""
    return scores * (capacities(scores, binary) / claimed(scores, alpha))


def attraction(shared: np.ndarray, a: int) -> np.ndarray:
    """How much each member solves what member ``a`` does not, weighted by scarcity."""
    gain = np.subtract(shared, shared[a])
    return np.maximum(gain, 0.0, out=gain).sum(axis=1)


def split_point_slerp(a: np.ndarray, b: np.ndarray, split: int, mix: float) -> np.ndarray:
    """M2N2's crossover of two flat parameter vectors, as the authors' code computes it.

    One angle Ω between the whole vectors; SLERP with ``t = mix`` before index ``split`` and
    ``t = 1 − mix`` from it on; linear interpolation when ``sin Ω ≤ 1e-6``.
    """
    # einsum, not BLAS: a threaded BLAS dot of a few 10k elements stalls when the cores are busy
    aa, bb = float(np.einsum("i,i->", a, a)), float(np.einsum("i,i->", b, b))
    cos_omega = float(np.einsum("i,i->", a, b)) / math.sqrt(aa * bb) if aa > 0 and bb > 0 else 0.0
    child = np.empty(a.shape, dtype=np.result_type(a, b))
    for (lo, hi), t in (((0, split), mix), ((split, a.size), 1.0 - mix)):
        ca, cb = split_slerp_coefficients(t, cos_omega)
        np.multiply(a[lo:hi], ca, out=child[lo:hi])
        child[lo:hi] += cb * b[lo:hi]
    return child


def roulette(rng: np.random.Generator, weights: np.ndarray, allowed: np.ndarray) -> int:
    """An index drawn ∝ ``weights`` among ``allowed``; uniform among them when all weights are 0."""
    w = np.where(allowed, np.maximum(weights, 0.0), 0.0)
    total = w.sum()
    if not np.isfinite(total) or total <= 0:
        w = allowed.astype(np.float64)
        total = w.sum()
    # inverse CDF: the same draw as Generator.choice(p=…), without its per-call validation cost
    index = int(np.searchsorted(np.cumsum(w), rng.random() * total, side="right"))
    return min(index, int(np.flatnonzero(w)[-1]))


class GAOptions(StrategyOptions):
    """The archive and breeding options M2N2 and the GA share."""

    archive_size: int = Field(default=20, ge=2, description="members kept (the paper: 20 on digits, 15 for LLMs)")
    split_point: bool = Field(default=True, description="random split point; off = whole-vector SLERP")
    crossover: bool = Field(default=True, description="off: the child is parent A plus mutation")
    mutation: float = Field(default=0.0, ge=0.0, description="std of Gaussian noise added to each child gene")
    random_seeds: int | None = Field(
        default=None,
        ge=0,
        description="uniform random genomes added to the seeds (recipe space); default fills the archive",
    )
    archive: Literal["genomes", "seed_recipes"] = Field(
        default="genomes",
        description="seed_recipes: members are piecewise combinations of the experts (no mutation; for large models)",
    )
    split_grid: Literal["rows", "elements"] = Field(
        default="rows", description="seed_recipes: split points between tensor rows, or anywhere (small models)"
    )
    racing_rank: int = Field(
        default=3,
        ge=1,
        description="with fitness.racing: a candidate goes on while it could beat this population's racing_rank-th"
        " best fully scored member (at least fitness.racing.top_k)",
    )

    @model_validator(mode="after")
    def _child_must_differ(self) -> "GAOptions":
        if not self.crossover and self.mutation == 0:
            raise ValueError("without crossover the children need mutation > 0, or they only copy parents")
        return self


class M2N2Options(GAOptions):
    alpha: float = Field(default=1.0, ge=0.0, description="competition exponent; 0 = no competition (GA)")
    attraction: bool = Field(default=True, description="draw parent B by attraction to A (else by fitness)")


class M2N2(Strategy):
    Options = M2N2Options

    @classmethod
    def requires(cls, options: StrategyOptions) -> Requirements:
        if getattr(options, "archive") == SEED_RECIPES:
            return Requirements(space=SEED_RECIPES, split_grid=getattr(options, "split_grid"))
        return Requirements()

    def __init__(self, population: str, spec: SearchSpec, seed: int, options: M2N2Options) -> None:
        super().__init__(population, spec, seed, options)
        self._gram = spec.seed_gram
        if (self._gram is not None) != (options.archive == SEED_RECIPES):
            raise ValueError(
                "archive 'seed_recipes' needs a space of seed recipes (SearchSpec.seed_recipes) and only it"
            )
        if self._gram is not None and options.mutation > 0:
            raise ValueError("mutation needs weights in the archive; seed recipes only combine the seeds")
        self._rng = np.random.default_rng(seed)
        from evomerge.strategies.noise import MutationNoise  # torch, only once a run builds M2N2

        self._noise = MutationNoise(seed)
        self._binary = True  # every score told so far is 0 or 1: capacities are 1
        self._negative = False  # some score was negative: examples are shifted by their worst
        self._pending = self._initial_genomes()
        self._members: list[np.ndarray | None] = [None] * options.archive_size
        self._member_ids: list[str] = [""] * options.archive_size
        self._scores: np.ndarray | None = None
        self._stats: dict[str, float] | None = None  # archive_stats until the archive changes

    @property
    def _alpha(self) -> float:
        return self.options.alpha

    @property
    def _use_attraction(self) -> bool:
        return self.options.attraction

    def _initial_genomes(self) -> list[np.ndarray]:
        if self._gram is not None:
            n = self._gram.n_seeds
            return [SeedRecipe.seed(i, n, self._gram.n_blocks).encode() for i in range(n)]
        seeds = [np.asarray(s, dtype=np.float64) for s in self.spec.seeds] or [self.x0]
        if self.spec.bounded:
            seeds = [np.clip(s, 0.0, 1.0) for s in seeds]
            extra = self.options.random_seeds
            if extra is None:
                extra = max(self.options.archive_size - len(seeds), 0)
            seeds += [self._rng.random(self.dim) for _ in range(extra)]
            seeds = [self.spec.snap(s) for s in seeds]
        return seeds

    # --- the archive ---------------------------------------------------------------------------
    @property
    def filled(self) -> np.ndarray:
        return np.array([m is not None for m in self._members])

    def archive_scores(self) -> np.ndarray:
        """The per-example scores of the members present, as the competition sees them."""
        if self._scores is None:
            return np.zeros((0, 0))
        return _shift(self._scores[self.filled])

    def archive_stats(self) -> dict[str, float]:
        """Training coverage and mean per-example entropy (the paper's diversity measures), kept
        until the archive changes: the report asks after every evaluation of a long run, and most
        children late in a run are discarded."""
        if self._stats is None:
            self._stats = self._measure_archive()
        return dict(self._stats)

    def _measure_archive(self) -> dict[str, float]:
        s = self.archive_scores()
        if s.size == 0:
            return {"coverage": 0.0, "entropy": 0.0, "members": 0}
        share = s / np.where(s.sum(axis=0) > 0, s.sum(axis=0), 1.0)
        with np.errstate(divide="ignore", invalid="ignore"):
            entropy = -np.where(share > 0, share * np.log(share), 0.0).sum(axis=0)
        return {"coverage": float(np.mean(s.max(axis=0) > 0)), "entropy": float(entropy.mean()), "members": int(len(s))}

    def _fitness(self, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self._negative:
            scores = _shift(scores)
        shared = shared_scores(scores, self._alpha, binary=self._binary)
        return shared, shared.sum(axis=1)

    def _insert(self, genome: np.ndarray, member_id: str, row: np.ndarray) -> None:
        if self._scores is None:
            self._scores = np.zeros((len(self._members), row.size))
        elif row.size != self._scores.shape[1]:
            raise ValueError(
                f"{member_id}: {row.size} per-example scores, the archive holds {self._scores.shape[1]} per member"
            )
        empty = [i for i, m in enumerate(self._members) if m is None]
        if empty:
            slot = empty[0]
        else:
            _, fitness = self._fitness(np.vstack([self._scores, row]))
            slot = int(np.argmin(fitness))
            if slot == len(self._members):
                return  # the child is the worst: discarded
        self._members[slot] = genome
        self._member_ids[slot] = member_id
        self._scores[slot] = row
        self._stats = None

    # --- breeding ------------------------------------------------------------------------------
    def _can_breed(self) -> bool:
        n = int(self.filled.sum())
        return n >= 2 or (n >= 1 and self.options.mutation > 0)

    def _parents(self) -> tuple[int, int]:
        assert self._scores is not None
        filled = self.filled
        slots = np.flatnonzero(filled)
        shared, fitness = self._fitness(self._scores if filled.all() else self._scores[slots])
        everyone = np.ones(len(slots), dtype=bool)
        a = roulette(self._rng, fitness, everyone)
        if not self._use_attraction:
            return int(slots[a]), int(slots[roulette(self._rng, fitness, everyone)])
        others = everyone.copy()
        if len(slots) > 1:
            others[a] = False
        pull = attraction(shared, a)
        if np.where(others, pull, 0.0).sum() <= 0:
            pull = fitness  # nobody adds anything to A: fall back to fitness, as B must differ
        return int(slots[a]), int(slots[roulette(self._rng, pull, others)])

    def _child(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        opts = self.options
        if not opts.crossover:
            child = a.copy()
        elif self._gram is not None:
            ra, rb = SeedRecipe.decode(a), SeedRecipe.decode(b)
            blocks = self._gram.n_blocks
            split = int(self._rng.integers(0, blocks)) if opts.split_point else blocks
            return self._gram.crossover(ra, rb, split, float(self._rng.random())).encode()
        else:
            split = int(self._rng.integers(0, a.size)) if opts.split_point else a.size
            child = split_point_slerp(a, b, split, float(self._rng.random()))
        if opts.mutation > 0:
            child += self._noise.sample(child.size, opts.mutation)
        if self.spec.bounded:
            # a discrete gene is bred as a continuous one, then snapped to its bin's centre
            child = self.spec.snap(np.clip(child, 0.0, 1.0, out=child))
        return child

    # --- ask/tell ------------------------------------------------------------------------------
    def _ask(self, n: int) -> list[tuple[np.ndarray, tuple[str, ...], Any]]:
        out: list[tuple[np.ndarray, tuple[str, ...], Any]] = []
        while self._pending and len(out) < n:
            out.append((self._pending.pop(0), (), "seed"))
        while len(out) < n and self._can_breed():
            a, b = self._parents()
            ga, gb = self._members[a], self._members[b]
            assert ga is not None and gb is not None
            parents = (self._member_ids[a],) if not self.options.crossover else (self._member_ids[a], self._member_ids[b])
            out.append((self._child(ga, gb), parents, "child"))
        return out

    def _tell(self, candidate: Candidate, tag: Any, fitness: float, evaluation: Evaluation) -> None:
        self._consider(candidate.genome, candidate.id, fitness, evaluation)

    def immigrate(self, genome: np.ndarray, evaluation: Evaluation) -> None:
        if evaluation.candidate_id in self._member_ids:
            return  # already here from an earlier migration
        fitness = evaluation.fitness if evaluation.usable else -math.inf
        self._consider(np.asarray(genome, dtype=np.float64), evaluation.candidate_id, fitness, evaluation)

    def _consider(self, genome: np.ndarray, member_id: str, fitness: float, evaluation: Evaluation) -> None:
        """Offer a scored genome to the archive: it competes like any child, on every example, so
        only a fully scored one (not stopped early by racing) is offered."""
        if not math.isfinite(fitness) or evaluation.fidelity < 1.0:
            return  # a failed child never enters the archive, nor one whose scores are partial
        row = evaluation.per_example if evaluation.per_example is not None else np.array([fitness])
        row = np.nan_to_num(np.asarray(row, dtype=np.float64).reshape(-1), nan=0.0, posinf=0.0, neginf=0.0)
        self._binary = self._binary and bool(np.all((row == 0) | (row == 1)))
        self._negative = self._negative or bool(row.min(initial=0.0) < 0)
        self._insert(genome, member_id, row)

    def racing_rank(self, top_k: int) -> int:
        """A child matters when it enters the archive, where it competes for examples: one below
        the best can still take the weakest member's place by covering examples the others miss
        (in full runs of the tiny-LM demo, 85 % of the children admitted ranked below the best).
        Racing children against the best starves the archive and the search stalls; against the
        3rd best, M2N2 ends where it does without racing on both demos (benchmarks/README.md,
        racing). The seeds race the same way: scoring them in full cost examples and changed
        nothing measurable there."""
        return max(top_k, self.options.racing_rank)

    def stop(self) -> dict[str, Any]:
        if self._pending or self.outstanding() or self._can_breed():
            return {}
        return {"archive": "fewer than two usable members: the seeds failed or scored nothing"}

    def _state(self) -> Any:
        return {
            "rng": self._rng.bit_generator.state,
            "noise": self._noise.state(),
            "binary": self._binary,
            "negative": self._negative,
            "pending": list(self._pending),
            "members": list(self._members),
            "member_ids": list(self._member_ids),
            "scores": None if self._scores is None else self._scores.copy(),
        }

    def _load_state(self, state: Any) -> None:
        self._rng.bit_generator.state = state["rng"]
        self._noise.set_state(state["noise"])
        self._binary = state["binary"]
        self._negative = state["negative"]
        self._pending = list(state["pending"])
        self._members = list(state["members"])
        self._member_ids = list(state["member_ids"])
        self._scores = None if state["scores"] is None else state["scores"].copy()
        self._stats = None


def _shift(scores: np.ndarray) -> np.ndarray:
    """Scores as resources: unchanged when non-negative, else less each example's worst."""
    if scores.size and scores.min() < 0:
        return scores - scores.min(axis=0)
    return scores


class GA(M2N2):
    """The paper's GA baseline: M2N2 without competition (α = 0) or attraction."""

    Options = GAOptions  # type: ignore[assignment]

    @property
    def _alpha(self) -> float:
        return 0.0

    @property
    def _use_attraction(self) -> bool:
        return False
