"""The estimator and the search, on analytic presets: plans are valid, runnable, pinned where asked, and every
configuration not chosen carries a reason."""
import json

import pytest

from planner.estimate import DDP_BUCKET_BYTES, DDP_FIRST_BUCKET_BYTES, Estimator, gradient_buckets, inflight_per_stage
from planner.plan import Plan, Schedule
from planner.schedule import inflight_per_stage as exact_inflight, validate_schedule
from planner.search import Pins, solve
from planner.solve import SolveRequest, run_solve
from planner.specs import Recompute, SpecError, TrainSpec, load_cluster, load_model
from planner.support import plan_unsupported_reason


def test_inflight_priced_on_two_rounds_matches_the_full_schedule():
    for pp in range(2, 9):
        for vpp in range(2, 5):
            for m in range(pp, 8 * pp + 1):
                if validate_schedule(Schedule.INTERLEAVED, pp, vpp, m):
                    continue
                assert inflight_per_stage(Schedule.INTERLEAVED, pp, vpp, m) == exact_inflight(Schedule.INTERLEAVED, pp, vpp, m)
        for m in range(pp, 4 * pp):
            assert inflight_per_stage(Schedule.ONE_F_ONE_B, pp, 1, m) == exact_inflight(Schedule.ONE_F_ONE_B, pp, 1, m)


@pytest.fixture(scope="module")
def gpt13_64():
    return run_solve(SolveRequest.build(gpus=64), Pins(), top_k=5)


def test_default_solve_returns_ranked_valid_runnable_plans(gpt13_64):
    plans = gpt13_64.plans
    assert 1 <= len(plans) <= 5
    times = [p.predicted.step_time_s for p in plans]
    assert times == sorted(times)
    for p in plans:
        assert p.parallel.world_size == 64
        assert plan_unsupported_reason(p) is None
        assert p.solver.gap == 0.0 and p.solver.status == "optimal"
        assert p.predicted.peak_memory_bytes <= p.cluster.gpu.memory_bytes
        # the plan file round-trips through the strict loader
        assert Plan.model_validate(json.loads(p.to_json())) == p


def test_memory_breakdown_adds_up(gpt13_64):
    for p in gpt13_64.plans:
        for st in p.predicted.stages:
            m = st.memory
            parts = (m.params_bytes + m.grads_bytes + m.optimizer_bytes + m.activations_bytes
                     + m.pipeline_buffers_bytes + m.reserve_bytes)
            assert abs(parts - m.total_bytes) <= 6  # int rounding of six parts


def test_every_rejection_has_a_reason(gpt13_64):
    kinds = {r.kind for r in gpt13_64.rejected}
    assert kinds <= {"indivisible", "unsupported", "oom", "dominated", "screened", "slower"}
    assert all(r.reason for r in gpt13_64.rejected)


def test_pins_are_respected():
    req = SolveRequest.build(gpus=64, model="gpt3-6.7b", global_batch=256)
    res = run_solve(req, Pins(tp=4, pp=4, mbs=1, recompute=Recompute.FULL, zero=2, sp=False,
                              schedule=Schedule.ONE_F_ONE_B), top_k=3)
    assert res.plans
    for p in res.plans:
        assert (p.parallel.tp, p.parallel.pp, p.parallel.dp, p.micro_batch_size, p.zero) == (4, 4, 4, 1, 2)
        assert p.recompute == "full" and p.schedule == Schedule.ONE_F_ONE_B and not p.parallel.sp


def test_unpinned_plan_is_never_predicted_slower_than_a_pinned_one():
    req = SolveRequest.build(gpus=64, model="gpt3-6.7b", global_batch=256)
    pinned = run_solve(req, Pins(tp=8, pp=2, mbs=2, recompute=Recompute.FULL, zero=0, sp=False,
                                 schedule=Schedule.ONE_F_ONE_B), top_k=1).plans[0]
    free = run_solve(req, Pins(), top_k=1).plans[0]
    assert free.predicted.step_time_s <= pinned.predicted.step_time_s


def test_zero_sharding_shrinks_static_memory():
    model, cluster = load_model("gpt3-13b"), load_cluster("dgx-a100", 64)
    est = Estimator(model, cluster, TrainSpec(global_batch=512))
    w0, g0, o0 = est.static_bytes_per_param(0, 8)
    w3, g3, o3 = est.static_bytes_per_param(3, 8)
    assert (w0, g0, o0) == (2, 2, 12)  # 16 bytes per parameter: ZeRO paper's 2 + 2 + 12
    assert (w3, g3, o3) == (2 / 8, 2 / 8, 12 / 8)


def test_per_stage_recompute_front_loads_under_1f1b():
    """With memory tight, early 1F1B stages (more micro-batches in flight) recompute at least as much as late ones."""
    # 64 micro-batches: torch.distributed.pipelining keeps a receive buffer per micro-batch and direction (50 MB
    # each here), so 512 of them would not fit beside the weights at all
    req = SolveRequest.build(gpus=64, model="gpt3-175b", global_batch=64, memory_limit=60 * 10**9)
    res = run_solve(req, Pins(tp=8, pp=8, mbs=1, zero=0, sp=False, schedule=Schedule.ONE_F_ONE_B), top_k=1)
    p = res.plans[0]
    share = [(s.recompute.get(Recompute.FULL, 0) + s.recompute.get(Recompute.SELECTIVE, 0)) / s.num_blocks
             for s in p.stages]
    assert p.recompute == "mixed" and share[0] > share[-1]


def test_no_fit_names_the_binding_constraint():
    req = SolveRequest.build(gpus=8, model="gpt3-175b", global_batch=64)
    res = run_solve(req, Pins(), top_k=3)
    assert not res.plans
    msg = res.no_fit_message()
    assert "no plan fits in memory" in msg and "GiB more per GPU" in msg and "more GPUs" in msg


def test_local_cluster_requires_a_profile():
    with pytest.raises(SpecError, match="mpplan profile"):
        SolveRequest.build(gpus=2, cluster="local")


def test_memory_limit_rejects_what_no_longer_fits():
    small = run_solve(SolveRequest.build(gpus=64, model="gpt3-6.7b", global_batch=256, memory_limit=20 * 10**9),
                      Pins(tp=1, pp=1, zero=0), top_k=1)
    assert not small.plans and all(r.kind in ("oom", "indivisible", "unsupported") for r in small.rejected)


def test_pruning_bounds_never_drop_the_best_plan():
    """The bound that prunes must stay below every plan it could drop: the top plan with pruning equals the
    top plan of all feasible ones (stage hand-offs, which the simulator overlaps, must not be in the bound)."""
    req = SolveRequest.build(gpus=64, model="gpt3-13b", global_batch=512)
    pins = Pins(tp=2, pp=2, zero=0, sp=False)
    pruned = run_solve(req, pins, top_k=3, exhaustive=True).plans[0]
    every = min(run_solve(req, pins, top_k=None).plans, key=lambda p: p.predicted.step_time_s)
    assert pruned.predicted.step_time_s == pytest.approx(every.predicted.step_time_s)


def test_ddp_reduces_a_small_first_bucket_then_full_ones():
    mib = 2**20
    assert DDP_FIRST_BUCKET_BYTES == mib and DDP_BUCKET_BYTES == 25 * mib
    # tiny-gpt's gradients: torch 2.13 DDP rebuilt its buckets as 1,048,576 + 698,880 bytes
    assert gradient_buckets(1_747_456, first_bucket=True) == [mib, 698_880]
    assert gradient_buckets(1_747_456, first_bucket=False) == [1_747_456]
    assert gradient_buckets(0.5 * mib, first_bucket=True) == [0.5 * mib]  # fits the first bucket alone
    big = gradient_buckets(mib + 60 * mib, first_bucket=True)  # the rest in even pieces of at most 25 MiB
    assert big == [mib, 20 * mib, 20 * mib, 20 * mib]
    assert gradient_buckets(60 * mib, first_bucket=False) == [20 * mib] * 3
