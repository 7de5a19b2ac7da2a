"""``RayExecutor``: a pool of Ray actors (``evomerge.executors.ray_actor``), each holding the models
once, behind the ``Executor`` interface; ``run_once`` asks any one of them.

Fault model of the Ray pool (the ``workers:`` section of the config):

* A candidate's own failure (its merge raises, its fitness is NaN, the fitness plugin raises) is a
  failed ``Evaluation`` made inside the worker; the actor lives on.
* A ``PluginError`` (a fitness plugin returning the wrong shape) would fail every candidate alike,
  so it reaches the caller as itself and the run stops with its message.
* A candidate still running after ``workers.timeout`` (by default derived from the run's own
  evaluation times, see ``evomerge.executors.timeouts``) is recorded as failed ("timed out after
  Ns"). A running Python call cannot be interrupted, so its actor is killed and a new one started;
  ``cancel`` (a stopping run's grace period is over) does the same and records it as cancelled.
* An actor that dies (crash, OOM kill, lost node) is replaced and its candidate run again, at most
  ``workers.max_retries`` times, then recorded as failed with the last error. After
  ``workers.max_worker_failures`` deaths in a row with no evaluation finishing in between, the run
  stops with ``WorkerError``: something kills every worker, and replacing them would loop for ever.
* Ray waits for ever, without an error, for resources to place an actor, so every wait here has a
  deadline (``workers.schedule_timeout``, ``load_timeout``, ``replace_timeout``): an actor not
  placed in time stops the run ("only N of M workers could start …"), as does one still loading
  its models; a replacement that cannot start shrinks the pool instead. An error while
  loading (a missing model, a broken plugin) reaches the caller as the original ``UserError``.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping

import numpy as np

from evomerge.config import RunConfig, WorkersConfig
from evomerge.errors import UserError
from evomerge.executors.base import Executor, Job, WorkerError, cancelled
from evomerge.executors.ray_reaper import Reaper
from evomerge.executors.timeouts import CandidateTimeout
from evomerge.records import Candidate, Evaluation

if TYPE_CHECKING:
    import torch

    from evomerge.models.memory import WorkerMemory

log = logging.getLogger(__name__)

POLL_SECONDS = 60.0
"""Longest single ``ray.wait``. Ray may never raise for an actor it lost track of, so even a wait
with no deadline wakes up now and then and logs what it is still waiting for."""


RAY_AUTH_NOTICE = "ray._private.authentication.authentication_token_setup"
"""The logger of Ray's "Token authentication is enabled for this Ray cluster" notice."""


def worker_gpus(settings: WorkersConfig, devices: int = 1) -> float:
    """GPUs each worker is given: ``models.devices`` when a worker spans several (the config then
    allows no other ``workers.gpus_per_worker``), else ``workers.gpus_per_worker``."""
    return float(devices) if devices > 1 else settings.gpus_per_worker


def _gpu_field(devices: int) -> str:
    """The config field that sets the GPUs a worker asks for."""
    return "models.devices" if devices > 1 else "workers.gpus_per_worker"


MEMORY_USAGE_THRESHOLD = 0.95
"""Ray's default ``memory_usage_threshold``: the share of a node's memory in use past which its
memory monitor kills workers."""


def monitor_reserve(total: int | None, environ: Mapping[str, str] = os.environ) -> int:
    """Bytes of a node's ``total`` memory that Ray's memory monitor keeps free: it kills workers
    (OutOfMemoryError) once used memory passes ``RAY_memory_usage_threshold`` of the total or less
    than ``RAY_min_memory_free_bytes`` is left, whichever comes later; none when the monitor is off
    (``RAY_memory_monitor_refresh_ms=0``). A Ray this process starts reads the same environment.
    Workers that fit only in this margin load and are killed, so the memory check leaves it out."""
    if total is None or environ.get("RAY_memory_monitor_refresh_ms", "").strip() == "0":
        return 0
    try:
        threshold = float(environ.get("RAY_memory_usage_threshold", MEMORY_USAGE_THRESHOLD))
        min_free = int(environ.get("RAY_min_memory_free_bytes", -1))
    except ValueError:
        threshold, min_free = MEMORY_USAGE_THRESHOLD, -1
    reserve = total - int(total * min(max(threshold, 0.0), 1.0))  # Ray's own rounding of its threshold
    return min(reserve, min_free) if min_free > 0 else reserve


def pool_memory(config: RunConfig, capacity: int, gpus: float) -> tuple["WorkerMemory", "torch.device"]:
    """The memory check for ``capacity`` white-box workers on this machine (a Ray started here):
    they share its RAM, or a GPU when they ask for GPUs (those that request none see no CUDA
    device and run on the CPU); a worker spanning several GPUs has them to itself. Host memory
    Ray's memory monitor keeps free is left out (:func:`monitor_reserve`), and so is what each
    worker process holds before it loads a model (the interpreter, torch, Ray, transformers: about
    what this process holds, measured), which the per-worker figures do not count and which
    MemAvailable still had when it was read, before the workers started."""
    import torch

    from evomerge.models.host_memory import process_anon_bytes
    from evomerge.models.memory import FreeMemory, check_memory, size, tier_memory, total_bytes

    on_gpu = gpus > 0 and torch.cuda.is_available() and config.models.device != "cpu"
    device = torch.device("cuda" if on_gpu else "cpu")
    tier_memory(config, device)  # imports the model's classes, as a worker does, before this process is measured
    own = process_anon_bytes()  # what a worker process holds before any weight: Python, torch, Ray, transformers
    free = (
        FreeMemory.measure(device, config.models.devices)
        .keeping_free(monitor_reserve(total_bytes()), "Ray's memory monitor keeps free (RAY_memory_usage_threshold)")
        .keeping_free(capacity * own, f"{capacity} worker processes take before loading models ({size(own)} each)")
    )
    workers = min(capacity, max(1, math.floor(1 / gpus + 1e-9))) if on_gpu else capacity
    return check_memory(config, workers, device, free), device


def pool_size(settings: WorkersConfig, resources: dict[str, float], devices: int = 1) -> int:
    """Workers to start: ``count``, else as many as the cluster's CPUs (GPUs for GPU workers) hold;
    ``devices`` is ``models.devices``."""
    if settings.count is not None:
        return settings.count
    gpus = worker_gpus(settings, devices)
    kind, per_worker = ("GPU", gpus) if gpus > 0 else ("CPU", settings.cpus_per_worker)
    count = math.floor(resources.get(kind, 0.0) / per_worker + 1e-9)
    if count < 1:
        advice = ""
        if gpus > 0:
            advice = "; lower models.devices" if devices > 1 else "; set workers.gpus_per_worker to 0 to run on CPU"
        raise WorkerError(
            f"workers: each worker needs {per_worker:g} {kind} but the Ray cluster has {resources.get(kind, 0.0):g}{advice}"
        )
    return count


def check_fits(settings: WorkersConfig, count: int, resources: dict[str, float], devices: int = 1) -> None:
    """Refuse a pool a fixed-size cluster cannot hold, instead of waiting for resources that never come."""
    for kind, per_worker, field in (
        ("CPU", settings.cpus_per_worker, "workers.cpus_per_worker"),
        ("GPU", worker_gpus(settings, devices), _gpu_field(devices)),
    ):
        have = resources.get(kind, 0.0)
        if count * per_worker > have + 1e-9:
            raise WorkerError(
                f"workers: {count} workers of {per_worker:g} {kind} each need {count * per_worker:g} {kind},"
                f" but this machine has {have:g}; lower workers.count or {field}"
            )


def _summary(err: BaseException) -> str:
    """One line for a Ray error, whose message runs to many lines of ids and hints: the first line,
    and for a dead worker how it exited ("… connection error code 2. End of file." for a crash)."""
    message = str(err)
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    text = lines[0] if lines else ""
    if "Worker exit detail: " in message:
        text += " (" + message.split("Worker exit detail: ", 1)[1].split(" Some common causes", 1)[0].strip() + ")"
    return f"{type(err).__name__}: {text[:300]}".rstrip(": ")


@dataclass
class _Job:
    candidate: Candidate
    deaths: int = 0
    """How many workers died while running this candidate."""


@dataclass
class _Slot:
    """One place in the pool. Its actor goes scheduling → loading → idle ⇄ busy, and is replaced
    (a new ``_Slot`` in the same place) when it dies or times out."""

    actor: Any
    stage: str
    ref: Any
    """The call being waited on (``ping``, ``load`` or ``evaluate``); None when idle."""
    load_ref: Any
    deadline: float | None
    """``time.monotonic()`` by which ``ref`` must finish; None for an evaluation without timeout."""
    worker_id: str = ""
    job: _Job | None = None
    started: float = 0.0
    limit: float | None = None
    """The running candidate's time limit in seconds."""

    def failure(self, reason: str) -> Evaluation:
        """The running candidate, recorded as failed on this slot's worker."""
        duration = time.time() - self.started
        cand = self.job.candidate
        return Evaluation.failure(cand.id, reason, self.worker_id, self.started, duration, cand.population)


class RayExecutor(Executor):
    """A pool of Ray actors, each loading the models once and scoring one candidate at a time.

    Uses the Ray session this process already has (tests, a program that called ``ray.init``),
    else calls ``ray.init(workers.address)`` — which also joins the cluster of ``RAY_ADDRESS``, as
    under ``ray job submit`` — and then owns the session: ``shutdown`` ends it. A Ray it starts
    on this machine is watched by a ``Reaper``, so none of its processes outlives this one. The constructor
    returns once every actor has loaded its models (and run ``setup``, as every replacement does
    too), so setup errors surface there.
    """

    def __init__(
        self, config: RunConfig, setup: Job | None = None, on_phase: Callable[[str], None] = lambda text: None
    ) -> None:
        import ray

        self.config = config
        self.settings = config.workers
        self.gpus = worker_gpus(self.settings, config.models.devices)
        self.setup = setup
        self._deaths = (
            ray.exceptions.RayActorError,
            ray.exceptions.WorkerCrashedError,
            ray.exceptions.ActorUnschedulableError,
            # Ray's memory monitor killed the actor (the node ran low on memory): a death like any
            # other, not an error of the driver's
            ray.exceptions.OutOfMemoryError,
        )
        self._slots: list[_Slot] = []
        self._queue: deque[_Job] = deque()
        self._finished: list[Evaluation] = []  # settled outside ``wait`` (by run_once), returned by it
        self._actors_made = 0
        self._deaths_in_a_row = 0
        self.timeout = CandidateTimeout(self.settings.timeout)
        self._owns_ray = not ray.is_initialized()
        self._reaper: Reaper | None = None
        self._ready = False  # set once the first pool is up: after that, a lost worker shrinks it
        started = time.perf_counter()
        local = self.settings.address is None and "RAY_ADDRESS" not in os.environ
        if self._owns_ray:
            on_phase(f"starting Ray ({os.cpu_count()} CPUs)" if local else "joining the Ray cluster")
            if local:  # Ray turns token auth on for a cluster it starts and logs a notice on every run,
                # over the progress line; the notice is silenced, the authentication stays on
                logging.getLogger(RAY_AUTH_NOTICE).setLevel(logging.ERROR)
            try:
                ray.init(address=self.settings.address, include_dashboard=False, logging_level=logging.WARNING)
            except ConnectionError as exc:  # "auto" with no cluster running, an unreachable ray:// address
                where = self.settings.address or os.environ.get("RAY_ADDRESS")
                raise WorkerError(f"cannot join the Ray cluster at {where!r} (workers.address): {exc}") from None
            if local:  # nothing of the Ray we start may outlive this process, even killed
                self._reaper = Reaper(ray._private.worker._global_node.get_session_dir_path())
        try:
            resources = ray.cluster_resources()
            self.capacity = pool_size(self.settings, resources, config.models.devices)
            if self._owns_ray and local:  # a Ray we started on this machine never grows
                check_fits(self.settings, self.capacity, resources, config.models.devices)
                tier = self._check_memory()
            else:
                tier = ""
            on_phase(f"loading models on {self.capacity} worker{'s' if self.capacity != 1 else ''}{tier}")
            self._slots = [self._new_slot() for _ in range(self.capacity)]
            while any(slot.stage in ("scheduling", "loading") for slot in self._slots):
                self._step()  # no candidates yet, so nothing finishes
        except BaseException:
            self.shutdown()
            raise
        self._ready = True
        log.info("%d Ray workers ready in %.1fs", self.capacity, time.perf_counter() - started)

    def _check_memory(self) -> str:
        """The memory tier every worker this pool starts uses (written into its config), in words
        for the phase line; empty for black-box workers, which hold no weights."""
        if self.config.api is not None:
            return ""
        from evomerge.models.memory import summary, with_residency

        need, device = pool_memory(self.config, self.capacity, self.gpus)
        log.info("workers hold the models in %s", summary(need, device))
        self.config = with_residency(self.config, need.tier)
        return f" ({summary(need, device)})"

    def _new_slot(self, placement_timeout: float | None = None) -> _Slot:
        """A new actor, asking for its CPUs and GPUs.

        A worker spanning N devices (``models.devices``) asks for ``num_gpus=N`` rather than a
        placement group with one bundle of N GPUs: Ray always places one actor's resources on one
        node and hands it N GPUs of its own, visible as cuda:0 to cuda:N-1 (``CUDA_VISIBLE_DEVICES``),
        which is all a one-bundle STRICT_PACK group would guarantee for one process. A group would
        add a second thing to place, wait for with a deadline (Ray waits for ever) and remove
        whenever its actor is replaced or the pool shuts down, or it keeps its GPUs from the cluster.
        """
        from evomerge.executors.ray_actor import EvaluationActor

        actor = EvaluationActor.options(
            num_cpus=self.settings.cpus_per_worker,
            num_gpus=self.gpus,
            scheduling_strategy="SPREAD",
        ).remote(self.config, self._actors_made)
        self._actors_made += 1
        placement = self.settings.schedule_timeout if placement_timeout is None else placement_timeout
        return _Slot(
            actor=actor,
            stage="scheduling",
            ref=actor.ping.remote(),
            load_ref=actor.load.remote(self.setup),
            deadline=time.monotonic() + placement,
        )

    def _replace(self, slot: _Slot) -> None:
        import ray

        ray.kill(slot.actor, no_restart=True)
        self._slots[self._slots.index(slot)] = self._new_slot(self.settings.replace_timeout)

    def submit(self, candidate: Candidate) -> None:
        self._queue.append(_Job(candidate))
        self._dispatch()

    def _dispatch(self) -> None:
        """Hand queued candidates to idle actors (the timeout clock starts here: the actor is ready)."""
        for slot in self._slots:
            if not self._queue:
                return
            if slot.stage != "idle":
                continue
            job = self._queue.popleft()
            slot.stage, slot.job, slot.started = "busy", job, time.time()
            slot.ref = slot.actor.evaluate.remote(job.candidate)
            slot.limit = self.timeout.seconds()
            slot.deadline = None if slot.limit is None else time.monotonic() + slot.limit

    def wait(self, timeout: float | None = None) -> list[Evaluation]:
        finished, self._finished = self._finished, []
        until = None if timeout is None else time.monotonic() + timeout
        while not finished and self.in_flight:
            left = None if until is None else until - time.monotonic()
            if left is not None and left <= 0:
                break
            finished = self._step(left)
            self._dispatch()
        return finished

    def cancel(self, reason: str) -> list[Evaluation]:
        """Kill the actors running candidates (a running call cannot be interrupted otherwise) and
        start new ones; results that had already come back are returned as they are."""
        finished, self._finished = self._finished, []
        self._queue.clear()
        for slot in [slot for slot in self._slots if slot.stage == "busy"]:
            finished.append(cancelled(slot.job.candidate, reason, slot.worker_id, slot.started))
            self._replace(slot)
        return finished

    def _step(self, most: float | None = None) -> list[Evaluation]:
        """One round: wait until a call finishes, a deadline passes or ``most`` seconds have gone
        by, then settle what happened."""
        import ray

        waiting = {slot.ref: slot for slot in self._slots if slot.ref is not None}
        deadlines = [slot.deadline for slot in self._slots if slot.deadline is not None]
        limits = [POLL_SECONDS] + [max(0.0, d - time.monotonic()) for d in deadlines]
        timeout = min(limits + ([most] if most is not None else []))
        done, _ = ray.wait(list(waiting), num_returns=1, timeout=timeout)
        if done:  # take every call that has finished by now, not just the first
            done, _ = ray.wait(list(waiting), num_returns=len(waiting), timeout=0)
        elif not deadlines and most is None:
            log.debug("still waiting for %d Ray calls", len(waiting))
        finished: list[Evaluation] = []
        for ref in done:
            finished += self._settle(waiting[ref])
        return finished + self._expire()

    def _settle(self, slot: _Slot) -> list[Evaluation]:
        """Advance a slot whose call has finished; a finished evaluation is returned."""
        import ray

        try:
            value = ray.get(slot.ref)
        except self._deaths as err:
            return self._worker_died(slot, err)
        except ray.exceptions.RayTaskError as err:
            if isinstance(err.cause, UserError):
                raise err.cause from None
            if slot.stage != "busy":
                raise WorkerError(f"worker {slot.worker_id} could not load the models: {_summary(err.cause)}") from None
            value = slot.failure(_summary(err.cause))
        if slot.stage == "scheduling":
            slot.worker_id, slot.stage = value, "loading"
            slot.ref, slot.deadline = slot.load_ref, time.monotonic() + self.settings.load_timeout
            return []
        slot.ref, slot.deadline = None, None
        if slot.stage == "loading":
            slot.stage = "idle"
            return []
        slot.stage, slot.job = "idle", None
        self._deaths_in_a_row = 0
        if value.per_example is not None:  # Ray hands back a read-only view into its object store
            value.per_example = np.array(value.per_example)
        self.timeout.observe(value.duration)
        return [value]

    def _worker_died(self, slot: _Slot, err: BaseException) -> list[Evaluation]:
        """Replace a dead actor and retry its candidate, or give up on it, or on the whole pool."""
        reason = _summary(err)
        job = slot.job
        self._deaths_in_a_row += 1
        running = f" running {job.candidate.id}" if job else ""
        log.warning("worker %s died%s: %s", slot.worker_id or "(starting)", running, reason)
        if self._deaths_in_a_row >= self.settings.max_worker_failures:
            raise WorkerError(
                f"workers keep dying: {self._deaths_in_a_row} deaths in a row with no evaluation finishing"
                f" (workers.max_worker_failures); last: {reason}. Check the workers' memory and the Ray logs"
            )
        self._replace(slot)
        if job is None:
            return []
        job.deaths += 1
        if job.deaths > self.settings.max_retries:
            retries = self.settings.max_retries
            reason = f"its worker died {job.deaths} times (workers.max_retries is {retries}); last: {reason}"
            return [slot.failure(reason)]
        self._queue.appendleft(job)
        return []

    def _expire(self) -> list[Evaluation]:
        """Fail candidates past ``workers.timeout``; stop the pool when an actor cannot start in time."""
        now = time.monotonic()
        finished: list[Evaluation] = []
        for slot in list(self._slots):
            if slot.deadline is None or now < slot.deadline:
                continue
            if slot.stage in ("scheduling", "loading") and self._ready and self._others_loaded(slot):
                self._drop(slot)  # a replacement with nowhere to run (e.g. its node is gone)
                continue
            if slot.stage == "scheduling":
                raise WorkerError(self._unplaced_message())
            if slot.stage == "loading":
                raise WorkerError(f"worker {slot.worker_id} did not load the models within {self.settings.load_timeout:g}s")
            reason = CandidateTimeout.reason(slot.limit)
            log.warning("candidate %s %s on worker %s; replacing it", slot.job.candidate.id, reason, slot.worker_id)
            self._replace(slot)
            finished.append(slot.failure(reason))
        return finished

    def _others_loaded(self, slot: _Slot) -> bool:
        return any(other.stage in ("idle", "busy") for other in self._slots if other is not slot)

    def _drop(self, slot: _Slot) -> None:
        """Shrink the pool by a replacement that could not start, so the run goes on with the rest."""
        import ray

        ray.kill(slot.actor, no_restart=True)
        self._slots.remove(slot)
        self.capacity = len(self._slots)
        log.warning(
            "a replacement worker could not start within %gs (the cluster lost capacity); going on with %d workers",
            self.settings.replace_timeout if slot.stage == "scheduling" else self.settings.load_timeout,
            self.capacity,
        )

    def _unplaced_message(self) -> str:
        import ray

        placed = sum(slot.stage != "scheduling" for slot in self._slots)
        resources = ray.cluster_resources()
        each = f"{self.settings.cpus_per_worker:g} CPU"
        if self.gpus:
            each += f" and {self.gpus:g} GPU"
        return (
            f"only {placed} of {len(self._slots)} workers could start within {self.settings.schedule_timeout:g}s: the cluster"
            f" lacks CPUs/GPUs for {len(self._slots)} workers of {each} each (it has {resources.get('CPU', 0):g} CPUs"
            f" and {resources.get('GPU', 0):g} GPUs); lower workers.count or the per-worker resources, or add nodes"
        )

    def run_once(self, job: Job) -> Any:
        """``job`` on one actor: an idle one if there is one, else queued behind a running
        evaluation; a worker that dies meanwhile is replaced and the job run again."""
        import ray

        while True:
            loaded = [slot for slot in self._slots if slot.stage in ("idle", "busy")]
            if not loaded:  # every actor is being replaced
                self._finished += self._step()
                continue
            slot = min(loaded, key=lambda s: s.stage != "idle")
            try:
                return ray.get(slot.actor.run.remote(job), timeout=self.settings.load_timeout)
            except self._deaths as err:
                self._finished += self._worker_died(slot, err)
            except ray.exceptions.GetTimeoutError:
                raise WorkerError(
                    f"worker {slot.worker_id} did not finish {job!r} within {self.settings.load_timeout:g}s"
                ) from None
            except ray.exceptions.RayTaskError as err:
                raise err.cause from None

    @property
    def in_flight(self) -> int:
        busy = sum(slot.stage == "busy" for slot in self._slots)
        return len(self._queue) + busy + len(self._finished)

    def shutdown(self) -> None:
        """Kill the actors, and end the Ray session if this executor started it."""
        import ray

        if ray.is_initialized():
            for slot in self._slots:
                ray.kill(slot.actor, no_restart=True)
        self._slots = []
        if self._owns_ray:
            ray.shutdown()
            self._owns_ray = False
        if self._reaper is not None:
            self._reaper.close()
            self._reaper = None
