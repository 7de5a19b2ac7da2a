"""Ask/tell optimizers, one per population; a config names one by registry key."""

from __future__ import annotations

from typing import Any, Mapping

from pydantic import ValidationError

from evomerge.strategies.adamerging import AdaMerging
from evomerge.space.genes import SearchSpec
from evomerge.strategies.base import Strategy, StrategyOptions
from evomerge.strategies.cmaes import CMAES
from evomerge.strategies.evo_merging import EvoMerging
from evomerge.strategies.m2n2 import GA, M2N2
from evomerge.strategies.map import MAP
from evomerge.strategies.optuna_samplers import NSGA2, TPE, OptunaCMAES
from evomerge.strategies.random_search import RandomSearch

STRATEGIES: dict[str, type[Strategy]] = {
    "adamerging": AdaMerging,
    "cmaes": CMAES,
    "evo_merging": EvoMerging,
    "ga": GA,
    "m2n2": M2N2,
    "map": MAP,
    "nsga2": NSGA2,
    "optuna_cmaes": OptunaCMAES,
    "random": RandomSearch,
    "tpe": TPE,
}


def make_strategy(name: str, population: str, spec: SearchSpec, seed: int, options: Mapping[str, Any]) -> Strategy:
    """Instantiate a registered strategy; bad options raise ValueError naming the option."""
    cls = STRATEGIES[name]
    try:
        parsed = cls.Options.model_validate(dict(options))
    except ValidationError as err:
        first = err.errors()[0]
        where = "".join(f".{x}" for x in first["loc"])
        msg = "unknown option" if first["type"] == "extra_forbidden" else first["msg"]
        raise ValueError(f"options{where}: {msg}") from None
    return cls(population, spec, seed, parsed)


__all__ = ["STRATEGIES", "Strategy", "StrategyOptions", "make_strategy"]
