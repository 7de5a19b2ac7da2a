"""Optuna's samplers over a space's unit cube, through Optuna's ask-and-tell interface.

- ``tpe``: Tree-structured Parzen Estimator (Bergstra et al., "Algorithms for Hyper-Parameter Optimization", NeurIPS 2011).
- ``optuna_cmaes``: Hansen's CMA-ES (Hansen and Ostermeier, 2001) as implemented by the ``cmaes`` package (Nomura and Shibata, 2024).
- ``nsga2``: NSGA-II (Deb et al., "A Fast and Elitist Multiobjective Genetic Algorithm", IEEE TEC 2002).

Each gene is a ``FloatDistribution(0, 1)`` named ``x<i>``; a discrete gene (see
:class:`~evomerge.space.genes.GeneRange`) is asked natively as its level: a
``CategoricalDistribution`` for TPE and NSGA-II (unordered choices, e.g. which expert supplies a
layer), an ``IntDistribution`` for CMA-ES (which relaxes and rounds it; it cannot sample
categories), and handed out as its bin's centre. The study lives in memory. A checkpoint
holds no study (it holds locks and sampler internals that change between Optuna releases), but
the log of what was done to it, as data: each ask, each tell with its values, each immigrant
added. Loading replays that log on a fresh study with the same seeded sampler, as Optuna
rebuilds a study from its storage; since samplers are deterministic given their seed and their
trials, a restored strategy proposes exactly what an uninterrupted one would. Optuna trials may
be told in any order. The space's ``x0`` is enqueued as the first trial
so each search starts from the configured init.
"""

from __future__ import annotations

import math
import warnings
from abc import abstractmethod
from typing import Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState
from pydantic import Field, field_validator

from evomerge.records import Candidate, Evaluation
from evomerge.space.genes import SearchSpec
from evomerge.strategies.base import Strategy, StrategyOptions
from evomerge.strategies.pareto import objective_values


class OptunaStrategy(Strategy):
    """One in-memory Optuna study; subclasses choose the sampler and the values told."""

    directions: tuple[str, ...] = ("maximize",)
    categorical: bool = True
    """Discrete genes as Optuna categories (else as integers)."""

    def __init__(self, population: str, spec: SearchSpec, seed: int, options: StrategyOptions) -> None:
        super().__init__(population, spec, seed, options)
        if not spec.bounded:
            raise ValueError(f"{type(self).__name__} searches the unit cube; this space is unbounded")
        # Optuna logs one INFO line per finished trial; the run's store records them already.
        # The verbosity is process-wide: warnings stay visible.
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self._names = [f"x{i}" for i in range(self.dim)]
        levels = {i: g.levels for g in spec.discrete for i in range(g.start, g.stop)}
        self._distributions: dict[str, BaseDistribution] = {
            name: self._distribution(levels.get(i)) for i, name in enumerate(self._names)
        }
        self._log: list[list[Any]] = []  # ["ask"], ["tell", number, values | None], ["add", genome, values]
        self._study = self._new_study()

    def _new_study(self) -> optuna.Study:
        """The study as this strategy starts it: seeded sampler, ``x0`` enqueued first."""
        with warnings.catch_warnings():
            # options that older Optuna releases still flag as experimental (multivariate TPE, ...)
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            sampler = self._sampler(self.seed)
        study = optuna.create_study(sampler=sampler, study_name=self.population, directions=list(self.directions))
        study.enqueue_trial(self._params(self.x0))
        return study

    def _distribution(self, levels: int | None) -> BaseDistribution:
        if levels is None:
            return FloatDistribution(0.0, 1.0)
        return CategoricalDistribution(tuple(range(levels))) if self.categorical else IntDistribution(0, levels - 1)

    def _params(self, genome: np.ndarray) -> dict[str, Any]:
        """A genome as trial parameters: unit coordinates, or the level of a discrete gene."""
        unit = np.clip(np.asarray(genome, dtype=np.float64), 0.0, 1.0)
        params: dict[str, Any] = {name: float(u) for name, u in zip(self._names, unit)}
        for gene in self.spec.discrete:
            for name, level in zip(self._names[gene.start : gene.stop], gene.level(unit)):
                params[name] = int(level)
        return params

    def _genome(self, params: dict[str, Any]) -> np.ndarray:
        """Trial parameters as a genome: a discrete gene's level becomes its bin's centre."""
        genome = np.array([params[name] for name in self._names], dtype=np.float64)
        for gene in self.spec.discrete:
            genome[gene.start : gene.stop] = gene.centre(genome[gene.start : gene.stop])
        return genome

    @abstractmethod
    def _sampler(self, seed: int) -> optuna.samplers.BaseSampler: ...

    def _values(self, fitness: float, evaluation: Evaluation) -> list[float] | None:
        """The objective values to tell, or None when the trial failed."""
        return [fitness] if math.isfinite(fitness) else None

    def _ask(self, n: int) -> list[tuple[np.ndarray, tuple[str, ...], Any]]:
        out = []
        for _ in range(n):
            trial = self._study.ask(self._distributions)
            self._log.append(["ask"])
            out.append((self._genome(trial.params), (), trial.number))
        return out

    def _tell(self, candidate: Candidate, tag: Any, fitness: float, evaluation: Evaluation) -> None:
        values = self._values(fitness, evaluation)
        self._log.append(["tell", int(tag), values])
        self._tell_study(self._study, int(tag), values)

    @staticmethod
    def _tell_study(study: optuna.Study, number: int, values: list[float] | None) -> None:
        if values is None:
            # FAIL rather than an invented worst value: all three samplers build their models
            # from COMPLETE trials only (TPE's good/bad split, CMA-ES's generations, NSGA-II's
            # populations), so a crashed merge neither needs a made-up score nor skews the
            # ranking, spread or crowding distances of the real ones. CMA-ES simply samples
            # more members until its generation has enough completed ones.
            study.tell(number, state=TrialState.FAIL)
        else:
            study.tell(number, values)

    def immigrate(self, genome: np.ndarray, evaluation: Evaluation) -> None:
        fitness = evaluation.fitness if evaluation.usable else -math.inf
        values = self._values(fitness, evaluation)
        if values is None:
            return
        self._log.append(["add", np.asarray(genome, dtype=np.float64).copy(), values])
        self._add(self._study, genome, values)

    def _add(self, study: optuna.Study, genome: np.ndarray, values: list[float]) -> None:
        params = self._params(genome)
        study.add_trial(optuna.trial.create_trial(params=params, distributions=self._distributions, values=values))

    @property
    def study(self) -> optuna.Study:
        """The live study, for inspection (its trials carry every value the sampler received)."""
        return self._study

    def _state(self) -> Any:
        return {"log": [list(event) for event in self._log]}

    def _load_state(self, state: Any) -> None:
        """Replay the saved log on a fresh study: the same trials, asked and told in the same order."""
        study = self._new_study()
        for event in state["log"]:
            if event[0] == "ask":
                study.ask(self._distributions)
            elif event[0] == "tell":
                self._tell_study(study, int(event[1]), None if event[2] is None else [float(v) for v in event[2]])
            elif event[0] == "add":
                self._add(study, np.asarray(event[1], dtype=np.float64), [float(v) for v in event[2]])
            else:
                raise ValueError(f"Optuna state: unknown log entry {event[0]!r}")
        self._study = study
        self._log = [list(event) for event in state["log"]]


class TPEOptions(StrategyOptions):
    n_startup_trials: int = Field(default=10, ge=0, description="random trials (after x0) before TPE models the results")
    multivariate: bool = Field(default=True, description="model the genes jointly rather than one by one")
    constant_liar: bool = Field(
        default=True, description="treat running trials as bad so parallel asks spread out instead of piling up"
    )


class TPE(OptunaStrategy):
    Options = TPEOptions

    def _sampler(self, seed: int) -> optuna.samplers.BaseSampler:
        o: TPEOptions = self.options  # type: ignore[assignment]
        return optuna.samplers.TPESampler(
            n_startup_trials=o.n_startup_trials, multivariate=o.multivariate, constant_liar=o.constant_liar, seed=seed
        )


class OptunaCMAESOptions(StrategyOptions):
    sigma0: float = Field(default=1.0 / 6.0, gt=0, description="initial step size in unit-cube coordinates")
    popsize: int | None = Field(default=None, ge=2, description="default 4 + floor(3 ln d)")
    n_startup_trials: int = Field(
        default=1, ge=0, description="trials before CMA-ES starts; the default 1 is the enqueued x0"
    )


class OptunaCMAES(OptunaStrategy):
    Options = OptunaCMAESOptions
    categorical = False  # CmaEsSampler relaxes integers; categories it would only sample at random

    def _sampler(self, seed: int) -> optuna.samplers.BaseSampler:
        o: OptunaCMAESOptions = self.options  # type: ignore[assignment]
        with warnings.catch_warnings():
            # Optuna 4.9 deprecated x0 and sigma0 (removal planned for 6.0, hence the pin below 6
            # in pyproject.toml); without x0 the mean would start at the centre, not the init.
            warnings.simplefilter("ignore", FutureWarning)
            return optuna.samplers.CmaEsSampler(
                x0=self._params(self.x0),
                sigma0=o.sigma0,
                popsize=o.popsize,
                n_startup_trials=o.n_startup_trials,
                warn_independent_sampling=False,  # trials asked before any completes are sampled independently
                seed=seed,
            )


class NSGA2Options(StrategyOptions):
    objectives: list[str] = Field(
        default=["fitness"],
        min_length=1,
        description='maximised objectives: "fitness" or keys of the evaluation\'s metrics; one objective gives a plain GA',
    )
    population_size: int = Field(default=50, ge=2, description="trials per generation")
    crossover_prob: float = Field(default=0.9, ge=0, le=1, description="probability a child is bred by crossover")
    mutation_prob: float | None = Field(default=None, ge=0, le=1, description="per-gene mutation probability; default 1/d")

    @field_validator("objectives")
    @classmethod
    def _distinct(cls, objectives: list[str]) -> list[str]:
        if len(set(objectives)) != len(objectives):
            raise ValueError("objectives must be distinct")
        return objectives


class NSGA2(OptunaStrategy):
    Options = NSGA2Options

    def __init__(self, population: str, spec: SearchSpec, seed: int, options: NSGA2Options) -> None:
        self.directions = ("maximize",) * len(options.objectives)
        super().__init__(population, spec, seed, options)

    def _sampler(self, seed: int) -> optuna.samplers.BaseSampler:
        o: NSGA2Options = self.options  # type: ignore[assignment]
        return optuna.samplers.NSGAIISampler(
            population_size=o.population_size, crossover_prob=o.crossover_prob, mutation_prob=o.mutation_prob, seed=seed
        )

    def _values(self, fitness: float, evaluation: Evaluation) -> list[float] | None:
        """A missing or non-finite objective fails the trial, as a NaN fitness does."""
        return objective_values(self.options.objectives, fitness, evaluation.metrics)  # type: ignore[attr-defined]
