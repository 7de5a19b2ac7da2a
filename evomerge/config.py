"""The run configuration: the schema of one YAML file, as pydantic models.

Only the file's own shape is checked here (types, bounds, keys, values that need nothing else);
what a name means — a merge method, a strategy, their parameters — is checked against the
registries by :mod:`evomerge.plan`, so reading a config imports neither torch nor a registry.
Every error names the file and the field (``config.yaml: budget.max_time: …``). Relative paths in
the file are relative to the file's directory, so a config and its models can move together.
"""

from __future__ import annotations

import difflib
import math
import re
from datetime import datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, Hashable, Literal, get_args

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from evomerge.errors import ConfigError, first_line

_DURATION = re.compile(r"^\s*(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m)?\s*(?:(\d+(?:\.\d+)?)s)?\s*$")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


_CLOCK = re.compile(r"^(\d{1,2}):(\d{2})$")


def parse_duration(value: str | float | int) -> float:
    """Seconds from ``90``, ``"90s"``, ``"30m"``, ``"8h"`` or ``"1h30m"``."""
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        match = _DURATION.match(value)
        if not value.strip() or not match or not any(match.groups()):
            raise ValueError(f"'{value}' is not a duration (use seconds, or e.g. '90s', '30m', '8h', '1h30m')")
        h, m, s = (float(g) if g else 0.0 for g in match.groups())
        seconds = h * 3600 + m * 60 + s
    if seconds <= 0:
        raise ValueError("a duration must be positive")
    return seconds


Duration = Annotated[float, BeforeValidator(parse_duration)]
"""Seconds, written in a config as a number or as ``"90s"``, ``"30m"``, ``"8h"``, ``"1h30m"``."""


MAX_POPULATIONS = 100
"""More populations than this is a typo (or a generated list gone wrong), not a search: each one
builds a strategy and a codec before the first evaluation."""
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def _ordered(bounds: tuple[float, float]) -> tuple[float, float]:
    low, high = bounds
    if not low < high:
        raise ValueError(f"low must be below high, got [{low}, {high}]")
    return bounds


Bounds = Annotated[tuple[float, float], AfterValidator(_ordered)]
"""A search range ``[low, high]`` of finite numbers, low first."""


def _finite_leaves(value: Any, where: str = "") -> None:
    """Refuse NaN and infinity anywhere in a free-form mapping of options (nested lists and maps
    included): no option means them, and a NaN would only surface later as a failed candidate."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{where or 'value'}: {value} is not a finite number")
    if isinstance(value, dict):
        for key, item in value.items():
            _finite_leaves(item, f"{where}.{key}" if where else str(key))
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _finite_leaves(item, f"{where}.{i}")


def _finite_options(value: dict[str, Any]) -> dict[str, Any]:
    _finite_leaves(value)
    return value


Options = Annotated[dict[str, Any], AfterValidator(_finite_options)]
"""Keyword arguments passed through to a function or a strategy; numbers in them must be finite."""


CONFIG_NAME = "config.yaml"
"""The config snapshot a run directory holds beside its run.db."""


def _numeric_only(annotation: Any) -> bool:
    """Whether a field takes numbers and nothing else (``int``, ``float | None``, ``Annotated[int, …]``)."""
    leaves = set()
    pending = [annotation]
    while pending:
        a = pending.pop()
        args = get_args(a)
        if args and getattr(a, "__metadata__", None) is not None:  # Annotated[T, ...]: T only
            pending.append(args[0])
        elif args:
            pending.extend(args)
        else:
            leaves.add(a)
    leaves.discard(type(None))
    return bool(leaves) and leaves <= {int, float}


class _Strict(BaseModel):
    # No float in a config means NaN or infinity: refuse them where they are written.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_a_number(cls, value: Any, info: ValidationInfo) -> Any:
        """YAML's ``true`` is no count: pydantic would read ``evaluations: true`` as 1."""
        if isinstance(value, bool) and info.field_name and _numeric_only(cls.model_fields[info.field_name].annotation):
            raise ValueError(f"a number, not {str(value).lower()}")
        return value


class ExpertRef(_Strict):
    """An expert model: a local directory or a hub id, with an optional display name. In the
    data-flow space a source may instead be a parameter-space merge the workers materialize once
    at start (PS+DFS): ``run``, a run directory's best, or ``recipe``, the ``recipe.yaml`` an
    export of one wrote."""

    path: str | None = None
    run: str | None = None
    recipe: str | None = None
    name: str | None = None
    # The expert's own task data: Fisher merging estimates the expert's Fisher information on it.
    data: DataConfig | None = None

    @model_validator(mode="after")
    def _one_source(self) -> "ExpertRef":
        if sum(value is not None for value in (self.path, self.run, self.recipe)) != 1:
            raise ValueError(
                "give an expert exactly one of path (a model), run (a run directory's best merge) or recipe"
                " (an export's recipe.yaml)"
            )
        return self

    @property
    def source(self) -> str:
        """The path, run directory or recipe file, as written."""
        return next(value for value in (self.path, self.run, self.recipe) if value is not None)

    @property
    def label(self) -> str:
        """The expert's name, else its directory's (for a recipe, the export directory holding it)."""
        named = Path(self.recipe).parent.name if self.recipe is not None else Path(self.source).name
        return self.name or named or self.source


class ModelsConfig(_Strict):
    base: str | None = None
    experts: list[ExpertRef] = Field(min_length=1)
    # auto: the dtype the checkpoints are stored in (see evomerge.models.checkpoint.run_dtype)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str = "auto"
    # Devices one worker spans (a model larger than one GPU): the working model is sharded over
    # cuda:0 to cuda:N-1 of the GPUs the worker sees (see evomerge.models.sharding).
    devices: int = Field(default=1, ge=1)
    # Experts whose tokenizers add tokens: "union" keeps every token (mergekit's tokenizer_source:
    # union), "base" keeps the base's vocabulary only; see evomerge.models.vocab.
    vocabulary: Literal["union", "base"] = "union"
    # Where workers keep the experts: auto takes the fastest tier that fits (see evomerge.models.memory).
    residency: Literal["auto", "device", "host", "mmap"] = "auto"

    @field_validator("experts", mode="before")
    @classmethod
    def _paths_as_strings(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [{"path": v} if isinstance(v, str) else v for v in value]
        return value

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not _DEVICE.match(value):
            raise ValueError(f"'{value}' is not a device (use auto, cpu, cuda, cuda:N or mps)")
        return value

    @field_validator("devices")
    @classmethod
    def _devices(cls, value: int, info: ValidationInfo) -> int:
        device = info.data.get("device")
        if value > 1 and device not in (None, "auto", "cuda"):
            one = "a CPU is one device" if device == "cpu" else f"'{device}' names one device"
            raise ValueError(
                f"a worker spanning {value} devices shards the model over CUDA GPUs, but models.device is"
                f" '{device}' ({one}); set models.device to cuda, or models.devices to 1"
            )
        return value

    def expert_labels(self) -> list[str]:
        return [e.label for e in self.experts]


class DataflowConfig(_Strict):
    """The data-flow space (``merge.space: dataflow``): the experts are the sources whose frozen
    layers a path visits; the head source (the first unless ``head_source`` names another)
    supplies the embeddings, the final norm and the head, and the search starts from its own path."""

    repeats: int = Field(default=3, ge=1, description="times the sources' layers are laid out: the paper's r")
    scaling: Literal["per_slot", "matrix", "none"] = "per_slot"
    scale_bounds: Bounds = (0.5, 2.0)
    max_layers: int | None = Field(default=None, ge=1, description="longest path a candidate may take")
    head_source: str | int | None = Field(default=None, description="a source's name or index; unset: the first")

    def head_index(self, labels: list[str]) -> int:
        """The index of the head source among sources of these labels (ValueError naming the field)."""
        value = self.head_source
        if value is None:
            return 0
        if isinstance(value, int):
            if not 0 <= value < len(labels):
                raise ValueError(f"merge.dataflow.head_source: {value} is not a source's index (0 to {len(labels) - 1})")
            return value
        if labels.count(value) > 1:
            raise ValueError(f"merge.dataflow.head_source: two sources are named '{value}'; give them distinct models.experts[].name")
        if value not in labels:
            raise ValueError(f"merge.dataflow.head_source: '{value}' is not a source's name (one of: {', '.join(labels)}) or index")
        return labels.index(value)


class MergeConfig(_Strict):
    space: Literal["parameter", "dataflow"] = "parameter"
    dataflow: DataflowConfig = Field(default_factory=DataflowConfig)
    method: str = "linear"
    granularity: Literal["global", "per_model", "per_layer_group", "per_tensor"] = "per_model"
    layer_groups: int | None = Field(default=None, ge=1)
    search: list[str] | None = None
    fixed: dict[str, float] = Field(default_factory=dict)
    bounds: dict[str, Bounds] = Field(default_factory=dict)
    init: dict[str, float] = Field(default_factory=dict)
    options: dict[str, bool] = Field(default_factory=dict)
    # Towers of a multimodal model (vision_tower, multi_modal_projector, …; see evomerge.space.towers)
    # that keep the working model's weights instead of being merged.
    frozen: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _layer_groups(self) -> "MergeConfig":
        if self.layer_groups is not None and self.granularity != "per_layer_group":
            raise ValueError("layer_groups only applies to granularity 'per_layer_group'")
        if self.space != "dataflow" and self.dataflow != DataflowConfig():
            raise ValueError("dataflow only applies to space 'dataflow'")
        return self


class PopulationConfig(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="letters, digits, _ . - (ids are name:number)")
    strategy: str = "cmaes"
    share: float = Field(default=1.0, gt=0)
    options: Options = Field(default_factory=dict)


def check_address(value: str) -> str:
    """A Ray address as ``workers.address`` or ``--address`` gives it: not blank (Ray would fail
    with a traceback on it)."""
    if not value.strip():
        raise ValueError("leave address out to start Ray on this machine, or use 'auto' or 'ray://host:port'")
    return value


class WorkersConfig(_Strict):
    """The Ray worker pool: one actor per worker, each holding the models once.

    ``count`` defaults to what the cluster holds (its CPUs / ``cpus_per_worker``, or its GPUs /
    ``gpus_per_worker`` for GPU workers), so a plain run uses the whole machine.
    """

    count: int | None = Field(default=None, ge=1)
    cpus_per_worker: float = Field(default=1.0, gt=0)
    gpus_per_worker: float = Field(default=0.0, ge=0)
    # None starts Ray on this machine (or joins RAY_ADDRESS); "auto" or "ray://host:port" joins a cluster.
    address: str | None = None
    # A candidate still running after this long fails, and its worker is replaced. "auto": a
    # multiple of the run's own slow evaluations once some have finished (a fixed cap before);
    # null: wait for ever.
    timeout: Literal["auto"] | Duration | None = "auto"
    # After a first SIGINT/SIGTERM the run stops asking and lets its evaluations finish for this
    # long; then (or at a second signal) it cancels them, checkpoints and exits, resumable.
    grace_period: Duration = Field(default=120.0, gt=0)
    # Re-runs of a candidate whose worker died under it, before it is recorded as failed.
    max_retries: int = Field(default=2, ge=0)
    # Worker deaths in a row, with no evaluation finishing in between, that stop the run.
    max_worker_failures: int = Field(default=10, ge=1)
    # Ray waits for ever for resources, so every wait has a deadline. How long a worker may wait
    # to be placed (room for an autoscaler to add a node, yet finite), load its models (or do
    # one-off work such as block Grams), and how long a dead worker's replacement may wait for
    # resources before the pool goes on without it.
    schedule_timeout: Duration = Field(default=300.0, gt=0)
    load_timeout: Duration = Field(default=1800.0, gt=0)
    replace_timeout: Duration = Field(default=120.0, gt=0)

    @field_validator("address")
    @classmethod
    def _address(cls, value: str | None) -> str | None:
        return None if value is None else check_address(value)


class DataConfig(_Strict):
    source: str
    split: str = "train"
    classes: list[int] | None = None
    limit: int | None = Field(default=None, ge=1)
    # text data (.jsonl/.csv) only: how each row becomes a prompt, target and choices
    template: str | None = Field(default=None, description="prompt as a str.format template over the row's fields")
    target: str | None = Field(default=None, description="field name, or template, of the target text")
    choices: str | None = Field(default=None, description="field holding the list of choices")
    label: str | None = Field(default=None, description="field holding the index of the right choice")


class RacingConfig(_Strict):
    """Staged evaluation ("racing"): a candidate is scored on growing seeded subsets of the fitness
    examples and continues only while it could still matter.

    After each stage (a fraction of the examples, the same seeded subset for every candidate) it
    stops when it can no longer beat its population's ``top_k``-th best fully scored member (or
    the rank its strategy asks for, :meth:`Strategy.racing_rank`: M2N2 races children against its
    ``racing_rank``-th best), at ``z`` standard errors: ``paired``, when a bound on its mean difference from that member on the
    same examples is below 0; unpaired, when a bound on its own mean is below that member's
    fitness (Wilson's bound for per-example scores in the range ``scores``, the normal one when
    ``scores`` is null): :mod:`evomerge.fitness.racing`. One that survives every stage is then
    scored on the examples the stages left, so it costs each example once and records the
    per-example scores a run without racing records.
    """

    # Defaults measured best of those tried on both demos (benchmarks/README.md, racing.py).
    stages: list[float] = Field(default_factory=lambda: [0.02, 0.05, 0.1, 0.2, 0.5], min_length=1)
    z: float = Field(default=2.0, gt=0, description="confidence: standard errors above the mean so far")
    top_k: int = Field(default=1, ge=1, description="the population's k-th best full score a candidate must be able to beat")
    # NumPy's default_rng takes no negative seed: every raced candidate would fail.
    seed: int = Field(default=0, ge=0)
    paired: bool = Field(
        default=True,
        description="compare a candidate with the k-th best member example by example (false: its own mean against that member's fitness)",
    )
    scores: tuple[float, float] | None | Literal["auto"] = Field(
        default="auto",
        description="the range every per-example score lies in; null: unbounded (negative cross-entropy);"
        " auto: what the fitness declares (a plugin: [0, 1])",
    )

    @field_validator("scores")
    @classmethod
    def _range(cls, value: tuple[float, float] | None | str) -> tuple[float, float] | None | str:
        if isinstance(value, tuple) and not value[0] < value[1]:
            raise ValueError("scores is the range [low, high] of the per-example scores, low below high")
        return value

    @field_validator("stages")
    @classmethod
    def _fractions(cls, value: list[float]) -> list[float]:
        if any(not 0 < f < 1 for f in value):
            raise ValueError("stages are fractions of the fitness examples between 0 and 1 (the full set comes last by itself)")
        if any(b <= a for a, b in zip(value, value[1:])):
            raise ValueError("stages must grow: each fraction larger than the one before")
        return value


class FitnessConfig(_Strict):
    name: str = "classification_accuracy"
    # Required unless the fitness brings its own examples (lm_eval: its tasks' documents); the plan checks it.
    data: DataConfig | None = None
    test_data: DataConfig | None = None
    options: Options = Field(default_factory=dict, description="keyword arguments for the fitness function")
    # Named data sets scored like `data` and recorded as metrics of those names: per-task
    # objectives for nsga2 and map (`options: {objectives: [digits_low, digits_high]}`).
    tasks: dict[str, DataConfig] = Field(default_factory=dict)
    # Off unless given: candidates that cannot matter stop after a small subset of `data`.
    racing: RacingConfig | None = None


def resolve_deadline(value: str, now: datetime | None = None) -> datetime:
    """The moment a deadline names: ``"07:00"`` is its next occurrence (local time), or an ISO
    date-time such as ``"2026-11-26T07:00"``."""
    now = now or datetime.now()
    clock = _CLOCK.match(value.strip())
    if clock:
        hour, minute = int(clock.group(1)), int(clock.group(2))
        if hour > 23 or minute > 59:
            raise ValueError(f"'{value}' is not a time of day")
        moment = now.replace(hour=hour, minute=minute, second=0, microsecond=0)
        return moment if moment > now else moment + timedelta(days=1)
    try:
        return datetime.fromisoformat(value.strip())
    except ValueError:
        raise ValueError(f"'{value}' is not a deadline (use a time of day like '07:00' or a date-time like '2026-11-26T07:00')") from None


_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class PriceConfig(_Strict):
    """What the service charges per token (any currency): the cost budget and reports use it."""

    prompt_token: float = Field(default=0.0, ge=0)
    completion_token: float = Field(default=0.0, ge=0)


class ApiConfig(_Strict):
    """Black-box mode: candidates are scored only through a model service's API.

    ``level`` picks what the service does: ``merge_service`` merges the adapters named in
    ``models.experts`` server-side from each candidate's α/β (Evo-Merging's routes);
    ``runtime_lora`` is a vLLM-compatible server to which the worker uploads each merged adapter
    (written under ``adapter_dir``, which the server must be able to read); ``openai`` is any
    OpenAI-compatible API serving the experts as models, mixed at the output by ``linear``
    weights. ``concurrency`` and ``requests_per_second`` hold per worker process.
    """

    level: Literal["merge_service", "runtime_lora", "openai"]
    base_url: str
    api_key_env: str | None = Field(default=None, description="name of the environment variable holding the API key")
    concurrency: int = Field(default=32, ge=1)
    requests_per_second: float | None = Field(default=None, gt=0)
    timeout: Duration = 60.0
    max_retries: int = Field(default=8, ge=0)
    backoff: Duration = 0.5
    max_backoff: Duration = 30.0
    price: PriceConfig = Field(default_factory=PriceConfig)
    adapter_dir: str | None = Field(default=None, description="runtime_lora: where merged adapters are written")

    @field_validator("base_url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not re.match(r"^https?://[^\s/]+", value):
            raise ValueError(f"'{value}' is not an http(s) URL")
        return value.rstrip("/")

    @field_validator("api_key_env")
    @classmethod
    def _env_name(cls, value: str | None) -> str | None:
        if value is not None and not _ENV_NAME.match(value):
            raise ValueError("name the environment variable that holds the key (e.g. OPENAI_API_KEY), never the key itself")
        return value

    @model_validator(mode="after")
    def _adapter_dir(self) -> "ApiConfig":
        if self.level == "runtime_lora" and self.adapter_dir is None:
            raise ValueError("level runtime_lora needs adapter_dir, a directory the server can read adapters from")
        return self


class BudgetConfig(_Strict):
    evaluations: int | None = Field(default=None, ge=1)
    max_time: Duration | None = None
    deadline: str | None = Field(default=None, description="'07:00' (next occurrence) or an ISO date-time")
    target_fitness: float | None = Field(default=None, description="stop once the best fitness reaches this")
    patience: int | None = Field(default=None, ge=1, description="stop after this many evaluations without improvement")
    # black-box runs: stop asking once the API usage reaches one of these
    requests: int | None = Field(default=None, ge=1, description="HTTP requests to the model service")
    tokens: int | None = Field(default=None, ge=1, description="prompt plus completion tokens")
    cost: float | None = Field(default=None, gt=0, description="tokens times api.price")
    # A run whose first candidates all fail the same way (same first line of the error) stops
    # with that reason after this many; "auto": max(8, 2 x workers); 0 or null: never.
    max_failures_at_start: Literal["auto"] | Annotated[int, Field(ge=0)] | None = "auto"

    @field_validator("deadline")
    @classmethod
    def _deadline(cls, value: str | None) -> str | None:
        if value is not None:
            resolve_deadline(value)
        return value

    @model_validator(mode="after")
    def _some_limit(self) -> "BudgetConfig":
        limits = (self.evaluations, self.max_time, self.deadline, self.requests, self.tokens, self.cost)
        if all(limit is None for limit in limits):
            raise ValueError("set at least one of 'evaluations', 'max_time', 'deadline', 'requests', 'tokens' or 'cost'")
        return self


class MigrationConfig(_Strict):
    """Every ``every`` evaluations, each population takes in the ``size`` best members of the others
    (among populations whose genomes mean the same merge)."""

    every: int = Field(ge=1)
    size: int = Field(default=1, ge=1)


class ExportConfig(_Strict):
    """What ``evomerge export`` carries beside the merged weights (mergekit's ``tokenizer_source``
    and ``chat_template``): an instruct merge over a pretrained base needs an expert's chat
    template and end-of-turn tokens, not the base's."""

    # base (models.base; the first expert when there is none) or an expert's name: the model whose
    # tokenizer, special tokens and generation config the export carries
    tokenizer_source: str = "base"
    # unset: the tokenizer source's own; base or an expert's name: that model's; else a Jinja template
    chat_template: str | None = None
    # hub ids for the model card's base_model, where the run's models are local copies
    base_model: list[str] = Field(default_factory=list)

    @field_validator("base_model", mode="before")
    @classmethod
    def _one_or_more(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("base_model")
    @classmethod
    def _hub_ids(cls, value: list[str]) -> list[str]:
        for ref in value:
            if _looks_local(ref) or not _HUB_ID.match(ref):
                raise ValueError(f"'{ref}' is not a hub id (org/name): the model card names models others can download")
        return value

    def check_sources(self, labels: list[str]) -> None:
        """Refuse a source that is neither ``base`` nor exactly one expert's name."""
        known = ", ".join(["base", *labels])
        for field, value in (("tokenizer_source", self.tokenizer_source), ("chat_template", self.chat_template)):
            if value is None or value == "base" or (field == "chat_template" and is_template(value)):
                continue
            if labels.count(value) > 1:
                raise ValueError(f"export.{field}: two experts are named '{value}'; give them distinct models.experts[].name")
            if value not in labels:
                what = "base, an expert's name or a Jinja template" if field == "chat_template" else "base or an expert's name"
                raise ValueError(f"export.{field}: '{value}' is not {what} (one of: {known})")


def is_template(value: str) -> bool:
    """A chat template is Jinja: it has a ``{{ … }}`` or ``{% … %}``; a model's name has neither."""
    return "{{" in value or "{%" in value


class RunConfig(_Strict):
    name: str = "evomerge-run"
    # Population i's strategy draws from NumPy's RandomState(seed + 1000 i), which takes seeds below
    # 2**32: below 2**31, every population's seed fits.
    seed: int = Field(default=0, ge=0, lt=2**31)
    run_dir: str = "runs/evomerge-run"
    executor: Literal["ray", "inline"] = "ray"  # inline: one process, no Ray (debugging, tests)
    checkpoint_every: int = Field(default=10, ge=1)
    migration: MigrationConfig | None = None
    # Score each expert alone on the fitness data once, before the search: the report's comparison.
    score_experts: bool = True
    models: ModelsConfig
    merge: MergeConfig = Field(default_factory=MergeConfig)
    populations: list[PopulationConfig] = Field(min_length=1, max_length=MAX_POPULATIONS)
    fitness: FitnessConfig
    budget: BudgetConfig
    workers: WorkersConfig = Field(default_factory=WorkersConfig)
    # Black-box mode: score candidates through a model service's API instead of holding the weights.
    api: ApiConfig | None = None
    export: ExportConfig = Field(default_factory=ExportConfig)

    # Set by load_config, not read from YAML: where relative paths start.
    base_dir: Path = Field(default=Path("."), exclude=True)
    # Set by config_from_dict: the file errors name, also those of a plan a worker builds from the
    # config alone (a merge space the model's layers cannot hold).
    _source: str = PrivateAttr(default="<config>")

    @property
    def source(self) -> str:
        """The file this config was read from, as messages name it (``<config>`` for one built in code)."""
        return self._source

    @model_validator(mode="after")
    def _distinct_populations(self) -> "RunConfig":
        names = [p.name for p in self.populations]
        duplicates = {x for x in names if names.count(x) > 1}
        if duplicates:
            raise ValueError(f"populations: duplicate name '{sorted(duplicates)[0]}'")
        return self

    @model_validator(mode="after")
    def _gpus_of_a_spanning_worker(self) -> "RunConfig":
        devices, gpus = self.models.devices, self.workers.gpus_per_worker
        if devices > 1 and gpus not in (0, devices):
            raise ValueError(
                f"workers.gpus_per_worker is {gpus:g} but models.devices is {devices}: a worker spanning"
                f" {devices} devices is given {devices} GPUs; leave workers.gpus_per_worker out"
            )
        return self

    @model_validator(mode="after")
    def _export_sources(self) -> "RunConfig":
        self.export.check_sources(self.models.expert_labels())
        return self

    @model_validator(mode="after")
    def _head_source(self) -> "RunConfig":
        self.merge.dataflow.head_index(self.models.expert_labels())
        return self

    @property
    def head(self) -> int:
        """The expert whose model the run writes into or runs paths in, when there is no base: the
        first, or in the data-flow space the head source (``merge.dataflow.head_source``)."""
        return self.merge.dataflow.head_index(self.models.expert_labels())

    def resolve_path(self, path: str) -> Path:
        p = Path(path).expanduser()
        return p if p.is_absolute() else (self.base_dir / p).resolve()

    def model_ref(self, path: str) -> str:
        """A local path resolved against the config's directory, or a hub id unchanged."""
        if _looks_local(path) or self.resolve_path(path).exists() or not _HUB_ID.match(path):
            return str(self.resolve_path(path))
        return path

    def run_path(self) -> Path:
        return self.resolve_path(self.run_dir)

    def expert_model(self, expert: ExpertRef) -> str:
        """The model an expert's weights have the layout, dtype and tokenizer of: its path, or for
        a run or recipe source the working model of the config that merged it (its merges are
        written into it)."""
        if expert.path is not None:
            return self.model_ref(expert.path)
        if expert.run is not None:
            source = load_config(self.resolve_path(expert.run) / CONFIG_NAME)
        else:
            from evomerge.source_merges import read_recipe

            source = read_recipe(self.resolve_path(expert.recipe or "")).config
        return source.model_ref(source.models.base or source.expert_model(source.models.experts[0]))


def _looks_local(path: str) -> bool:
    return path.startswith((".", "/", "~")) or "\\" in path


def field_path(loc: tuple) -> str:
    """A pydantic error location as the config's dotted field path (``populations.0.options``)."""
    return ".".join(str(x) for x in loc if not (isinstance(x, str) and x.startswith("function-")))


def _settings_at(loc: tuple) -> list[str]:
    """The keys the section holding an unknown key ``loc`` accepts: the fields of the model
    reached by walking ``loc`` from RunConfig (list indices, dict keys and pydantic's union tags
    are steps that stay in the model they are in)."""
    model: type[BaseModel] = RunConfig
    for part in loc[:-1]:
        if isinstance(part, str) and part in model.model_fields:
            model = _model_in(model.model_fields[part].annotation) or model
    return list(model.model_fields)


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The settings model an annotation holds (``X | None``, ``list[X]``, ``dict[str, X]``)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _unknown_key(loc: tuple) -> str:
    """An unknown key's message, with the accepted key it is likely a misspelling of."""
    key = str(loc[-1]) if loc else ""
    close = difflib.get_close_matches(key, _settings_at(loc), n=1, cutoff=0.6)
    return f"unknown key; did you mean '{close[0]}'?" if close else "unknown key (check its spelling and level)"


def _format_errors(source: str, err: ValidationError) -> str:
    parts = []
    for e in err.errors()[:3]:
        loc = field_path(e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = _unknown_key(e["loc"])
        parts.append(f"{loc}: {msg}" if loc else msg)
    more = len(err.errors()) - 3
    return f"{source}: " + "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


def config_from_dict(data: Any, source: str = "<config>", base_dir: Path | None = None) -> RunConfig:
    if data is None:  # an empty file, or one holding only comments
        raise ConfigError(f"{source}: the config is empty; it needs at least models, merge, populations and fitness")
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of settings at the top level")
    if "base_dir" in data:  # a field set here, not read: accepted, it would be overwritten unseen
        raise ConfigError(f"{source}: base_dir: not a setting; relative paths start at the config file's directory")
    try:
        config = RunConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(source, err)) from None
    config.base_dir = (base_dir or Path.cwd()).resolve()
    config._source = source
    return config


class _UniqueKeyLoader(yaml.SafeLoader):
    """The safe loader, refusing a key written twice in one mapping: PyYAML would keep the last one
    silently, so a second ``budget:`` section (a paste, a merge) would replace the first unseen.
    Keys a merge (``<<: *defaults``) brings in may still be overridden."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # '<<': the base class merges it
                continue
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, Hashable) and key in seen:  # an unhashable key: the base class says so
                raise yaml.constructor.ConstructorError(
                    None, None, f"'{key}' is set twice in this mapping; keep one", key_node.start_mark
                )
            if isinstance(key, Hashable):
                seen.add(key)
        return super().construct_mapping(node, deep)


def load_config(path: str | Path) -> RunConfig:
    """Read and validate a run YAML; raises ``ConfigError`` with file and field on any problem."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path} is a directory; give the config file (a .yaml) inside it")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except OSError as exc:  # no permission, an I/O error
        raise ConfigError(f"{path}: cannot read the config file: {exc.strerror or first_line(exc)}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a YAML text file (it is not UTF-8 text)") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: invalid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    return config_from_dict(data, str(path), path.parent)
