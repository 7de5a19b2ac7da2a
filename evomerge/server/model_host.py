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
pickles), and every adapter path must resolve inside the adapter root.

Nothing here is thread-safe: the server runs every call on one thread at a time.
"""

from __future__ import annotations

import json
import math
import re
import uuid
from collections import OrderedDict
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

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


class ServiceError(Exception):
    """A refusal the server answers in the OpenAI error shape, with this HTTP status."""

    def __init__(self, status: int, message: str, code: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = headers or {}


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

    def __init__(self, model: str, served_model_name: str, adapter_root: Path | None, device: str = "cpu") -> None:
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
        self.peft = None  # the peft wrapper with the slot, made when the first adapter is read
        self._slot_scaling = 1.0
        self._slot_params: dict[str, torch.Tensor] = {}
        self._active: str | None = None
        self.adapters: dict[str, Adapter] = {}
        self.sessions: OrderedDict[str, MergeSession] = OrderedDict()
        self._merges: OrderedDict[str, str] = OrderedDict()  # merged model name -> session id
        if self.adapter_root is not None:
            for path in sorted(p for p in self.adapter_root.iterdir() if (p / ADAPTER_CONFIG).is_file()):
                if ADAPTER_NAME.match(path.name) and (path / ADAPTER_WEIGHTS).is_file():
                    self.adapters[path.name] = self._read(path.name, path, "root")

    # --- adapters -----------------------------------------------------------------------------
    def confined(self, path: str) -> Path:
        """``path`` (absolute, or relative to the adapter root) if it lies inside the root."""
        if self.adapter_root is None:
            raise ServiceError(400, "This server has no adapter root (start it with --adapters DIR).", "no_adapter_root")
        candidate = Path(path)
        resolved = (candidate if candidate.is_absolute() else self.adapter_root / candidate).resolve()
        if not resolved.is_relative_to(self.adapter_root):
            raise ServiceError(400, "The adapter path lies outside the server's adapter root.", "path_outside_root")
        return resolved

    def _read(self, name: str, path: Path, source: str) -> Adapter:
        from safetensors.torch import load_file

        if not (path / ADAPTER_WEIGHTS).is_file():
            raise ServiceError(
                400, f"Adapter '{name}' has no {ADAPTER_WEIGHTS}; only safetensors adapters are served.", "not_safetensors"
            )
        try:
            config = json.loads((path / ADAPTER_CONFIG).read_text())
            weights = load_file(str(path / ADAPTER_WEIGHTS), device=str(self.device))
        except (OSError, ValueError) as exc:
            raise ServiceError(400, f"Adapter '{name}' cannot be read: {exc}", "invalid_adapter") from None
        if config.get("peft_type", "LORA") != "LORA" or "r" not in config:
            raise ServiceError(400, f"Adapter '{name}' is not a LoRA adapter.", "invalid_adapter")
        if self.peft is None:
            self._make_slot(config)
        keys = set(self._slot_params)
        if set(weights) != keys or any(weights[k].shape != self._slot_params[k].shape for k in keys):
            raise ServiceError(
                400,
                f"Adapter '{name}' does not share the served adapters' LoRA layout (target modules and rank).",
                "adapter_layout_mismatch",
            )
        ratio = lora_scaling(config) / self._slot_scaling
        for key, tensor in weights.items():
            weights[key] = tensor.float() * ratio if ".lora_B." in key else tensor.float()
        return Adapter(name, weights, source)

    def _make_slot(self, config: dict[str, Any]) -> None:
        from peft import LoraConfig, get_peft_model

        known = set(LoraConfig.__dataclass_fields__)
        lora = LoraConfig(**{k: v for k, v in config.items() if k in known and k not in ("peft_type", "auto_mapping")})
        lora.inference_mode = True
        self.peft = get_peft_model(self.base, lora, adapter_name=SLOT)
        self.peft.eval()
        self._slot_scaling = lora_scaling(config)
        self._slot_params = {
            name.replace(f".{SLOT}.", "."): param.data for name, param in self.peft.named_parameters() if f".{SLOT}." in name
        }

    def load_adapter(self, name: str, path: str, replace: bool) -> None:
        """vLLM's ``/v1/load_lora_adapter``: read an adapter directory inside the root."""
        if not ADAPTER_NAME.match(name or ""):
            raise ServiceError(400, "lora_name must be letters, digits, '.', '_' or '-' (at most 128).", "invalid_name")
        if name == self.base_name or (name in self.adapters and not replace):
            raise ServiceError(400, f"The model '{name}' is already loaded.", "adapter_exists")
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
        if not all(math.isfinite(x) for x in [*alpha, *beta]):
            raise ServiceError(400, "alpha and beta must be finite numbers.", "invalid_coefficients")
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
