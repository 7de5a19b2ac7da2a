"""lm-evaluation-harness tasks as fitness: ``fitness: {name: lm_eval, options: {tasks: [...]}}``.

The tasks are built once per worker process (:func:`harness_tasks`, cached per options) and every
candidate is scored on the resident model wrapped as lm-eval's ``HFLM``: no reload, no save. The
examples are the tasks' documents, one :class:`Document` per document, leaf tasks in alphabetical
order of their names and each task's documents in lm-eval's ``doc_id`` order; a candidate's
per-example scores are the per-document values of one metric from lm-eval's logged samples (so M2N2
competes per document). A task's metric is ``metrics[task]`` (``"acc_norm"``, or
``"exact_match,first_number"`` to name a filter), by default its first metric under its first filter.

Scores must not depend on what was scored before: lm-eval's request cache (``use_cache``,
``cache_requests``) is keyed by request, not by weights, so it is never used; the few-shot sampler
is reseeded before every evaluation (lm-eval's default seed, as its CLI uses) because each
evaluation draws from it; bootstrap resampling for standard errors is off (``bootstrap_iters=0``).

Black-box runs score the same tasks through the API client (:func:`lm_eval_served`): each
log-likelihood and generation request is sent the way lm-eval's ``local-completions`` model sends
it, to the candidate as the service serves it.

lm-eval is an optional extra, imported when the tasks are first built.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from evomerge.errors import ConfigError, first_line
from evomerge.fitness.lm import _inference

if TYPE_CHECKING:
    import torch

    from evomerge.fitness.blackbox import ServedModel

FEWSHOT_SEED = 1234
"""lm-eval's default ``fewshot_random_seed`` (``DEFAULT_OTHER_SEED``), so scores match its CLI's."""

MISSING_EXTRA = "fitness 'lm_eval' needs the lm-eval package: pip install 'evomerge[lmeval]'"


@dataclass(frozen=True)
class Document:
    """One document of one lm-eval task: an example of the lm_eval fitness."""

    task: str
    doc_id: int


class HarnessTasks:
    """lm-eval tasks loaded once, with the metric each task is scored by and its documents in order."""

    def __init__(
        self, tasks: Sequence[str], include_path: str | None, num_fewshot: int | None, metrics: dict[str, str]
    ) -> None:
        try:
            from lm_eval.tasks import TaskManager
        except ImportError:
            raise ConfigError(MISSING_EXTRA) from None
        logging.getLogger("lm_eval").setLevel(logging.WARNING)
        # HFLM warns on every wrap of an already-built model, i.e. once per candidate here.
        logging.getLogger("lm_eval.models.huggingface").setLevel(logging.ERROR)
        manager = self._manager(TaskManager, list(tasks), include_path)
        try:
            loaded = manager.load(list(tasks))
        except Exception as exc:  # a broken YAML, a dataset that cannot be read offline
            raise ConfigError(f"fitness.options.tasks: lm-eval cannot load {list(tasks)}: {first_line(exc)}") from None
        self.tasks: dict[str, Any] = dict(sorted(loaded["tasks"].items()))
        for task in self.tasks.values():
            if num_fewshot is not None and task.get_config("num_fewshot") != 0:
                task.set_config(key="num_fewshot", value=num_fewshot)
            elif task.get_config("num_fewshot") is None:
                task.set_config(key="num_fewshot", value=0)
        unknown = sorted(set(metrics) - set(self.tasks))
        if unknown:
            raise ConfigError(f"fitness.options.metrics: '{unknown[0]}' is not one of the tasks ({', '.join(self.tasks)})")
        self.metric = {name: self._metric(name, task, metrics.get(name)) for name, task in self.tasks.items()}
        self.documents = [Document(name, i) for name, task in self.tasks.items() for i in range(len(task.eval_docs))]

    @staticmethod
    def _manager(task_manager: type, tasks: list[str], include_path: str | None) -> Any:
        """Index only ``include_path`` when it holds every task (lm-eval's own tree takes seconds)."""
        if include_path is not None:
            local = task_manager(include_path=include_path, include_defaults=False)
            if all(local.match_tasks([t]) for t in tasks):
                return local
        manager = task_manager(include_path=include_path)
        missing = [t for t in tasks if not manager.match_tasks([t])]
        if missing:
            where = f" in {include_path} or" if include_path else ""
            raise ConfigError(f"fitness.options.tasks: no lm-eval task or group '{missing[0]}'{where} among lm-eval's own tasks")
        return manager

    @staticmethod
    def _metric(name: str, task: Any, chosen: str | None) -> tuple[str, str]:
        """(metric, filter) of a task: ``chosen`` as ``metric`` or ``metric,filter``, or the first of each."""
        filters = [f.name for f in getattr(task, "_filters", [])] or ["none"]
        available = [m["metric"] for m in task.config.metric_list or []] or list(task._metric_fn_list)
        metric, _, filter_name = (chosen or available[0]).partition(",")
        if metric not in available:
            raise ConfigError(f"fitness.options.metrics: task '{name}' has no metric '{metric}' (it has {', '.join(available)})")
        filter_name = filter_name or filters[0]
        if filter_name not in filters:
            raise ConfigError(f"fitness.options.metrics: task '{name}' has no filter '{filter_name}' (it has {', '.join(filters)})")
        return metric, filter_name

    def score(self, lm: Any, documents: Sequence[Document]) -> np.ndarray:
        """Per-document metric values of ``documents`` for the lm-eval model ``lm`` as it is now."""
        from lm_eval.evaluator import evaluate

        wanted: dict[str, list[int]] = {}
        for doc in documents:
            wanted.setdefault(doc.task, []).append(doc.doc_id)
        # Ascending, whatever order the caller's subset is in (racing draws a seeded permutation):
        # lm-eval visits a subset in dataset order and labels the k-th visited document samples[k].
        wanted = {task: sorted(ids) for task, ids in wanted.items()}
        task_dict = {"tasks": {n: t for n, t in self.tasks.items() if n in wanted}, "groups": {}, "group_map": {}}
        for task in task_dict["tasks"].values():
            task.set_fewshot_seed(seed=FEWSHOT_SEED)
        results = evaluate(lm, task_dict, samples=wanted, log_samples=True, bootstrap_iters=0)
        values: dict[tuple[str, int], float] = {}
        for name, samples in results["samples"].items():
            metric, filter_name = self.metric[name]
            for sample in samples:
                if sample["filter"] == filter_name:
                    values[(name, sample["doc_id"])] = _number(name, metric, sample[metric])
        return np.array([values[(d.task, d.doc_id)] for d in documents], dtype=np.float64)


def _number(task: str, metric: str, value: Any) -> float:
    """A per-document value as a float; metrics aggregated across documents (perplexity) have none."""
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(
            f"fitness.options.metrics: metric '{metric}' of task '{task}' has no per-document value"
            f" ({type(value).__name__}); name one such as acc or exact_match"
        ) from None


@functools.lru_cache(maxsize=None)
def _cached_tasks(tasks: tuple[str, ...], include_path: str | None, num_fewshot: int | None, metrics: tuple) -> HarnessTasks:
    return HarnessTasks(tasks, include_path, num_fewshot, dict(metrics))


def harness_tasks(
    tasks: Sequence[str], include_path: str | None = None, num_fewshot: int | None = None, metrics: dict[str, str] | None = None
) -> HarnessTasks:
    """The tasks for these options, built on first use in this process and reused for every candidate."""
    if isinstance(tasks, str) or not isinstance(tasks, Sequence) or not tasks or not all(isinstance(t, str) for t in tasks):
        raise ConfigError("fitness.options.tasks: list the lm-eval task names, e.g. [arc_easy] or local YAML tasks")
    return _cached_tasks(tuple(tasks), include_path, num_fewshot, tuple(sorted((metrics or {}).items())))


def lm_eval_documents(
    *, tasks: Sequence[str], include_path: str | None = None, num_fewshot: int | None = None,
    metrics: dict[str, str] | None = None, batch_size: int = 16,
) -> list[Document]:
    """The examples of the lm_eval fitness: every document of its tasks, in the order scores come."""
    return harness_tasks(tasks, include_path, num_fewshot, metrics).documents


def lm_eval_fitness(
    model: torch.nn.Module, tokenizer: Any, examples: Sequence[Document], *, tasks: Sequence[str],
    include_path: str | None = None, num_fewshot: int | None = None, metrics: dict[str, str] | None = None,
    batch_size: int = 16,
) -> np.ndarray:
    """Per-document scores of lm-eval ``tasks`` (local YAML tasks under ``include_path`` or lm-eval's own)."""
    harness = harness_tasks(tasks, include_path, num_fewshot, metrics)
    from lm_eval.models.huggingface import HFLM

    with _inference(model) as device:  # HFLM switches the model to eval mode; its own mode comes back after
        return harness.score(HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(device)), examples)


async def lm_eval_served(
    model: ServedModel, examples: Sequence[Document], *, tasks: Sequence[str], include_path: str | None = None,
    num_fewshot: int | None = None, metrics: dict[str, str] | None = None,
) -> np.ndarray:
    """The black-box ``lm_eval``: the same tasks and scores, each request sent through the API client.

    lm-eval's evaluation is synchronous, so it runs in a thread; its requests come back to this
    event loop, where the served model answers them concurrently (and from the run's response
    cache, keyed by the candidate's merge); ``api.concurrency`` bounds those in flight.
    """
    from evomerge.fitness.harness_served import ServedLM

    harness = harness_tasks(tasks, include_path, num_fewshot, metrics)
    lm = ServedLM(model, asyncio.get_running_loop())
    return await asyncio.to_thread(harness.score, lm, examples)
