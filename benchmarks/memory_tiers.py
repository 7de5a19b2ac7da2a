"""Per-candidate merge time and a worker's peak memory in each memory tier (device, host, mmap).

Usage::

    python benchmarks/memory_tiers.py --json [--experts 4] [--hidden 768] [--layers 12] [--vocab 32000]
                                      [--repeats 3] [--threads 1] [--device D]

Built here (random weights, nothing downloaded): a Llama-architecture base (vocabulary 32000,
hidden 768, 12 layers, intermediate 2048, tied embeddings: ~110 M parameters) and ``--experts``
experts ``base + 0.01 · noise``, saved in float32 with ``save_pretrained`` (safetensors) in a
temporary directory. Each tier runs in a fresh process (so peaks do not mix) that loads the models
the way a worker does (``load_resident_models`` with ``models.residency`` set to the tier) for a
``task_arithmetic`` search with one weight per expert per layer, merges one warm-up candidate, then
``--repeats`` fresh genomes. Task arithmetic is a linear combination of the experts, so the
streaming tiers read it in blocks of whole kernel chunks (README, "Memory tiers").

Per tier:

* ``seconds``: median per-candidate merge (decode + write into the working model).
* ``floor_seconds``: the bytes the candidate must move at bandwidths measured in the tier's own
  process right after its merges (so under the same load).
  Every tier pays the in-place kernel: reading the task vectors and the base and writing the
  output, ``itemsize · N · (experts + 2)`` at the copy bandwidth (``dst.copy_(src)`` on 256 MiB,
  best of 5, ``2 · bytes / time``). The streaming tiers also read ``itemsize · N · (experts + 1)``
  from where they keep the models: host memory at the host → device copy rate (one-way bytes per
  second; on a CPU the same memcpy), or the safetensors files at the rate a plain loop copies a
  memory-mapped file (warm in the page cache) into a buffer (on a GPU, at the slower of that and
  the host → device rate: the bytes cross to the device too, pipelined with the reads). On a CPU
  one memory bus serves both, so the floor is their sum.
* ``ratio`` = ``seconds / floor_seconds``.
* ``peak_anon_bytes``: the process's peak anonymous resident memory (``RssAnon`` of
  ``/proc/self/status``, sampled every millisecond by a thread) over loading and merging, less its
  value after imports (``baseline_anon_bytes``: the interpreter, torch, transformers). Pages of the
  mapped files are the page cache's, not the worker's, and are not anonymous.
* ``estimate_bytes``: the memory check's peak for that tier (``evomerge.models.memory.tier_memory``;
  on a CPU, device and host together; on a GPU, its host figure); ``estimate_over_peak`` =
  ``estimate_bytes / peak_anon_bytes``. On a GPU the CUDA context is created before the baseline.
* On a GPU only: ``device_peak_bytes``, the most the worker had allocated on the device
  (``torch.cuda.max_memory_allocated`` less what was allocated before it loaded), against the check's
  device figure ``device_estimate_bytes``; ``device_estimate_over_peak`` is their ratio.
* ``mmap_peak_over_working_model``: the mapped tier's ``peak_anon_bytes`` over ``working_model_bytes``.

Targets: the mmap tier's peak anonymous memory ≤ the working model + 10 %; the host tier within 2×
of its floor; each estimate within 10 % of the measured peak (on a GPU, the device's).

On a GPU every timed region starts and ends with ``torch.cuda.synchronize``.
"""

from __future__ import annotations

import argparse
import json
import mmap
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

TIERS = ("device", "host", "mmap")
ITEMSIZE = 4  # float32 checkpoints, merged in float32


def rss_anon() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


class PeakSampler(threading.Thread):
    """The highest ``RssAnon`` seen, read every millisecond (torch ops release the GIL)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak = rss_anon()
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(0.001):
            self.peak = max(self.peak, rss_anon())

    def stop(self) -> int:
        self._done.set()
        self.join()
        self.peak = max(self.peak, rss_anon())
        return self.peak


def build_models(root: Path, args) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=12, num_key_value_heads=12,
        max_position_embeddings=128, tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(root / "base")
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    for i in range(args.experts):
        gen = torch.Generator().manual_seed(1 + i)
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(base[n] + 0.01 * torch.randn(p.shape, generator=gen))
        model.save_pretrained(root / f"expert{i}")
    (root / "data.jsonl").write_text(json.dumps({"prompt": "1+1=", "target": "2"}) + "\n")


def run_config(root: Path, args, tier: str) -> dict:
    return {
        "executor": "inline",
        "run_dir": str(root / "run"),
        "models": {
            "base": str(root / "base"),
            "experts": [str(root / f"expert{i}") for i in range(args.experts)],
            "device": args.device, "dtype": "float32", "residency": tier,
        },
        "merge": {"method": "task_arithmetic", "granularity": "per_layer_group", "layer_groups": args.layers},
        "populations": [{"name": "p", "strategy": "random"}],
        "fitness": {"name": "negative_cross_entropy", "data": {"source": str(root / "data.jsonl")}},
        "budget": {"evaluations": 1},
    }


def child(root: Path, args) -> dict:
    """One tier, in this fresh process: load, merge, and report time and peak memory."""
    from evomerge.config import config_from_dict
    from evomerge.models.loading import resolve_device
    from evomerge.models.memory import tier_memory
    from evomerge.models.sharding import Placement
    from evomerge.plan import RunPlan
    from evomerge.workers.whitebox import load_resident_models

    torch.set_num_threads(args.threads)
    config = config_from_dict(run_config(root, args, args.child))
    device = resolve_device(args.device)
    plan = RunPlan.from_config(config)
    need = tier_memory(config, device)[args.child]
    on_gpu = device.type == "cuda"
    estimate = need.host_peak if on_gpu else need.peak
    if on_gpu:  # the CUDA context's host memory is the process's, not the worker's: made before the baseline
        torch.zeros(1, device=device)
        torch.cuda.synchronize(device)
        device_before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    baseline = rss_anon()
    sampler = PeakSampler()
    sampler.start()
    loaded = load_resident_models(plan, Placement((device,)), args.child)
    layout = {name: tuple(t.shape) for name, t in loaded.materializer.targets.items()}
    space = loaded.space
    codecs = plan.codecs(space, layout)
    rng = np.random.default_rng(0)
    loaded.materializer.apply(codecs["p"].decode(rng.uniform(0.2, 0.8, space.dim)))  # warm-up
    times = []
    for _ in range(args.repeats):
        decoded = codecs["p"].decode(rng.uniform(0.2, 0.8, space.dim))
        if on_gpu:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        loaded.materializer.apply(decoded)
        if on_gpu:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    peak = sampler.stop()
    device_peak = torch.cuda.max_memory_allocated(device) - device_before if on_gpu else None
    # the floor's bandwidths, measured in this process right after its merges (after the peak)
    numel = sum(t.numel() for t in loaded.materializer.targets.values())
    floor = ITEMSIZE * numel * (args.experts + 2) / copy_bandwidth(device)  # the in-place kernel
    streamed = ITEMSIZE * numel * (args.experts + 1)
    if args.child == "host":
        floor += streamed / host_to_device_bandwidth(device)
    elif args.child == "mmap":
        rate = mapped_file_bandwidth(model_files(root, args))
        floor += streamed / (min(rate, host_to_device_bandwidth(device)) if on_gpu else rate)
    seconds = statistics.median(times)
    figures = {
        "seconds": seconds,
        "floor_seconds": floor,
        "ratio": seconds / floor,
        "peak_anon_bytes": peak - baseline,
        "estimate_bytes": estimate,
        "estimate_over_peak": estimate / (peak - baseline),
        "baseline_anon_bytes": baseline,
        "numel": numel,
    }
    if device_peak is not None:
        figures.update(
            device_peak_bytes=device_peak, device_estimate_bytes=need.device_peak,
            device_estimate_over_peak=need.device_peak / device_peak,
        )
    return figures


def model_files(root: Path, args) -> list[Path]:
    return [root / "base" / "model.safetensors"] + [root / f"expert{i}" / "model.safetensors" for i in range(args.experts)]


def copy_bandwidth(device: torch.device) -> float:
    """Bytes per second read and written by ``dst.copy_(src)`` on the device (best of 5; on a GPU
    each timing spans 20 copies, as one takes about as long as a synchronization)."""
    src = torch.ones(64 << 20, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    copies = 20 if device.type == "cuda" else 1
    dst.copy_(src)  # untimed: first use
    best = float("inf")
    for _ in range(5):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(copies):
            dst.copy_(src)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, (time.perf_counter() - t0) / copies)
    return 2 * src.numel() * 4 / best


def host_to_device_bandwidth(device: torch.device) -> float:
    """Bytes per second carried from (pinned, on a GPU) host memory to the device (best of 5)."""
    src = torch.ones(64 << 20, dtype=torch.float32, pin_memory=device.type == "cuda")
    dst = torch.empty(src.shape, dtype=src.dtype, device=device)
    dst.copy_(src)  # untimed: first use
    best = float("inf")
    for _ in range(5):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return src.numel() * 4 / best


def mapped_file_bandwidth(files: list[Path]) -> float:
    """Bytes per second a plain loop copies memory-mapped files (warm) into a buffer (best of 3)."""
    block = 64 << 20
    buffer = np.empty(block, dtype=np.uint8)
    best = float("inf")
    total = 0
    for _ in range(3):
        t0 = time.perf_counter()
        total = 0
        for file in files:
            with open(file, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                view = np.frombuffer(m, dtype=np.uint8)
                for s in range(0, len(view), block):
                    part = view[s : s + block]
                    buffer[: len(part)] = part
                    total += len(part)
                del view, part
        best = min(best, time.perf_counter() - t0)
    return total / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--intermediate", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--child", choices=TIERS, help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.root, args)))
        return

    from evomerge.models.loading import resolve_device

    device = resolve_device(args.device)
    torch.set_num_threads(args.threads)
    with open("/proc/loadavg") as f:
        load_before = f.read().split()[0]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build_models(root, args)
        tiers = {}
        for tier in TIERS:
            command = [sys.executable, __file__, "--child", tier, "--root", str(root)]
            command += [f"--{k}={getattr(args, k)}" for k in ("experts", "hidden", "layers", "intermediate", "vocab", "repeats", "threads", "device")]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode:
                sys.exit(f"tier {tier} failed:\n{done.stderr}")
            tiers[tier] = json.loads(done.stdout.strip().splitlines()[-1])
    numel = tiers["device"]["numel"]
    for figures in tiers.values():
        del figures["numel"]
    working = ITEMSIZE * numel
    with open("/proc/loadavg") as f:
        load_after = f.read().split()[0]
    result = {
        "working_model_bytes": working,
        **tiers,
        "mmap_peak_over_working_model": tiers["mmap"]["peak_anon_bytes"] / working,
        "parameters": numel, "experts": args.experts, "worker_device": str(device), "threads": args.threads,
        "loadavg_before_after": [load_before, load_after],
    }
    print(json.dumps(result, indent=None if args.json else 2))


if __name__ == "__main__":
    main()
