"""Fixtures for the merge-engine tests: small random "models" as state dicts, and tiny Llamas on disk."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from typing import Callable

import pytest
import torch

from evomerge.merge import MERGE_METHODS, ResidentTensor, TensorContext
from evomerge.workers.materializer import Materializer

# A model layout with an embedding before the layers and a norm and head after them, like a Llama.
LAYOUT: dict[str, tuple[int, ...]] = {
    "model.embed_tokens.weight": (12, 6),
    "model.layers.0.self_attn.q_proj.weight": (6, 6),
    "model.layers.0.input_layernorm.weight": (6,),
    "model.layers.1.self_attn.q_proj.weight": (6, 6),
    "model.layers.1.input_layernorm.weight": (6,),
    "model.layers.2.mlp.up_proj.weight": (9, 6),
    "model.layers.3.mlp.up_proj.weight": (9, 6),
    "model.norm.weight": (6,),
    "lm_head.weight": (12, 6),
}

# A PEFT adapter layout (the only kind lora_compose accepts).
LORA_LAYOUT: dict[str, tuple[int, ...]] = {
    "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": (4, 10),
    "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": (10, 4),
    "base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight": (4, 10),
    "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight": (10, 4),
}


def random_state(layout: dict[str, tuple[int, ...]], seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=gen) * scale for name, shape in layout.items()}


class MergeSetup:
    """Inputs of one merge: a base (or none), experts, and a fresh way to build a materializer."""

    def __init__(self, method: str, n_models: int, with_base: bool, dtype: torch.dtype = torch.float32):
        self.method = MERGE_METHODS[method]
        self.n_models = n_models
        self.layout = LORA_LAYOUT if method == "lora_compose" else LAYOUT
        self.base = random_state(self.layout, seed=100) if with_base else None
        if self.base is not None:
            # fine-tuned experts: base plus a small task vector
            self.experts = [
                {n: self.base[n] + d for n, d in random_state(self.layout, 200 + i, 0.1).items()}
                for i in range(n_models)
            ]
        else:
            self.experts = [random_state(self.layout, 200 + i) for i in range(n_models)]
        self.dtype = dtype

    @property
    def names(self) -> list[str]:
        return list(self.layout)

    def targets(self, fill: float = float("nan")) -> dict[str, torch.Tensor]:
        return {n: torch.full(s, fill, dtype=self.dtype) for n, s in self.layout.items()}

    def materializer(self, targets: dict[str, torch.Tensor] | None = None, chunk: int | None = None) -> Materializer:
        materializer = Materializer.from_state_dicts(
            self.targets() if targets is None else targets,
            ((f"expert {i}", e) for i, e in enumerate(self.experts)),
            n_models=self.n_models,
            base=self.base,
            chunk=chunk,
        )
        if self.method.needs_fisher:  # what a worker estimates on each expert's data: here random
            materializer.set_fishers(self.fishers(), floor=1e-8)
        return materializer

    def fishers(self) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(300)
        return {n: torch.rand((self.n_models, *s), generator=gen) for n, s in self.layout.items()}


def method_cases() -> list:
    """Every registered method with every setup it accepts: (method, n_models, with_base)."""
    cases = []
    for name, method in MERGE_METHODS.items():
        n = method.max_models or 3
        n = max(n, method.min_models)
        bases = [True] if method.needs_base else ([False] if name == "lora_compose" else [False, True])
        for with_base in bases:
            cases.append(pytest.param((name, n, with_base), id=f"{name}-{'base' if with_base else 'nobase'}"))
    return cases


def pytest_generate_tests(metafunc):
    """``merge_case`` runs a test once per registered method and accepted setup (conformance suite)."""
    if "merge_case" in metafunc.fixturenames:
        metafunc.parametrize("merge_case", method_cases())


@pytest.fixture
def make_setup() -> Callable[..., MergeSetup]:
    return MergeSetup


@pytest.fixture
def make_ctx() -> Callable[..., TensorContext]:
    """A context for calling a kernel directly on one tensor."""

    def make(
        tensor: ResidentTensor,
        seed: int = 0,
        chunk: int = 1 << 16,
        flat_gram: torch.Tensor | None = None,
        offset: int = 0,
        total: int | None = None,
    ) -> TensorContext:
        return TensorContext(
            name=tensor.name,
            offset=offset,
            total=tensor.numel if total is None else total,
            generator=torch.Generator().manual_seed(seed),
            chunk=chunk,
            flat_gram=flat_gram,
        )

    return make


# --- tiny Llama models, saved and loaded through transformers -------------------------------------

TINY_LLAMA = dict(
    vocab_size=128,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=2,
    intermediate_size=64,
    tie_word_embeddings=False,
)


def _save_tiny_llama(path, seed: int, **overrides) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**{**TINY_LLAMA, **overrides}))
    with torch.no_grad():  # norms start at 1 in every model; make them differ too
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_llama_dirs(tmp_path_factory) -> dict[str, str]:
    """Paths of saved tiny Llamas: base, expert0, expert1, and two that do not match them."""
    root = tmp_path_factory.mktemp("tiny_llamas")
    return {
        "base": _save_tiny_llama(root / "base", seed=0),
        "expert0": _save_tiny_llama(root / "expert0", seed=1),
        "expert1": _save_tiny_llama(root / "expert1", seed=2),
        "vocab130": _save_tiny_llama(root / "vocab130", seed=3, vocab_size=130),
        "ffn48": _save_tiny_llama(root / "ffn48", seed=4, intermediate_size=48),
    }


@pytest.fixture(scope="session")
def load_llama(tiny_llama_dirs) -> Callable[[str], torch.nn.Module]:
    from transformers import AutoModelForCausalLM

    def load(key: str) -> torch.nn.Module:
        model = AutoModelForCausalLM.from_pretrained(tiny_llama_dirs[key])
        return model.eval()

    return load
