"""Kernels written once as plain torch over one chunk, run as one fused loop where that pays.

TIES' trim, sign election and disjoint mean, DARE's hashed drop masks and the top-k threshold scan
are a dozen elementwise steps per entry. As separate torch ops each step is a pass over the chunk,
and on CPUs those passes, not the memory traffic, set the cost (10–25× the traffic floor).
``torch.compile`` (inductor: C++ through the system compiler on CPUs, Triton on GPUs) turns the same
function into one loop that reads each input once and keeps every intermediate in registers.

A :class:`FusedKernel` compiles its function on first use, once per process (inductor also keeps
its output in an on-disk cache, so a second process on the machine compiles in a fraction of the
time), for models (or rows) of at least ``FUSED_MIN_NUMEL`` elements: below that the eager ops
cost less than the compile would repay. Where compiling is impossible (no C++ compiler, no Triton, an unsupported
platform) the first failure is reported as a warning and the kernel runs eagerly from then on.
Compiled and eager runs compute the same operations in the same order, so float32 and float64
results are the same bits on CPUs (inductor's C++ neither contracts a multiply and an add into
one rounding nor reorders sums). They may differ in the last bit where a backend does contract
(Triton on GPUs), and for float16/bfloat16, which a compiled loop keeps in float32 between its
steps where eager ops round after each.
"""

from __future__ import annotations

import warnings
from typing import Callable

import torch

FUSED_MIN_NUMEL = 1 << 16
"""Work smaller than this runs eagerly (its per-op dispatch is cheap next to a compile)."""
RECOMPILE_LIMIT = 64
"""Specializations one fused function may compile (see :meth:`FusedKernel._call_without_duck_shapes`)."""
FUSED_STEP = 1 << 22
"""Columns per compiled call: long enough that the call's dispatch (tens of µs) is noise, short
enough that an eager rerun of one call (after a failed compile) keeps its temporaries small."""


class FusedKernel:
    """A plain torch function over one chunk, called compiled when it pays and works, else eagerly."""

    def __init__(self, fn: Callable[..., object]) -> None:
        self.eager = fn
        self._compiled: Callable[..., object] | None = None
        self.failure: str | None = None

    def plan(self, size: int, eager_step: int) -> tuple[Callable[..., object], int]:
        """The callable to use, and how many columns to give it per call.

        ``size`` is how many elements the work that repays a compile comes in: a merge kernel
        passes the model's parameter count (so a big model's small tensors run compiled too, one
        call each, where eager they would cost a dozen dispatches), a per-row scan its row length.
        ``eager_step`` is the cache-sized step of the eager ops; a compiled loop keeps nothing
        between its steps, so it takes long steps.
        """
        if size < FUSED_MIN_NUMEL or self.failure is not None:
            return self.eager, eager_step
        return self._call_compiled, max(FUSED_STEP, eager_step)

    def _call_compiled(self, *args: object) -> object:
        if self.failure is not None:
            return self.eager(*args)
        try:
            if self._compiled is None:
                with warnings.catch_warnings():  # loading inductor trips torch's own deprecations
                    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.")
                    # dynamic: one compiled loop for every chunk length, not one per tensor shape
                    self._compiled = torch.compile(self.eager, dynamic=True, fullgraph=True)
                    return self._call_without_duck_shapes(*args)
            return self._call_without_duck_shapes(*args)
        except Exception as exc:  # noqa: BLE001 - any compiler or backend failure means "run eagerly"
            self.failure = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
            warnings.warn(
                f"torch.compile of {self.eager.__name__} failed ({self.failure}); running it eagerly",
                RuntimeWarning,
                stacklevel=2,
            )
            return self.eager(*args)

    def _call_without_duck_shapes(self, *args: object) -> object:
        """Call the compiled function under two settings of its own, set and restored by hand
        (``config.patch`` costs more than a small compiled call):

        * no duck shaping: chunks are views at varying offsets, and a length that happens to equal
          an offset would otherwise become a guard that the next chunk fails (a recompile);
        * room for ``RECOMPILE_LIMIT`` specializations: each expert count, dtype and option
          (normalize, drop) is one, and past torch's default of 8 a process that merges several
          kinds of runs would silently lose the compiled loop.
        """
        # The compiler stack (torch._dynamo) is imported here, on the first compiled call, so that
        # importing the merge declarations (evomerge validate, a plan) does not load it.
        import torch._dynamo.config as dynamo_config
        import torch.fx.experimental._config as fx_config

        assert self._compiled is not None
        duck, limit = fx_config.use_duck_shape, dynamo_config.recompile_limit
        fx_config.use_duck_shape = False
        dynamo_config.recompile_limit = max(limit, RECOMPILE_LIMIT)
        try:
            return self._compiled(*args)
        finally:
            fx_config.use_duck_shape = duck
            dynamo_config.recompile_limit = limit
