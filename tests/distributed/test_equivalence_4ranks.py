"""Numerical equivalence on 4 ranks: DP x TP, PP x TP and PP x DP over every schedule, ZeRO stage and both
mesh orders the planner emits; losses equal the one-process run within 1e-5. One spawned world."""
import pytest

from tests.distributed.plans import TOLERANCE, make_plan, max_loss_diff, run_world, stage

pytestmark = pytest.mark.distributed

SCHEDULES = {"gpipe": {}, "1f1b": {}, "interleaved": {"vpp": 2}}

PLANS = {
    **{f"dp2xtp2-zero{z}{'-sp' if sp else ''}": make_plan(dp=2, tp=2, nmb=2, zero=z, sp=sp)
       for z in (0, 2, 3) for sp in (False, True)},
    "pp2xtp2-gpipe": make_plan(pp=2, tp=2, nmb=2, schedule="gpipe"),
    "pp2xtp2-1f1b-sp-full": make_plan(pp=2, tp=2, sp=True, nmb=2, schedule="1f1b", recompute="full"),
    "pp2xtp2-interleaved-sp-selective": make_plan(pp=2, tp=2, sp=True, vpp=2, nmb=2, schedule="interleaved",
                                                  recompute="selective"),
    **{f"pp2xdp2-{s}-zero{z}": make_plan(pp=2, dp=2, nmb=4 if z % 2 else 2, zero=z, schedule=s, **SCHEDULES[s])
       for s in SCHEDULES for z in (0, 1, 2, 3)},
    "pp2xdp2-1f1b-zero3-dp-outer": make_plan(pp=2, dp=2, nmb=2, zero=3, schedule="1f1b",
                                             mesh_order=("dp", "pp", "tp")),
    "pp2xdp2-interleaved-empty-stage-zero3": make_plan(pp=2, dp=2, vpp=2, nmb=2, zero=3, schedule="interleaved",
                                                       stages=[stage(0, 4), stage(4, 4), stage(4, 8), stage(8, 8)]),
}


@pytest.fixture(scope="module")
def reports():
    return run_world(4, PLANS)


@pytest.mark.parametrize("name", list(PLANS))
def test_losses_equal_one_process_run(reports, name):
    assert max_loss_diff(PLANS[name], reports[name]) <= TOLERANCE


def test_wrapper_choice_follows_the_proven_combinations(reports):
    # DDP breaks on DTensor parameters and inside pipeline schedules (facts file): zero 0 uses replicate there
    assert reports["dp2xtp2-zero0"]["wrappers"]["data"].startswith("replicate")
    assert reports["pp2xdp2-1f1b-zero0"]["wrappers"]["data"].startswith("replicate")
    assert reports["pp2xdp2-gpipe-zero1"]["wrappers"]["data"].endswith("ZeroRedundancyOptimizer")
    assert reports["pp2xdp2-gpipe-zero1"]["wrappers"]["data"].startswith("gradient all-reduce")
