"""The cluster as a graph, the bandwidth a rank group gets, and α-β costs of ring collectives.

The graph (`build_graph`), per node n of the cluster::

    gpu(n,g) ──NVLink── nvswitch(n)                          every GPU at intra_node.bandwidth_GBps
    gpu(n,g) ──PCIe── nic(n, g*F//G)                         F NICs, attached evenly (GPUDirect RDMA)
    nic(n,f) ──IB── fabric                                   oversubscription 1: one non-blocking switch layer
    nic(n,f) ──IB── leaf(n) ──uplink── spine                 oversubscription s > 1: the node's uplink
                                                             carries F x nic rate / s across the spine

Edges carry `bw_Bps` (bytes/s per direction) and `latency_s`; a GPU-to-GPU path sums to intra_node.latency_us
inside a node and inter_node.latency_us across nodes. Rank r is GPU r % G of node r // G; a cluster with fewer
GPUs than one node is a single partial node.

Who shares what (`Topology.group_bandwidth_Bps`). NCCL runs a ring collective over several rings ("channels"),
each leaving a node through a different NIC, so a ring crosses each node boundary once per channel and the
traffic over a node boundary equals one ring link's traffic (nccl-tests doc/PERFORMANCE.md, "bus bandwidth").
The bus bandwidth of a group with k ranks on each of m > 1 nodes is therefore

    min(NVLink rate x NVLINK_EFFICIENCY            -- the hops between the group's own GPUs inside a node,
        k x per-GPU inter-node share x IB_EFFICIENCY) -- the k GPUs each bring their share of the node's NICs,

and the per-GPU share is the node's inter-node capacity (its NICs, and its spine uplink when oversubscribed)
divided by the number of the node's GPUs that cross nodes at the same time. Collectives of one mesh axis run
together (every DP group all-reduces its gradients at once, every TP group all-reduces at once), so by default a
full node's GPUs all share it: with tp=8 each of the 8 DP groups has one GPU per node and gets one NIC
(25 GB/s on DGX A100); with tp=1 one DP group has 8 GPUs per node and gets all 8 NICs (200 GB/s). The capacity is
a max-flow on a two-node copy of the graph from the communicating GPUs of one node to those of the other,
without forwarding through peer GPUs; it is computed once per number of communicating GPUs and cached.
Inside a node the NVSwitch is non-blocking, so concurrency does not lower NVLink bandwidth.
"""
from __future__ import annotations

import bisect
import itertools
import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from functools import cached_property

import networkx as nx

from planner.plan import MeshAxis, Parallel
from planner.specs import ClusterSpec, SpecError

# Achievable fraction of line rate for large NCCL ring collectives (bus bandwidth / line rate, as nccl-tests
# defines bus bandwidth). NVLink: all_reduce_perf on a DGX A100 reaches about 230 of the 300 GB/s per direction
# per GPU; the rest goes to protocol overhead (NCCL's Simple protocol headers, flags) and the reduction kernels
# sharing SM time with the copies. InfiniBand: about 23.5 of an HDR NIC's 25 GB/s, the IB link-layer and
# transport-header overhead on 4 KiB MTU packets. Both apply to every link of their kind, whatever its rate.
NVLINK_EFFICIENCY = 230 / 300
IB_EFFICIENCY = 23.5 / 25


class CollectiveOp(StrEnum):
    ALL_REDUCE = "all_reduce"
    ALL_GATHER = "all_gather"
    REDUCE_SCATTER = "reduce_scatter"
    SEND_RECV = "send_recv"


@dataclass(frozen=True)
class GroupShape:
    """What a group's bandwidth depends on: its size, the fewest ranks it has on any node it spans (the ring's
    narrowest node boundary) and how many nodes it spans."""

    size: int
    ranks_per_node: int
    nodes: int

    @property
    def spans_nodes(self) -> bool:
        return self.nodes > 1


FittedCosts = Mapping[tuple[str, int], tuple[float, float]]
"""(op, group size) -> (alpha_s, beta_s_per_byte), fitted from a measured profile: time = alpha + beta * bytes."""


# ------------------------------------------------------------------------------------------------- graph

def build_graph(cluster: ClusterSpec) -> nx.Graph:
    """The whole cluster as an undirected graph (see the module docstring for its layout)."""
    num_gpus = _world_size(cluster)
    gpn, inter = cluster.gpus_per_node, cluster.inter_node
    nics = inter.nics_per_node
    nvlink_Bps = cluster.intra_node.bandwidth_GBps * 1e9
    nic_Bps = inter.nic_Gbps * 1e9 / 8
    half_intra_s = cluster.intra_node.latency_us * 1e-6 / 2
    half_inter_s = inter.latency_us * 1e-6 / 2
    oversubscribed = inter.oversubscription > 1
    graph = nx.Graph(name=cluster.name)
    nodes: list[tuple] = []
    edges: list[tuple] = []
    for node in range(cluster.num_nodes):
        switch = ("nvswitch", node)
        nodes.append((switch, {"kind": "nvswitch", "node": node}))
        for f in range(nics):
            nodes.append((("nic", node, f), {"kind": "nic", "node": node}))
        for g in range(min(gpn, num_gpus - node * gpn)):
            gpu = ("gpu", node, g)
            nodes.append((gpu, {"kind": "gpu", "node": node, "rank": node * gpn + g}))
            edges.append((gpu, switch, {"kind": "nvlink", "bw_Bps": nvlink_Bps, "latency_s": half_intra_s}))
            # the PCIe hop is sized to its NIC (PCIe Gen4 x16 ~ 32 GB/s feeds a 25 GB/s HDR NIC), so it is
            # given the NIC's rate and no latency of its own
            edges.append((gpu, ("nic", node, g * nics // gpn), {"kind": "pcie", "bw_Bps": nic_Bps, "latency_s": 0.0}))
        first_hop = ("leaf", node) if oversubscribed else "fabric"
        for f in range(nics):
            edges.append((("nic", node, f), first_hop, {"kind": "ib", "bw_Bps": nic_Bps, "latency_s": half_inter_s}))
        if oversubscribed:
            nodes.append((("leaf", node), {"kind": "leaf", "node": node}))
            edges.append((("leaf", node), "spine", {"kind": "uplink", "latency_s": 0.0,
                                                    "bw_Bps": nics * nic_Bps / inter.oversubscription}))
    nodes.append(("spine" if oversubscribed else "fabric", {"kind": "spine" if oversubscribed else "fabric"}))
    graph.add_nodes_from(nodes)
    graph.add_edges_from(edges)
    return graph


def _world_size(cluster: ClusterSpec) -> int:
    if cluster.num_gpus <= 0:
        raise SpecError(f"cluster {cluster.name}: the number of GPUs is not set (pass --gpus)")
    return cluster.num_gpus


# ------------------------------------------------------------------------------------------- mesh layout

def _ordered_sizes(mesh_order: Sequence[MeshAxis | str], sizes: Mapping[str, int] | Parallel) -> tuple[int, ...]:
    if sorted(map(str, mesh_order)) != sorted(map(str, MeshAxis)):
        raise ValueError(f"mesh_order {list(mesh_order)} must name pp, dp and tp once each")
    if isinstance(sizes, Parallel):
        return tuple(getattr(sizes, str(axis)) for axis in mesh_order)
    return tuple(int(sizes.get(str(axis), 1)) for axis in mesh_order)


def rank_grid(mesh_order: Sequence[MeshAxis | str],
              sizes: Mapping[str, int] | Parallel) -> dict[MeshAxis, list[list[int]]]:
    """The rank groups along each mesh axis, ranks laid out as arange(world).reshape(sizes in mesh_order order),
    outermost axis first (picotron's one-line grid; TP innermost by default so a TP group is contiguous ranks
    inside a node).

    With 16 GPUs g0..g15, order (pp, dp, tp), pp=2, dp=4, tp=2 (Megatron-core style):
      tp groups [g0,g1], [g2,g3], ..., [g14,g15];
      dp groups [g0,g2,g4,g6], [g1,g3,g5,g7], [g8,g10,g12,g14], [g9,g11,g13,g15];
      pp groups [g0,g8], [g1,g9], ..., [g7,g15].
    """
    dims = _ordered_sizes(mesh_order, sizes)
    axes = [MeshAxis(str(a)) for a in mesh_order]
    strides = [math.prod(dims[i + 1:]) for i in range(len(dims))]
    grid: dict[MeshAxis, list[list[int]]] = {}
    for i, axis in enumerate(axes):
        others = [range(d) for j, d in enumerate(dims) if j != i]
        other_strides = [s for j, s in enumerate(strides) if j != i]
        grid[axis] = [[sum(c * s for c, s in zip(coords, other_strides)) + k * strides[i] for k in range(dims[i])]
                      for coords in itertools.product(*others)]
    return grid


# Preference order when several layouts are equivalent: TP innermost first (its per-layer activation collectives
# are the most frequent, so they get NVLink), Megatron-core's default (pp, dp, tp) leading; then DP innermost,
# then PP innermost (its point-to-point traffic is the smallest).
_ORDER_PREFERENCE: tuple[tuple[MeshAxis, MeshAxis, MeshAxis], ...] = (
    (MeshAxis.PP, MeshAxis.DP, MeshAxis.TP), (MeshAxis.DP, MeshAxis.PP, MeshAxis.TP),
    (MeshAxis.PP, MeshAxis.TP, MeshAxis.DP), (MeshAxis.TP, MeshAxis.PP, MeshAxis.DP),
    (MeshAxis.DP, MeshAxis.TP, MeshAxis.PP), (MeshAxis.TP, MeshAxis.DP, MeshAxis.PP),
)


def candidate_mesh_orders(sizes: Mapping[str, int] | Parallel) -> list[tuple[MeshAxis, MeshAxis, MeshAxis]]:
    """The axis orders that give distinct rank layouts for these degrees, preferred first. Two orders that
    differ only in where size-1 axes sit lay ranks out identically, so only the first of them is kept."""
    seen: set[tuple[MeshAxis, ...]] = set()
    orders = []
    for order in _ORDER_PREFERENCE:
        dims = _ordered_sizes(order, sizes)
        key = tuple(axis for axis, d in zip(order, dims) if d > 1)
        if key not in seen:
            seen.add(key)
            orders.append(order)
    return orders


# ---------------------------------------------------------------------------------------------- topology

class Topology:
    """One cluster's graph plus everything the cost model asks of it, cached by group shape.

    The full graph is built only when `graph` is read. Bandwidths come from a two-node copy of it (every node of
    the cluster is alike and the fabric is flat), so pricing a group never touches a 16,384-GPU graph.
    `fitted_costs`, when given (a profile of the `local` cluster), replace the α-β numbers for the ops and group
    sizes it covers; see `fitted_alpha_beta`.
    """

    def __init__(self, cluster: ClusterSpec, fitted_costs: FittedCosts | None = None,
                 fitted_time: Mapping[tuple[str, int], Callable[[float], float]] | None = None):
        self.cluster = cluster
        self.world_size = _world_size(cluster)
        self.gpus_per_node = cluster.gpus_per_node
        multi_node = cluster.num_nodes > 1
        self.template = build_graph(cluster.with_gpus(2 * cluster.gpus_per_node) if multi_node else cluster)
        """The cluster's first two nodes and the fabric (the whole cluster when it has one node)."""
        gpu0 = ("gpu", 0, 0)
        self.nvlink_Bps: float = self.template.edges[gpu0, ("nvswitch", 0)]["bw_Bps"]
        self.intra_latency_s: float = 2 * self.template.edges[gpu0, ("nvswitch", 0)]["latency_s"]
        self.inter_latency_s: float = (nx.shortest_path_length(self.template, gpu0, ("gpu", 1, 0), weight="latency_s")
                                       if multi_node else cluster.inter_node.latency_us * 1e-6)
        self._fitted = _index_fitted(fitted_costs or {})
        self._fitted_time = {(CollectiveOp(op), n): f for (op, n), f in (fitted_time or {}).items()}
        """Measured time functions (e.g. a profile's piecewise fits) for exact (op, group size) pairs; they win
        over fitted_costs, which still cover other group sizes by interpolation."""
        self._capacity_cache: dict[int, float] = {}
        self._bandwidth_cache: dict[tuple[GroupShape, int], float] = {}
        self._axis_cache: dict[tuple[int, int, bool], frozenset[GroupShape]] = {}

    @cached_property
    def graph(self) -> nx.Graph:
        """The whole cluster's graph (built on first use)."""
        return self.template if self.cluster.num_nodes <= 2 else build_graph(self.cluster)

    # -- groups ------------------------------------------------------------------------------------------

    def node_of(self, rank: int) -> int:
        return rank // self.gpus_per_node

    def shape_of(self, ranks: Sequence[int]) -> GroupShape:
        if not ranks or len(set(ranks)) != len(ranks) or min(ranks) < 0 or max(ranks) >= self.world_size:
            raise ValueError(f"ranks {list(ranks)[:8]} must be distinct ranks of a world of {self.world_size}")
        per_node = Counter(self.node_of(r) for r in ranks)
        return GroupShape(len(ranks), min(per_node.values()), len(per_node))

    def inter_node_capacity_Bps(self, active_gpus: int) -> float:
        """Bytes/s that `active_gpus` GPUs of one node can send to as many GPUs of another node at once, each
        through its own NIC (no forwarding over NVLink through a peer): a max-flow on the two-node graph.
        The active GPUs are spread evenly over the node, as a regular mesh layout places them."""
        if active_gpus not in self._capacity_cache:
            flow = nx.DiGraph()
            for u, v, edge in self.template.edges(data=True):
                if edge["kind"] != "nvlink":
                    flow.add_edge(u, v, capacity=edge["bw_Bps"])
                    flow.add_edge(v, u, capacity=edge["bw_Bps"])
            for i in range(active_gpus):
                g = i * self.gpus_per_node // active_gpus
                flow.add_edge("source", ("gpu", 0, g))  # no capacity attribute: unbounded
                flow.add_edge(("gpu", 1, g), "sink")
            self._capacity_cache[active_gpus] = nx.maximum_flow_value(flow, "source", "sink")
        return self._capacity_cache[active_gpus]

    def shape_bandwidth_Bps(self, shape: GroupShape, concurrent_groups: int | None = None) -> float:
        """Bus bandwidth (nccl-tests' definition) one rank of a group of this shape gets in a ring collective.

        concurrent_groups: groups of this shape, this one included, that cross nodes at the same time on each
        node the group spans. None (the default) means every GPU of the node does, as when all groups of one
        mesh axis run their collective together. Ignored inside a node: the NVSwitch is non-blocking.
        """
        nvlink_Bps = self.nvlink_Bps * NVLINK_EFFICIENCY
        if not shape.spans_nodes:
            return nvlink_Bps
        k, gpn = shape.ranks_per_node, self.gpus_per_node
        active = gpn if concurrent_groups is None else concurrent_groups * k
        if concurrent_groups is not None and (concurrent_groups < 1 or active > gpn):
            raise ValueError(f"{concurrent_groups} concurrent groups of {k} ranks per node"
                             f" do not fit a node of {gpn} GPUs")
        key = (shape, active)
        if key not in self._bandwidth_cache:
            share_Bps = self.inter_node_capacity_Bps(active) / active
            inter_Bps = k * share_Bps * IB_EFFICIENCY
            self._bandwidth_cache[key] = min(nvlink_Bps, inter_Bps) if k > 1 else inter_Bps
        return self._bandwidth_cache[key]

    def group_bandwidth_Bps(self, ranks: Sequence[int], concurrent_groups: int | None = None) -> float:
        """Bus bandwidth of one rank of this group in a ring collective; see `shape_bandwidth_Bps`."""
        return self.shape_bandwidth_Bps(self.shape_of(ranks), concurrent_groups)

    # -- collective costs --------------------------------------------------------------------------------

    def fitted_alpha_beta(self, op: CollectiveOp, group_size: int) -> tuple[float, float] | None:
        """(alpha_s, beta_s_per_byte) from the fitted costs for this op, or None when it has none. A group size
        between two measured ones interpolates both linearly in the size (ring alpha grows as n-1, and beta's
        (n-1)/n factor moves slowly); outside the measured range the nearest measured size is used rather than
        extrapolating a fit past its data."""
        points = self._fitted.get(op)
        if not points:
            return None
        sizes = [n for n, _, _ in points]
        i = bisect.bisect_left(sizes, group_size)
        if i < len(sizes) and sizes[i] == group_size:
            return points[i][1], points[i][2]
        if i == 0 or i == len(sizes):
            nearest = points[0] if i == 0 else points[-1]
            return nearest[1], nearest[2]
        (n0, a0, b0), (n1, a1, b1) = points[i - 1], points[i]
        w = (group_size - n0) / (n1 - n0)
        return a0 + w * (a1 - a0), b0 + w * (b1 - b0)

    def shape_time_s(self, op: CollectiveOp | str, nbytes: float, shape: GroupShape,
                     concurrent_groups: int | None = None) -> float:
        """Seconds for one collective over a group of this shape (α-β ring costs: Thakur, Rabenseifner and
        Gropp 2005, "Optimization of collective communication operations in MPICH", section 4; bandwidth term
        with nccl-tests' bus-bandwidth factors). nbytes is the full, unsharded tensor for all_gather and
        reduce_scatter, and the message for send_recv."""
        op, n = CollectiveOp(op), shape.size
        if op == CollectiveOp.SEND_RECV and n not in (1, 2):
            raise ValueError(f"send_recv is between two ranks, not {n}")
        if n == 1 or nbytes <= 0:
            return 0.0
        if (op, n) in self._fitted_time:
            return self._fitted_time[op, n](nbytes)
        fitted = self.fitted_alpha_beta(op, n)
        if fitted is not None:
            alpha_s, beta_s_per_byte = fitted
            return alpha_s + beta_s_per_byte * nbytes
        bw_Bps = self.shape_bandwidth_Bps(shape, concurrent_groups)
        alpha_s = self.inter_latency_s if shape.spans_nodes else self.intra_latency_s
        if op == CollectiveOp.ALL_REDUCE:  # reduce-scatter + all-gather rings: 2(n-1) steps of bytes/n
            return 2 * (n - 1) / n * nbytes / bw_Bps + 2 * (n - 1) * alpha_s
        if op in (CollectiveOp.ALL_GATHER, CollectiveOp.REDUCE_SCATTER):  # n-1 steps of bytes/n
            return (n - 1) / n * nbytes / bw_Bps + (n - 1) * alpha_s
        return nbytes / bw_Bps + alpha_s

    def collective_time_s(self, op: CollectiveOp | str, nbytes: float, ranks: Sequence[int],
                          concurrent_groups: int | None = None) -> float:
        """Seconds for `op` over these ranks (for send_recv: [src, dst]); a group of one rank costs 0."""
        if CollectiveOp(op) == CollectiveOp.SEND_RECV and len(ranks) == 2 and ranks[0] == ranks[1]:
            return 0.0
        return self.shape_time_s(op, nbytes, self.shape_of(ranks), concurrent_groups)

    # -- mesh axes ---------------------------------------------------------------------------------------

    def axis_group_shapes(self, mesh_order: Sequence[MeshAxis | str], sizes: Mapping[str, int] | Parallel,
                          axis: MeshAxis | str, pairs: bool = False) -> frozenset[GroupShape]:
        """The distinct shapes of the groups along `axis` (pairs=True: of the neighbouring pairs in them, the
        pipeline's point-to-point links). One shape for a regular layout."""
        dims = _ordered_sizes(mesh_order, sizes)
        if math.prod(dims) != self.world_size:
            named = " * ".join(f"{a}({d})" for a, d in zip(mesh_order, dims))
            raise SpecError(f"{named} = {math.prod(dims)} != world size {self.world_size}")
        i = [str(a) for a in mesh_order].index(str(axis))
        key = (math.prod(dims[i + 1:]), dims[i], pairs)
        if key not in self._axis_cache:
            self._axis_cache[key] = self._strided_shapes(*key)
        return self._axis_cache[key]

    def axis_group_shape(self, mesh_order: Sequence[MeshAxis | str], sizes: Mapping[str, int] | Parallel,
                         axis: MeshAxis | str, pairs: bool = False) -> GroupShape:
        """The representative group along `axis`: the slowest one (fewest ranks on a node) when the layout
        is irregular, since the step waits for it."""
        return min(self.axis_group_shapes(mesh_order, sizes, axis, pairs), key=lambda s: (s.ranks_per_node, -s.nodes))

    def axis_time_s(self, op: CollectiveOp | str, nbytes: float, mesh_order: Sequence[MeshAxis | str],
                    sizes: Mapping[str, int] | Parallel, axis: MeshAxis | str,
                    concurrent_groups: int | None = None) -> float:
        """Seconds for `op` of `nbytes` along `axis` of this mesh, e.g. the DP gradient all-reduce or, with
        op=send_recv, one pipeline hand-off between neighbouring stages."""
        pairs = CollectiveOp(op) == CollectiveOp.SEND_RECV
        shape = self.axis_group_shape(mesh_order, sizes, axis, pairs)
        return self.shape_time_s(op, nbytes, shape, concurrent_groups)

    def _strided_shapes(self, stride: int, size: int, pairs: bool) -> frozenset[GroupShape]:
        """Shapes of the groups {b, b + stride, ..., b + (size-1) stride} that tile the world (or of their
        neighbouring pairs). Closed forms for the regular layouts, else every group of one period."""
        g, world = self.gpus_per_node, self.world_size
        n = 2 if pairs else size
        if size == 1:
            return frozenset({GroupShape(1, 1, 1)})
        if world <= g or g % (stride * size) == 0:  # every group inside one node
            return frozenset({GroupShape(n, n, 1)})
        if stride % g == 0:  # every member on its own node
            return frozenset({GroupShape(n, 1, n)})
        if g % stride == 0 and (stride * size) % g == 0:  # g/stride (>= 2) members on each node
            if pairs:  # neighbours share a node except where the group steps to the next node
                return frozenset({GroupShape(2, 2, 1), GroupShape(2, 1, 2)})
            return frozenset({GroupShape(n, g // stride, stride * size // g)})
        # Irregular (or pairs of a group that spans nodes with several members per node): groups repeat every
        # lcm(g, stride * size) ranks, which divides the world, so one period holds every distinct shape.
        period = math.lcm(g, stride * size)
        shapes = set()
        for base in range(period):
            if (base // stride) % size:
                continue
            members = [base + k * stride for k in range(size)]
            for group in zip(members, members[1:]) if pairs else [members]:
                shapes.add(self.shape_of(group))
        return frozenset(shapes)


def _index_fitted(fitted: FittedCosts) -> dict[CollectiveOp, list[tuple[int, float, float]]]:
    index: dict[CollectiveOp, list[tuple[int, float, float]]] = {}
    for (op, n), (alpha_s, beta_s_per_byte) in fitted.items():
        if op not in set(CollectiveOp):
            raise SpecError(f"fitted collective cost ({op!r}, {n}): unknown op (ops: {', '.join(CollectiveOp)})")
        if n < 2 or alpha_s < 0 or beta_s_per_byte < 0:
            raise SpecError(f"fitted collective cost ({op!r}, {n}): needs a group of 2+ ranks and alpha, beta >= 0")
        index.setdefault(CollectiveOp(op), []).append((n, alpha_s, beta_s_per_byte))
    return {op: sorted(points) for op, points in index.items()}
