"""White-box merge operators: declarations as plain data, kernels as pure torch functions.

The registry is an explicit dict; a config names a method by its key. Importing this package (or
the registry) imports no torch: a method's kernel module is imported when the kernel first runs,
and kernel-side types live in :mod:`evomerge.merge.kernel` and :mod:`evomerge.merge.resident`.
"""

from evomerge.merge.declarations import (
    CONSENSUS_TASK_ARITHMETIC, CONSENSUS_TIES, DARE_LINEAR, DARE_TIES, FISHER, LAYER_SWAP, LINEAR, LORA_COMPOSE, PCB,
    SLERP, SPLIT_SLERP, TASK_ARITHMETIC, TIES,
)
from evomerge.merge.method import MergeMethod, OptionSpec, ParamSpec

MERGE_METHODS: dict[str, MergeMethod] = {
    m.name: m
    for m in (
        LINEAR, TASK_ARITHMETIC, TIES, DARE_LINEAR, DARE_TIES, SLERP, SPLIT_SLERP, LORA_COMPOSE,
        CONSENSUS_TASK_ARITHMETIC, CONSENSUS_TIES, PCB, LAYER_SWAP, FISHER,
    )
}


def get_merge_method(name: str) -> MergeMethod:
    try:
        return MERGE_METHODS[name]
    except KeyError:
        known = ", ".join(sorted(MERGE_METHODS))
        raise ValueError(f"unknown merge method '{name}' (known: {known})") from None


__all__ = [
    "MERGE_METHODS",
    "MergeMethod",
    "OptionSpec",
    "ParamSpec",
    "get_merge_method",
]
