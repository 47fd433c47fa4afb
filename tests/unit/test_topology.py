"""planner/topology.py: the graph, group bandwidths and collective times, checked against numbers worked out
by hand for a DGX A100 cluster (8 GPUs/node, NVLink 300 GB/s per direction, 8 x HDR 200 Gb/s = 25 GB/s NICs)."""
import time

import networkx as nx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from planner.plan import MeshAxis, Parallel
from planner.presets import CLUSTERS
from planner.specs import ClusterSpec, SpecError
from planner.topology import (IB_EFFICIENCY, NVLINK_EFFICIENCY, GroupShape, Topology, build_graph,
                              candidate_mesh_orders, rank_grid)

GB = 1e9
NVLINK = 300 * GB * NVLINK_EFFICIENCY  # 230 GB/s bus bandwidth inside a node
NIC = 25 * GB * IB_EFFICIENCY  # 23.5 GB/s through one HDR NIC
INTRA_S, INTER_S = 3e-6, 5e-6


def dgx(num_gpus: int, **inter) -> ClusterSpec:
    base = CLUSTERS["dgx-a100"]
    if inter:
        base = ClusterSpec.model_validate({**base.model_dump(),
                                           "inter_node": {**base.inter_node.model_dump(), **inter}})
    return base.with_gpus(num_gpus)


# ------------------------------------------------------------------------------------------------- graph

def test_graph_has_every_part_and_the_spec_latencies():
    g = build_graph(dgx(16))
    kinds = nx.get_node_attributes(g, "kind")
    counts = {k: list(kinds.values()).count(k) for k in set(kinds.values())}
    assert counts == {"gpu": 16, "nvswitch": 2, "nic": 16, "fabric": 1}
    assert g.edges[("gpu", 1, 3), ("nvswitch", 1)]["bw_Bps"] == 300 * GB
    assert g.edges[("nic", 1, 3), "fabric"]["bw_Bps"] == 25 * GB
    assert g.nodes[("gpu", 1, 3)]["rank"] == 11
    lat = nx.shortest_path_length(g, ("gpu", 0, 0), ("gpu", 0, 5), weight="latency_s")
    assert lat == pytest.approx(INTRA_S)
    lat = nx.shortest_path_length(g, ("gpu", 0, 2), ("gpu", 1, 6), weight="latency_s")
    assert lat == pytest.approx(INTER_S)


def test_gpus_attach_to_nics_evenly():
    g = build_graph(dgx(8, nics_per_node=4))
    nic_of = {gpu: next(n for n in g.neighbors(("gpu", 0, gpu)) if n[0] == "nic")[2] for gpu in range(8)}
    assert nic_of == {0: 0, 1: 0, 2: 1, 3: 1, 4: 2, 5: 2, 6: 3, 7: 3}


def test_oversubscribed_fabric_has_leaves_and_a_thinner_spine_uplink():
    g = build_graph(dgx(16, oversubscription=2.0))
    assert "spine" in g and "fabric" not in g
    assert g.edges[("leaf", 0), "spine"]["bw_Bps"] == 8 * 25 * GB / 2
    assert g.edges[("nic", 0, 7), ("leaf", 0)]["bw_Bps"] == 25 * GB


def test_partial_node():
    topo = Topology(dgx(4))
    assert sum(1 for _, k in topo.graph.nodes(data="kind") if k == "gpu") == 4
    assert topo.group_bandwidth_Bps([0, 1, 2, 3]) == pytest.approx(NVLINK)
    assert topo.axis_group_shape(("pp", "dp", "tp"), {"dp": 4}, "dp") == GroupShape(4, 4, 1)
    with pytest.raises(ValueError):
        topo.group_bandwidth_Bps([3, 4])


def test_unset_gpu_count_is_a_spec_error():
    with pytest.raises(SpecError, match="--gpus"):
        Topology(CLUSTERS["dgx-a100"])


# ------------------------------------------------------------------------------------------- bandwidths

def test_tp8_inside_a_node_gets_nvlink():
    topo = Topology(dgx(32))
    assert topo.group_bandwidth_Bps(range(8, 16)) == pytest.approx(230 * GB)
    # 2 (n-1)/n * B / bw + 2 (n-1) alpha, n = 8
    assert topo.collective_time_s("all_reduce", 1e9, list(range(8))) == pytest.approx(
        1.75e9 / (230 * GB) + 14 * INTRA_S)


def test_dp_over_4_nodes_with_tp8_gets_one_nic_per_group():
    topo = Topology(dgx(32))
    dp_group = [0, 8, 16, 24]  # the 8 DP groups (one per TP rank) each own one GPU, hence one NIC, per node
    assert topo.group_bandwidth_Bps(dp_group) == pytest.approx(23.5 * GB)
    assert topo.collective_time_s("all_reduce", 1e9, dp_group) == pytest.approx(1.5e9 / (23.5 * GB) + 6 * INTER_S)
    assert topo.collective_time_s("all_gather", 1e9, dp_group) == pytest.approx(0.75e9 / (23.5 * GB) + 3 * INTER_S)
    assert topo.collective_time_s("reduce_scatter", 1e9, dp_group) == pytest.approx(0.75e9 / NIC + 3 * INTER_S)


def test_dp32_over_4_nodes_with_tp1_uses_all_eight_nics():
    topo = Topology(dgx(32))
    # 8 ranks per node share the node's 8 NICs: 8 x 25 x 0.94 = 188 GB/s < NVLink's 230
    assert topo.group_bandwidth_Bps(range(32)) == pytest.approx(188 * GB)
    assert topo.collective_time_s("all_reduce", 1e9, range(32)) == pytest.approx(
        2 * 31 / 32 * 1e9 / (188 * GB) + 62 * INTER_S)


def test_oversubscription_halves_inter_node_bandwidth():
    full, half = Topology(dgx(32)), Topology(dgx(32, oversubscription=2.0))
    for group in ([0, 8, 16, 24], list(range(32))):
        assert half.group_bandwidth_Bps(group) == pytest.approx(full.group_bandwidth_Bps(group) / 2)
    assert half.group_bandwidth_Bps(range(8)) == pytest.approx(NVLINK)  # NVLink is untouched


def test_concurrent_groups_says_who_shares():
    half = Topology(dgx(32, oversubscription=2.0))
    # alone on its node a group's GPU has its NIC and the 100 GB/s uplink is not the limit
    assert half.group_bandwidth_Bps([0, 8], concurrent_groups=1) == pytest.approx(NIC)
    assert half.group_bandwidth_Bps([0, 8], concurrent_groups=4) == pytest.approx(NIC)  # 4 x 25 = 100 GB/s uplink
    assert half.group_bandwidth_Bps([0, 8], concurrent_groups=8) == pytest.approx(NIC / 2)
    shared_nics = Topology(dgx(32, nics_per_node=4))  # two GPUs per NIC
    assert shared_nics.group_bandwidth_Bps([0, 8]) == pytest.approx(NIC / 2)
    assert shared_nics.group_bandwidth_Bps([0, 8], concurrent_groups=4) == pytest.approx(NIC)  # GPUs 0,2,4,6
    with pytest.raises(ValueError):
        shared_nics.group_bandwidth_Bps([0, 1, 8, 9], concurrent_groups=5)


def test_uneven_group_is_limited_by_its_thinnest_node():
    topo = Topology(dgx(32))
    assert topo.shape_of([0, 1, 2, 8]) == GroupShape(4, 1, 2)
    assert topo.group_bandwidth_Bps([0, 1, 2, 8]) == pytest.approx(NIC)


def test_send_recv_inside_and_across_nodes():
    topo = Topology(dgx(16))
    assert topo.collective_time_s("send_recv", 1e8, [0, 1]) == pytest.approx(1e8 / NVLINK + INTRA_S)
    assert topo.collective_time_s("send_recv", 1e8, [3, 11]) == pytest.approx(1e8 / NIC + INTER_S)
    with pytest.raises(ValueError):
        topo.collective_time_s("send_recv", 1e8, [0, 1, 2])


def test_a_group_of_one_is_free():
    topo = Topology(dgx(16))
    for op in ("all_reduce", "all_gather", "reduce_scatter"):
        assert topo.collective_time_s(op, 1e9, [5]) == 0.0
    assert topo.collective_time_s("send_recv", 1e9, [5, 5]) == 0.0
    assert topo.axis_time_s("all_reduce", 1e9, ("pp", "dp", "tp"), {"dp": 16}, "tp") == 0.0


def test_fitted_costs_replace_alpha_beta():
    fitted = {("all_reduce", 2): (1e-4, 1e-9), ("all_reduce", 4): (3e-4, 2e-9), ("send_recv", 2): (5e-5, 4e-10)}
    local = CLUSTERS["local"].with_gpus(8)
    topo, plain = Topology(local, fitted_costs=fitted), Topology(local)
    assert topo.collective_time_s("all_reduce", 1e6, [0, 1]) == pytest.approx(1e-4 + 1e-3)
    assert topo.collective_time_s("all_reduce", 1e6, [0, 1, 2]) == pytest.approx(2e-4 + 1.5e-3)  # interpolated
    assert topo.collective_time_s("all_reduce", 1e6, range(8)) == pytest.approx(3e-4 + 2e-3)  # nearest: 4
    assert topo.collective_time_s("send_recv", 1e6, [2, 6]) == pytest.approx(5e-5 + 4e-4)
    assert topo.collective_time_s("all_gather", 1e6, range(4)) == plain.collective_time_s("all_gather", 1e6, range(4))
    assert topo.collective_time_s("all_reduce", 1e6, [3]) == 0.0
    with pytest.raises(SpecError, match="unknown op"):
        Topology(local, fitted_costs={("broadcast", 2): (1e-4, 1e-9)})


# ------------------------------------------------------------------------------------------- mesh layout

def test_rank_grid_worked_example():
    grid = rank_grid(("pp", "dp", "tp"), {"pp": 2, "dp": 4, "tp": 2})
    assert grid[MeshAxis.TP] == [[2 * i, 2 * i + 1] for i in range(8)]
    assert grid[MeshAxis.DP] == [[0, 2, 4, 6], [1, 3, 5, 7], [8, 10, 12, 14], [9, 11, 13, 15]]
    assert grid[MeshAxis.PP] == [[i, i + 8] for i in range(8)]


def test_rank_grid_other_order_and_parallel():
    grid = rank_grid((MeshAxis.TP, MeshAxis.PP, MeshAxis.DP), Parallel(tp=2, pp=2, dp=2))
    assert grid[MeshAxis.DP] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert grid[MeshAxis.TP] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert sorted(r for grp in grid[MeshAxis.PP] for r in grp) == list(range(8))


def test_axis_costs_match_the_hand_computed_groups():
    topo = Topology(dgx(64))
    order, sizes = ("pp", "dp", "tp"), {"pp": 2, "dp": 4, "tp": 8}
    assert topo.axis_group_shape(order, sizes, "tp") == GroupShape(8, 8, 1)
    assert topo.axis_group_shape(order, sizes, "dp") == GroupShape(4, 1, 4)
    assert topo.axis_time_s("all_reduce", 1e9, order, sizes, "dp") == pytest.approx(
        topo.collective_time_s("all_reduce", 1e9, [0, 8, 16, 24]))
    assert topo.axis_time_s("send_recv", 1e8, order, sizes, "pp") == pytest.approx(1e8 / NIC + INTER_S)
    # dp innermost, tp=1: neighbouring pipeline stages are 8 ranks apart, always on different nodes
    assert topo.axis_time_s("send_recv", 1e8, ("pp", "tp", "dp"), {"pp": 8, "dp": 8}, "pp") == pytest.approx(
        1e8 / NIC + INTER_S)
    with pytest.raises(SpecError, match="world size 64"):
        topo.axis_group_shape(order, {"pp": 2, "dp": 2, "tp": 8}, "dp")


def test_irregular_layout_reports_every_shape_and_prices_the_slowest():
    topo = Topology(dgx(48))
    order, sizes = ("pp", "dp", "tp"), {"dp": 8, "tp": 6}  # TP groups of 6 on nodes of 8: some straddle two nodes
    shapes = topo.axis_group_shapes(order, sizes, "tp")
    assert shapes == {GroupShape(6, 6, 1), GroupShape(6, 2, 2)}
    assert shapes == {topo.shape_of(grp) for grp in rank_grid(order, sizes)[MeshAxis.TP]}
    assert topo.axis_group_shape(order, sizes, "tp") == GroupShape(6, 2, 2)
    assert topo.axis_time_s("all_reduce", 1e9, order, sizes, "tp") == pytest.approx(
        topo.collective_time_s("all_reduce", 1e9, [6, 7, 8, 9, 10, 11]))


@settings(max_examples=60, deadline=None)
@given(gpn=st.sampled_from([2, 4, 8]), nodes=st.sampled_from([1, 2, 3, 4, 6]),
       split=st.data(), order=st.permutations([MeshAxis.PP, MeshAxis.DP, MeshAxis.TP]))
def test_axis_shapes_agree_with_brute_force(gpn, nodes, split, order):
    world = gpn * nodes
    divisors = [d for d in range(1, world + 1) if world % d == 0]
    tp = split.draw(st.sampled_from(divisors))
    pp = split.draw(st.sampled_from([d for d in divisors if (world // tp) % d == 0]))
    sizes = {"tp": tp, "pp": pp, "dp": world // tp // pp}
    topo = Topology(ClusterSpec.model_validate({**CLUSTERS["dgx-a100"].model_dump(), "gpus_per_node": gpn,
                                                "num_gpus": world}))
    for axis, groups in rank_grid(order, sizes).items():
        assert topo.axis_group_shapes(order, sizes, axis) == {topo.shape_of(g) for g in groups}
        pairs = {topo.shape_of(p) for g in groups for p in zip(g, g[1:])} or {GroupShape(1, 1, 1)}
        assert topo.axis_group_shapes(order, sizes, axis, pairs=True) == pairs


def test_candidate_mesh_orders_are_distinct_layouts():
    assert len(candidate_mesh_orders({"tp": 2, "pp": 2, "dp": 2})) == 6
    assert candidate_mesh_orders({"tp": 8, "pp": 4, "dp": 2})[0] == (MeshAxis.PP, MeshAxis.DP, MeshAxis.TP)
    two = candidate_mesh_orders(Parallel(tp=1, pp=2, dp=4))
    first_dp_groups = {tuple(rank_grid(o, {"pp": 2, "dp": 4})[MeshAxis.DP][0]) for o in two}
    assert len(two) == 2 and first_dp_groups == {(0, 1, 2, 3), (0, 2, 4, 6)}
    assert len(candidate_mesh_orders({"tp": 1, "pp": 1, "dp": 16})) == 1


def test_16k_gpu_cluster_is_priced_without_building_its_graph():
    start = time.perf_counter()
    topo = Topology(dgx(16384))
    for tp in (1, 2, 4, 8):
        for pp in (1, 4, 16, 64):
            sizes = {"tp": tp, "pp": pp, "dp": 16384 // tp // pp}
            for order in candidate_mesh_orders(sizes):
                for axis in MeshAxis:
                    topo.axis_time_s("all_reduce", 1e9, order, sizes, axis)
                    topo.axis_time_s("send_recv", 1e7, order, sizes, axis)
    assert time.perf_counter() - start < 2.0  # measured ~0.01 s; the full graph alone takes ~0.3 s
    assert "graph" not in vars(topo) and topo.template.number_of_nodes() == 2 * (8 + 1 + 8) + 1


def test_measured_time_functions_win_for_their_exact_group_size():
    from planner.specs import load_cluster
    from planner.topology import Topology
    topo = Topology(load_cluster("local", 4), fitted_costs={("all_reduce", 2): (1e-3, 1e-9)},
                    fitted_time={("all_reduce", 2): lambda nbytes: 42.0 + nbytes})
    assert topo.collective_time_s("all_reduce", 8.0, [0, 1]) == 50.0
    # other sizes still come from the alpha-beta fits (nearest measured size)
    assert topo.collective_time_s("all_reduce", 1e6, [0, 1, 2, 3]) == pytest.approx(1e-3 + 1e-9 * 1e6)
