"""The black-box worker: scores candidates purely through a model service's API.

It plugs into the executors like the white-box ``WhiteBoxWorker`` (``evaluate(candidate) ->
Evaluation``), but holds no base model: a genome decodes through its population's codec to a
recipe with one value per expert (per-adapter α and β, or per-model weights), the service level
(``api.level``) turns it into a model name on the service, and the black-box fitness function
scores that model through ``/v1/completions``:

* ``merge_service`` — Evo-Merging's setting: one merge session over the adapters named in
  ``models.experts``; each candidate is ``POST /v1/sessions/{id}/materialize``-d and served under
  the name the service answers;
* ``runtime_lora`` — a vLLM-compatible server: the worker merges the adapters it reads from
  ``models.experts`` (local directories) with ``lora_compose``, writes the result under
  ``api.adapter_dir``, loads it with ``/v1/load_lora_adapter``, scores it and unloads it;
* ``openai`` — plain hosted models that cannot be merged: ``models.experts`` name served models
  and a ``linear`` genome's weights combine them at the output, as a mixture of their
  likelihoods; generation goes to the most weighted model. Each model's answers are cached once,
  so after the first candidate the search costs nothing.

Requests of one candidate run concurrently in the worker's own event loop. A service that forgets
a session or model (it restarted) answers 404; the worker then sets the candidate up again, and
the answers it already had come from the response cache. Each evaluation's ``metrics["usage"]``
holds the requests, tokens and cost the candidate took (a cached answer costs nothing), and its
``responses`` the new answers, which the controller records in the run store (the worker's cache
lives in its memory, seeded with what the run recorded: ``evomerge.workers.jobs.SeedResponses``).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import shutil
import uuid
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Sequence

import numpy as np

from evomerge.config import RunConfig
from evomerge.errors import ConfigError, UserError
from evomerge.fitness import brings_own_examples, own_examples, resolve_blackbox_fitness, scores_and_metrics, with_options
from evomerge.fitness.blackbox import Loglikelihood
from evomerge.fitness.data import load_examples
from evomerge.fitness.result import FitnessFailed, add_metrics, per_task_metrics
from evomerge.service.client import ApiClient, ApiError, MalformedResponse, api_key_from_env, refuses_the_key
from evomerge.plan import RunPlan
from evomerge.records import Candidate, Evaluation
from evomerge.service.response_cache import ResponseCache
from evomerge.service.served_model import ApiServedModel
from evomerge.space.merge_space import Recipe
from evomerge.workers.base import Scored, Worker, racing_of

RECOVERY_ATTEMPTS = 3
"""Set-ups of one candidate when the service answers 404 for what it was just given (a restart)."""
OUTAGE_CANDIDATES = 3
"""Candidates in a row that the service fails to answer (after all retries: down, or still
rate-limiting) before the run stops: past that it is down or out of quota, not flaky, and failing
every further candidate would only burn the budget."""


class ServiceUnreachable(UserError):
    """The model service cannot be reached, stopped answering, or refuses the run's credentials."""


Coefficients = dict[str, list[float]]
"""A recipe's values per merge parameter, one per expert (``alpha``/``beta``, ``weight``): a
service's search space has a single group."""


def coefficients(recipe: Recipe) -> Coefficients:
    return {param: groups[0] for param, groups in recipe.values.items()}


def merge_identity(config: RunConfig, recipe: Recipe) -> str:
    """What a merge is, independent of the name a service gives it: the response cache's model."""
    adapters = [e.path for e in config.models.experts]
    return json.dumps({"base": config.models.base, "adapters": adapters, **coefficients(recipe)}, sort_keys=True)


class MergeService:
    """Evo-Merging's merge service: the service merges its own adapters from α and β."""

    def __init__(self, client: ApiClient, config: RunConfig, cache: ResponseCache) -> None:
        self.client, self.config, self.cache = client, config, cache
        self.adapters = [e.path for e in config.models.experts]
        self.session_id: str | None = None

    def required_models(self) -> list[str]:
        return self.adapters

    def forget(self) -> None:
        self.session_id = None

    @asynccontextmanager
    async def model(self, tag: str, recipe: Recipe) -> AsyncIterator[ApiServedModel]:
        values = coefficients(recipe)
        alpha, beta = values["alpha"], values["beta"]

        async def materialize() -> str:
            if self.session_id is None:
                answer = await self.client.request("POST", "/v1/sessions", {"adapters": self.adapters})
                self.session_id = _field(answer, "session_id", "POST /v1/sessions")
            path = f"/v1/sessions/{self.session_id}/materialize"
            answer = await self.client.request("POST", path, {"alpha": alpha, "beta": beta, "tag": tag})
            return _field(answer, "model", f"POST {path}")

        yield ApiServedModel(self.client, merge_identity(self.config, recipe), self.cache, materialize)


class RuntimeLora:
    """A vLLM-compatible server with runtime LoRA: the worker merges, the server loads and serves."""

    def __init__(self, client: ApiClient, config: RunConfig, cache: ResponseCache) -> None:
        from safetensors.torch import load_file

        from evomerge.workers.materializer import Materializer

        self.client, self.config, self.cache = client, config, cache
        if config.models.base is None:
            raise ConfigError("models.base: name the served base model the adapters apply to (api.level runtime_lora)")
        self.adapter_dir = config.resolve_path(config.api.adapter_dir)
        self.adapter_dir.mkdir(parents=True, exist_ok=True)
        configs, weights = [], []
        for i, expert in enumerate(config.models.experts):
            path = Path(config.model_ref(expert.path))
            try:
                configs.append(json.loads((path / "adapter_config.json").read_text()))
                weights.append((expert.path, load_file(str(path / "adapter_model.safetensors"))))
            except (OSError, ValueError) as exc:
                raise ConfigError(f"models.experts.{i}.path: not a LoRA adapter directory with safetensors: {exc}") from None
        shape = {(c.get("r"), c.get("lora_alpha"), c.get("use_rslora", False)) for c in configs}
        if len(shape) > 1:
            raise ConfigError("models.experts: composing adapters needs adapters of one rank and lora_alpha")
        self.adapter_config = {**configs[0], "base_model_name_or_path": config.models.base}
        self.targets = {k: t.float().clone() for k, t in weights[0][1].items()}
        self.materializer = Materializer.from_state_dicts(self.targets, iter(weights), len(weights))

    def required_models(self) -> list[str]:
        return [self.config.models.base]

    def forget(self) -> None:
        """Nothing to forget: every candidate's adapter is loaded afresh."""

    @asynccontextmanager
    async def model(self, tag: str, recipe: Recipe) -> AsyncIterator[ApiServedModel]:
        from safetensors.torch import save_file

        name = f"evomerge-{uuid.uuid4().hex[:16]}"
        directory = self.adapter_dir / name

        async def load() -> str:
            self.materializer.apply(recipe)
            directory.mkdir()
            save_file(self.targets, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
            (directory / "adapter_config.json").write_text(json.dumps(self.adapter_config))
            await self.client.request("POST", "/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(directory)})
            return name

        model = ApiServedModel(self.client, merge_identity(self.config, recipe), self.cache, load)
        try:
            yield model
        finally:
            if model.prepared:
                try:
                    await self.client.request("POST", "/v1/unload_lora_adapter", {"lora_name": name})
                except ApiError:
                    pass  # a restarted server no longer has it
            shutil.rmtree(directory, ignore_errors=True)


class OutputMixture:
    """A candidate over plain served models: their likelihoods mixed by the genome's weights."""

    def __init__(self, members: Sequence[ApiServedModel], weights: Sequence[float]) -> None:
        clipped = [max(w, 0.0) for w in weights]
        total = sum(clipped)
        self.weights = [w / total for w in clipped] if total > 0 else [1.0 / len(clipped)] * len(clipped)
        self.members = list(members)
        self.leader = max(range(len(self.weights)), key=self.weights.__getitem__)

    async def loglikelihood(self, context: str, continuation: str) -> Loglikelihood:
        used = [i for i, w in enumerate(self.weights) if w > 0]
        results = await asyncio.gather(*(self.members[i].loglikelihood(context, continuation) for i in used))
        terms = [math.log(self.weights[i]) + r.logprob for i, r in zip(used, results)]
        peak = max(terms)
        lead = results[used.index(self.leader)]
        return Loglikelihood(peak + math.log(sum(math.exp(t - peak) for t in terms)), lead.tokens, lead.is_greedy)

    async def generate(self, prompt: str, *, max_tokens: int, stop: Sequence[str] = ()) -> str:
        return await self.members[self.leader].generate(prompt, max_tokens=max_tokens, stop=stop)


class PlainModels:
    """Plain hosted models behind an OpenAI-compatible API: nothing is merged on the service."""

    def __init__(self, client: ApiClient, config: RunConfig, cache: ResponseCache) -> None:
        self.names = [e.path for e in config.models.experts]
        self.members = [ApiServedModel(client, f"served:{n}", cache, _constant(n)) for n in self.names]

    def required_models(self) -> list[str]:
        return self.names

    def forget(self) -> None:
        """Nothing to forget: served models keep their names."""

    @asynccontextmanager
    async def model(self, tag: str, recipe: Recipe) -> AsyncIterator[OutputMixture]:
        yield OutputMixture(self.members, coefficients(recipe)["weight"])


def _constant(name: str):
    async def prepare() -> str:
        return name

    return prepare


SERVICE_LEVELS = {"merge_service": MergeService, "runtime_lora": RuntimeLora, "openai": PlainModels}


def _field(answer: Any, key: str, what: str) -> str:
    if not isinstance(answer, dict) or not isinstance(answer.get(key), str):
        raise MalformedResponse(f"{what}: the answer has no '{key}'")
    return answer[key]


class BlackBoxWorker(Worker):
    """Scores candidates of one black-box run (inline, or inside a Ray actor)."""

    def __init__(self, plan: RunPlan, worker_id: str | None = None) -> None:
        config = plan.config
        api = config.api
        self.config = config
        self.worker_id = worker_id or f"api-{os.getpid()}"
        self.fitness_name = config.fitness.name
        fitness = resolve_blackbox_fitness(config.fitness.name)
        self.fitness = with_options(fitness, config.fitness.name, config.fitness.options)
        fitness = config.fitness
        own = brings_own_examples(fitness.name)
        self.examples = own_examples(fitness.name, fitness.options) if own else self.load_examples(fitness.data)
        self.racing = racing_of(config)
        self.space = plan.space([])  # one value per expert: no tensors to group
        self.codecs = plan.codecs(self.space, {})
        self.cache = ResponseCache()
        self._loop = asyncio.new_event_loop()
        self.client = ApiClient(
            api.base_url,
            api_key_from_env(api.api_key_env),
            concurrency=api.concurrency,
            requests_per_second=api.requests_per_second,
            timeout=api.timeout,
            max_retries=api.max_retries,
            backoff=api.backoff,
            max_backoff=api.max_backoff,
            prompt_token_price=api.price.prompt_token,
            completion_token_price=api.price.completion_token,
        )
        self.service = SERVICE_LEVELS[api.level](self.client, config, self.cache)
        self._outages = 0
        self._stop: ServiceUnreachable | None = None
        self._loop.run_until_complete(self._check_service())

    def load_examples(self, data) -> list[dict[str, Any]]:
        examples = load_examples(
            data.source, data.split, data.classes, data.limit, self.config.base_dir,
            template=data.template, target=data.target, choices=data.choices, label=data.label,
        )
        if not isinstance(examples, list):
            raise ConfigError(f"fitness data '{data.source}': black-box runs score text (.jsonl or .csv data)")
        return examples

    async def _check_service(self) -> None:
        """Fail the run at start, naming the setting to fix, when the service is unusable."""
        url = self.config.api.base_url
        try:
            listing = await self.client.request("GET", "/v1/models")
        except ApiError as exc:
            if refuses_the_key(exc):
                raise self._refused(exc) from None
            raise ServiceUnreachable(f"cannot reach the model service at {url} (api.base_url): {exc}") from None
        entries = listing.get("data") if isinstance(listing, dict) else None
        if not isinstance(entries, list):  # a web page or another API at api.base_url
            raise ServiceUnreachable(
                f"the service at {url} (api.base_url) answered GET /v1/models without a model list: {str(listing)[:60]!r}"
            )
        served = {m.get("id") for m in entries if isinstance(m, dict)}
        missing = [name for name in self.service.required_models() if name not in served]
        if missing:
            raise ServiceUnreachable(f"the model service at {url} does not serve {', '.join(missing)} (models in the config)")

    async def _score(self, tag: str, recipe: Recipe, examples: list[dict[str, Any]]) -> tuple[np.ndarray, dict[str, Any]]:
        """Per-example scores and what the fitness reported besides (a judge's own API usage)."""
        for attempt in range(RECOVERY_ATTEMPTS):
            try:
                async with self.service.model(tag, recipe) as model:
                    raw = await self.fitness(model, examples)
                return scores_and_metrics(raw, len(examples), self.fitness_name)
            except ApiError as exc:
                if exc.status != 404 or attempt == RECOVERY_ATTEMPTS - 1:
                    raise
                self.service.forget()  # the service restarted and lost the session or the adapter
        raise AssertionError("unreachable")

    def evaluate(self, candidate: Candidate) -> Evaluation:
        recipe = self.codecs[candidate.population].decode(candidate.genome)
        return self._evaluate(candidate.id, candidate.population, recipe, self.examples, candidate.must_beat, candidate.rival)

    def _evaluate(
        self,
        candidate_id: str,
        population: str,
        recipe: Recipe,
        examples: list[dict[str, Any]],
        must_beat: float | None = None,
        rival: np.ndarray | None = None,
    ) -> Evaluation:
        """Score one merge, with the requests, tokens and cost it took (a cached answer costs nothing).

        Racing (``must_beat`` set, with the ``rival``'s scores) scores it stage by stage, each stage a call on the service with
        the merge prepared afresh, and a survivor's last call asks only for the examples the stages
        left, so its requests and cost are those of a run without racing.
        """
        if self._stop is not None:  # the last candidate found the service gone: stop before asking it again
            raise self._stop
        usage_before, hits_before = self.client.usage.copy(), self.cache.hits
        spent: dict[str, Any] = {}  # what the fitness reported (a judge's usage), over racing's stages

        def score(subset: list[dict[str, Any]]) -> np.ndarray:
            try:
                scores, metrics = self._loop.run_until_complete(self._score(candidate_id, recipe, subset))
            except FitnessFailed as exc:  # a judge's requests before the failure were paid for
                add_metrics(spent, exc.metrics)
                raise
            add_metrics(spent, metrics)
            return scores

        def race() -> Scored:
            raced = self.racing.race(score, examples, must_beat, rival)
            return raced, {"examples_scored": raced.examples_scored}

        ev = self.scored(candidate_id, population, race)
        add_metrics(ev.metrics, spent)
        used = self.client.usage - usage_before
        fitness_usage = ev.metrics.pop("usage", {})  # the judge's, added to the service's
        ev.metrics.update({"usage": add_metrics(used.metrics(), fitness_usage), "api_retries": used.retries,
                           "cached_responses": self.cache.hits - hits_before})
        if ev.per_example is not None:
            ev.metrics.update(per_task_metrics(examples, ev.per_example))
        ev.responses = self.cache.take_new()  # also a failed candidate's: they were paid for
        return ev

    def _refused(self, exc: ApiError) -> ServiceUnreachable:
        """The one line for a refused key, at start or mid-run: the variable holding it, never the key."""
        env = self.config.api.api_key_env
        key = f"the key in ${env}" if env else "requests without a key"
        return ServiceUnreachable(f"the model service at {self.config.api.base_url} refused {key} (api.api_key_env): {exc}")

    def _failed(self, exc: Exception) -> None:
        """Stop the run (resumably) on a refused key at once, or once outages persist: the stop is
        raised by the next candidate, so this failed one is still recorded with the requests and
        answers it paid for (the budget counts them; resume does not ask them again)."""
        if isinstance(exc, ApiError) and refuses_the_key(exc):
            self._stop = ServiceUnreachable(f"{self._refused(exc)}; resume the run once it is accepted")
        else:
            self._count_outage(exc)

    def _succeeded(self) -> None:
        self._outages = 0

    def _count_outage(self, exc: Exception) -> None:
        """Mark the run to stop (resumably) once the service has stopped answering for good."""
        down = isinstance(exc, ApiError) and not isinstance(exc, MalformedResponse) and (
            exc.status is None or exc.status == 429 or exc.status >= 500
        )
        self._outages = self._outages + 1 if down else 0
        if self._outages >= OUTAGE_CANDIDATES:
            self._stop = ServiceUnreachable(
                f"the model service at {self.config.api.base_url} stopped answering ({self._outages} candidates in a row,"
                f" after api.max_retries retries each): {exc}; resume the run once it is back"
            )

    def expert_baselines(self) -> list[Evaluation]:
        """The base (when the method declares values that give it: every β 0) and each expert
        alone on the fitness data, through the values its merge method declares reproduce one
        expert (α = 1 with a one-hot β is exactly the adapter, a one-hot weight exactly the
        served model)."""
        n = len(self.config.models.experts)
        baselines = []
        method = self.space.method
        if method.base_alone and self.config.models.base is not None:  # the served base, no adapter weight
            ev = self._evaluate(self.config.models.base, "", self.space.recipe(method.base_values(n)), self.examples)
            ev.metrics["baseline"] = "base"
            baselines.append(ev)
        for i, label in enumerate(self.config.models.expert_labels()):
            ev = self._evaluate(label, "", self.space.recipe(self.space.method.expert_alone(i, n)), self.examples)
            ev.metrics["baseline"] = "expert"
            baselines.append(ev)
        return baselines

    def score_on(self, data, candidate: Candidate | None = None) -> Evaluation:
        """A candidate scored on other data of the same kind (held-out examples)."""
        if candidate is None:
            raise UserError("a black-box worker holds no model of its own: give the candidate to score")
        recipe = self.codecs[candidate.population].decode(candidate.genome)
        return self._evaluate(candidate.id, candidate.population, recipe, self.load_examples(data))

    def close(self) -> None:
        self._loop.run_until_complete(self.client.aclose())
        self._loop.close()
