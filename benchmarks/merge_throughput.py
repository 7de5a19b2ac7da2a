"""Merge throughput: each merge method's materialization against a memory-traffic floor.

Usage::

    python benchmarks/merge_throughput.py --json [--params N] [--repeats R] [--device D]
                                          [--threads T] [--methods a,b] [--verbose]

What is timed is what a worker does per candidate: ``Space.build(method, …)`` (granularity
``per_layer_group``, one group per layer; ``global`` for methods that only allow it), a genome drawn
uniformly from ``[0.1, 0.9]^d``, ``space.decode(genome)``, and ``Materializer.apply(recipe)``
writing the merge in place into preallocated target tensors. Every method is called once to warm
up — the first call also builds the per-tensor caches (TIES' and LoRA-A's magnitude histograms,
SLERP's Gram matrices) and compiles the fused kernels of TIES, DARE and the top-k scan (once per
process: ``evomerge/merge/fused.py``), all outside the timed calls and reported as
``setup_seconds`` (first call minus the median; inductor's on-disk cache shortens the compiles of
a second run) — and then
``--repeats`` times with fresh genomes; ``seconds`` is the median. ``--methods`` restricts the run.

Models (random fp32, built here, nothing downloaded):

* Full models: a tiny-Llama layout (embedding, ``L = 12`` layers of q/k/v/o/gate/up/down plus two
  RMSNorm vectors, final norm, untied ``lm_head``; hidden ``d ≈ sqrt(params / 179)``, vocab ``16 d``,
  intermediate ``≈ 2.75 d``) with about ``--params`` parameters; a base and three experts
  ``base + τ_i``. Methods are timed on the **base form** (base + stacked task vectors), which is how
  a worker holds the experts when the run names a base: it is the only form the task-vector
  methods accept and the form linear and SLERP run on in the same run. Linear, SLERP and split
  SLERP are also timed on the raw form (stacked expert weights, no base; how a worker holds them
  when the run has no base) under the extra key ``without_base``.
* ``slerp`` and ``split_slerp`` take exactly two experts: they run on experts 0 and 1 of the three
  (a materializer over views of the first two rows of the same resident stacks).
* ``lora_compose`` merges LoRA adapters: three synthetic adapters in PEFT naming
  (``base_model.model.model.layers.{i}.{self_attn.q_proj,…,mlp.down_proj}.lora_{A,B}.weight``,
  ``lora_A`` ``[r, d_in]``, ``lora_B`` ``[d_out, r]``, Llama-7B module shapes, rank 64) with about
  ``--params`` lora_A/lora_B parameters each, raw form (adapters have no base).

Floor: the copy bandwidth ``B`` of this machine is measured in the same run (``dst.copy_(src)`` on
a 256 MiB fp32 buffer — 1 GiB on CUDA — pages faulted in first, ``B = 2 · bytes / time``: a copy
reads and writes every byte). Shared machines drift by 2× within minutes, so each method samples
it right around its own calls (two copies before each timed call and after the last) and uses the
best copy of that window. With ``N`` the elements of one model (or adapter) and 4 bytes per fp32
element, a method must at least read each resident input row it combines once and write the output
once::

    floor_bytes   = 4 · N · (rows + reference + 1)
    floor_seconds = floor_bytes / B

where ``rows`` is the number of expert rows the method combines (3; 2 for SLERP and split SLERP),
``reference`` is 1 in the base form (the base tensor is read: output = base + combination of task
vectors) and 0 in the raw form, and the final 1 is the output write. Sparsification (TIES' trim,
DARE's drop, LoRA-A's magnitude trim) and sign election are compute, not traffic, so they add
nothing to the floor (TIES and LoRA-A's exact top-k thresholds do cost a second read of the rows);
the targets allow for them (linear and task arithmetic 1.5×, SLERP 3×, TIES and DARE 6×;
``lora_compose`` is held to the TIES target, since it trims by magnitude too). ``ratio`` is the
median call over the floor; ``best_ratio`` the fastest call over it.

Memory: glibc's free heap is handed back (``malloc_trim``) and the resident set read before a
method's first call; around every call the peak is reset (``5`` into ``/proc/self/clear_refs``)
and ``VmHWM`` read after it (on CUDA: ``max_memory_allocated`` against ``memory_allocated``).
``peak_extra_bytes`` is the largest rise over the timed calls: transients plus whatever the method
built and keeps (work buffers, threshold histograms, Gram matrices), since a worker keeps them too.
``peak_bytes`` = resident inputs (stacks and base the method reads) + output + that rise;
``memory_budget_bytes`` = resident inputs + 2 × output, i.e. at most one more output-sized buffer;
``memory_ok`` compares the two. The first call's rise is ``setup_peak_extra_bytes``. The
compiler's own modules (dynamo, inductor: host code, the same for any model size) are loaded
before the first method and reported apart, as ``compiler_bytes`` in every entry.

Output: one JSON object on stdout keyed by registry names (``evomerge.merge.MERGE_METHODS``), each
``{"seconds", "floor_seconds", "ratio", …}``; ``--verbose`` adds one line of device information on
stderr. Run it on a quiet machine (see ``research/deps.md``, oversubscribed cores).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evomerge.merge import MERGE_METHODS  # noqa: E402
from evomerge.merge.resident import ResidentTensor  # noqa: E402
from evomerge.workers.materializer import Materializer  # noqa: E402
from evomerge.space.merge_space import Space  # noqa: E402
from evomerge.workers.tiers import DeviceTier  # noqa: E402

N_EXPERTS = 3
LLAMA_LAYERS = 12
TARGET_RATIO = {
    "linear": 1.5,
    "task_arithmetic": 1.5,
    "slerp": 3.0,
    "split_slerp": 3.0,
    "ties": 6.0,
    "dare_linear": 6.0,
    "dare_ties": 6.0,
    "lora_compose": 6.0,
}
ADAPTER_METHODS = {"lora_compose"}
"""Methods that merge LoRA adapters rather than full models."""
BYTES_PER_ELEMENT = 4


# ----------------------------------------------------------------------------- layouts


def llama_layout(params: int) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of a tiny Llama with about ``params`` parameters."""
    d = max(16, int(round(math.sqrt(params / 179) / 16)) * 16)
    vocab, inter = 16 * d, max(16, int(round(2.75 * d / 16)) * 16)
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, d)}
    for i in range(LLAMA_LAYERS):
        p = f"model.layers.{i}"
        shapes[f"{p}.input_layernorm.weight"] = (d,)
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[f"{p}.self_attn.{proj}.weight"] = (d, d)
        shapes[f"{p}.post_attention_layernorm.weight"] = (d,)
        shapes[f"{p}.mlp.gate_proj.weight"] = (inter, d)
        shapes[f"{p}.mlp.up_proj.weight"] = (inter, d)
        shapes[f"{p}.mlp.down_proj.weight"] = (d, inter)
    shapes["model.norm.weight"] = (d,)
    shapes["lm_head.weight"] = (vocab, d)
    return shapes


def lora_layout(params: int) -> dict[str, tuple[int, ...]]:
    """PEFT adapter shapes (Llama-7B modules, rank ≤ 64) with about ``params`` parameters."""
    d, inter = 4096, 11008
    modules = {
        "self_attn.q_proj": (d, d),
        "self_attn.k_proj": (d, d),
        "self_attn.v_proj": (d, d),
        "self_attn.o_proj": (d, d),
        "mlp.gate_proj": (d, inter),
        "mlp.up_proj": (d, inter),
        "mlp.down_proj": (inter, d),
    }
    per_rank = sum(i + o for i, o in modules.values())
    rank = max(1, min(64, int(round(params / per_rank))))
    layers = max(1, int(round(params / (per_rank * rank))))
    shapes: dict[str, tuple[int, ...]] = {}
    for i in range(layers):
        for module, (d_in, d_out) in modules.items():
            p = f"base_model.model.model.layers.{i}.{module}"
            shapes[f"{p}.lora_A.weight"] = (rank, d_in)
            shapes[f"{p}.lora_B.weight"] = (d_out, rank)
    return shapes


def random_state(
    shapes: Mapping[str, tuple[int, ...]], seed: int, std: float, device: torch.device,
    around: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Random fp32 tensors ``around + std · N(0, 1)`` (norm vectors near 1 when not ``around``)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    state = {}
    for name, shape in shapes.items():
        t = torch.randn(shape, generator=gen, device=device).mul_(std)
        if around is not None:
            t.add_(around[name])
        elif len(shape) == 1:
            t.add_(1.0)
        state[name] = t
    return state


def experts_around(
    shapes: Mapping[str, tuple[int, ...]], base: Mapping[str, torch.Tensor] | None, device: torch.device
) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
    """Expert state dicts made one at a time (so only one is alive while a materializer reads it)."""
    for i in range(N_EXPERTS):
        if base is None:  # LoRA adapters: independent factors
            yield f"adapter {i}", random_state(shapes, 1000 + i, 0.02, device)
        else:
            yield f"expert {i}", random_state(shapes, 1000 + i, 0.002, device, around=base)


def first_two(mat: Materializer) -> Materializer:
    """A materializer over experts 0 and 1 of ``mat`` (views of its stacks, no copy)."""
    tensors = {
        name: ResidentTensor(name=name, stack=t.stack[:2], reference=t.reference)
        for name, t in mat.tensors.items()
    }
    devices = {name: t.device for name, t in mat.targets.items()}
    return Materializer(mat.targets, DeviceTier(tensors, devices), chunk=mat.chunk)


# ----------------------------------------------------------------------------- measuring


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class CopyFloor:
    """Copy bandwidth of this machine: ``dst.copy_(src)``, counting the read and the write.

    Shared machines drift (other tenants, frequency), so every method samples it again right
    around its own calls and uses the best copy of its window.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.nbytes = (1 << 30) if device.type == "cuda" else (256 << 20)
        self.src = torch.rand(self.nbytes // BYTES_PER_ELEMENT, device=device)
        self.dst = torch.empty_like(self.src)
        self.dst.copy_(self.src)  # fault the pages in

    def copy_seconds(self, times: int = 2) -> float:
        best = math.inf
        for _ in range(times):
            sync(self.device)
            start = time.perf_counter()
            self.dst.copy_(self.src)
            sync(self.device)
            best = min(best, time.perf_counter() - start)
        return best

    def bandwidth(self, seconds: float) -> float:
        return 2 * self.nbytes / seconds


def _proc_status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def _release_free_heap() -> None:
    """Hand freed heap pages back to the OS (glibc ``malloc_trim``), so that memory an earlier
    method freed but the allocator kept does not blur the next method's baseline."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak memory of a call above a baseline taken before the method's first call.

    CPU: the resident set (``5`` into ``/proc/self/clear_refs`` resets ``VmHWM`` to the current
    ``VmRSS``); CUDA: ``max_memory_allocated``. Caches and work buffers that a method builds on
    its first call and keeps are counted, since they stay resident in a worker.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        _release_free_heap()
        self.baseline = self._current()

    def _current(self) -> int | None:
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device)
        try:
            return _proc_status_bytes("VmRSS")
        except (OSError, KeyError):
            return None

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            self.baseline = None

    def extra(self) -> int | None:
        if self.baseline is None:
            return None
        if self.device.type == "cuda":
            return max(0, torch.cuda.max_memory_allocated(self.device) - self.baseline)
        return max(0, _proc_status_bytes("VmHWM") - self.baseline)


def load_compiler(device: torch.device) -> int | None:
    """Load ``torch.compile``'s machinery (dynamo, inductor) before any method is measured.

    TIES, DARE and the top-k scan run fused kernels compiled on first use; the compiler's own
    modules are a fixed cost of the process (host code, not data, the same for any model size), so
    they are loaded here and their resident set reported once as ``compiler_bytes`` rather than
    charged to whichever method compiles first. ``None`` when nothing compiles (the kernels then
    run eagerly) or the resident set cannot be read.
    """
    _release_free_heap()
    try:
        before = _proc_status_bytes("VmRSS")
    except (OSError, KeyError):
        before = None
    try:
        torch.compile(lambda x: x + 1, dynamic=True, fullgraph=True)(torch.ones(1 << 16, device=device))
    except Exception:  # noqa: BLE001 - no compiler here
        return None
    _release_free_heap()
    return None if before is None else max(0, _proc_status_bytes("VmRSS") - before)


def resident_input_bytes(mat: Materializer, rows: int) -> int:
    return sum(
        BYTES_PER_ELEMENT * t.numel * (rows + (t.reference is not None)) for t in mat.tensors.values()
    )


def bench_method(
    name: str, mat: Materializer, repeats: int, floor: CopyFloor, device: torch.device, seed: int
) -> dict:
    method = MERGE_METHODS[name]
    if method.needs_fisher and mat.fishers is None:  # Fisher merging also reads one Fisher per expert
        mat.set_fishers({n: torch.rand_like(t.stack) for n, t in mat.tensors.items()}, floor=1e-8)
    granularity = "global" if method.global_only else "per_layer_group"
    space = Space.build(method, list(mat.targets), mat.n_models, granularity=granularity)
    rng = np.random.default_rng(seed)

    def call() -> tuple[float, int | None]:
        recipe_genome = rng.uniform(0.1, 0.9, space.dim)
        memory.reset()
        sync(device)
        start = time.perf_counter()
        mat.apply(space.decode(recipe_genome))
        sync(device)
        return time.perf_counter() - start, memory.extra()

    memory = PeakMemory(device)
    first, setup_extra = call()
    times, extras, copies = [], [], []
    for _ in range(repeats):
        copies.append(floor.copy_seconds())
        seconds, extra = call()
        times.append(seconds)
        extras.append(extra)
    copies.append(floor.copy_seconds())
    bandwidth = floor.bandwidth(min(copies))
    seconds = statistics.median(times)
    n = sum(t.numel() for t in mat.targets.values())
    rows = mat.n_models
    has_base = mat.has_base
    floor_bytes = BYTES_PER_ELEMENT * n * (rows + int(has_base) + 1)
    floor_seconds = floor_bytes / bandwidth
    target = TARGET_RATIO.get(name)
    entry = {
        "seconds": seconds,
        "floor_seconds": floor_seconds,
        "ratio": seconds / floor_seconds,
        "target_ratio": target,
        "meets_target": None if target is None else seconds / floor_seconds <= target,
        "best_seconds": min(times),
        "best_ratio": min(times) / floor_seconds,
        "setup_seconds": max(0.0, first - seconds),
        "form": "base + task vectors" if has_base else ("LoRA adapters" if name in ADAPTER_METHODS else "raw experts"),
        "experts": rows,
        "granularity": granularity,
        "parameters": n,
        "floor_bytes": floor_bytes,
        "bandwidth_bytes_per_second": bandwidth,
    }
    if None not in extras and setup_extra is not None:
        inputs = resident_input_bytes(mat, rows)
        output = BYTES_PER_ELEMENT * n
        extra = max(extras)  # type: ignore[type-var]
        peak = inputs + output + extra
        budget = inputs + 2 * output
        entry.update(
            peak_extra_bytes=extra,
            peak_bytes=peak,
            memory_budget_bytes=budget,
            memory_ok=peak <= budget,
            setup_peak_extra_bytes=setup_extra,
        )
    return entry


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print the results as one JSON object (the default)")
    parser.add_argument("--params", type=int, default=50_000_000, help="parameters per expert (default 50M)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per method after one warm-up")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch intra-op threads")
    parser.add_argument("--verbose", action="store_true", help="one line of device information on stderr")
    parser.add_argument("--methods", help="comma-separated registry names to time (default: all)")
    args = parser.parse_args(argv)
    if args.params < 1000 or args.repeats < 1 or args.threads < 1:
        parser.error("--params must be ≥ 1000, --repeats and --threads ≥ 1")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())

    compiler_bytes = load_compiler(device)
    floor = CopyFloor(device)
    if args.verbose:
        what = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)"
        bandwidth = floor.bandwidth(floor.copy_seconds(7))
        print(
            f"device {device} {what}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
            f"copy bandwidth {bandwidth / 1e9:.1f} GB/s, {args.params:,} parameters per expert, "
            "torch.compile resident "
            + ("unavailable" if compiler_bytes is None else f"{compiler_bytes / 2**20:.0f} MiB"),
            file=sys.stderr,
        )

    shapes = llama_layout(args.params)
    base = random_state(shapes, 7, 0.02, device)
    targets = {n: torch.zeros(s, device=device) for n, s in shapes.items()}
    with_base = Materializer.from_state_dicts(targets, experts_around(shapes, base, device), N_EXPERTS, base=base)
    del base
    # The raw form is rebuilt from the base form (identical up to rounding; no second generation).
    raw_state = {n: t.stack + t.reference for n, t in with_base.tensors.items()}
    raw = Materializer.from_state_dicts(
        targets, ((f"expert {i}", {n: s[i] for n, s in raw_state.items()}) for i in range(N_EXPERTS)), N_EXPERTS
    )
    del raw_state
    lora_shapes = lora_layout(args.params)
    lora_targets = {n: torch.zeros(s, device=device) for n, s in lora_shapes.items()}
    adapters = Materializer.from_state_dicts(lora_targets, experts_around(lora_shapes, None, device), N_EXPERTS)

    results: dict[str, dict] = {}
    wanted = set(args.methods.split(",")) if args.methods else set(MERGE_METHODS)
    unknown = wanted - set(MERGE_METHODS)
    if unknown:
        parser.error(f"unknown merge methods: {', '.join(sorted(unknown))}")
    for index, (name, method) in enumerate(MERGE_METHODS.items()):
        if name not in wanted:
            continue
        if name in ADAPTER_METHODS:
            entry = bench_method(name, adapters, args.repeats, floor, device, index)
            entry["note"] = f"{N_EXPERTS} synthetic LoRA adapters (lora_A/lora_B tensors)"
        elif method.max_models == 2:
            entry = bench_method(name, first_two(with_base), args.repeats, floor, device, index)
            entry["without_base"] = bench_method(name, first_two(raw), args.repeats, floor, device, index)
            entry["note"] = f"takes exactly 2 experts: timed on experts 0 and 1 of the {N_EXPERTS}"
        else:
            if method.min_models > N_EXPERTS or (method.max_models or N_EXPERTS) < N_EXPERTS:
                continue
            entry = bench_method(name, with_base, args.repeats, floor, device, index)
            if not method.needs_base:
                entry["without_base"] = bench_method(name, raw, args.repeats, floor, device, index)
        entry["compiler_bytes"] = compiler_bytes
        results[name] = entry
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
