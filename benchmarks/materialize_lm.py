"""Candidate turnaround on a ~100 M-parameter Llama: in-place materialization vs save and reload.

Usage::

    python benchmarks/materialize_lm.py --json [--hidden 768] [--layers 12] [--repeats 5] [--device D]
                                           [--dtype auto|float32|bfloat16] [--threads T]

Built here (random weights, nothing downloaded): a Llama-architecture base (hidden 768, 12 layers,
intermediate 3072, the character tokenizer of ``evomerge.models.zoo.tiny_lm``: ~113 M parameters)
and three experts ``base + 0.01 · noise``, saved with ``save_pretrained`` in a temporary directory.
A ``WhiteBoxWorker`` loads them the way a run does (the base resident, three task vectors, one working
model) for a ``task_arithmetic`` search with one weight per expert per layer, in ``--dtype`` (``auto``:
the checkpoints' float32; a GPU run holds bfloat16).

* ``inplace_seconds``: median over ``--repeats`` fresh random genomes of ``worker.materialize``,
  i.e. decode the genome and write the merge into the resident working model. The candidate is
  then ready to score.
* ``save_reload_seconds``: the path other tools take per candidate (mergekit-evolve writes every
  candidate and loads it back): the same merge, ``save_pretrained`` (safetensors) of the merged
  model into a fresh directory, and ``AutoModelForCausalLM.from_pretrained`` of it onto the device.
  transformers maps safetensors files lazily, so a reloaded model reads its weights only when it
  first runs: the path is timed up to the end of scoring the 64 examples once, and the resident
  model's ``score_seconds`` is subtracted. The reloaded model takes the worker's dtype. Median over ``--repeats`` genomes; the directory is
  removed after each.
* ``score_seconds``: scoring 64 examples (``negative_cross_entropy`` on synthetic addition and
  reversal prompts, batch 16) with the resident merged model (median of ``--repeats``); both paths
  pay it, so it is reported apart.
* ``speedup`` = ``save_reload_seconds / inplace_seconds``.
* ``floor_seconds``: the memory traffic the in-place merge must do, ``itemsize · N · (3 + 1 + 1)``
  bytes (read three task vectors and the base, write the output; N the model's elements), at the
  copy bandwidth measured on the worker's device in the same run (``dst.copy_(src)`` on a 256 MiB
  buffer, best of 5: ``2 · bytes / time``; on a GPU each timing spans 20 copies between two
  synchronizations, as one copy takes ~0.1 ms there and a synchronization alone tens of µs).
  ``floor_ratio`` = ``inplace_seconds / floor_seconds``.

On a GPU every timed region starts and ends with ``torch.cuda.synchronize``, so queued kernels are
counted where they run.

Threads: ``--threads`` (default 1) sets torch's CPU threads, as a Ray worker with
``cpus_per_worker: 1`` runs (Ray sets ``OMP_NUM_THREADS`` to an actor's CPUs). On a 2-core machine
with anything else running, two OpenMP threads per op wait on each other at every barrier and
streaming ops slow down by 10× or more, so figures with ``--threads 2`` are only meaningful on an
otherwise idle machine.

Targets on a 2-core CPU: speedup ≥ 3 and floor_ratio ≤ 2; on a GPU (``--device cuda --dtype
bfloat16``): speedup ≥ 10 and floor_ratio ≤ 2.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from evomerge.plan import RunPlan
from evomerge.records import Candidate

N_EXPERTS = 3
SCORED_EXAMPLES = 64


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, mib: int = 256, repeats: int = 5) -> float:
    """Bytes per second a plain copy moves on ``device`` (each byte read once and written once)."""
    src = torch.ones(mib * 2**20 // 4, device=device)
    dst = torch.zeros_like(src)
    copies = 20 if device.type == "cuda" else 1  # a GPU copies 256 MiB in about a synchronization's time
    dst.copy_(src)  # untimed: first use
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(copies):
            dst.copy_(src)
        _sync(device)
        best = min(best, (time.perf_counter() - t0) / copies)
    return 2 * src.numel() * 4 / best


def build_models(root: Path, hidden: int, layers: int) -> None:
    from evomerge.models.zoo.tiny_lm import build_tokenizer, tiny_llama

    tokenizer = build_tokenizer()
    base = tiny_llama(tokenizer, hidden=hidden, layers=layers, heads=hidden // 64, intermediate=4 * hidden, seed=0)
    base.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    state = {k: v.clone() for k, v in base.state_dict().items()}
    for i in range(N_EXPERTS):
        generator = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for name, param in base.named_parameters():
                param.copy_(state[name] + 0.01 * torch.randn(param.shape, generator=generator))
        base.save_pretrained(root / f"expert{i}")


def write_examples(path: Path) -> None:
    from evomerge.models.zoo.tiny_lm import skill_examples

    rows = skill_examples("addition", SCORED_EXAMPLES // 2, 0) + skill_examples("reversal", SCORED_EXAMPLES // 2, 0)
    path.write_text("".join(json.dumps({"prompt": r["prompt"], "target": r["target"]}) + "\n" for r in rows))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print only the JSON figures")
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"], help="models.dtype")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (a Ray worker's cpus_per_worker)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from transformers import AutoModelForCausalLM

    from evomerge.config import config_from_dict
    from evomerge.fitness.lm import negative_cross_entropy
    from evomerge.models.loading import quiet_transformers, resolve_device
    from evomerge.workers.whitebox import WhiteBoxWorker

    quiet_transformers()
    device = resolve_device(args.device)
    with tempfile.TemporaryDirectory(prefix="materialize-lm-") as tmp:
        root = Path(tmp)
        build_models(root, args.hidden, args.layers)
        write_examples(root / "examples.jsonl")
        config = config_from_dict(
            {
                "executor": "inline",
                "models": {
                    "base": str(root / "base"),
                    "experts": [str(root / f"expert{i}") for i in range(N_EXPERTS)],
                    "device": str(device),
                    "dtype": args.dtype,
                },
                "merge": {"method": "task_arithmetic", "granularity": "per_layer_group", "search": ["weight"]},
                "populations": [{"name": "p", "strategy": "random"}],
                "fitness": {"name": "negative_cross_entropy", "options": {"batch_size": 16},
                            "data": {"source": str(root / "examples.jsonl")}},
                "budget": {"evaluations": 1},
            }
        )
        worker = WhiteBoxWorker(RunPlan.from_config(config), worker_id="bench")
        numel = sum(p.numel() for p in worker.models.model.parameters())
        dtype = next(worker.models.model.parameters()).dtype
        itemsize = dtype.itemsize
        rng = np.random.default_rng(0)
        genomes = [rng.uniform(0.1, 0.9, worker.space.dim) for _ in range(args.repeats + 1)]

        worker.materialize(Candidate("p:warm", "p", genomes[-1]))  # warm-up: first-touch of buffers, kernel caches
        inplace, bandwidths = [], []
        for genome in genomes[: args.repeats]:
            bandwidths.append(copy_bandwidth(device))
            _sync(device)
            t0 = time.perf_counter()
            worker.materialize(Candidate("p:0", "p", genome))
            _sync(device)
            inplace.append(time.perf_counter() - t0)
        bandwidths.append(copy_bandwidth(device))

        score_times = []
        for _ in range(args.repeats):
            _sync(device)
            t0 = time.perf_counter()
            scores = worker.score(worker.examples)
            _sync(device)
            score_times.append(time.perf_counter() - t0)
        score_seconds = statistics.median(score_times)

        save_reload = []
        for i, genome in enumerate(genomes[: args.repeats]):
            out = root / f"candidate{i}"
            _sync(device)
            t0 = time.perf_counter()
            worker.materialize(Candidate("p:0", "p", genome))
            worker.models.model.save_pretrained(out, safe_serialization=True)
            reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=dtype).to(device).eval()
            negative_cross_entropy(reloaded, worker.models.tokenizer, worker.examples, batch_size=16)
            _sync(device)
            save_reload.append(time.perf_counter() - t0 - score_seconds)
            del reloaded
            shutil.rmtree(out)

    bandwidth = max(bandwidths)
    floor_seconds = itemsize * numel * (N_EXPERTS + 2) / bandwidth
    inplace_seconds = statistics.median(inplace)
    save_reload_seconds = statistics.median(save_reload)
    figures = {
        "inplace_seconds": round(inplace_seconds, 4),
        "save_reload_seconds": round(save_reload_seconds, 4),
        "score_seconds": round(score_seconds, 4),
        "speedup": round(save_reload_seconds / inplace_seconds, 2),
        "floor_seconds": round(floor_seconds, 4),
        "floor_ratio": round(inplace_seconds / floor_seconds, 2),
        "parameters": numel,
        "copy_bandwidth_gb_s": round(bandwidth / 1e9, 2),
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "threads": args.threads,
        "mean_score": round(float(np.mean(scores)), 4),
    }
    if not args.json:
        print(__doc__.splitlines()[0], file=sys.stderr)
    print(json.dumps(figures, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
