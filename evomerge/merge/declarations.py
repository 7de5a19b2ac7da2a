"""Every built-in merge method, declared as plain data: parameters, options and requirements.

The kernels live in their own modules (``linear.py``, ``task_arithmetic.py``, …, with the papers
and the choices made) and are named here by reference, so that the registry can be read — to
validate a config, size a search space, list the methods — without importing torch.
"""

from __future__ import annotations

from evomerge.merge.method import LORA_FACTORS, MergeMethod, OptionSpec, ParamSpec

LINEAR = MergeMethod(
    name="linear",
    kernel_ref="evomerge.merge.linear:linear_kernel",
    params=(ParamSpec("weight", per_model=True, default=1.0, low=0.0, high=1.0, doc="mixing weight"),),
    options=(OptionSpec("normalize", True, "divide the weights by their sum"),),
    doc="Weighted average of the experts.",
    mergekit_name="linear",
    differentiable=True,
    alone=(("weight", None),),
)

# --- task arithmetic, TIES and DARE: one operator configured four ways (task_arithmetic.py) ----
_WEIGHT = ParamSpec("weight", per_model=True, default=1.0, low=0.0, high=2.0, doc="scale of the task vector")
_DENSITY = ParamSpec("density", per_model=True, default=0.5, low=0.05, high=1.0, doc="fraction of the task vector kept")
_LAMBDA = ParamSpec("lambda", per_model=False, default=1.0, low=0.0, high=2.0, doc="scale of the combined task vector")


def _family(name: str, sparsify: str | None, consensus: bool, normalize: bool, rescale: bool, doc: str) -> MergeMethod:
    """``sparsify``: None, ``"magnitude"`` (TIES' trim) or ``"random"`` (DARE's drop);
    ``consensus``: TIES' sign election and disjoint mean."""
    params = (_WEIGHT, _DENSITY, _LAMBDA) if sparsify else (_WEIGHT, _LAMBDA)
    options = [OptionSpec("normalize", normalize, "divide by the summed weights (of agreeing experts for TIES)")]
    if sparsify == "random":
        options.append(OptionSpec("rescale", rescale, "rescale kept entries by 1/keep probability"))
    return MergeMethod(
        name=name,
        kernel_ref=f"evomerge.merge.task_arithmetic:{name}_kernel",
        params=params,
        options=tuple(options),
        needs_base=True,
        doc=doc,
        mergekit_name=name,
        magnitude_ranks=sparsify == "magnitude",
        differentiable=sparsify is None and not consensus,  # base + λ Σ w τ: linear
    )


TASK_ARITHMETIC = _family(
    "task_arithmetic", None, False, normalize=False, rescale=False,
    doc="Base plus a weighted sum of task vectors.",
)
TIES = _family(
    "ties", "magnitude", True, normalize=True, rescale=False,
    doc="Trim task vectors by magnitude, elect signs, average the agreeing entries.",
)
DARE_LINEAR = _family(
    "dare_linear", "random", False, normalize=False, rescale=True,
    doc="Randomly drop task-vector entries, rescale, and sum.",
)
DARE_TIES = _family(
    "dare_ties", "random", True, normalize=False, rescale=True,
    doc="Randomly drop task-vector entries, rescale, and combine with TIES' sign consensus.",
)

# --- consensus merging: TALL masks over task arithmetic or TIES (consensus.py) -----------------
_MASK_LAMBDA = ParamSpec(
    "mask_lambda", per_model=True, default=0.4, low=0.0, high=1.0,
    doc="TALL mask threshold λ_t: keep where |τ_t| ≥ λ_t·|τ_MTL − τ_t|",
)
_K = ParamSpec(
    "k", per_model=False, default=2, low=1, high=None, integer=True,
    doc="keep the entries at least k task masks select (1 … number of experts)",
)


def _consensus(inner: MergeMethod, doc: str) -> MergeMethod:
    name = f"consensus_{inner.name}"
    return MergeMethod(
        name=name,
        kernel_ref=f"evomerge.merge.consensus:{name}_kernel",
        params=(*inner.params, _MASK_LAMBDA, _K),
        options=inner.options,
        needs_base=True,
        magnitude_ranks=inner.magnitude_ranks,
        doc=doc,
    )


CONSENSUS_TASK_ARITHMETIC = _consensus(
    TASK_ARITHMETIC, "Task arithmetic keeping only the weights at least k TALL masks agree on."
)
CONSENSUS_TIES = _consensus(TIES, "TIES keeping only the weights at least k TALL masks agree on.")

# --- the others ---------------------------------------------------------------------------------
SLERP = MergeMethod(
    name="slerp",
    kernel_ref="evomerge.merge.slerp:slerp_kernel",
    params=(ParamSpec("t", per_model=False, default=0.5, low=0.0, high=1.0, doc="0 gives expert 0, 1 expert 1"),),
    min_models=2,
    max_models=2,
    doc="Spherical interpolation between two experts, per tensor.",
    mergekit_name="slerp",
)

SPLIT_SLERP = MergeMethod(
    name="split_slerp",
    kernel_ref="evomerge.merge.slerp:split_slerp_kernel",
    params=(
        ParamSpec("split", per_model=False, default=0.5, low=0.0, high=1.0, doc="split position as a fraction of the flat parameter vector"),
        ParamSpec("mix", per_model=False, default=0.5, low=0.0, high=1.0, doc="SLERP t before the split (1 − mix after it)"),
    ),
    min_models=2,
    max_models=2,
    needs_flat_gram=True,
    global_only=True,
    doc="M2N2's crossover: split-point SLERP over the flattened parameter set.",
)

LORA_COMPOSE = MergeMethod(
    name="lora_compose",
    kernel_ref="evomerge.merge.lora:lora_compose_kernel",
    params=(
        ParamSpec("alpha", per_model=True, default=1.0, low=0.0, high=1.0, doc="fraction of LoRA-A entries kept"),
        ParamSpec("beta", per_model=True, default=None, low=-1.5, high=1.5, doc="signed scale of A and B (default 1/N)"),
    ),
    doc="Evo-Merging: sparsify LoRA-A by magnitude, scale A and B by signed β, sum.",
    inputs=LORA_FACTORS,
    magnitude_ranks=True,
    alone=(("alpha", 1.0), ("beta", None)),
    base_alone=(("alpha", 1.0), ("beta", 0.0)),
)

PCB = MergeMethod(
    name="pcb",
    kernel_ref="evomerge.merge.pcb:pcb_kernel",
    params=(
        ParamSpec("density", per_model=True, default=0.2, low=0.05, high=1.0, doc="fraction of each task's entries kept by score"),
        ParamSpec("lambda", per_model=False, default=1.0, low=0.0, high=2.0, doc="scale of the combined task vector"),
    ),
    needs_base=True,
    doc="PCB: score entries by intra- and inter-task balance, drop the lowest, combine by score.",
)

LAYER_SWAP = MergeMethod(
    name="layer_swap",
    kernel_ref="evomerge.merge.layer_swap:layer_swap_kernel",
    params=(
        ParamSpec(
            "expert", per_model=False, default=0, low=0, high=None, integer=True,
            doc="index of the expert that supplies this group of layers",
        ),
    ),
    min_models=2,
    doc="Each group of layers copied whole from one expert (a categorical gene per group).",
)

FISHER = MergeMethod(
    name="fisher",
    kernel_ref="evomerge.merge.fisher:fisher_kernel",
    params=(ParamSpec("weight", per_model=True, default=1.0, low=0.0, high=1.0, doc="λ_i, the expert's weight beside its Fisher"),),
    needs_fisher=True,
    doc="Fisher-weighted averaging: experts weighted element-wise by their diagonal Fisher information.",
)
