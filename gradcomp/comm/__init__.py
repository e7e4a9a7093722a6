"""How compressed gradients cross the network: quantized collectives, the hierarchical exchange, the policy and the DDP hook."""

from gradcomp.comm.checkpoint import gather_state_dict, load_gathered_state_dict
from gradcomp.comm.collectives import ShardLayout, quantized_allreduce
from gradcomp.comm.fsdp import FSDPCompressConfig, FSDPCompressState
from gradcomp.comm.guard import HookFailedError
from gradcomp.comm.hierarchical import HierarchicalGroups, HierarchicalLayout, hierarchical_allreduce
from gradcomp.comm.hook import HookConfig, QuantizedAllReduceState, quantized_allreduce_hook, register
from gradcomp.comm.policy import PLAIN, CommPolicy, LinkFit, NetworkFit, PolicyConfig, probe_network
from gradcomp.comm.topology import Topology

__all__ = [
    "CommPolicy",
    "FSDPCompressConfig",
    "FSDPCompressState",
    "HierarchicalGroups",
    "HierarchicalLayout",
    "HookConfig",
    "HookFailedError",
    "LinkFit",
    "NetworkFit",
    "PLAIN",
    "PolicyConfig",
    "QuantizedAllReduceState",
    "ShardLayout",
    "Topology",
    "gather_state_dict",
    "hierarchical_allreduce",
    "load_gathered_state_dict",
    "probe_network",
    "quantized_allreduce",
    "quantized_allreduce_hook",
    "register",
]
