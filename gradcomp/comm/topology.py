"""Where the ranks run: how many share a node, and which node and local slot each rank has.

The library never reads the environment; the launch code builds the topology from torchrun's
variables with :meth:`Topology.from_env` and hands it to the hook::

    topo = Topology.from_env(os.environ)            # LOCAL_WORLD_SIZE=2 on 2 nodes
    state = gradcomp.register(ddp, bits=8, topology=topo)

Ranks are numbered node by node, as torchrun numbers them: on ``L`` ranks per node, rank ``r``
runs on node ``r // L`` in local slot ``r % L``. Example with ``L = 2`` and 4 ranks: nodes
``(0, 0, 1, 1)``, local ranks ``(0, 1, 0, 1)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Mapping

__all__ = ["Topology"]


@dataclass(frozen=True)
class Topology:
    """Ranks per node of a job whose ranks are numbered node by node.

    Attributes:
        local_world_size: ranks on each node (``L``); every node runs the same number.

    Example:
        >>> t = Topology(local_world_size=3)
        >>> t.num_nodes(6), t.node_of(4), t.local_rank(4)
        (2, 1, 1)
        >>> t.node_groups(6), t.cross_groups(6)
        ([[0, 1, 2], [3, 4, 5]], [[0, 3], [1, 4], [2, 5]])
    """

    local_world_size: int

    def __post_init__(self) -> None:
        v = self.local_world_size
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"local_world_size must be an int, got {type(v).__name__} {v!r}")
        if v < 1:
            raise ValueError(f"local_world_size must be >= 1 (ranks per node), got {v}")

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> "Topology":
        """Build the topology from torchrun's variables in ``env`` (pass ``os.environ``).

        Reads ``LOCAL_WORLD_SIZE`` and, where present, checks that ``RANK``, ``GROUP_RANK`` and
        ``LOCAL_RANK`` number the ranks node by node (``RANK == GROUP_RANK * L + LOCAL_RANK``) and
        that ``WORLD_SIZE`` is a multiple of ``L``.

        Raises:
            ValueError: a variable is missing or not an integer, or the numbering is not node by node.
        """

        def get(name: str, required: bool):
            raw = env.get(name)
            if raw is None:
                if required:
                    raise ValueError(f"{name} is not set; launch with torchrun or give Topology(local_world_size=...) explicitly")
                return None
            try:
                return int(raw)
            except ValueError:
                raise ValueError(f"{name} must be an integer, got {raw!r}") from None

        lws = get("LOCAL_WORLD_SIZE", True)
        topo = cls(local_world_size=lws)
        world, rank, group_rank, local_rank = (get(n, False) for n in ("WORLD_SIZE", "RANK", "GROUP_RANK", "LOCAL_RANK"))
        if world is not None:
            topo.num_nodes(world)
        if None not in (rank, group_rank, local_rank) and rank != group_rank * lws + local_rank:
            raise ValueError(
                f"ranks must be numbered node by node (RANK == GROUP_RANK * LOCAL_WORLD_SIZE + LOCAL_RANK), got "
                f"RANK={rank}, GROUP_RANK={group_rank}, LOCAL_WORLD_SIZE={lws}, LOCAL_RANK={local_rank}"
            )
        return topo

    def num_nodes(self, world_size: int) -> int:
        """Return the number of nodes of a job of ``world_size`` ranks (a multiple of ``L``)."""
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size must be a positive int, got {world_size!r}")
        if world_size % self.local_world_size:
            raise ValueError(
                f"world_size must be a multiple of local_world_size={self.local_world_size} "
                f"(the same number of ranks on every node), got {world_size}"
            )
        return world_size // self.local_world_size

    def node_of(self, rank: int) -> int:
        """Return the node of ``rank``."""
        return rank // self.local_world_size

    def local_rank(self, rank: int) -> int:
        """Return the slot of ``rank`` on its node."""
        return rank % self.local_world_size

    def node_groups(self, world_size: int) -> List[List[int]]:
        """Return the ranks of each node, node by node (the intra-node groups)."""
        L = self.local_world_size
        return [list(range(m * L, (m + 1) * L)) for m in range(self.num_nodes(world_size))]

    def cross_groups(self, world_size: int) -> List[List[int]]:
        """Return, for each local slot, the ranks holding it on every node (the inter-node groups)."""
        L, M = self.local_world_size, self.num_nodes(world_size)
        return [[m * L + l for m in range(M)] for l in range(L)]
