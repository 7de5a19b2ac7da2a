"""Declarations of merge methods: parameters as data, kernels named and imported on first use.

A merge method *declares* its parameters (name, per model or per tensor group, default, bounds), and
everything else — config validation, the size of a search space's genome, docs — is derived from
that declaration. The kernel is a plain function over tensors (:mod:`evomerge.merge.kernel`); it
never sees files, Ray or configs. A declaration names its kernel instead of holding it, so that
reading declarations (``evomerge validate``, a strategy's search space) does not import torch.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from evomerge.merge.kernel import Kernel


@dataclass(frozen=True)
class ParamSpec:
    """One numeric parameter of a merge method.

    ``per_model`` parameters take one value per expert (a weight, a density); the others take one
    value per tensor group (SLERP's ``t``, task arithmetic's ``lambda``). ``low``/``high`` are the
    default search bounds; a config may narrow or widen them. A ``default`` of ``None`` means
    "1 / number of experts" (Evo-Merging's uniform start).
    """

    name: str
    per_model: bool
    default: float | None
    low: float
    high: float | None
    doc: str = ""
    integer: bool = False
    """An integer gene (consensus' vote count k, the expert that supplies a layer): the space
    decodes it to one of the integers ``low … high``, and strategies are told it is discrete. A
    ``high`` of ``None`` means "one value per expert": ``low + n_models − 1``."""

    def default_for(self, n_models: int) -> float:
        return 1.0 / n_models if self.default is None else self.default

    def bounds_for(self, n_models: int) -> tuple[float, float]:
        """The declared search bounds for a run with ``n_models`` experts."""
        return self.low, (self.low + n_models - 1 if self.high is None else self.high)


@dataclass(frozen=True)
class OptionSpec:
    """A fixed (never searched) switch of a method, e.g. ``normalize``."""

    name: str
    default: bool
    doc: str = ""


WEIGHTS = "weights"
"""A method's inputs are the experts' dense weights (full fine-tunes, or adapters merged into the base)."""
LORA_FACTORS = "lora_factors"
"""A method's inputs are the experts' LoRA factors: the working model is the base with one
resident adapter, and a candidate costs the size of an adapter."""
INPUTS = (WEIGHTS, LORA_FACTORS)


@dataclass(frozen=True)
class MergeMethod:
    """A registered merge method.

    ``needs_base``: the method combines task vectors (expert − base), so the run must name a base.
    ``min_models``/``max_models`` bound the number of experts. ``needs_flat_gram``: the kernel needs
    inner products over the whole flattened parameter set (M2N2's split-point SLERP).
    ``needs_fisher``: the kernel weighs the experts by their diagonal Fisher information, which the
    worker estimates once on each expert's own data (``models.experts[i].data``).
    ``inputs``: what the kernel combines, :data:`WEIGHTS` or :data:`LORA_FACTORS`; loading, the
    memory check and export follow from it.
    ``magnitude_ranks``: the kernel finds each expert's k-th largest magnitude per tensor (TIES'
    trim, LoRA-A sparsification), from a magnitude histogram built once per tensor and expert in
    reusable buffers the memory check counts.
    ``differentiable``: the merge is a linear combination of the experts, written again in torch by
    ``evomerge.workers.entropy_gradient`` so gradient strategies (AdaMerging) can learn its genes.
    ``alone``: parameter values that give one expert unchanged, ``(name, value)``; a value of
    ``None`` means 1 for that expert and 0 for the others (a one-hot weight). Empty when no values
    do; a black-box run scores each expert alone through it.
    ``base_alone``: parameter values (the same for every expert) that give the base unchanged, for
    methods whose black-box services merge onto a base (``lora_compose``: every β 0). Empty when none do.
    ``kernel_ref``: the kernel as ``"module:function"``, imported by :attr:`kernel` on first use.
    """

    name: str
    kernel_ref: str
    params: tuple[ParamSpec, ...]
    options: tuple[OptionSpec, ...] = ()
    needs_base: bool = False
    min_models: int = 1
    max_models: int | None = None
    needs_flat_gram: bool = False
    needs_fisher: bool = False
    global_only: bool = False
    doc: str = ""
    mergekit_name: str | None = None
    inputs: str = WEIGHTS
    magnitude_ranks: bool = False
    differentiable: bool = False
    alone: tuple[tuple[str, float | None], ...] = ()
    base_alone: tuple[tuple[str, float], ...] = ()

    @property
    def elementwise(self) -> bool:
        """Whether each output element depends only on the experts' elements at the same position:
        true of a linear combination of the experts (``differentiable``), so a memory tier that
        streams the experts in may hand the kernel a tensor in blocks of rows."""
        return self.differentiable

    def __reduce__(self):
        """Pickled as its registry key: spaces and recipes travel to workers as plain data."""
        from evomerge.merge import get_merge_method

        return get_merge_method, (self.name,)

    @cached_property
    def kernel(self) -> Kernel:
        """The kernel function, imported (with torch) the first time a merge is computed."""
        module, _, function = self.kernel_ref.partition(":")
        return getattr(importlib.import_module(module), function)

    def expert_alone(self, index: int, n_models: int) -> dict[str, list[float]]:
        """Per-expert values of the :attr:`alone` parameters that reproduce expert ``index``."""
        if not self.alone:
            raise ValueError(f"merge method '{self.name}' cannot reproduce one expert alone")
        one_hot = [float(i == index) for i in range(n_models)]
        return {name: one_hot if value is None else [value] * n_models for name, value in self.alone}

    def base_values(self, n_models: int) -> dict[str, list[float]]:
        """Per-expert values of the :attr:`base_alone` parameters that reproduce the base."""
        if not self.base_alone:
            raise ValueError(f"merge method '{self.name}' cannot reproduce the base alone")
        return {name: [value] * n_models for name, value in self.base_alone}

    def param(self, name: str) -> ParamSpec:
        for spec in self.params:
            if spec.name == name:
                return spec
        known = ", ".join(p.name for p in self.params) or "none"
        raise ValueError(f"merge method '{self.name}' has no parameter '{name}' (it has: {known})")

    def default_options(self) -> dict[str, bool]:
        return {o.name: o.default for o in self.options}

    @property
    def param_names(self) -> list[str]:
        return [p.name for p in self.params]

    @property
    def option_names(self) -> list[str]:
        return [o.name for o in self.options]

