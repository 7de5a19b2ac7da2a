"""The white-box worker: holds the working model on its device and the experts in a memory tier,
merges in place, scores.

It loads every model once. The base (or the first expert when the run has none) becomes the one
working model; experts are read one at a time into the resident stacks of a held tier (on the
device or in host memory), or left in their safetensors files for the mmap tier, so memory is the
working model plus the tier's holdings. A candidate is applied to the working model's parameters
in place, scored by the fitness function, and never written to disk.
"""

from __future__ import annotations

import functools
import gc
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from evomerge.config import RunConfig
from evomerge.errors import ConfigError, ModelLoadError, UserError
from evomerge.fitness import brings_own_examples, own_examples, resolve_whitebox_fitness, scores_and_metrics, with_options
from evomerge.fitness.data import load_examples
from evomerge.fitness.racing import count
from evomerge.fitness.result import FitnessFailed, add_metrics, per_task_metrics
from evomerge.merge.declarations import LINEAR
from evomerge.merge.method import LORA_FACTORS
from evomerge.models.adapters import (
    adapter_factors,
    attach_working_adapter,
    is_adapter,
    lora_config,
    lora_parameters,
    lora_scaling,
    merged_adapter_state,
)
from evomerge.models.checkpoint import run_dtype, weight_files
from evomerge.models.loading import load_model, load_tokenizer
from evomerge.models.memory import worker_placement
from evomerge.models.model_files import ADAPTER_CONFIG
from evomerge.models.sharding import Placement
from evomerge.models.vocab import VocabularyAlignment, align_working_model, vocabulary_alignment
from evomerge.plan import RunPlan
from evomerge.records import Candidate, Evaluation
from evomerge.space.codec import Codec
from evomerge.space.merge_space import Space
from evomerge.space.paths import PathSpace
from evomerge.workers.base import Scored, Worker, racing_of
from evomerge.workers.extra_metrics import ExtraMetrics
from evomerge.workers.materializer import Materializer
from evomerge.workers.path_model import PathMaterializer
from evomerge.workers.tiers import TIER_CLASSES, HeldTier, MappedTier

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModels:
    """The working model (merges are written into its parameters) and its tokenizer."""

    model: torch.nn.Module
    tokenizer: object | None
    materializer: Materializer | PathMaterializer
    space: Space | PathSpace
    """The space candidates are decoded in: the merge space over the working model's parameters
    (its tensors are the merged ones), or the data-flow space over the sources' layers."""
    tensor_names: list[str]
    vocabulary: VocabularyAlignment | None = None
    """How the experts' vocabularies were aligned to the working model's, when they differ."""


def check_adapters_have_a_base(config: RunConfig) -> None:
    """LoRA adapters are merged onto a base, which the memory check and loading read first."""
    if config.models.base is None and any(is_adapter(config.expert_model(e)) for e in config.models.experts):
        raise ModelLoadError("models.base: LoRA adapters are merged onto their base model; name it in models.base")


def load_resident_models(plan: RunPlan, placement: Placement, tier_name: str) -> LoadedModels:
    """Load the working model where ``placement`` says (one device, or sharded over several), and
    every expert once into the memory tier ``tier_name``, each tensor beside the working tensor it
    merges into; experts may be full models or LoRA adapters."""
    config = plan.config
    dtype = DTYPES[run_dtype(config)]
    refs = [config.expert_model(e) for e in config.models.experts]
    labels = [f"expert '{label}'" for label in config.models.expert_labels()]
    adapters = [is_adapter(ref) for ref in refs]
    device = placement.primary  # a data-flow worker and adapter slots never span devices (the plan refuses them)
    if plan.dataflow:
        return _load_path_sources(plan, device, dtype)
    tier = TIER_CLASSES[tier_name]
    if plan.method.inputs == LORA_FACTORS:
        return _load_adapter_slots(plan, refs, labels, adapters, device, dtype, tier)
    working_ref = plan.working_model
    model = load_model(working_ref, placement.modules(), dtype)
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
        if placement.device_map is not None:  # resizing would replace modules the device map placed
            raise ConfigError(
                "models.devices: the experts' vocabularies differ and are aligned by resizing the working model"
                " at load time, which a worker spanning devices cannot do; use models.devices 1"
            )
        align_working_model(model, vocab, record=has_base)
        vocab.extend_tokenizer(tokenizer)
    space = plan.space([name for name, _ in model.named_parameters()])
    targets = {name: p.data for name, p in model.named_parameters() if name in space.tensor_groups}
    frozen = {name for name, _ in model.named_parameters() if name not in targets}  # merge.frozen towers
    if tier.maps_files:
        if vocab is not None:
            raise ConfigError(
                "models.residency mmap: the experts' vocabularies differ and are aligned to the union at load"
                " time, which their files do not hold; use models.residency host or device"
            )
        base = ("the base model", weight_files(config.model_ref(config.models.base))) if has_base else None
        mapped = MappedTier(targets, [(label, weight_files(ref)) for label, ref in zip(labels, refs)], base)
        return LoadedModels(model, tokenizer, Materializer(targets, mapped), space, list(targets), vocab)
    assert issubclass(tier, HeldTier)
    storage = placement.modules(lambda d: tier.storage(d)[0])  # experts load where the tier holds them
    base_state = targets if has_base else None  # the materializer clones the base first

    def expert_states():
        for row, (label, ref, adapter) in enumerate(zip(labels, refs, adapters)):
            if adapter:  # base + scaling · B A, a dense expert like a full fine-tune
                state = merged_adapter_state(load_model(working_ref, storage, dtype), ref)
            else:
                expert = load_model(ref, storage, dtype)
                state = {n: p.data for n, p in expert.named_parameters()}
                del expert
            aligned = state if vocab is None else vocab.align(row + has_base, state)
            yield label, {name: t for name, t in aligned.items() if name not in frozen}
            del state, aligned
            gc.collect()

    materializer = Materializer.from_state_dicts(targets, expert_states(), len(refs), base=base_state, tier=tier)
    if vocab is not None:
        vocab.fill_(materializer.tensors)
    return LoadedModels(model, tokenizer, materializer, space, list(targets), vocab)


def merge_ready(plan: RunPlan) -> tuple[LoadedModels, dict[str, Codec], Placement]:
    """Everything a candidate's merge needs, loaded once: the resident models (in the memory tier
    and on the devices the memory check chose), one codec per population, and with Fisher merging
    each expert's Fisher (estimated on its own data)."""
    check_adapters_have_a_base(plan.config)
    tier, placement = worker_placement(plan.config)
    device = placement.primary
    models = load_resident_models(plan, placement, tier)
    layout = {} if plan.dataflow else {name: tuple(t.shape) for name, t in models.materializer.targets.items()}
    codecs = plan.codecs(models.space, layout)
    if plan.method.needs_fisher:  # estimated once, kept for the whole run
        from evomerge.merge.fisher import FISHER_FLOOR
        from evomerge.workers.fisher_estimate import expert_fishers

        fishers = expert_fishers(plan.config, device, models.tensor_names, models.vocabulary)
        models.materializer.set_fishers(fishers, FISHER_FLOOR)
    return models, codecs, placement


def _load_path_sources(plan: RunPlan, device: torch.device, dtype: torch.dtype) -> LoadedModels:
    """For the data-flow space: the head source (``merge.dataflow.head_source``) is the working
    model; the others lend their decoder layers, resident beside it (their embeddings and heads are
    dropped). A run or recipe source is a recorded parameter-space merge, materialized here once."""
    from evomerge.source_merges import recorded_merge
    from evomerge.workers.merge_source import materialize_merge

    config = plan.config

    def source(expert) -> tuple[torch.nn.Module, object | None]:
        if expert.path is None:
            return materialize_merge(recorded_merge(config, expert), device, dtype)
        ref = config.model_ref(expert.path)
        return load_model(ref, device, dtype), load_tokenizer(ref)

    loaded = [source(expert) for expert in config.models.experts]
    working, tokenizer = loaded[config.head]
    materializer = PathMaterializer.from_models([model for model, _ in loaded], config.head)
    del loaded
    gc.collect()
    return LoadedModels(working, tokenizer, materializer, plan.path_space(), [])


def _load_adapter_slots(
    plan: RunPlan,
    refs: list[str],
    labels: list[str],
    adapters: list[bool],
    device: torch.device,
    dtype: torch.dtype,
    tier: type[HeldTier] | type[MappedTier],
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
    assert issubclass(tier, HeldTier)  # the mmap tier is refused for LoRA factors at plan time
    materializer = Materializer.from_state_dicts(targets, states, len(refs), base=None, tier=tier)
    return LoadedModels(model, load_tokenizer(base_ref), materializer, plan.space(list(targets)), list(targets))


class WhiteBoxWorker(Worker):
    """Scores candidates of one run in this process (the inline executor, or inside a Ray actor)."""

    def __init__(self, plan: RunPlan, worker_id: str | None = None) -> None:
        config = plan.config
        self.config = config
        self.worker_id = worker_id or f"local-{os.getpid()}"
        self.models, self.codecs, self.placement = merge_ready(plan)
        self.device = self.placement.primary
        self.dataflow = plan.dataflow
        self.space = self.models.space
        self.fitness_name = config.fitness.name
        self.fitness_fn = with_options(resolve_whitebox_fitness(config.fitness.name), config.fitness.name, config.fitness.options)
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
        self.spent: dict[str, Any] = {}
        """What the fitness function reported since the last evaluation began (a judge's API
        usage), summed over its calls: racing's stages and ``fitness.tasks`` score more than once."""

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
        try:
            raw = self.fitness_fn(self.models.model, self.models.tokenizer, examples)
        except FitnessFailed as exc:
            add_metrics(self.spent, exc.metrics)
            raise
        scores, metrics = scores_and_metrics(raw, count(examples), self.fitness_name)
        add_metrics(self.spent, metrics)
        return scores

    def _scored_with_spending(self, candidate_id: str, population: str, score) -> Evaluation:
        """``scored`` with what the fitness reported added to the metrics (a failed candidate's
        too: a judge's requests before the failure were paid for)."""
        self.spent = {}
        ev = self.scored(candidate_id, population, score)
        add_metrics(ev.metrics, self.spent)
        return ev

    def evaluate(self, candidate: Candidate) -> Evaluation:
        """Merge and score one candidate, with the metrics its population needs besides fitness."""

        codec = self._codec(candidate)

        def merge_and_score() -> Scored:
            t0 = time.perf_counter()
            self._apply(candidate, codec)
            t1 = time.perf_counter()
            raced = self.racing.race(self.score, self.examples, candidate.must_beat, candidate.rival)
            extra = self.extra_metrics(candidate)
            return raced, {
                "merge_seconds": t1 - t0, "score_seconds": time.perf_counter() - t1,
                "examples_scored": raced.examples_scored, **per_task_metrics(self.examples, raced.per_example), **extra,
            }

        return self._scored_with_spending(candidate.id, candidate.population, merge_and_score)

    def expert_baselines(self) -> list[Evaluation]:
        """The base (when the run has one) and each expert alone, scored on the fitness data and
        on ``fitness.tasks``, with the per-task means (``candidate_id`` is the model's label;
        ``metrics["baseline"]`` says ``base`` or ``expert``).

        An expert is the linear merge with all weight on it, so it is applied like any candidate;
        the base is the reference the experts' task vectors are taken from. In the data-flow space a
        source is the path through its own layers (in the head source's embeddings and head, which
        is the head source exactly), and no base is scored alone.
        """
        n = len(self.config.models.experts)
        baselines = []
        if not self.dataflow and self.models.materializer.has_base:
            label = Path(self.config.models.base).name or self.config.models.base
            baselines.append(self._scored_with_spending(label, "", lambda: self._alone(self.models.materializer.apply_base, "base")))
        for i, label in enumerate(self.config.models.expert_labels()):
            if self.dataflow:
                decoded = self.space.source_alone(i)
            else:
                alone = Space.build(LINEAR, self.models.tensor_names, n, "per_model")
                decoded = alone.decode(alone.encode(LINEAR.expert_alone(i, n)))
            apply = functools.partial(self.models.materializer.apply, decoded)
            baselines.append(self._scored_with_spending(label, "", lambda: self._alone(apply, "expert")))
        return baselines

    def _alone(self, apply: Callable[[], None], role: str) -> Scored:
        apply()
        scores = self.score(self.examples)
        return scores, {"baseline": role, **per_task_metrics(self.examples, scores), **self.extra_metrics.task_metrics()}

    def score_on(self, data, candidate: Candidate | None = None) -> Evaluation:
        """A candidate (None: the model as it is now) scored on other data, e.g. ``fitness.test_data``."""
        if data is None:
            raise UserError("fitness.test_data is not set in the config")
        examples = self.load_examples(data)

        def score() -> Scored:
            if candidate is not None:
                self.materialize(candidate)
            return self.score(examples), {}

        return self._scored_with_spending(
            "held-out" if candidate is None else candidate.id, "" if candidate is None else candidate.population, score
        )

    def close(self) -> None:
        """Drop the resident models, so a long-lived process (a notebook, a test session) gets its
        memory back when the run ends."""
        del self.models
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
