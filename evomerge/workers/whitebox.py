"""The white-box worker: holds the base and the experts on its device, merges in place, scores.

It loads every model once. The base (or the first expert when the run has none) becomes the one
working model; experts are read one at a time into the resident stacks, so memory is the working
model plus the resident inputs. A candidate is applied to the working model's parameters in
place, scored by the fitness function, and never written to disk.
"""

from __future__ import annotations

import gc
import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from evomerge.errors import ModelLoadError, UserError
from evomerge.fitness import brings_own_examples, own_examples, per_example_scores, resolve_fitness, with_options
from evomerge.fitness.data import load_examples
from evomerge.fitness.racing import count
from evomerge.merge.declarations import LINEAR
from evomerge.merge.method import LORA_FACTORS
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
from evomerge.models.checkpoint import run_dtype
from evomerge.models.loading import load_model, load_tokenizer, resolve_device
from evomerge.models.vocab import VocabularyAlignment, align_working_model, vocabulary_alignment
from evomerge.plan import RunPlan
from evomerge.records import Candidate, Evaluation
from evomerge.space.merge_space import Space
from evomerge.workers.base import Scored, Worker, racing_of
from evomerge.workers.extra_metrics import ExtraMetrics
from evomerge.workers.materializer import Materializer
from evomerge.workers.path_model import PathMaterializer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModels:
    """The working model (merges are written into its parameters) and its tokenizer."""

    model: torch.nn.Module
    tokenizer: object | None
    materializer: Materializer | PathMaterializer
    tensor_names: list[str]
    vocabulary: VocabularyAlignment | None = None
    """How the experts' vocabularies were aligned to the working model's, when they differ."""


def load_resident_models(plan: RunPlan, device: torch.device) -> LoadedModels:
    """Load the working model and every expert once; experts may be full models or LoRA adapters."""
    config = plan.config
    dtype = DTYPES[run_dtype(config)]
    refs = [config.model_ref(e.path) for e in config.models.experts]
    labels = [f"expert '{label}'" for label in config.models.expert_labels()]
    adapters = [is_adapter(ref) for ref in refs]
    if any(adapters) and config.models.base is None:
        raise ModelLoadError("models.base: LoRA adapters are merged onto their base model; name it in models.base")
    if plan.dataflow:
        return _load_path_sources(refs, device, dtype)
    if plan.method.inputs == LORA_FACTORS:
        return _load_adapter_slots(plan, refs, labels, adapters, device, dtype)
    working_ref = plan.working_model
    model = load_model(working_ref, device, dtype)
    tokenizer = load_tokenizer(working_ref)
    has_base = config.models.base is not None
    vocab = vocabulary_alignment(
        model,
        tokenizer,
        list(zip(labels, refs, adapters)),
        has_base,
        base_merged=plan.method.needs_base,
        union=config.models.vocabulary == "union",
    )
    if vocab is not None:
        align_working_model(model, vocab, record=has_base)
        vocab.extend_tokenizer(tokenizer)
    targets = {name: p.data for name, p in model.named_parameters()}
    base_state = targets if has_base else None  # the materializer clones the base first

    def expert_states():
        for row, (label, ref, adapter) in enumerate(zip(labels, refs, adapters)):
            if adapter:  # base + scaling · B A, a dense expert like a full fine-tune
                state = merged_adapter_state(load_model(working_ref, device, dtype), ref)
            else:
                expert = load_model(ref, device, dtype)
                state = {n: p.data for n, p in expert.named_parameters()}
                del expert
            yield label, state if vocab is None else vocab.align(row + has_base, state)
            del state
            gc.collect()

    materializer = Materializer.from_state_dicts(targets, expert_states(), len(refs), base=base_state)
    if vocab is not None:
        vocab.fill_(materializer.tensors)
    return LoadedModels(model, tokenizer, materializer, list(targets), vocab)


def _load_path_sources(refs: list[str], device: torch.device, dtype: torch.dtype) -> LoadedModels:
    """For the data-flow space: the first source is the working model; the others lend their
    decoder layers, resident beside it (their embeddings and heads are dropped)."""
    working = load_model(refs[0], device, dtype)
    others = [load_model(ref, device, dtype) for ref in refs[1:]]
    materializer = PathMaterializer.from_models(working, others)
    del others
    gc.collect()
    return LoadedModels(working, load_tokenizer(refs[0]), materializer, [])


def _load_adapter_slots(
    plan: RunPlan, refs: list[str], labels: list[str], adapters: list[bool], device: torch.device, dtype: torch.dtype
) -> LoadedModels:
    """For a method over LoRA factors: the base with one resident adapter whose factors candidates overwrite."""
    for label, adapter in zip(labels, adapters):
        if not adapter:
            raise ModelLoadError(
                f"{label} is not a LoRA adapter directory (no {ADAPTER_CONFIG}); {plan.method.name} merges adapters"
            )
    base_ref = plan.working_model
    model = attach_working_adapter(load_model(base_ref, device, dtype), refs[0])
    targets = lora_parameters(model)  # in the base's dtype: the adapter is attached without upcasting
    scaling = lora_scaling(lora_config(refs[0]))
    states = ((label, adapter_factors(ref, device, dtype, scaling)) for label, ref in zip(labels, refs))
    materializer = Materializer.from_state_dicts(targets, states, len(refs), base=None)
    return LoadedModels(model, load_tokenizer(base_ref), materializer, list(targets))


class WhiteBoxWorker(Worker):
    """Scores candidates of one run in this process (the inline executor, or inside a Ray actor)."""

    def __init__(self, plan: RunPlan, worker_id: str | None = None) -> None:
        config = plan.config
        self.config = config
        self.worker_id = worker_id or f"local-{os.getpid()}"
        self.device = resolve_device(config.models.device)
        self.models = load_resident_models(plan, self.device)
        self.dataflow = plan.dataflow
        layout = {} if plan.dataflow else {name: tuple(t.shape) for name, t in self.models.materializer.targets.items()}
        self.space, self.codecs = plan.codecs(layout)
        if plan.method.needs_fisher:  # estimated once, kept for the whole run
            from evomerge.merge.fisher import FISHER_FLOOR
            from evomerge.workers.fisher_estimate import expert_fishers

            fishers = expert_fishers(config, self.device, self.models.tensor_names, self.models.vocabulary)
            self.models.materializer.set_fishers(fishers, FISHER_FLOOR)
        self.fitness_name = config.fitness.name
        self.fitness_fn = with_options(resolve_fitness(config.fitness.name), config.fitness.name, config.fitness.options)
        fitness = config.fitness
        own = brings_own_examples(fitness.name)
        self.examples = own_examples(fitness.name, fitness.options) if own else self.load_examples(fitness.data)
        self.racing = racing_of(config)
        entropy = None
        if plan.gradient_populations:
            from evomerge.workers.entropy_gradient import EntropyGradient

            entropy = EntropyGradient(self.space, self.models, self.examples, self.device)
        tasks = {name: self.load_examples(data) for name, data in config.fitness.tasks.items()}
        self.extra_metrics = ExtraMetrics(tasks, self.score, entropy, plan.gradient_populations)

    def load_examples(self, data) -> Any:
        """The examples a data section names, as the fitness function takes them."""
        return load_examples(
            data.source, data.split, data.classes, data.limit, self.config.base_dir,
            template=data.template, target=data.target, choices=data.choices, label=data.label,
        )

    def materialize(self, candidate: Candidate) -> dict:
        """Write a candidate into the working model; returns what was applied as a plain document."""
        return self._apply(candidate, self._codec(candidate))

    def _codec(self, candidate: Candidate):
        """The candidate's population's codec (an unknown population is a bug, never a failed candidate)."""
        try:
            return self.codecs[candidate.population]
        except KeyError:
            raise KeyError(f"{candidate.id}: the run has no population '{candidate.population}'") from None

    def _apply(self, candidate: Candidate, codec) -> dict:
        decoded = codec.decode(candidate.genome)
        self.models.materializer.apply(decoded)
        return decoded.to_dict()

    def score(self, examples) -> np.ndarray:
        raw = self.fitness_fn(self.models.model, self.models.tokenizer, examples)
        return per_example_scores(raw, count(examples), self.fitness_name)

    def evaluate(self, candidate: Candidate) -> Evaluation:
        """Merge and score one candidate, with the metrics its population needs besides fitness."""

        codec = self._codec(candidate)

        def merge_and_score() -> Scored:
            t0 = time.perf_counter()
            self._apply(candidate, codec)
            t1 = time.perf_counter()
            raced = self.racing.race(self.score, self.examples, candidate.must_beat)
            extra = self.extra_metrics(candidate)
            return raced, {
                "merge_seconds": t1 - t0, "score_seconds": time.perf_counter() - t1,
                "examples_scored": raced.examples_scored, **extra,
            }

        return self.scored(candidate.id, candidate.population, merge_and_score)

    def expert_baselines(self) -> list[Evaluation]:
        """Each expert alone, scored on the fitness data (``candidate_id`` is the expert's label).

        An expert is the linear merge with all weight on it, so it is applied like any candidate.
        In the data-flow space a source is the path through its own layers (in the first source's
        embeddings and head, which is the first source exactly).
        """
        n = len(self.config.models.experts)
        baselines = []
        for i, label in enumerate(self.config.models.expert_labels()):
            if self.dataflow:
                decoded = self.space.source_alone(i)
            else:
                alone = Space.build(LINEAR, self.models.tensor_names, n, "per_model")
                decoded = alone.decode(alone.encode(LINEAR.expert_alone(i, n)))
            baselines.append(self.scored(label, "", lambda: self._apply_and_score(decoded)))
        return baselines

    def _apply_and_score(self, recipe) -> Scored:
        self.models.materializer.apply(recipe)
        return self.score(self.examples), {}

    def score_on(self, data, candidate: Candidate | None = None) -> Evaluation:
        """A candidate (None: the model as it is now) scored on other data, e.g. ``fitness.test_data``."""
        if data is None:
            raise UserError("fitness.test_data is not set in the config")
        examples = self.load_examples(data)

        def score() -> Scored:
            if candidate is not None:
                self.materialize(candidate)
            return self.score(examples), {}

        return self.scored("held-out" if candidate is None else candidate.id, "" if candidate is None else candidate.population, score)

    def close(self) -> None:
        """Drop the resident models, so a long-lived process (a notebook, a test session) gets its
        memory back when the run ends."""
        del self.models
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
