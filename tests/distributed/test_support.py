"""planner/support.py: which combinations the runtime refuses, and that it accepts what the distributed tests run.
Pure Python, no processes."""
import pytest

from planner.plan import Parallel, Schedule
from planner.presets import MODELS
from planner.support import unsupported_reason

GPT, LLAMA = MODELS["tiny-gpt"], MODELS["tiny-llama"]
TIED = GPT.model_copy(update={"tie_embeddings": True})


def reason(model=GPT, zero=0, schedule=Schedule.ONE_F_ONE_B, nmb=4, **par):
    return unsupported_reason(Parallel(**par), zero, schedule, nmb, model)


@pytest.mark.parametrize("kwargs, expected", [
    (dict(tp=4, model=LLAMA), "does not divide kv heads"),  # 4 heads, 2 kv heads
    (dict(tp=3), "does not divide num_heads"),
    (dict(tp=2, model=TIED), "tied embeddings"),
    (dict(pp=2, model=TIED), "tied embeddings across pipeline stages"),
    (dict(sp=True), "needs tp > 1"),
    (dict(tp=2, dp=2, zero=1), "zero 1"),
    (dict(pp=4, nmb=2), "1f1b needs num_microbatches (2) >= pp (4)"),
    (dict(pp=2, vpp=2, nmb=5, schedule=Schedule.INTERLEAVED), "multiple of its 2 rounds"),
])
def test_refused_with_a_reason(kwargs, expected):
    why = reason(**kwargs)
    assert why is not None and expected in why and "\n" not in why


@pytest.mark.parametrize("kwargs", [
    dict(dp=2, zero=1),
    dict(pp=2, dp=2, zero=1, schedule=Schedule.GPIPE, nmb=2),
    dict(tp=2, sp=True, dp=2, zero=3),
    dict(pp=2, vpp=2, nmb=3, schedule=Schedule.INTERLEAVED),
    dict(pp=4, nmb=2, schedule=Schedule.GPIPE),
    dict(model=TIED, dp=2, zero=3),
    dict(model=LLAMA, tp=2, pp=2, dp=2, zero=2, sp=True),
])
def test_accepted(kwargs):
    assert reason(**kwargs) is None


def test_planner_stays_torch_free():
    import subprocess
    import sys
    from pathlib import Path

    code = "import sys, planner.support; assert 'torch' not in sys.modules"
    root = Path(__file__).resolve().parents[2]
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, cwd=root).returncode == 0
