"""White-box merge operators: pure torch kernels over resident expert tensors.

The registry is an explicit dict; a config names a method by its key.
"""

from evomerge.merge.consensus import CONSENSUS_TASK_ARITHMETIC, CONSENSUS_TIES
from evomerge.merge.fisher import FISHER
from evomerge.merge.layer_swap import LAYER_SWAP
from evomerge.merge.linear import LINEAR
from evomerge.merge.lora import LORA_COMPOSE
from evomerge.merge.method import MergeMethod, OptionSpec, ParamSpec, TensorContext
from evomerge.merge.pcb import PCB
from evomerge.merge.resident import ResidentTensor
from evomerge.merge.slerp import SLERP, SPLIT_SLERP
from evomerge.merge.task_arithmetic import DARE_LINEAR, DARE_TIES, TASK_ARITHMETIC, TIES

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
    "ResidentTensor",
    "TensorContext",
    "get_merge_method",
]
