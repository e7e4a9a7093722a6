"""How compressed gradients cross the network: quantized collectives and the DDP hook."""

from gradcomp.comm.collectives import ShardLayout, quantized_allreduce
from gradcomp.comm.hook import HookConfig, QuantizedAllReduceState, quantized_allreduce_hook, register

__all__ = [
    "HookConfig",
    "QuantizedAllReduceState",
    "ShardLayout",
    "quantized_allreduce",
    "quantized_allreduce_hook",
    "register",
]
