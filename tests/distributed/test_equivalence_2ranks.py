"""Numerical equivalence on 2 ranks: DP 2 under every ZeRO stage, TP 2 with and without sequence parallel, PP 2
under every schedule, each recompute mode and a mixed per-stage plan; losses of the first steps equal the
one-process run within 1e-5. All plans run in one spawned world."""
import pytest

from tests.distributed.plans import TOLERANCE, make_plan, max_loss_diff, run_world, stage

pytestmark = pytest.mark.distributed

PLANS = {
    "dp2-zero0-ddp": make_plan(dp=2, nmb=2, zero=0),
    "dp2-zero1": make_plan(dp=2, nmb=2, zero=1),
    "dp2-zero2-selective": make_plan(dp=2, nmb=2, zero=2, recompute="selective"),
    "dp2-zero3-full": make_plan(dp=2, nmb=1, zero=3, recompute="full"),
    "dp2-zero3-tied": make_plan(dp=2, nmb=2, zero=3, tie_embeddings=True),
    "dp2-zero0-tied": make_plan(dp=2, nmb=1, zero=0, tie_embeddings=True),
    "dp2-pp1-vpp2-interleaved-zero2": make_plan(dp=2, vpp=2, nmb=2, zero=2, schedule="interleaved"),
    "tp2": make_plan(tp=2, nmb=2),
    "tp2-sp-selective": make_plan(tp=2, sp=True, nmb=1, recompute="selective"),
    "llama-tp2-sp-full": make_plan(model="tiny-llama", tp=2, sp=True, nmb=2, recompute="full"),
    "pp2-gpipe": make_plan(pp=2, nmb=2, schedule="gpipe"),
    "pp2-1f1b-mixed": make_plan(pp=2, nmb=3, schedule="1f1b", recompute=["full", "selective"]),
    "pp2-interleaved-mixed": make_plan(pp=2, vpp=2, nmb=2, schedule="interleaved",
                                       recompute=["full", "none", "selective", "none"]),
    "pp2-uneven-embedding-only-stage": make_plan(pp=2, nmb=2, schedule="gpipe",
                                                 stages=[stage(0, 0), stage(0, 8, "selective")]),
    "llama-pp2-interleaved": make_plan(model="tiny-llama", pp=2, vpp=2, nmb=4, schedule="interleaved"),
}


@pytest.fixture(scope="module")
def reports():
    return run_world(2, PLANS)


@pytest.mark.parametrize("name", list(PLANS))
def test_losses_equal_one_process_run(reports, name):
    assert max_loss_diff(PLANS[name], reports[name]) <= TOLERANCE


def test_report_names_the_wrappers_used(reports):
    assert reports["dp2-zero0-ddp"]["wrappers"]["data"] == "DDP"
    assert reports["dp2-zero1"]["wrappers"]["data"] == "DDP + ZeroRedundancyOptimizer"
    assert "reshard_after_forward=False" in reports["dp2-zero2-selective"]["wrappers"]["data"]
    assert "reshard_after_forward=True" in reports["dp2-zero3-full"]["wrappers"]["data"]
    assert "sequence parallel" in reports["tp2-sp-selective"]["wrappers"]["tensor"]
    assert reports["pp2-interleaved-mixed"]["wrappers"]["pipeline"] == "ScheduleInterleaved1F1B"
    assert reports["pp2-gpipe"]["wrappers"]["pipeline"] == "ScheduleGPipe"
    assert "gradient accumulation" in reports["dp2-pp1-vpp2-interleaved-zero2"]["wrappers"]["pipeline"]


def test_report_measures_time_and_memory_against_prediction(reports):
    r = reports["pp2-gpipe"]
    assert r["measured"]["step_time_s"] > 0 and r["measured"]["tokens_per_s"] > 0
    assert len(r["per_rank_memory"]) == 2 and [m["pp_rank"] for m in r["per_rank_memory"]] == [0, 1]
    assert all(m["peak_memory_bytes"] > 0 for m in r["per_rank_memory"])
    assert len(r["measured"]["cpu_busy_per_rank"]) == 2 and all(b > 0 for b in r["measured"]["cpu_busy_per_rank"])
    expected = 100 * (r["measured"]["step_time_s"] - 0.1) / 0.1  # make_plan predicts 0.1 s
    assert r["error_pct"]["step_time_s"] == pytest.approx(expected)
    assert len(r["losses"]) == 3
