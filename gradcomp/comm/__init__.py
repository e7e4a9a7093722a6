"""How compressed gradients cross the network: the exchange, the DDP hook, FSDP2, the hierarchical mode, the policy.

Modules, bottom up: :mod:`~gradcomp.comm.plan` (where a bucket's values go: chunks, shards, message
buffers), :mod:`~gradcomp.comm.exchange` (the exchange's pure steps and whole exchanges),
:mod:`~gradcomp.comm.collectives` (the blocking one-tensor all-reduce), :mod:`~gradcomp.comm.topology`,
:mod:`~gradcomp.comm.hierarchical`, :mod:`~gradcomp.comm.pipeline`, :mod:`~gradcomp.comm.cost` (the
alpha-beta model), :mod:`~gradcomp.comm.measure`, :mod:`~gradcomp.comm.policy`,
:mod:`~gradcomp.comm.guard`, :mod:`~gradcomp.comm.hook` (DDP), :mod:`~gradcomp.comm.checkpoint`, and
FSDP2 in :mod:`~gradcomp.comm.fsdp` (on :mod:`~gradcomp.comm.fsdp_plan`,
:mod:`~gradcomp.comm.fsdp_collectives`, :mod:`~gradcomp.comm.fsdp_replicate`).
"""

from gradcomp.comm.checkpoint import gather_state_dict, load_gathered_state_dict
from gradcomp.comm.collectives import quantized_allreduce
from gradcomp.comm.fsdp import FSDPCompressConfig, FSDPCompressState, register_fsdp
from gradcomp.comm.guard import HookFailedError
from gradcomp.comm.hierarchical import HierarchicalGroups, HierarchicalLayout, hierarchical_allreduce
from gradcomp.comm.hook import HookConfig, QuantizedAllReduceState, quantized_allreduce_hook, register
from gradcomp.comm.plan import ShardLayout
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
    "register_fsdp",
]
