"""The white-box worker: holds the base and the experts on its device, merges in place, scores.

It loads every model once. The base (or the first expert when the run has none) becomes the one
working model; experts are read one at a time into the resident stacks, so memory is the working
model plus the resident inputs. A candidate is applied to the working model's parameters in
place, scored by the fitness function, and never written to disk.
"""

from __future__ import annotations

import gc
import math
import os
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from evomerge.records import Candidate, Evaluation
from evomerge.config import RunConfig
from evomerge.errors import ModelLoadError, PluginError, UserError
from evomerge.fitness import per_example_scores, resolve_fitness, with_options
from evomerge.fitness.data import load_examples
from evomerge.merge import get_merge_method
from evomerge.merge.materializer import Materializer
from evomerge.models.adapters import (
    ADAPTER_CONFIG,
    adapter_factors,
    attach_working_adapter,
    is_adapter,
    lora_config,
    lora_parameters,
    lora_scaling,
    merged_adapter_state,
)
from evomerge.models.loading import load_model, load_tokenizer, resolve_device
from evomerge.space import Recipe, Space
from evomerge.strategies.seed_recipes import SeedRecipe
from evomerge.workers.extra_metrics import ExtraMetrics

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModels:
    """The working model (merges are written into its parameters) and its tokenizer."""

    model: torch.nn.Module
    tokenizer: object | None
    materializer: Materializer
    tensor_names: list[str]


def load_resident_models(config: RunConfig, device: torch.device) -> LoadedModels:
    """Load the working model and every expert once; experts may be full models or LoRA adapters."""
    dtype = DTYPES[config.models.dtype]
    refs = [config.model_ref(e.path) for e in config.models.experts]
    labels = [f"expert '{label}'" for label in config.models.expert_labels()]
    adapters = [is_adapter(ref) for ref in refs]
    if any(adapters) and config.models.base is None:
        raise ModelLoadError("models.base: LoRA adapters are merged onto their base model; name it in models.base")
    if config.merge.method == "lora_compose":
        return _load_adapter_slots(config, refs, labels, adapters, device, dtype)
    working_ref = config.working_model_ref()
    model = load_model(working_ref, device, dtype)
    tokenizer = load_tokenizer(working_ref)
    targets = {name: p.data for name, p in model.named_parameters()}
    base_state = targets if config.models.base else None  # the materializer clones the base first

    def expert_states():
        for label, ref, adapter in zip(labels, refs, adapters):
            if adapter:  # base + scaling · B A, a dense expert like a full fine-tune
                yield label, merged_adapter_state(load_model(working_ref, device, dtype), ref)
            else:
                expert = load_model(ref, device, dtype)
                yield label, {n: p.data for n, p in expert.named_parameters()}
                del expert
            gc.collect()

    materializer = Materializer.from_state_dicts(targets, expert_states(), len(refs), base=base_state)
    return LoadedModels(model, tokenizer, materializer, list(targets))


def _load_adapter_slots(
    config: RunConfig, refs: list[str], labels: list[str], adapters: list[bool], device: torch.device, dtype: torch.dtype
) -> LoadedModels:
    """For ``lora_compose``: the base with one resident adapter whose factors candidates overwrite."""
    for label, adapter in zip(labels, adapters):
        if not adapter:
            raise ModelLoadError(f"{label} is not a LoRA adapter directory (no {ADAPTER_CONFIG}); lora_compose merges adapters")
    base_ref = config.working_model_ref()
    model = attach_working_adapter(load_model(base_ref, device, dtype), refs[0])
    targets = lora_parameters(model)  # in the base's dtype: the adapter is attached without upcasting
    scaling = lora_scaling(lora_config(refs[0]))
    states = ((label, adapter_factors(ref, device, dtype, scaling)) for label, ref in zip(labels, refs))
    materializer = Materializer.from_state_dicts(targets, states, len(refs), base=None)
    return LoadedModels(model, load_tokenizer(base_ref), materializer, list(targets))


class WhiteBoxWorker:
    """Scores candidates of one run in this process (the inline executor, or inside a Ray actor)."""

    def __init__(self, config: RunConfig, worker_id: str | None = None) -> None:
        self.config = config
        self.worker_id = worker_id or f"local-{os.getpid()}"
        self.device = resolve_device(config.models.device)
        self.models = load_resident_models(config, self.device)
        self.space: Space = config.merge.build_space(self.models.tensor_names, len(config.models.experts))
        if self.space.method.needs_fisher:  # estimated once, kept for the whole run
            from evomerge.merge.fisher import FISHER_FLOOR
            from evomerge.workers.fisher_estimate import expert_fishers

            fishers = expert_fishers(config, self.device, self.models.tensor_names)
            self.models.materializer.set_fishers(fishers, FISHER_FLOOR)
        self.fitness_name = config.fitness.name
        self.fitness_fn = with_options(resolve_fitness(config.fitness.name), config.fitness.name, config.fitness.options)
        self.examples = self._examples(config.fitness.data)
        self._seed_recipe_grids = {
            p.name: grid for p in config.populations if (grid := p.seed_recipe_grid()) is not None
        }
        self._block_edges: dict[str, np.ndarray] = {}
        self.extra_metrics = ExtraMetrics(self)  # per-task scores, AdaMerging's gradient

    def _examples(self, data):
        return load_examples(
            data.source, data.split, data.classes, data.limit, self.config.base_dir,
            template=data.template, target=data.target, choices=data.choices, label=data.label,
        )

    def block_grams(self, grid: str) -> tuple[np.ndarray, np.ndarray]:
        """The experts' per-block Gram matrices on a split grid, for M2N2's seed-recipe archive."""
        return self.models.materializer.block_grams(grid)

    def materialize(self, genome: np.ndarray, population: str | None = None) -> dict:
        """Write a candidate into the working model; returns the recipe as a plain document.

        Genomes of a seed-recipe population are piecewise combinations of the experts; all
        others decode through the run's merge space.
        """
        grid = self._seed_recipe_grids.get(population or "")
        if grid is None:
            recipe: Recipe = self.space.decode(genome)
            self.models.materializer.apply(recipe)
            return recipe.to_dict()
        if grid not in self._block_edges:
            self._block_edges[grid] = self.models.materializer.block_edges(grid)
        seed_recipe = SeedRecipe.decode(genome)
        edges = self._block_edges[grid][seed_recipe.edges]
        self.models.materializer.apply_pieces(edges, seed_recipe.coeffs)
        labels = self.config.models.expert_labels()
        return {
            "method": "seed_recipe",
            "pieces": [
                {"start": int(lo), "end": int(hi), "weights": dict(zip(labels, map(float, row)))}
                for lo, hi, row in zip(edges[:-1], edges[1:], seed_recipe.coeffs)
            ],
        }

    def score(self, examples) -> np.ndarray:
        raw = self.fitness_fn(self.models.model, self.models.tokenizer, examples)
        n = len(next(iter(examples.values()))) if isinstance(examples, dict) else len(examples)
        return per_example_scores(raw, n, self.fitness_name)

    def evaluate(self, candidate: Candidate) -> Evaluation:
        ev = self._evaluate(candidate.id, candidate.genome, candidate.population)
        ev.population = candidate.population
        return ev

    def run(self, job: Callable[[Any], Any]) -> Any:
        """One-off work on this worker (``evomerge.workers.jobs``), for ``executor.run_once``."""
        return job(self)

    def _evaluate(self, candidate_id: str, genome: np.ndarray, population: str | None = None) -> Evaluation:
        """Merge and score one candidate; failures become a failed evaluation, never an exception.

        User-fixable plugin errors (wrong return shape) are re-raised: every candidate would fail
        the same way, so the run should stop with the message.
        """
        started = time.time()
        t0 = time.perf_counter()
        try:
            self.materialize(genome, population)
            t1 = time.perf_counter()
            scores = self.score(self.examples)
            extra = self.extra_metrics(genome, population)
        except PluginError:
            raise
        except Exception as exc:  # a candidate's failure must not end the run
            reason = f"{type(exc).__name__}: {exc}".strip()
            tb = traceback.format_exc(limit=3)
            ev = Evaluation.failure(candidate_id, reason, self.worker_id, started, time.perf_counter() - t0)
            ev.metrics["traceback"] = tb
            return ev
        duration = time.perf_counter() - t0
        fitness = float(np.mean(scores)) if len(scores) else math.nan
        if not math.isfinite(fitness):
            return Evaluation.failure(candidate_id, "fitness is NaN or infinite", self.worker_id, started, duration)
        return Evaluation(
            candidate_id=candidate_id,
            status="ok",
            fitness=fitness,
            per_example=scores,
            metrics={"merge_seconds": t1 - t0, "score_seconds": duration - (t1 - t0), **extra},
            worker=self.worker_id,
            started=started,
            duration=duration,
        )

    def expert_baselines(self) -> list[Evaluation]:
        """Each expert alone, scored on the fitness data (``candidate_id`` is the expert's label).

        An expert is the linear merge with all weight on it, so it is applied like any candidate;
        a failure is a failed evaluation, as in :meth:`evaluate`.
        """
        n = len(self.config.models.experts)
        alone = Space.build(get_merge_method("linear"), self.models.tensor_names, n, "per_model")
        baselines = []
        for i, label in enumerate(self.config.models.expert_labels()):
            started, t0 = time.time(), time.perf_counter()
            try:
                self.models.materializer.apply(alone.decode(alone.encode({"weight": np.eye(n)[i]})))
                scores = self.score(self.examples)
            except PluginError:
                raise
            except Exception as exc:
                reason = f"{type(exc).__name__}: {exc}".strip()
                baselines.append(Evaluation.failure(label, reason, self.worker_id, started, time.perf_counter() - t0))
                continue
            fitness = float(np.mean(scores)) if len(scores) else math.nan
            status = "ok" if math.isfinite(fitness) else "failed"
            baselines.append(
                Evaluation(label, status, fitness if status == "ok" else -math.inf, scores, {}, self.worker_id, started,
                           time.perf_counter() - t0, None if status == "ok" else "fitness is NaN or infinite")
            )
        return baselines

    def close(self) -> None:
        """Drop the resident models, so a long-lived process (a notebook, a test session) gets its
        memory back when the run ends."""
        del self.models
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def test_accuracy(self, genome: np.ndarray | None = None, population: str | None = None) -> float:
        """Mean score on ``fitness.test_data`` for a genome (None: the model as it is now)."""
        if self.config.fitness.test_data is None:
            raise UserError("fitness.test_data is not set in the config")
        if genome is not None:
            self.materialize(genome, population)
        return float(np.mean(self.score(self._examples(self.config.fitness.test_data))))
