"""Evo-Merging's two-stage CMA-ES: first the LoRA-A keep fractions α, then the signed scales β.

Chen et al., "Black-box Model Merging for Language-Model-as-a-Service with Massive Model
Repositories" (arXiv 2509.12951; authors' ``BMM_code/core/session.py``), over the genes of the
``lora_compose`` merge method:

* stage 1 runs CMA-ES over α only, β held at its start, minimising
  ``loss + λ1 · mean|α|`` with ``loss = −fitness``;
* stage 2 fixes α at stage 1's best candidate by that penalised objective and runs a fresh CMA-ES
  over β only, minimising ``loss + λ2 · mean|β|``.

Penalties are on real values (β ∈ [−1.5, 1.5], not its unit coordinate), step sizes are given in
real units and scaled into the unit cube by each gene's range. Both stages start from the space's
``x0``: for ``lora_compose`` that is α = 1 (no pruning) and β = 1/N, the authors' start, at every
granularity and unless ``init`` overrides it. Other searched genes stay at ``x0``.

Budgets: like the authors' ``maxiter = budget // popsize``, each stage runs whole generations and
rounds its budget down (400 / 20 = 20 and 800 / 20 = 40 generations), so it never overshoots —
pycma needs full generations, so a partial last one is not run. A stage also ends early when
pycma's own termination criteria fire, as in the authors' loop. Failed or NaN evaluations count
as the generation's worst finite objective + 1.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from pydantic import Field, model_validator

from evomerge.records import Candidate, Evaluation
from evomerge.space.genes import GeneRange, SearchSpec
from evomerge.strategies.base import Requirements, Strategy, StrategyOptions
from evomerge.strategies.cmaes import Generations, pycma_es


class EvoMergingOptions(StrategyOptions):
    popsize: int = Field(default=20, ge=2, description="CMA-ES population of both stages (authors' default)")
    stage1_budget: int = Field(
        default=400, ge=1, description="evaluations of stage 1 (α), rounded down to whole generations"
    )
    stage2_budget: int = Field(
        default=800, ge=1, description="evaluations of stage 2 (β), rounded down to whole generations"
    )
    stage1_sigma: float = Field(default=0.05, gt=0, description="initial step size of α, in real units")
    stage2_sigma: float = Field(default=0.05, gt=0, description="initial step size of β, in real units")
    stage1_l1: float = Field(default=0.05, ge=0, description="λ of the λ·mean|α| penalty in stage 1")
    stage2_l1: float = Field(default=0.05, ge=0, description="λ of the λ·mean|β| penalty in stage 2")

    @model_validator(mode="after")
    def _budgets_hold_a_generation(self) -> "EvoMergingOptions":
        for name in ("stage1_budget", "stage2_budget"):
            if getattr(self, name) < self.popsize:
                raise ValueError(f"{name} must allow at least one generation of popsize {self.popsize}")
        return self


GENES = ("alpha", "beta")
"""The genes Evo-Merging searches, stage by stage: LoRA-A keep fractions, then signed scales."""


class EvoMerging(Strategy):
    Options = EvoMergingOptions

    @classmethod
    def requires(cls, options: StrategyOptions) -> Requirements:
        return Requirements(genes=GENES)

    def __init__(self, population: str, spec: SearchSpec, seed: int, options: EvoMergingOptions) -> None:
        super().__init__(population, spec, seed, options)
        names = {g.name: g for g in spec.genes}
        if any(gene not in names for gene in GENES):
            raise ValueError(
                "evo_merging searches the genes alpha and beta (merge.method lora_compose with both searched);"
                f" this space has: {', '.join(names) or 'no genes'}"
            )
        self.alpha: GeneRange = names["alpha"]
        self.beta: GeneRange = names["beta"]
        self._base = spec.snap(np.clip(self.x0, 0.0, 1.0))  # the genome outside the stage's genes
        self._stage = 1
        self._run = Generations(self._new_es())
        self._stage1_best: tuple[float, np.ndarray] | None = None  # (objective, α unit coordinates)
        self._stage1_stop: dict[str, Any] = {}

    def _gene(self) -> GeneRange:
        return self.alpha if self._stage == 1 else self.beta

    def _new_es(self) -> Any:
        """The current stage's CMA-ES over its gene's unit coordinates, from ``self._base``, for
        budget // popsize generations (also the base a checkpoint is replayed on)."""
        o: EvoMergingOptions = self.options  # type: ignore[assignment]
        gene = self._gene()
        sigma, budget = (o.stage1_sigma, o.stage1_budget) if self._stage == 1 else (o.stage2_sigma, o.stage2_budget)
        # stage 2 draws from a second stream: it must not replay stage 1's draws
        seed = self.seed if self._stage == 1 else self.seed + 1
        return pycma_es(
            self._base[gene.start : gene.stop],
            sigma / (gene.high - gene.low),
            seed,
            bounds=[0.0, 1.0],
            popsize=o.popsize,
            maxiter=budget // o.popsize,
        )

    def _objective(self, genome: np.ndarray, fitness: float) -> float:
        """What the current stage's CMA-ES minimises: ``−fitness + λ · mean|x|`` on real values."""
        if not math.isfinite(fitness):
            return math.inf
        l1 = self.options.stage1_l1 if self._stage == 1 else self.options.stage2_l1
        return -fitness + l1 * float(np.mean(np.abs(self._gene().real(genome))))

    def _ask(self, n: int) -> list[tuple[np.ndarray, tuple[str, ...], Any]]:
        gene = self._gene()
        out = []
        for index, x in self._run.ask(n):
            genome = self._base.copy()
            genome[gene.start : gene.stop] = x
            out.append((genome, (), index))
        return out

    def _tell(self, candidate: Candidate, tag: Any, fitness: float, evaluation: Evaluation) -> None:
        objective = self._objective(candidate.genome, fitness)
        if self._stage == 1 and math.isfinite(objective):
            if self._stage1_best is None or objective < self._stage1_best[0]:
                self._stage1_best = (objective, candidate.genome[self.alpha.start : self.alpha.stop].copy())
        if self._run.tell(tag, objective) and self._stage == 1:
            reasons = self._run.stop()
            if reasons:
                self._hand_over(reasons)

    def _hand_over(self, stage1_reasons: dict[str, Any]) -> None:
        """Fix α at stage 1's best (its start if every evaluation failed) and start stage 2 on β."""
        if self._stage1_best is not None:
            self._base[self.alpha.start : self.alpha.stop] = self._stage1_best[1]
        self._stage1_stop = stage1_reasons
        self._stage = 2
        self._run = Generations(self._new_es())

    def stop(self) -> dict[str, Any]:
        if self._stage == 1:
            return {}
        reasons = self._run.stop()
        if not reasons:
            return {}
        stage1 = {f"stage1 {k}": v for k, v in self._stage1_stop.items()}
        return {**stage1, **{f"stage2 {k}": v for k, v in reasons.items()}}

    def _state(self) -> Any:
        return {
            "stage": self._stage,
            "run": self._run.state(),
            "base": self._base.copy(),
            "stage1_best": None if self._stage1_best is None else list(self._stage1_best),
            "stage1_stop": dict(self._stage1_stop),
        }

    def _load_state(self, state: Any) -> None:
        self._stage = state["stage"]
        self._base = np.array(state["base"], dtype=np.float64)
        best = state["stage1_best"]
        self._stage1_best = None if best is None else (float(best[0]), np.asarray(best[1], dtype=np.float64))
        self._stage1_stop = dict(state["stage1_stop"])
        self._run = Generations.from_state(state["run"], self._new_es())
