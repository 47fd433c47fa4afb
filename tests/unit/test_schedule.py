"""planner/schedule.py: orders, in-flight counts, simulation, closed forms."""
from __future__ import annotations

import random
import types

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import planner.schedule as sched
from planner.plan import Schedule
from planner.schedule import (Action, ActionKind, closed_form_step_time_s, inflight_per_stage,
                              interleaved_round_size, peak_activation_bytes, rank_orders, simulate, step_time_s,
                              validate_schedule)
from planner.specs import SpecError

F, B = ActionKind.FORWARD, ActionKind.BACKWARD
GPIPE, ONE_F_ONE_B, INTERLEAVED = Schedule.GPIPE, Schedule.ONE_F_ONE_B, Schedule.INTERLEAVED


def valid_configs(max_pp: int, max_vpp: int, max_m_factor: int = 3):
    for schedule in Schedule:
        for pp in range(1, max_pp + 1):
            for vpp in range(1, max_vpp + 1):
                for m in range(1, max_m_factor * pp + 3):
                    if validate_schedule(schedule, pp, vpp, m) is None:
                        yield schedule, pp, vpp, m


def timeline_table(result):
    return [(rank, str(a), start, end) for rank, a, start, end in result.timeline]


# --- hand-checked tiny cases: pp 2, m 2, forward 1 s, backward 2 s per stage --------------------------------------

def test_gpipe_pp2_m2_timeline():
    result = simulate(GPIPE, 2, 1, 2, [1.0, 1.0], [2.0, 2.0], keep_timeline=True)
    assert timeline_table(result) == [
        (0, "F0@0", 0.0, 1.0), (0, "F1@0", 1.0, 2.0), (0, "B0@0", 5.0, 7.0), (0, "B1@0", 7.0, 9.0),
        (1, "F0@1", 1.0, 2.0), (1, "F1@1", 2.0, 3.0), (1, "B0@1", 3.0, 5.0), (1, "B1@1", 5.0, 7.0)]
    assert result.step_time_s == 9.0
    assert result.rank_busy_s == (6.0, 6.0)
    assert result.bubble_fraction == pytest.approx(1 - 12 / 18)


def test_1f1b_pp2_m2_timeline():
    assert [[str(a) for a in order] for order in rank_orders(ONE_F_ONE_B, 2, 1, 2)] == [
        ["F0@0", "F1@0", "B0@0", "B1@0"], ["F0@1", "B0@1", "F1@1", "B1@1"]]
    result = simulate(ONE_F_ONE_B, 2, 1, 2, [1.0, 1.0], [2.0, 2.0], keep_timeline=True)
    assert timeline_table(result) == [
        (0, "F0@0", 0.0, 1.0), (0, "F1@0", 1.0, 2.0), (0, "B0@0", 4.0, 6.0), (0, "B1@0", 7.0, 9.0),
        (1, "F0@1", 1.0, 2.0), (1, "B0@1", 2.0, 4.0), (1, "F1@1", 4.0, 5.0), (1, "B1@1", 5.0, 7.0)]


def test_1f1b_pp2_m2_p2p_delays_every_link():
    result = simulate(ONE_F_ONE_B, 2, 1, 2, [1.0, 1.0], [2.0, 2.0], p2p_s=0.5, keep_timeline=True)
    assert timeline_table(result) == [
        (0, "F0@0", 0.0, 1.0), (0, "F1@0", 1.0, 2.0), (0, "B0@0", 5.0, 7.0), (0, "B1@0", 8.0, 10.0),
        (1, "F0@1", 1.5, 2.5), (1, "B0@1", 2.5, 4.5), (1, "F1@1", 4.5, 5.5), (1, "B1@1", 5.5, 7.5)]


def test_interleaved_pp2_vpp2_m2_order_and_time():
    orders = [[str(a) for a in order] for order in rank_orders(INTERLEAVED, 2, 2, 2)]
    assert orders == [["F0@0", "F1@0", "F0@2", "F1@2", "B0@2", "B1@2", "B0@0", "B1@0"],
                      ["F0@1", "F1@1", "F0@3", "B0@3", "F1@3", "B1@3", "B0@1", "B1@1"]]
    # (m vpp + pp - 1)(f + b) = (4 + 1) * 3
    assert simulate(INTERLEAVED, 2, 2, 2, [1.0] * 4, [2.0] * 4).step_time_s == 15.0


# --- closed forms --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("schedule", [GPIPE, ONE_F_ONE_B])
def test_uniform_single_chunk_schedules_take_m_plus_pp_minus_1_slots(schedule):
    for pp in range(1, 9):
        for m in range(pp, 4 * pp + 2):
            result = simulate(schedule, pp, 1, m, [0.7] * pp, [1.9] * pp)
            assert result.step_time_s == pytest.approx((m + pp - 1) * 2.6), (pp, m)
            # Narayanan et al. 2021 bubble b = (pp - 1) / m; ours is idle / total = b / (1 + b)
            b = (pp - 1) / m
            assert result.bubble_fraction == pytest.approx(b / (1 + b), abs=1e-12)


def test_interleaved_uniform_matches_narayanan_when_m_at_least_pp():
    """(m + (pp-1)/vpp) full-rank micro-batch times, for torch's rounds too (m not a multiple of pp)."""
    for pp in range(2, 9):
        for vpp in range(2, 5):
            for m in range(pp, 4 * pp + 2):
                if validate_schedule(INTERLEAVED, pp, vpp, m):
                    continue
                f, b = 0.3, 1.1  # per virtual stage
                result = simulate(INTERLEAVED, pp, vpp, m, [f] * (pp * vpp), [b] * (pp * vpp))
                rank_time = vpp * (f + b)
                assert result.step_time_s == pytest.approx((m + (pp - 1) / vpp) * rank_time), (pp, vpp, m)
                bubble = (pp - 1) / (vpp * m)
                assert result.bubble_fraction == pytest.approx(bubble / (1 + bubble), abs=1e-12)


def test_interleaved_with_fewer_microbatches_than_ranks_is_a_gpipe_over_all_stages():
    for pp in range(3, 8):
        for vpp in (2, 3):
            for m in range(1, pp):
                stages = pp * vpp
                got = simulate(INTERLEAVED, pp, vpp, m, [1.0] * stages, [2.0] * stages).step_time_s
                assert got == pytest.approx((m + stages - 1) * 3.0)


def test_closed_forms_agree_with_simulation_with_p2p():
    rng = random.Random(7)
    for schedule, pp, vpp, m in valid_configs(12, 4, 4):
        stages = pp * vpp
        for f, b, p2p in [(1.0, 2.0, 0.1), (1.0, 0.01, 30.0), (0.01, 1.0, 0.0),
                          (rng.uniform(0.01, 5), rng.uniform(0.01, 5), rng.uniform(0, 5))]:
            if schedule == INTERLEAVED:
                p2p = 0.0
            closed = closed_form_step_time_s(schedule, pp, vpp, m, [f] * stages, [b] * stages, p2p)
            simulated = simulate(schedule, pp, vpp, m, [f] * stages, [b] * stages, p2p).step_time_s
            assert closed == pytest.approx(simulated, rel=1e-12), (schedule, pp, vpp, m, f, b, p2p)


def test_gpipe_closed_form_holds_for_uneven_stages():
    rng = random.Random(3)
    for _ in range(200):
        pp, m = rng.randint(1, 8), rng.randint(1, 20)
        fwd = [rng.uniform(0.1, 3) for _ in range(pp)]
        bwd = [rng.uniform(0.1, 6) for _ in range(pp)]
        p2p = rng.choice([0.0, rng.uniform(0, 2)])
        assert closed_form_step_time_s(GPIPE, pp, 1, m, fwd, bwd, p2p) == pytest.approx(
            simulate(GPIPE, pp, 1, m, fwd, bwd, p2p).step_time_s, rel=1e-12)


def test_no_closed_form_where_none_is_exact_and_step_time_falls_back_to_simulation():
    fwd, bwd = [1.0, 1.5, 1.0, 1.0], [2.0, 2.0, 2.5, 2.0]
    assert closed_form_step_time_s(ONE_F_ONE_B, 4, 1, 8, fwd, bwd) is None
    assert step_time_s(ONE_F_ONE_B, 4, 1, 8, fwd, bwd, 0.2) == simulate(ONE_F_ONE_B, 4, 1, 8, fwd, bwd, 0.2).step_time_s
    uniform = [1.0] * 8
    assert closed_form_step_time_s(INTERLEAVED, 4, 2, 8, uniform, uniform, p2p_s=0.1) is None
    assert closed_form_step_time_s(INTERLEAVED, 4, 2, 8, uniform, uniform) == (8 * 2 + 3) * 2.0


# --- uneven stages -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("schedule,vpp", [(GPIPE, 1), (ONE_F_ONE_B, 1), (INTERLEAVED, 2)])
def test_slowest_stage_dominates(schedule, vpp):
    pp, m = 4, 64
    fwd, bwd = [1.0] * (pp * vpp), [2.0] * (pp * vpp)
    fwd[2], bwd[2] = 3.0, 6.0  # one stage three times slower
    step = simulate(schedule, pp, vpp, m, fwd, bwd).step_time_s
    slow_rank_work = m * sum(fwd[j] + bwd[j] for j in range(2, pp * vpp, pp))
    assert slow_rank_work <= step <= slow_rank_work * 1.25
    # monotone: between all-fast and all-slow pipelines
    fast = simulate(schedule, pp, vpp, m, [1.0] * (pp * vpp), [2.0] * (pp * vpp)).step_time_s
    slow = simulate(schedule, pp, vpp, m, [3.0] * (pp * vpp), [6.0] * (pp * vpp)).step_time_s
    assert fast < step < slow


# --- in-flight micro-batches ---------------------------------------------------------------------------------------

def test_inflight_1f1b_and_gpipe():
    for pp in range(1, 9):
        for m in range(pp, 3 * pp + 1):
            assert inflight_per_stage(ONE_F_ONE_B, pp, 1, m) == tuple(min(pp - i, m) for i in range(pp))
            assert inflight_per_stage(GPIPE, pp, 1, m) == (m,) * pp


def brute_force_rank_peak(order, weight):
    held, best = 0, 0
    for a in order:
        held += weight[a.stage] if a.kind == F else -weight[a.stage]
        best = max(best, held)
    return best


def test_inflight_interleaved_counts_each_rank_at_its_peak():
    for _, pp, vpp, m in (c for c in valid_configs(6, 4) if c[0] == INTERLEAVED):
        counts = inflight_per_stage(INTERLEAVED, pp, vpp, m)
        orders = rank_orders(INTERLEAVED, pp, vpp, m)
        for rank in range(pp):
            mine = [counts[j] for j in range(rank, pp * vpp, pp)]
            assert sum(mine) == brute_force_rank_peak(orders[rank], [1] * (pp * vpp))
            assert all(0 <= n <= m for n in mine)
        rank_totals = [sum(counts[j] for j in range(r, pp * vpp, pp)) for r in range(pp)]
        assert rank_totals == sorted(rank_totals, reverse=True), (pp, vpp, m)  # early ranks hold more
    # pp 4, vpp 2, m 8: rank 0 warms up with (vpp-1)*pp + 2*(pp-1) = 10 forwards, peaks at 11 chunk-activations
    assert inflight_per_stage(INTERLEAVED, 4, 2, 8) == (7, 5, 4, 4, 4, 4, 3, 1)


def test_peak_activation_bytes_weights_each_stage():
    rng = random.Random(11)
    for schedule, pp, vpp, m in valid_configs(5, 3):
        weights = [rng.randint(1, 1000) for _ in range(pp * vpp)]
        orders = rank_orders(schedule, pp, vpp, m)
        assert peak_activation_bytes(schedule, pp, vpp, m, weights) == tuple(
            brute_force_rank_peak(order, weights) for order in orders)


# --- validity, completeness, dependencies, deadlock freedom --------------------------------------------------------

@pytest.mark.parametrize("args,fragment", [
    ((ONE_F_ONE_B, 4, 1, 2), "1f1b needs num_microbatches (2) >= pp (4)"),
    ((GPIPE, 4, 2, 8), "vpp 1"),
    ((ONE_F_ONE_B, 4, 2, 8), "vpp 1"),
    ((INTERLEAVED, 4, 1, 8), "vpp >= 2"),
    ((INTERLEAVED, 1, 2, 8), "pp >= 2"),
    ((INTERLEAVED, 4, 2, 9), "multiple of its rounds"),
    ((GPIPE, 0, 1, 8), "pp must be a positive integer"),
    ((GPIPE, 2, 1, 0), "num_microbatches must be a positive integer"),
])
def test_validate_schedule_reasons(args, fragment):
    reason = validate_schedule(*args)
    assert reason is not None and fragment in reason
    with pytest.raises(SpecError, match="^" + reason.replace("(", r"\(").replace(")", r"\)")):
        rank_orders(*args)


def test_validate_schedule_accepts_torch_rounds():
    assert validate_schedule(INTERLEAVED, 4, 2, 10) is None  # 2 rounds of 5
    assert interleaved_round_size(4, 10) == 5
    assert validate_schedule(INTERLEAVED, 4, 2, 3) is None  # one round of 3
    assert validate_schedule(GPIPE, 8, 1, 1) is None
    assert validate_schedule(ONE_F_ONE_B, 1, 1, 1) is None


def test_every_valid_small_config_has_complete_orders_and_terminates():
    for schedule, pp, vpp, m in valid_configs(6, 4):
        orders = rank_orders(schedule, pp, vpp, m)
        for rank, order in enumerate(orders):
            expected = {Action(kind, mb, j) for kind in (F, B) for mb in range(m) for j in range(rank, pp * vpp, pp)}
            assert len(order) == len(expected) and set(order) == expected, (schedule, pp, vpp, m, rank)
        stages = pp * vpp
        result = simulate(schedule, pp, vpp, m, [1.0] * stages, [2.0] * stages, 0.25)
        assert result.step_time_s > 0


def test_deadlocked_order_is_reported(monkeypatch):
    # one rank, one micro-batch, backward before forward: the rank waits on itself
    monkeypatch.setattr(sched, "_rank_codes", lambda *args: [[1, 0]])
    with pytest.raises(RuntimeError, match="deadlocks: rank 0 waits at B0@0"):
        simulate(GPIPE, 1, 1, 1, [1.0], [1.0])


def check_timeline(schedule, pp, vpp, m, fwd, bwd, p2p):
    result = simulate(schedule, pp, vpp, m, fwd, bwd, p2p, keep_timeline=True)
    ends, by_rank = {}, {r: [] for r in range(pp)}
    for rank, action, start, end in result.timeline:
        assert action.stage % pp == rank
        assert action not in ends, f"{action} twice"
        ends[action] = end
        by_rank[rank].append((action, start, end))
    assert len(ends) == 2 * m * pp * vpp
    for rank, rows in by_rank.items():
        assert [a for a, _, _ in rows] == rank_orders(schedule, pp, vpp, m)[rank]
        free = 0.0
        for action, start, end in rows:
            j, mb = action.stage, action.microbatch
            deps = []
            if action.kind == F:
                duration = fwd[j]
                if j > 0:
                    deps.append(ends[Action(F, mb, j - 1)] + p2p)
            else:
                duration = bwd[j]
                deps.append(ends[Action(F, mb, j)])
                if j < pp * vpp - 1:
                    deps.append(ends[Action(B, mb, j + 1)] + p2p)
            assert start >= free - 1e-9, "actions of one rank overlap"
            assert all(start >= d - 1e-9 for d in deps), f"{action} starts before its input is ready"
            assert start == pytest.approx(max([free] + deps))  # and not later than needed
            assert end == pytest.approx(start + duration)
            free = end
        assert result.rank_busy_s[rank] == pytest.approx(sum(e - s for _, s, e in rows))
    assert result.step_time_s == pytest.approx(max(ends.values()))


@st.composite
def configs(draw):
    schedule = draw(st.sampled_from(list(Schedule)))
    pp = draw(st.integers(2 if schedule == INTERLEAVED else 1, 6))
    vpp = draw(st.integers(2, 4)) if schedule == INTERLEAVED else 1
    m = draw(st.integers(1, 3 * pp + 2))
    if schedule == ONE_F_ONE_B:
        m = max(m, pp)
    if schedule == INTERLEAVED:
        m -= m % max(1, m // pp)  # a multiple of torch's rounds
    times = st.floats(0.01, 10.0, allow_nan=False)
    fwd = draw(st.lists(times, min_size=pp * vpp, max_size=pp * vpp))
    bwd = draw(st.lists(times, min_size=pp * vpp, max_size=pp * vpp))
    p2p = draw(st.sampled_from([0.0, 0.05, 1.0, 7.5]))
    return schedule, pp, vpp, m, fwd, bwd, p2p


@settings(max_examples=60, deadline=None)
@given(configs())
def test_simulation_respects_orders_and_dependencies(config):
    assert validate_schedule(*config[:4]) is None
    check_timeline(*config)


# --- cross-check with torch 2.13's own schedule tables (skipped where torch is absent) ----------------------------

def torch_orders(schedules_module, schedule, pp, vpp, m):
    computation = schedules_module._ComputationType
    if schedule == INTERLEAVED:
        fake = types.SimpleNamespace(n_local_stages=vpp, pp_group_size=pp, _n_microbatches=m,
                                     microbatches_per_round=interleaved_round_size(pp, m))
        table = {r: schedules_module.ScheduleInterleaved1F1B._calculate_single_rank_operations(fake, r)
                 for r in range(pp)}
    else:
        cls = schedules_module.ScheduleGPipe if schedule == GPIPE else schedules_module.Schedule1F1B
        table = cls._get_pipeline_order(types.SimpleNamespace(_num_stages=pp, _n_microbatches=m))
    kinds = {computation.FORWARD: F, computation.FULL_BACKWARD: B}
    return [[Action(kinds[a.computation_type], a.microbatch_index, a.stage_index)
             for a in table[r] if a is not None and a.computation_type in kinds] for r in range(pp)]


def test_orders_match_torch_pipelining_tables():
    schedules_module = pytest.importorskip("torch.distributed.pipelining.schedules")
    if not hasattr(schedules_module.ScheduleInterleaved1F1B, "_calculate_single_rank_operations"):
        pytest.skip("this torch lays out its schedule tables differently")
    for schedule, pp, vpp, m in valid_configs(6, 4):
        ours, theirs = rank_orders(schedule, pp, vpp, m), torch_orders(schedules_module, schedule, pp, vpp, m)
        if schedule == ONE_F_ONE_B:
            # torch 2.13's Schedule1F1B._get_pipeline_order (a picture only) numbers the last rank's forwards from 1;
            # what it executes (_step_microbatches: min(m, pp - rank) warm-up forwards, then B/F) is our order.
            ours, theirs = ours[:-1], theirs[:-1]
        assert ours == theirs, (schedule, pp, vpp, m)


def test_receives_per_rank_count_every_hand_off_a_rank_waits_for():
    from planner.schedule import receives_per_rank

    # 1F1B / GPipe over 2 ranks: rank 0 waits for every gradient, rank 1 for every activation
    assert receives_per_rank(Schedule.ONE_F_ONE_B, 2, 1, 16) == 16
    assert receives_per_rank(Schedule.GPIPE, 2, 1, 8) == 8
    # a middle rank of 4 waits for both
    assert receives_per_rank(Schedule.ONE_F_ONE_B, 4, 1, 8) == 16
    # interleaved over 2 ranks with v chunks each: 2v - 1 of a rank's 2v actions per micro-batch receive
    for vpp in (2, 3, 4):
        assert receives_per_rank(Schedule.INTERLEAVED, 2, vpp, 16) == (2 * vpp - 1) * 16
