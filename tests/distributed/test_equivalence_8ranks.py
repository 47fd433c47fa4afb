"""PP x DP x TP = 2 x 2 x 2 on 8 ranks: each schedule, ZeRO 0/2/3 (ZeRO 1 is refused with TP), TP with and
without SP, each recompute mode; losses equal the one-process run within 1e-5. One spawned world (the slowest
test here: about a minute on 2 busy cores)."""
import pytest

from tests.distributed.plans import TOLERANCE, make_plan, max_loss_diff, run_world

pytestmark = pytest.mark.distributed

PLANS = {
    "1f1b-zero3-sp-full": make_plan(pp=2, dp=2, tp=2, sp=True, nmb=2, zero=3, schedule="1f1b", recompute="full"),
    "interleaved-zero0-selective": make_plan(pp=2, dp=2, tp=2, vpp=2, nmb=2, zero=0, schedule="interleaved",
                                             recompute="selective"),
    "gpipe-zero2-mixed-dp-outer": make_plan(pp=2, dp=2, tp=2, nmb=2, zero=2, schedule="gpipe",
                                            recompute=["full", "selective"], mesh_order=("dp", "pp", "tp")),
    "1f1b-zero0": make_plan(pp=2, dp=2, tp=2, nmb=2, zero=0, schedule="1f1b"),
    "interleaved-zero2-sp": make_plan(pp=2, dp=2, tp=2, sp=True, vpp=2, nmb=2, zero=2, schedule="interleaved"),
}


@pytest.fixture(scope="module")
def reports():
    return run_world(8, PLANS)


@pytest.mark.parametrize("name", list(PLANS))
def test_losses_equal_one_process_run(reports, name):
    assert max_loss_diff(PLANS[name], reports[name]) <= TOLERANCE


def test_every_rank_reports_memory(reports):
    r = reports["1f1b-zero3-sp-full"]
    assert [m["rank"] for m in r["per_rank_memory"]] == list(range(8))
    assert {m["pp_rank"] for m in r["per_rank_memory"]} == {0, 1}
