"""Fixtures for the merge-engine tests: small random "models" as state dicts, and tiny Llamas on disk."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from typing import Callable

import pytest
import torch

from evomerge.merge import MERGE_METHODS
from evomerge.merge.kernel import TensorContext
from evomerge.merge.resident import ResidentTensor
from evomerge.testing.merge_suite import MergeSetup


@pytest.fixture
def make_setup() -> Callable[..., MergeSetup]:
    """``make_setup("ties", 3, True)``: a registered method's inputs (see evomerge.testing.merge_suite)."""
    return lambda method, *args, **kwargs: MergeSetup(MERGE_METHODS[method], *args, **kwargs)


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
