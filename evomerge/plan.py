"""The run plan: a config resolved against the registries, once, before any model loads.

``RunPlan.from_config`` is where every cross-check between the config and the registries lives
(a merge method's parameters, experts and base; a strategy's options and what it requires; what a
black-box service can search), each failing as one ``ConfigError`` naming the file and the field.
From there on nothing looks a name up again: the plan hands out the merge method, the
per-population budgets, the models this machine reads, the merge space, one codec per population
and the strategies. ``evomerge validate`` builds the plan and stops there, so it catches every
mistake a run would, without loading a model.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

from pydantic import ValidationError

from evomerge.config import CONFIG_NAME, DataConfig, MergeConfig, RunConfig, field_path
from evomerge.errors import ConfigError, RunDirError, UserError
from evomerge.fitness import brings_own_examples, check_fitness_name, may_spend_api_usage, own_examples
from evomerge.merge import MERGE_METHODS
from evomerge.merge.declarations import LINEAR, LORA_COMPOSE
from evomerge.merge.method import LORA_FACTORS, MergeMethod
from evomerge.models.model_files import check_model_dir
from evomerge.strategies import STRATEGIES
from evomerge.strategies.base import MERGE_SPACE, SEED_RECIPES, Requirements, Strategy, StrategyOptions

if TYPE_CHECKING:
    from evomerge.executors import Executor
    from evomerge.space.codec import Codec
    from evomerge.space.merge_space import Space
    from evomerge.space.paths import PathSpace

SERVICE_METHODS: dict[str, tuple[MergeMethod, str]] = {
    "merge_service": (LORA_COMPOSE, "merges LoRA adapters by per-adapter alpha and beta"),
    "runtime_lora": (LORA_COMPOSE, "merges LoRA adapters by per-adapter alpha and beta"),
    "openai": (LINEAR, "mixes served models by per-model weights"),
}
"""The merge method a black-box service level (``api.level``) searches, and what it does."""
SERVICE_GRANULARITIES = ("global", "per_model")
"""A service takes one value per expert: no tensor groups."""


@dataclass(frozen=True)
class PopulationPlan:
    """One population as the run will start it."""

    name: str
    strategy: type[Strategy]
    options: StrategyOptions
    requires: Requirements
    budget: int | None
    """Evaluations (None: limited by time only)."""
    share: float
    seed: int

    @property
    def cache_scope(self) -> str:
        """Populations whose genomes mean the same merge share cached evaluations."""
        return f"{SEED_RECIPES}:{self.requires.split_grid}" if self.requires.space == SEED_RECIPES else "space"


class RunPlan:
    """A validated config and everything decided from it (see the module docstring)."""

    def __init__(self, config: RunConfig, source: str | None = None) -> None:
        self.config = config
        self.source = config.source if source is None else source
        self.method = self._merge_method()
        if self.dataflow:
            self._check_dataflow()
        else:
            self._check_models()
        self._check_fitness_data()
        budgets = self._budgets()
        self.populations = [self._population(i, budgets) for i in range(len(config.populations))]
        self._check_blackbox()
        self._check_spanned_devices()

    @property
    def dataflow(self) -> bool:
        """The run searches the data-flow space (layer paths through frozen sources), not merges."""
        return self.config.merge.space == "dataflow"

    @classmethod
    def from_config(cls, config: RunConfig, source: str | None = None) -> "RunPlan":
        return cls(config, source)

    # --- cross-checks ------------------------------------------------------------------------
    def _fail(self, where: str, message: str) -> ConfigError:
        return ConfigError(f"{self.source}: {where}: {message}")

    def _merge_method(self) -> MergeMethod:
        merge = self.config.merge
        if merge.method not in MERGE_METHODS:
            raise self._fail("merge.method", f"unknown merge method '{merge.method}' (known: {', '.join(sorted(MERGE_METHODS))})")
        method = MERGE_METHODS[merge.method]
        for field_name in ("fixed", "bounds", "init", "search"):
            for key in getattr(merge, field_name) or []:
                if key not in method.param_names:
                    raise self._fail(
                        f"merge.{field_name}",
                        f"'{key}' is not a parameter of {method.name} (it has: {', '.join(method.param_names)})",
                    )
        self._check_fixed(method)
        for key in merge.options:
            if key not in method.option_names:
                raise self._fail(
                    "merge.options",
                    f"'{key}' is not an option of {method.name} (it has: {', '.join(method.option_names) or 'none'})",
                )
        if method.global_only and merge.granularity != "global":
            raise self._fail("merge.granularity", f"merge method '{method.name}' only supports granularity 'global'")
        return method

    def _check_fixed(self, method: MergeMethod) -> None:
        """A fixed value must lie in its parameter's range (``merge.bounds``, else the declared one),
        as a searched one does: a merge never tried outside it is not known to mean anything."""
        merge, n = self.config.merge, len(self.config.models.experts)
        for name, value in merge.fixed.items():
            low, high = merge.bounds.get(name, method.param(name).bounds_for(n))
            if not low <= value <= high:
                raise self._fail(
                    f"merge.fixed.{name}",
                    f"{value} lies outside the bounds [{low}, {high}] of {method.name}'s '{name}'"
                    " (widen them in merge.bounds if you mean it)",
                )

    def _check_fitness_data(self) -> None:
        """``fitness.name`` is one a worker can resolve, and ``fitness.data`` names the examples,
        unless the fitness brings its own (lm-eval tasks)."""
        fitness = self.config.fitness
        try:
            check_fitness_name(fitness.name)
        except UserError as exc:
            raise self._fail("fitness.name", str(exc)) from None
        if brings_own_examples(fitness.name):
            given = [name for name, value in (("data", fitness.data), ("test_data", fitness.test_data), ("tasks", fitness.tasks)) if value]
            if given:
                raise self._fail(
                    f"fitness.{given[0]}",
                    f"fitness '{fitness.name}' scores the documents of its own tasks and cannot read examples; remove fitness.{given[0]}",
                )
        if not brings_own_examples(fitness.name) and fitness.data is None:
            raise self._fail("fitness.data", f"fitness '{fitness.name}' needs examples: name their source in fitness.data")

    def _check_models(self) -> None:
        method, models = self.method, self.config.models
        n = len(models.experts)
        for i, expert in enumerate(models.experts):
            for field_name in ("run", "recipe"):
                if getattr(expert, field_name) is not None:
                    raise self._fail(
                        f"models.experts.{i}.{field_name}",
                        f"a recorded merge ({field_name}) is a source of merge.space 'dataflow' only; give a model path",
                    )
        if method.needs_base and models.base is None:
            raise self._fail("merge.method", f"'{method.name}' combines task vectors and needs models.base")
        if n < method.min_models or (method.max_models is not None and n > method.max_models):
            wanted = f"exactly {method.min_models}" if method.min_models == method.max_models else f"at least {method.min_models}"
            raise self._fail("models.experts", f"merge method '{method.name}' takes {wanted} experts, got {n}")
        if method.needs_fisher:
            for i, expert in enumerate(models.experts):
                if expert.data is None:
                    raise self._fail(
                        f"models.experts.{i}.data",
                        f"merge method '{method.name}' estimates each expert's Fisher information on its own"
                        " data; give every expert a data source",
                    )

    def _check_dataflow(self) -> None:
        """A path runs frozen layers of the experts (its sources): no merge parameters, no base,
        no service that could run it."""
        config = self.config
        defaults = MergeConfig()  # compared by value: a run's resolved snapshot spells out every default
        merge_fields = [
            name for name in MergeConfig.model_fields
            if name not in ("space", "dataflow") and getattr(config.merge, name) != getattr(defaults, name)
        ]
        if merge_fields:
            raise self._fail(f"merge.{merge_fields[0]}", "merge parameters do not apply to merge.space 'dataflow'; remove it")
        if config.models.base is not None:
            raise self._fail(
                "models.base", "the data-flow space runs the experts' own layers (the head source supplies the head); remove models.base"
            )
        if config.api is not None:
            raise self._fail("merge.space", "a data-flow path runs on white-box workers; remove the api section")

    def _check_decoder_layers(self) -> None:
        """Every source has a decoder layer list a path can route through, read from its config
        on the meta device (no weights), so a model without one (GPT-2's and Falcon's ``transformer.h``)
        is named before any source loads."""
        from evomerge.models.loading import meta_model
        from evomerge.workers.path_model import decoder_stack

        config = self.config
        for i, expert in enumerate(config.models.experts):
            try:
                decoder_stack(meta_model(config.expert_model(expert)))
            except UserError as exc:
                raise self._fail(f"models.experts.{i}", str(exc)) from None

    def _check_merge_sources(self) -> None:
        """A run or recipe source must name a merge the workers can rebuild: a parameter-space
        run's successful candidate, over models this machine holds."""
        from evomerge.source_merges import RecipeFileError, recorded_merge

        config = self.config
        for i, expert in enumerate(config.models.experts):
            if expert.path is not None:
                continue
            field_name = "run" if expert.run is not None else "recipe"
            where, named = f"models.experts.{i}.{field_name}", config.resolve_path(expert.source)
            if expert.run is not None and not (named / CONFIG_NAME).is_file():
                raise self._fail(where, f"{named} is not a run directory (no {CONFIG_NAME})")
            try:
                merge = recorded_merge(config, expert)
            except RecipeFileError as exc:
                raise self._fail(where, str(exc)) from None
            except RunDirError:
                raise self._fail(where, f"run {named} has no successful evaluation yet; run it first") from None
            source = merge.config
            if source.merge.space != "parameter":
                raise self._fail(where, f"{field_name} {named} searched merge.space '{source.merge.space}'; a source must merge parameters")
            if merge.population not in [p.name for p in source.populations]:
                raise self._fail(where, f"{named}: its config has no population '{merge.population}' to decode the genome in")
            try:
                models = RunPlan.from_config(source, f"{named} (its config)").local_models()
            except ConfigError as exc:
                raise self._fail(where, str(exc)) from None
            for model_field, ref in models:
                resolved = source.model_ref(ref)
                if Path(resolved).is_absolute() and not Path(resolved).exists():
                    raise self._fail(where, f"{named} merges {resolved} ({model_field}), which is not on this machine")

    def _population(self, i: int, budgets: Mapping[str, int | None]) -> PopulationPlan:
        pop, config = self.config.populations[i], self.config
        if pop.strategy not in STRATEGIES:
            raise self._fail(f"populations.{i}.strategy", f"unknown strategy '{pop.strategy}' (known: {', '.join(sorted(STRATEGIES))})")
        strategy = STRATEGIES[pop.strategy]
        try:
            options = strategy.Options.model_validate(pop.options)
        except ValidationError as err:
            first = err.errors()[0]
            if first["type"] == "extra_forbidden":
                msg = _unknown_option(str(first["loc"][-1]), pop.strategy, list(strategy.Options.model_fields))
            else:
                msg = first["msg"]
            where = field_path(first["loc"])
            raise self._fail(f"populations.{i}.options{'.' + where if where else ''}", msg) from None
        requires = strategy.requires(options)
        if self.dataflow and (requires.gradient or requires.genes or requires.space != MERGE_SPACE):
            raise self._fail(
                f"populations.{i}.strategy",
                f"{pop.strategy} with these options searches merge parameters or weights; merge.space 'dataflow'"
                " is searched by cmaes, m2n2 (archive: genomes), ga, random and the optuna samplers",
            )
        if requires.gradient and not self.method.differentiable:
            differentiable = sorted(name for name, m in MERGE_METHODS.items() if m.differentiable)
            raise self._fail(
                f"populations.{i}.strategy",
                f"{pop.strategy} learns {' or '.join(differentiable)} coefficients by gradient descent on white-box"
                f" workers; merge.method is '{self.method.name}'",
            )
        if requires.gradient and brings_own_examples(config.fitness.name):
            raise self._fail(
                f"populations.{i}.strategy",
                f"{pop.strategy} descends the entropy of the model's outputs on fitness.data, which fitness"
                f" '{config.fitness.name}' does not read; use another fitness or strategy",
            )
        searched = config.merge.search if config.merge.search is not None else [
            p for p in self.method.param_names if p not in config.merge.fixed
        ]
        missing = [gene for gene in requires.genes if gene not in searched or gene in config.merge.fixed]
        if missing:
            raise self._fail(
                f"populations.{i}.strategy",
                f"{pop.strategy} searches the genes {' and '.join(requires.genes)}; merge.method '{self.method.name}'"
                f" does not search {missing[0]}",
            )
        unknown = [o for o in pop.options.get("objectives", []) if o != "fitness" and o not in config.fitness.tasks]
        if unknown and config.api is None:  # a white-box worker measures the fitness and the tasks
            raise self._fail(
                f"populations.{i}.options.objectives",
                f"'{unknown[0]}' is neither 'fitness' nor a task of fitness.tasks (tasks: {', '.join(config.fitness.tasks) or 'none'})",
            )
        return PopulationPlan(pop.name, strategy, options, requires, budgets[pop.name], pop.share, config.seed + 1000 * i)

    def _check_blackbox(self) -> None:
        """What a black-box run can search: one value per expert of its service's method, no weights."""
        config = self.config
        if config.api is None:
            usage_limited = any(getattr(config.budget, key) is not None for key in ("requests", "tokens", "cost"))
            if usage_limited and not may_spend_api_usage(config.fitness.name):
                raise self._fail(
                    "budget",
                    f"requests, tokens and cost limit API usage, which fitness '{config.fitness.name}' has none of;"
                    " add an api section (black-box run) or score with a judge (fitness.name: judge)",
                )
            return
        if config.merge.frozen:
            raise self._fail("merge.frozen", "black-box runs merge no weights of their own; remove merge.frozen")
        method, what = SERVICE_METHODS[config.api.level]
        if self.method is not method or config.merge.granularity not in SERVICE_GRANULARITIES:
            raise self._fail(
                "api.level",
                f"a {config.api.level} service {what}; use merge.method {method.name} with granularity per_model or global",
            )
        for i, pop in enumerate(self.populations):
            if pop.requires.space == SEED_RECIPES:
                raise self._fail(f"populations.{i}.options.archive", "seed recipes need the weights; black-box runs cannot use them")

    def _check_spanned_devices(self) -> None:
        """A worker spanning several devices merges full models tensor by tensor, each on its own
        shard's device; a run whose workers need more of their models on one device is refused."""
        if self.config.models.devices == 1:
            return
        method = self.method
        if self.config.api is not None:
            why = "black-box workers hold no weights"
        elif self.dataflow:
            why = "a data-flow worker runs the sources' own layers on one device"
        elif method.inputs == LORA_FACTORS:
            why = f"{method.name} merges LoRA factors into an adapter slot on one device"
        elif method.needs_fisher:
            why = f"{method.name} estimates each expert's Fisher information with backward passes on one device"
        elif self.gradient_populations:
            why = "adamerging's entropy gradient differentiates through every expert on one device"
        else:
            return
        raise self._fail("models.devices", f"{why}; use models.devices 1")

    def _budgets(self) -> dict[str, int | None]:
        """Evaluations per population, split by ``share`` (None: limited by time only)."""
        config = self.config
        total = config.budget.evaluations
        if total is None:
            return {p.name: None for p in config.populations}
        total_share = sum(p.share for p in config.populations)
        budgets = {p.name: int(total * p.share / total_share) for p in config.populations}
        for p in config.populations[: total - sum(budgets.values())]:
            budgets[p.name] += 1
        starved = [name for name, budget in budgets.items() if budget < 1]
        if starved:  # refused before any strategy is built: building them alone can take minutes
            raise self._fail(
                "budget.evaluations",
                f"{total} evaluations shared among {len(budgets)} populations leave {len(starved)} of them"
                f" ('{starved[0]}' first) without a single evaluation; raise budget.evaluations or drop populations",
            )
        return budgets

    # --- what the run uses -------------------------------------------------------------------
    @property
    def budgets(self) -> dict[str, int | None]:
        return {p.name: p.budget for p in self.populations}

    @property
    def seed_recipe_populations(self) -> frozenset[str]:
        """Populations that search M2N2's seed recipes (their codecs need the experts' block Grams)."""
        return frozenset(p.name for p in self.populations if p.requires.space == SEED_RECIPES)

    @property
    def gradient_populations(self) -> frozenset[str]:
        """Populations whose evaluations must carry the entropy gradient (white-box workers)."""
        return frozenset(p.name for p in self.populations if p.requires.gradient)

    @property
    def working_model(self) -> str:
        """The model whose parameters merges are written into: the base, else the first expert (in
        the data-flow space, the head source a path runs in)."""
        config = self.config
        return config.model_ref(config.models.base) if config.models.base else config.expert_model(config.models.experts[config.head])

    def local_models(self) -> list[tuple[str, str]]:
        """(field, reference) of the models this machine reads: all of them in white-box runs; in
        black-box runs only runtime_lora's adapters (a merge service names its adapters, and the
        base is always a served model name)."""
        config = self.config
        refs = [("models.base", config.models.base)] if config.models.base and config.api is None else []
        if config.api is None or config.api.level == "runtime_lora":
            refs += [(f"models.experts.{i}.path", e.path) for i, e in enumerate(config.models.experts) if e.path is not None]
        return refs  # type: ignore[return-value]

    def check_files(self) -> None:
        """What this machine must hold before any model loads (``validate --no-files`` skips it):
        the local model directories (a config, and weights whose headers read), fitness data with
        at least one example and only finite numbers, and the device ``models.device`` names when
        the workers run here."""
        config = self.config
        for field_name, ref in self.local_models():
            resolved = config.model_ref(ref)
            if Path(resolved).is_absolute() and not Path(resolved).exists():
                raise self._fail(field_name, f"model directory not found: {resolved}")
            if Path(resolved).exists():  # a hub id is read by the workers
                try:
                    check_model_dir(resolved)
                except UserError as exc:
                    raise self._fail(field_name, str(exc)) from None
        if self.dataflow:
            self._check_merge_sources()
            self._check_decoder_layers()
            self.path_space()
        for field_name, data in self._data_sections():
            if data.source.startswith("hf:"):  # a hub dataset is fetched by the workers, not here
                continue
            from evomerge.fitness.data import read_examples

            try:
                read_examples(
                    data.source, data.split, data.classes, data.limit, config.base_dir,
                    template=data.template, target=data.target, choices=data.choices, label=data.label,
                )
            except ConfigError as exc:
                raise self._fail(field_name, str(exc)) from None
        self._check_own_examples()
        self._check_device()
        self._check_run_dir()

    def _check_run_dir(self) -> None:
        """A run directory where one can be made: not a file, nor under one (``run`` would stop there)."""
        run_dir = self.config.run_path()
        blocking = next((p for p in (run_dir, *run_dir.parents) if p.exists() and not p.is_dir()), None)
        if blocking is not None:
            raise self._fail("run_dir", f"{blocking} is a file, not a directory; choose another run directory")

    def _check_own_examples(self) -> None:
        """A fitness that brings its examples (lm-eval tasks) builds them here once, so a missing
        task, include_path or extra is named before any model loads."""
        fitness = self.config.fitness
        if brings_own_examples(fitness.name):
            try:
                own_examples(fitness.name, fitness.options)
            except UserError as exc:
                raise ConfigError(f"{self.source}: {exc}") from None

    def _data_sections(self) -> list[tuple[str, DataConfig]]:
        """(field, section) of every data set the workers read."""
        fitness, experts = self.config.fitness, self.config.models.experts
        sections = [("fitness.data", fitness.data)] if fitness.data is not None else []
        sections += [("fitness.test_data", fitness.test_data)] if fitness.test_data is not None else []
        sections += [(f"fitness.tasks.{name}", data) for name, data in fitness.tasks.items()]
        if self.config.api is None:  # white-box: an expert's own data feeds its Fisher estimate
            sections += [(f"models.experts.{i}.data", e.data) for i, e in enumerate(experts) if e.data is not None]
        return sections

    def _check_device(self) -> None:
        """An explicit ``models.device`` must exist here when the workers run on this machine (the
        inline executor, or Ray started locally); a cluster's workers check it on their own node.
        ``auto`` and ``cpu`` always exist, so only an explicit accelerator, or a worker spanning
        several devices, imports torch."""
        config = self.config
        models = config.models
        if config.api is not None or (models.device in ("auto", "cpu") and models.devices == 1):
            return
        if config.executor == "ray" and (config.workers.address or os.environ.get("RAY_ADDRESS")):
            return
        from evomerge.models.loading import resolve_devices

        try:
            resolve_devices(models.device, models.devices)
        except ConfigError as exc:
            raise ConfigError(f"{self.source}: {exc}") from None

    def space(self, tensor_names: Sequence[str]) -> "Space":
        """The merge space over tensors of these names (every process builds the same one)."""
        from evomerge.space.merge_space import Space

        merge = self.config.merge
        try:
            return Space.build(
                self.method,
                tensor_names,
                len(self.config.models.experts),
                granularity=merge.granularity,
                layer_groups=merge.layer_groups,
                search=merge.search,
                fixed=merge.fixed,
                bounds=merge.bounds,
                init=merge.init,
                options=merge.options,
                frozen=merge.frozen,
            )
        except ValueError as exc:  # e.g. per_layer_group on a model without numbered layers
            raise self._fail("merge", str(exc)) from None

    def path_space(self) -> "PathSpace":
        """The data-flow space over the experts' layers, from their configs alone: sources must
        share a hidden size (a hidden state passes from one's layer to another's)."""
        from evomerge.models.loading import load_config
        from evomerge.space.paths import PathSpace

        config, flow = self.config, self.config.merge.dataflow
        counts, first_hidden = [], None
        for i, expert in enumerate(config.models.experts):
            model_config = load_config(config.expert_model(expert))
            text = model_config.get_text_config()
            hidden, layers = getattr(text, "hidden_size", None), getattr(text, "num_hidden_layers", None)
            if hidden is None or layers is None:
                raise self._fail(f"models.experts.{i}.path", f"a {model_config.model_type} model has no numbered decoder layers to route through")
            if first_hidden is not None and hidden != first_hidden:
                raise self._fail(
                    f"models.experts.{i}.path",
                    f"hidden size {hidden} differs from the first source's {first_hidden}; a path passes one hidden state through every source",
                )
            if flow.scaling != "none":
                from evomerge.models.path_export import unfoldable

                why = unfoldable(text.model_type)
                if why is not None:
                    raise self._fail(
                        "merge.dataflow.scaling",
                        f"{why}, so the best path could not be exported; search it with merge.dataflow.scaling: none",
                    )
            first_hidden = hidden
            counts.append(int(layers))
        try:
            return PathSpace(
                tuple(counts), flow.repeats, flow.scaling, tuple(flow.scale_bounds), flow.max_layers,
                tuple(config.models.expert_labels()), config.head,
            )
        except ValueError as exc:
            raise self._fail("merge.dataflow", str(exc)) from None

    def codecs(self, space: "Space | PathSpace", layout: Mapping[str, Sequence[int]]) -> dict[str, "Codec"]:
        """One codec per population over a worker's space: in the data-flow space, the path
        space's; else over its merged tensors (``name → shape``, model order), the merge space's
        or seed recipes on the population's split grid."""
        from evomerge.space.codec import MergeCodec, PathCodec, SeedRecipeCodec

        if self.dataflow:
            return {p.name: PathCodec(space) for p in self.populations}
        labels = tuple(self.config.models.expert_labels())
        shapes = [tuple(shape) for shape in layout.values()]
        codecs: dict[str, Codec] = {
            p.name: SeedRecipeCodec(p.requires.split_grid, shapes, labels)  # type: ignore[arg-type]
            if p.requires.space == SEED_RECIPES
            else MergeCodec(space)
            for p in self.populations
        }
        return codecs

    def tensor_names(self) -> list[str]:
        """The working model's parameter names, from its config alone; none in black-box runs,
        whose services take one value per expert."""
        if self.config.api is not None:
            return []
        from evomerge.models.loading import parameter_names

        return parameter_names(self.working_model)

    def strategies(self, executor: "Executor") -> tuple["Space | PathSpace", list[Strategy]]:
        """The run's space and one fresh strategy per population (a resume builds the same ones).

        A seed-recipe population needs the experts' per-block Gram matrices, which only a worker
        holding the weights can compute: they come back through ``executor.run_once``.
        """
        from evomerge.space.genes import SearchSpec
        from evomerge.space.seed_recipes import SeedGram
        from evomerge.workers.jobs import BlockGrams

        space = self.path_space() if self.dataflow else self.space(self.tensor_names())
        strategies = []
        for i, pop in enumerate(self.populations):
            if pop.requires.space == SEED_RECIPES:
                try:
                    edges, grams = executor.run_once(BlockGrams(pop.requires.split_grid))  # type: ignore[arg-type]
                except ValueError as exc:  # e.g. an element grid on a model too large for it
                    raise ConfigError(f"populations '{pop.name}': {exc}") from None
                spec = SearchSpec.seed_recipes(SeedGram.from_block_grams(edges, grams))
            else:
                spec = space.search_spec()
            try:
                strategies.append(pop.strategy(pop.name, spec, pop.seed, pop.options))
            except ValueError as exc:
                raise self._fail(f"populations.{i}", str(exc)) from None
        return space, strategies


def _unknown_option(option: str, strategy: str, known: list[str]) -> str:
    """An unknown strategy option's message: the option it likely misspells, else the ones there are."""
    close = difflib.get_close_matches(option, known, n=1, cutoff=0.6)
    if close:
        return f"unknown option; did you mean '{close[0]}'?"
    return f"unknown option ({strategy} takes {', '.join(known)})"
