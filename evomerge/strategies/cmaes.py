"""CMA-ES over a space's unit cube, through pycma.

Hansen's CMA-ES as used for merge recipes by Akiba et al. ("Evolutionary Optimization of Model
Merging Recipes", 2024) and mergekit-evolve: bounds [0, 1] from the space, σ0 = 1/6 of the range,
population 4 + ⌊3 ln d⌋. Weight-space genomes (``SearchSpec.weights``) are unbounded. Above 100
dimensions the covariance is diagonal by default (separable CMA, Ros and Hansen 2008): a full
d × d matrix costs O(d²) memory and O(d³) eigendecompositions, and needs on the order of d²
evaluations to learn anyway. pycma is generational, so ``ask`` hands out one generation and
returns nothing more until every member has been told; results may arrive in any order. pycma
draws from numpy's global RNG by default; each strategy gets its own ``RandomState`` so
populations in one process never disturb each other.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from typing import Any, Literal, Sequence

import numpy as np
from pydantic import Field

from evomerge.records import Candidate, Evaluation
from evomerge.strategies.base import SearchSpec, Strategy, StrategyOptions

SEPARABLE_ABOVE = 100  # dimensions above which separable="auto" turns diagonal covariance on


def _import_cma():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pycma warns when matplotlib is missing
        import cma
    return cma


def pycma_es(x0: np.ndarray, sigma0: float, seed: int, **options: Any) -> Any:
    """A quiet ``cma.CMAEvolutionStrategy`` drawing from its own ``RandomState(seed)``.

    pycma reseeds numpy's global RNG when it starts; the global state is put back, so building a
    strategy never changes anyone else's draws.
    """
    cma = _import_cma()
    opts: dict[str, Any] = {
        "randn": np.random.RandomState(seed).randn,
        "verbose": -9,
        "verb_log": 0,
        "verb_disp": 0,
        "seed": seed + 1,
        # Merge fitness is often discrete (accuracy over N examples): a generation of equal scores
        # is common on a plateau and no reason to stop; pycma's default gives up after one.
        "tolflatfitness": 20,
        **options,
    }
    global_state = np.random.get_state()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return cma.CMAEvolutionStrategy(np.asarray(x0, dtype=np.float64).tolist(), sigma0, opts)
    finally:
        np.random.set_state(global_state)


class Generations:
    """A pycma ES handed out one generation at a time, its members' losses told back in any order.

    A member with a non-finite loss (failed or NaN evaluation) counts as the generation's worst
    finite loss + 1: pycma cannot rank infinities, and this keeps failures last without
    distorting the spread of the rest.

    Every call made on the ES (ask, tell, inject) is logged as data. A checkpoint holds that log,
    not the ES: :meth:`from_state` replays it on a freshly built ES, which is then exactly the
    one that was saved (pycma is deterministic given its seed and what it was told). The log keeps
    each generation's losses and a digest of its members, not the members: the replayed ES asks
    them again, and the digest checks they are the ones recorded. So a checkpoint grows by one
    float per evaluation, whatever the dimension.
    """

    def __init__(self, es: Any) -> None:
        self.es = es
        self.members: list[np.ndarray] = []
        self.issued = 0
        self.losses: dict[int, float] = {}
        self.immigrants: list[np.ndarray] = []  # injected once the current generation is told
        self.log: list[list[Any]] = []  # ["ask", digest of the members], ["tell", losses], ["inject", xs]

    def ask(self, n: int) -> list[tuple[int, np.ndarray]]:
        """Up to ``n`` untold members ``(index, x)`` of the current generation; a new one only
        once the last was told in full and pycma has not stopped."""
        if not self.members:
            if self.es.stop():
                return []
            self.members = [np.asarray(x, dtype=np.float64) for x in self.es.ask()]
            self.log.append(["ask", _digest(self.members)])
            self.issued = 0
            self.losses = {}
        take = min(n, len(self.members) - self.issued)
        out = [(self.issued + i, self.members[self.issued + i]) for i in range(take)]
        self.issued += take
        return out

    def tell(self, index: int, loss: float) -> bool:
        """Record member ``index``'s loss; True when that completed the generation (pycma was told)."""
        self.losses[index] = loss
        if len(self.losses) < len(self.members):
            return False
        finite = [v for v in self.losses.values() if math.isfinite(v)]
        worst = (max(finite) + 1.0) if finite else 0.0
        losses = [self.losses[i] if math.isfinite(self.losses[i]) else worst for i in range(len(self.members))]
        self._tell_es(self.members, losses)
        self.log.append(["tell", np.array(losses, dtype=np.float64)])
        self.members = []
        self.issued = 0
        self.losses = {}
        self._inject_waiting()
        return True

    def inject(self, x: np.ndarray) -> None:
        """Make ``x`` a member of the next generation (pycma takes injections only between generations)."""
        self.immigrants.append(np.asarray(x, dtype=np.float64))
        if not self.members:
            self._inject_waiting()

    def _inject_waiting(self) -> None:
        if self.immigrants:
            self._inject_es(self.immigrants)
            self.log.append(["inject", np.array(self.immigrants)])
            self.immigrants = []

    def _tell_es(self, members: Sequence[np.ndarray], losses: Sequence[float]) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.es.tell([np.asarray(x).tolist() for x in members], [float(v) for v in losses])

    def _inject_es(self, xs: Sequence[np.ndarray]) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.es.inject([np.asarray(x).tolist() for x in xs], force=True)

    def stop(self) -> dict[str, Any]:
        """pycma's termination reasons, only between generations (a started one is finished first)."""
        if self.members:
            return {}
        return {str(k): v for k, v in self.es.stop().items()}

    def state(self) -> dict[str, Any]:
        return {
            "log": [list(event) for event in self.log],
            "issued": self.issued,
            "losses": [[i, v] for i, v in self.losses.items()],
            "immigrants": list(self.immigrants),
        }

    @classmethod
    def from_state(cls, state: dict[str, Any], es: Any) -> "Generations":
        """The saved run, rebuilt on ``es``: a fresh ES made exactly as the saved one was first made."""
        run = cls(es)
        members: list[np.ndarray] = []
        for kind, data in state["log"]:
            if kind == "ask":
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    members = [np.asarray(x, dtype=np.float64) for x in es.ask()]
                if _digest(members) != data:
                    raise ValueError("CMA-ES state: the rebuilt ES asked another generation than the one recorded")
            elif kind == "tell":
                run._tell_es(members, data)
                members = []
            elif kind == "inject":
                run._inject_es(list(np.asarray(data, dtype=np.float64)))
            else:
                raise ValueError(f"CMA-ES state: unknown log entry {kind!r}")
        run.log = [list(event) for event in state["log"]]
        run.members = members
        run.issued = int(state["issued"])
        run.losses = {int(i): float(v) for i, v in state["losses"]}
        run.immigrants = [np.asarray(x, dtype=np.float64) for x in state["immigrants"]]
        return run


def _digest(members: Sequence[np.ndarray]) -> str:
    """A short fingerprint of a generation's members, to check a replay asked the same ones."""
    return hashlib.sha256(np.ascontiguousarray(np.array(members, dtype=np.float64)).tobytes()).hexdigest()[:16]


class CMAESOptions(StrategyOptions):
    sigma0: float = Field(default=1.0 / 6.0, gt=0, description="initial step size in unit-cube coordinates")
    popsize: int | None = Field(default=None, ge=2, description="default 4 + floor(3 ln d)")
    separable: bool | Literal["auto"] = Field(
        default="auto",
        description=f"diagonal covariance (separable CMA); auto: on above {SEPARABLE_ABOVE} dimensions",
    )


class CMAES(Strategy):
    Options = CMAESOptions

    def __init__(self, population: str, spec: SearchSpec, seed: int, options: CMAESOptions) -> None:
        super().__init__(population, spec, seed, options)
        if spec.dim < 1:
            raise ValueError("CMA-ES needs at least one searched gene")
        self._run = Generations(self._new_es())

    def _new_es(self) -> Any:
        """The ES as this strategy starts it (also the base a checkpoint is replayed on)."""
        spec, options, dim = self.spec, self.options, self.spec.dim
        separable = dim > SEPARABLE_ABOVE if options.separable == "auto" else options.separable
        x0 = np.clip(self.x0, 0.0, 1.0) if spec.bounded else self.x0
        extra: dict[str, Any] = {}
        if spec.discrete:
            # Discrete genes are searched relaxed and handed out as their bin's centre
            # (SearchSpec.snap); a floor on their step size of a quarter bin keeps the search
            # trying neighbouring levels instead of collapsing inside one bin.
            minstd = np.zeros(dim)
            for gene in spec.discrete:
                minstd[gene.start : gene.stop] = 0.25 / gene.levels  # type: ignore[operator]
            extra["minstd"] = minstd.tolist()
        return pycma_es(
            x0,
            options.sigma0,
            self.seed,
            bounds=[0.0, 1.0] if spec.bounded else [None, None],
            popsize=options.popsize or 4 + int(3 * math.log(dim)),
            CMA_diagonal=separable,
            **extra,
        )

    def _ask(self, n: int) -> list[tuple[np.ndarray, tuple[str, ...], Any]]:
        return [(self.spec.snap(x), (), index) for index, x in self._run.ask(n)]  # pycma keeps x itself

    def _tell(self, candidate: Candidate, tag: Any, fitness: float, evaluation: Evaluation) -> None:
        self._run.tell(tag, -fitness)  # pycma minimises; the tag is the generation member

    def immigrate(self, genome: np.ndarray, evaluation: Evaluation) -> None:
        self._run.inject(np.clip(genome, 0.0, 1.0) if self.spec.bounded else genome)

    def stop(self) -> dict[str, Any]:
        return self._run.stop()

    def _state(self) -> Any:
        return self._run.state()

    def _load_state(self, state: Any) -> None:
        self._run = Generations.from_state(state, self._new_es())
