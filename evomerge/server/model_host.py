"""What the reference model service hosts: one base model, LoRA adapters, and merges of them.

The base is loaded once and wrapped by peft with a single adapter *slot*. Every adapter the
service knows — those in its adapter root, those loaded at run time (vLLM's
``/v1/load_lora_adapter``) and the merges of a merge session (Evo-Merging's
``/v1/sessions/{id}/materialize``) — is held as tensors, and a request for one writes it into the
slot in place before the forward pass: a copy for a stored adapter, evomerge's own
``lora_compose`` merge for a session's merge (so a merge costs a few numbers until it is used).
The base itself is served with the slot disabled.

Adapters therefore share one LoRA layout (target modules and rank): the first adapter read fixes
it, and one with another layout is refused with a message saying so. A different ``lora_alpha``
is folded into B, so its scaling is exact. Only ``adapter_model.safetensors`` is ever read (never
pickles), and every adapter path must resolve inside the adapter root; its two files are opened
without following symbolic links (a link inside the root could point anywhere) and must be regular
files. An adapter of the root that cannot be read is skipped at start with a warning naming it and
why. Adapters loaded at run time are limited to ``max_loras`` (vLLM's flag), each being a full copy.

Nothing here is thread-safe: the server runs every call on one thread at a time.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import re
import stat
import uuid
from collections import OrderedDict
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from safetensors import SafetensorError

from evomerge.errors import first_line
from evomerge.merge.declarations import LORA_COMPOSE
from evomerge.space.merge_space import Recipe
from evomerge.workers.materializer import Materializer

ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
TAG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
SLOT = "slot"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MAX_SESSIONS = 16
"""Merge sessions kept at once; the least recently used is dropped (its client re-creates it)."""
MAX_MERGES = 1024
"""Materialized merges kept at once (each is a few numbers); the least recently used is dropped."""
MAX_LORAS = 16
"""Adapters loaded at run time kept at once by default (``--max-loras``); unloading frees a slot."""
MAX_CONFIG_BYTES = 1 << 20
"""An ``adapter_config.json`` larger than this is refused (peft's are a few hundred bytes)."""

log = logging.getLogger(__name__)


class ServiceError(Exception):
    """A refusal the server answers in the OpenAI error shape, with this HTTP status."""

    def __init__(
        self, status: int, message: str, code: str, headers: dict[str, str] | None = None, param: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = headers or {}
        self.param = param
        """The request field to change, OpenAI's ``error.param``."""


def _not_found(kind: str, name: str) -> ServiceError:
    return ServiceError(404, f"The {kind} '{name}' does not exist.", f"{kind.replace(' ', '_')}_not_found")


def lora_scaling(config: dict[str, Any]) -> float:
    """peft's factor on ``B @ A``: ``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA)."""
    r = int(config["r"])
    return float(config.get("lora_alpha", r)) / (math.sqrt(r) if config.get("use_rslora") else r)


@dataclass
class Adapter:
    """A LoRA adapter held as tensors under its saved key names, B scaled to the slot's scaling."""

    name: str
    weights: dict[str, torch.Tensor]
    source: str
    """``"root"`` (found in the adapter root at start) or ``"loaded"`` (loaded at run time)."""


@dataclass
class MergeSession:
    """One client's merge session over a fixed list of adapters (the authors' preset)."""

    id: str
    adapters: list[str]
    materializer: Materializer
    examples: list[dict[str, str]]
    merges: dict[str, tuple[list[float], list[float]]] = field(default_factory=dict)


class ModelHost:
    """The base model, its tokenizer and every adapter and merge the service can run."""

    def __init__(
        self,
        model: str,
        served_model_name: str,
        adapter_root: Path | None,
        device: str = "cpu",
        max_loras: int = MAX_LORAS,
    ) -> None:
        from evomerge.models.loading import load_model, load_tokenizer

        self.base_name = served_model_name
        self.device = torch.device(device)
        self.base = load_model(model, self.device, torch.float32)
        self.tokenizer = load_tokenizer(model)
        if self.tokenizer is None:
            from evomerge.errors import ModelLoadError

            raise ModelLoadError(f"'{model}' has no tokenizer; the service needs one to read prompts")
        self.max_positions = int(getattr(self.base.config, "max_position_embeddings", 0) or 1 << 30)
        self.adapter_root = None if adapter_root is None else Path(adapter_root).resolve()
        self.max_loras = max_loras
        self.peft = None  # the peft wrapper with the slot, made when the first adapter is read
        self._slot_scaling = 1.0
        self._slot_params: dict[str, torch.Tensor] = {}
        self._active: str | None = None
        self.adapters: dict[str, Adapter] = {}
        self.sessions: OrderedDict[str, MergeSession] = OrderedDict()
        self._merges: OrderedDict[str, str] = OrderedDict()  # merged model name -> session id
        if self.adapter_root is not None:
            self._read_root()

    # --- adapters -----------------------------------------------------------------------------
    def _read_root(self) -> None:
        """Every adapter directory of the root (one with an ``adapter_config.json``); one that
        cannot be served is skipped with a warning, so one broken adapter does not stop the service."""
        for path in sorted(self.adapter_root.iterdir()):
            if not path.is_dir() or not os.path.lexists(path / ADAPTER_CONFIG):
                continue
            try:
                if not ADAPTER_NAME.match(path.name):
                    raise ServiceError(400, "its name is not letters, digits, '.', '_' or '-' (at most 128)", "invalid_name")
                self.adapters[path.name] = self._read(path.name, self.confined(str(path)), "root")
            except ServiceError as exc:
                log.warning("skipping the adapter %s: %s", path, exc.message)

    def confined(self, path: str) -> Path:
        """``path`` (absolute, or relative to the adapter root) if it lies inside the root."""
        if self.adapter_root is None:
            raise ServiceError(400, "This server has no adapter root (start it with --adapters DIR).", "no_adapter_root")
        try:
            candidate = Path(path)
            resolved = (candidate if candidate.is_absolute() else self.adapter_root / candidate).resolve()
        except (OSError, ValueError):  # a NUL byte, a name too long, a loop of links
            raise ServiceError(400, "The adapter path is not a usable path.", "invalid_path") from None
        if not resolved.is_relative_to(self.adapter_root):
            raise ServiceError(400, "The adapter path lies outside the server's adapter root.", "path_outside_root")
        return resolved

    def _read(self, name: str, path: Path, source: str) -> Adapter:
        from safetensors.torch import load

        try:
            config = json.loads(_read_regular_file(name, path, ADAPTER_CONFIG, MAX_CONFIG_BYTES))
            weights = load(_read_regular_file(name, path, ADAPTER_WEIGHTS, None))
        except (ValueError, RecursionError, SafetensorError) as exc:
            raise ServiceError(400, f"Adapter '{name}' cannot be read: {first_line(exc)}", "invalid_adapter") from None
        scaling = _lora_config_scaling(name, config)
        new_slot = self.peft is None
        if new_slot:
            self._make_slot(name, config)
        keys = set(self._slot_params)
        if set(weights) != keys or any(weights[k].shape != self._slot_params[k].shape for k in keys):
            if new_slot:  # the slot was made from this adapter's config: leave none for the next one
                self._drop_slot()
            raise ServiceError(
                400,
                f"Adapter '{name}' does not share the served adapters' LoRA layout (target modules and rank).",
                "adapter_layout_mismatch",
            )
        ratio = scaling / self._slot_scaling
        return Adapter(name, {k: _as_slot_tensor(k, t, ratio, self.device) for k, t in weights.items()}, source)

    def _make_slot(self, name: str, config: dict[str, Any]) -> None:
        from peft import LoraConfig, get_peft_model

        known = set(LoraConfig.__dataclass_fields__)
        try:
            lora = LoraConfig(**{k: v for k, v in config.items() if k in known and k not in ("peft_type", "auto_mapping")})
            lora.inference_mode = True
            self.peft = get_peft_model(self.base, lora, adapter_name=SLOT)
        except (TypeError, ValueError, KeyError) as exc:
            raise ServiceError(400, f"Adapter '{name}' has a LoRA config peft refuses: {first_line(exc)}", "invalid_adapter") from None
        self.peft.eval()
        self._slot_scaling = lora_scaling(config)
        self._slot_params = {
            key.replace(f".{SLOT}.", "."): param.data for key, param in self.peft.named_parameters() if f".{SLOT}." in key
        }

    def _drop_slot(self) -> None:
        """Take the slot out of the base again (its layout came from an adapter that turned out broken)."""
        self.base = self.peft.unload()
        self.peft = None
        self._slot_scaling = 1.0
        self._slot_params = {}

    def load_adapter(self, name: str, path: str, replace: bool) -> None:
        """vLLM's ``/v1/load_lora_adapter``: read an adapter directory inside the root."""
        if not ADAPTER_NAME.match(name or ""):
            raise ServiceError(400, "lora_name must be letters, digits, '.', '_' or '-' (at most 128).", "invalid_name")
        if name == self.base_name or (name in self.adapters and not replace):
            raise ServiceError(400, f"The model '{name}' is already loaded.", "adapter_exists")
        loaded = sum(1 for a in self.adapters.values() if a.source == "loaded")
        if name not in self.adapters and loaded >= self.max_loras:
            raise ServiceError(
                400,
                f"{loaded} adapters are loaded at run time, the most this server keeps (--max-loras); unload one first.",
                "max_loras_reached",
            )
        adapter = self._read(name, self.confined(path), "loaded")
        self.adapters[name] = adapter
        if self._active == name:
            self._active = None

    def unload_adapter(self, name: str) -> None:
        adapter = self.adapters.get(name)
        if adapter is None or adapter.source != "loaded":
            raise _not_found("adapter", name)
        del self.adapters[name]
        if self._active == name:
            self._active = None

    # --- merge sessions -------------------------------------------------------------------------
    def create_session(self, adapters: Sequence[str] | None, examples: list[dict[str, str]]) -> MergeSession:
        names = list(adapters) if adapters else sorted(n for n, a in self.adapters.items() if a.source == "root")
        if not names:
            raise ServiceError(400, "A merge session needs at least one adapter.", "no_adapters")
        for name in names:
            if name not in self.adapters:
                raise _not_found("adapter", name)
        session_id = "sess-" + uuid.uuid4().hex[:16]
        materializer = Materializer.from_state_dicts(
            self._slot_params, ((n, self.adapters[n].weights) for n in names), len(names)
        )
        session = MergeSession(session_id, names, materializer, examples)
        self.sessions[session_id] = session
        while len(self.sessions) > MAX_SESSIONS:
            _, dropped = self.sessions.popitem(last=False)
            self._drop_merges(dropped.id)
        return session

    def session(self, session_id: str) -> MergeSession:
        session = self.sessions.get(session_id)
        if session is None:
            raise _not_found("session", session_id)
        self.sessions.move_to_end(session_id)
        return session

    def materialize(self, session: MergeSession, alpha: list[float], beta: list[float], tag: str | None) -> str:
        """Register the merge ``(α, β)`` of the session's adapters; returns its model name."""
        n = len(session.adapters)
        if len(alpha) != n or len(beta) != n:
            raise ServiceError(400, f"alpha and beta need one value per adapter of the session ({n}).", "invalid_coefficients")
        if tag is not None and not TAG.match(tag):
            raise ServiceError(400, "tag must be letters, digits, '.', '_', ':' or '-' (at most 128).", "invalid_tag")
        name = f"{session.id}/{tag or len(session.merges)}"
        session.merges[name] = (list(alpha), list(beta))
        self._merges[name] = session.id
        self._merges.move_to_end(name)
        if self._active == name:
            self._active = None
        while len(self._merges) > MAX_MERGES:
            old, owner = self._merges.popitem(last=False)
            if owner in self.sessions:
                self.sessions[owner].merges.pop(old, None)
        return name

    def _drop_merges(self, session_id: str) -> None:
        for name in [m for m, owner in self._merges.items() if owner == session_id]:
            del self._merges[name]
            if self._active == name:
                self._active = None

    # --- running a model ------------------------------------------------------------------------
    def model_names(self) -> list[tuple[str, str | None]]:
        """(name, parent) of every servable model: the base, then adapters (vLLM's /v1/models)."""
        return [(self.base_name, None)] + [(name, self.base_name) for name in self.adapters]

    @contextmanager
    def running(self, name: str) -> Iterator[torch.nn.Module]:
        """The model to call for ``name``, with its adapter or merge in the slot."""
        if name == self.base_name:
            with self.peft.disable_adapter() if self.peft is not None else nullcontext():
                yield self.base if self.peft is None else self.peft
            return
        if name != self._active:
            self._write_slot(name)
            self._active = name
        yield self.peft

    @torch.no_grad()
    def _write_slot(self, name: str) -> None:
        adapter = self.adapters.get(name)
        if adapter is not None:
            for key, param in self._slot_params.items():
                param.copy_(adapter.weights[key])
            return
        owner = self._merges.get(name)
        if owner is None or owner not in self.sessions or name not in self.sessions[owner].merges:
            raise _not_found("model", name)
        self._merges.move_to_end(name)
        session = self.sessions[owner]
        alpha, beta = session.merges[name]
        recipe = Recipe(
            method=LORA_COMPOSE,
            group_names=["all"],
            values={"alpha": [alpha], "beta": [beta]},
            options={},
            seed=0,
            tensor_groups={key: 0 for key in self._slot_params},
        )
        session.materializer.apply(recipe)


def _read_regular_file(adapter: str, directory: Path, name: str, limit: int | None) -> bytes:
    """The bytes of ``directory/name``, opened without following a symbolic link and only if it
    is a regular file (not a FIFO or device that would block or never end), at most ``limit``."""
    try:
        fd = os.open(directory / name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        why = "only safetensors adapters are served" if name == ADAPTER_WEIGHTS else "it is not a peft adapter"
        code = "not_safetensors" if name == ADAPTER_WEIGHTS else "invalid_adapter"
        raise ServiceError(400, f"Adapter '{adapter}' has no {name}; {why}.", code) from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ServiceError(
                400, f"Adapter '{adapter}': {name} is a symbolic link; only regular files inside the root are read.", "path_outside_root"
            ) from None
        raise ServiceError(400, f"Adapter '{adapter}': {name} cannot be opened ({exc.strerror}).", "invalid_adapter") from None
    with os.fdopen(fd, "rb") as file:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ServiceError(400, f"Adapter '{adapter}': {name} is not a regular file.", "invalid_adapter")
        if limit is not None and info.st_size > limit:
            raise ServiceError(400, f"Adapter '{adapter}': {name} is over {limit} bytes.", "invalid_adapter")
        return file.read()


def _lora_config_scaling(adapter: str, config: Any) -> float:
    """The scaling of a parsed ``adapter_config.json``, refusing anything that is not a LoRA config."""
    if not isinstance(config, dict) or config.get("peft_type", "LORA") != "LORA":
        raise ServiceError(400, f"Adapter '{adapter}' is not a LoRA adapter.", "invalid_adapter")
    r, alpha = config.get("r"), config.get("lora_alpha", config.get("r"))
    if not (type(r) is int and r > 0 and type(alpha) in (int, float) and 0 < alpha < math.inf):
        raise ServiceError(400, f"Adapter '{adapter}' needs a positive integer r and a positive finite lora_alpha.", "invalid_adapter")
    return lora_scaling(config)


def _as_slot_tensor(key: str, tensor: torch.Tensor, ratio: float, device: torch.device) -> torch.Tensor:
    """A stored tensor as the slot holds it: float32 on the device, B scaled to the slot's scaling."""
    tensor = tensor.to(device=device, dtype=torch.float32)
    return tensor * ratio if ".lora_B." in key else tensor
