"""Tiny causal language models built and trained on this machine, for the LM demo and the tests.

Nothing is downloaded: the tokenizer is character-level and built in memory, the model is a small
Llama-architecture ``LlamaForCausalLM`` (or an image-text Gemma 3 for multimodal tests), and the data are synthetic skills (two-digit addition,
string reversal, …) generated from a seed. Models and tokenizers save with ``save_pretrained``, so
the rest of evomerge loads them exactly as it loads users' models.
"""

from __future__ import annotations

import random
import string
from typing import Callable, Sequence

import torch

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"
CHARACTERS = string.digits + string.ascii_lowercase + " +-*=>|?.,:"
VOCAB = [PAD, EOS, UNK, *CHARACTERS]


def build_tokenizer():
    """One token per character, so answers never merge with their prompts across a boundary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({t: i for i, t in enumerate(VOCAB)}, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=PAD, eos_token=EOS, unk_token=UNK, padding_side="right"
    )


def tiny_llama(
    tokenizer,
    *,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    intermediate: int | None = None,
    max_positions: int = 64,
    seed: int = 0,
):
    """A randomly initialised Llama whose vocabulary is exactly the tokenizer's."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate or 4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


IMAGE_TOKENS = 4
"""Soft tokens a tiny Gemma 3 spends on one image (its vision tower sees 32×32 pixels in 8×8 patches)."""


def tiny_gemma3(tokenizer, *, hidden: int = 32, layers: int = 4, vision_layers: int = 3, seed: int = 0):
    """A randomly initialised image-text Gemma 3 (``Gemma3ForConditionalGeneration``: language
    model, SigLIP vision tower, projector) whose text vocabulary is the tokenizer's plus the three
    image tokens (begin, end, image) after it."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    n = len(tokenizer)
    text = dict(
        vocab_size=n + 3, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=1, head_dim=hidden // 2, max_position_embeddings=128,
        sliding_window=16, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
    )
    vision = dict(
        hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=vision_layers, num_attention_heads=2,
        image_size=32, patch_size=8, vision_use_head=False,
    )
    config = Gemma3Config(
        text_config=text, vision_config=vision, mm_tokens_per_image=IMAGE_TOKENS,
        boi_token_index=n, eoi_token_index=n + 1, image_token_index=n + 2,
    )
    torch.manual_seed(seed)
    return Gemma3ForConditionalGeneration(config)


# --- synthetic skills: (prompt, target) pairs from a seeded generator -------------------------------


def _addition(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randrange(10, 50), rng.randrange(10, 50)
    return f"{a}+{b}=", str(a + b)


def _reversal(rng: random.Random) -> tuple[str, str]:
    word = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randrange(4, 8)))
    return f"{word}>", word[::-1]


def _subtraction(rng: random.Random) -> tuple[str, str]:
    a = rng.randrange(20, 99)
    b = rng.randrange(10, a)
    return f"{a}-{b}=", str(a - b)


def _sorting(rng: random.Random) -> tuple[str, str]:
    word = "".join(rng.choice(string.ascii_lowercase[:12]) for _ in range(rng.randrange(3, 6)))
    return f"{word}|", "".join(sorted(word))


SKILLS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "addition": _addition,
    "reversal": _reversal,
    "subtraction": _subtraction,
    "sorting": _sorting,
}


def skill_examples(skill: str, n: int, seed: int) -> list[dict[str, str]]:
    """``n`` examples of one skill as ``{"prompt", "target", "skill"}`` rows (the data files' shape)."""
    try:
        make = SKILLS[skill]
    except KeyError:
        raise ValueError(f"unknown skill '{skill}' (known: {', '.join(SKILLS)})") from None
    rng = random.Random(f"{skill}:{seed}")
    rows = []
    for _ in range(n):
        prompt, target = make(rng)
        rows.append({"prompt": prompt, "target": target, "skill": skill})
    return rows


# --- training -----------------------------------------------------------------------------------


def _encode(tokenizer, examples: Sequence[dict[str, str]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Input ids and labels for prompt + target + eos; only the target and eos are learned."""
    rows = []
    for example in examples:
        prompt = tokenizer(example["prompt"])["input_ids"]
        target = tokenizer(example["target"])["input_ids"] + [tokenizer.eos_token_id]
        rows.append((prompt, target))
    width = max(len(p) + len(t) for p, t in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (prompt, target) in enumerate(rows):
        ids[i, : len(prompt) + len(target)] = torch.tensor(prompt + target)
        labels[i, len(prompt) : len(prompt) + len(target)] = torch.tensor(target)
    return ids, labels


def train_causal_lm(
    model: torch.nn.Module,
    tokenizer,
    examples: Sequence[dict[str, str]],
    *,
    steps: int,
    lr: float = 3e-3,
    batch_size: int = 64,
    seed: int = 0,
) -> list[float]:
    """AdamW on the target tokens of ``examples``; returns the loss of every step.

    Only parameters with ``requires_grad`` are trained, so the same loop fine-tunes a full model or
    the LoRA factors of a peft model. Right padding is safe: pads come after every learned token.
    """
    ids, labels = _encode(tokenizer, examples)
    mask = (ids != tokenizer.pad_token_id).long()
    generator = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    device = next(model.parameters()).device
    model.train()
    losses = []
    for _ in range(steps):
        batch = torch.randint(len(ids), (batch_size,), generator=generator)
        out = model(input_ids=ids[batch].to(device), attention_mask=mask[batch].to(device), labels=labels[batch].to(device))
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        losses.append(out.loss.item())
    model.eval()
    return losses
