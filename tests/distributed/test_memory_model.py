"""The planner's per-rank peak memory against what 2 gloo ranks hold when they run the plan.

On CPU the runtime measures the peak of live tensor bytes from torch.profiler's allocation events
(runtime/memory_meter.py): deterministic, so the model can be held to it plan by plan. The profile here has the
real parameter counts and saved-activation bytes of tiny-gpt (times are placeholders: only memory is checked), and
the plans come from the search, pinned to one shape each, so each prediction is the planner's own."""
from __future__ import annotations

import pytest
import torch

from planner.plan import Schedule
from planner.presets import MODELS
from planner.collectives import fit_collective
from planner.profile import DeviceInfo, LayerProfile, Profile
from planner.search import Pins
from planner.solve import SolveRequest, run_solve
from planner.specs import Recompute
from runtime.memory_meter import peak_allocated_from_trace
from runtime.profile_layers import LayerCase, count_params, saved_activation_bytes
from tests.distributed.plans import run_world

pytestmark = pytest.mark.distributed

TINY = MODELS["tiny-gpt"]
MBS = (1, 2)
TOLERANCE = 0.10
# DTensor's all-reduce outputs are freed on gloo's worker threads, which the profiler does not watch: the meter
# counts such a buffer until its address is reused (runtime/memory_meter.py), +5-11 % on these TP plans
TP_TOLERANCE = 0.15


def measured_profile() -> Profile:
    layers = []
    for tp in (1, 2):
        for mbs in MBS:
            for kind in ("embedding", "block", "head"):
                case = LayerCase(TINY, kind, tp, mbs, torch.device("cpu"), torch.float32)
                modes = list(Recompute) if kind == "block" else [Recompute.NONE]
                layers.append(LayerProfile(
                    kind=kind, tp=tp, micro_batch_size=mbs, fwd_s=1e-4 * mbs, bwd_s=2e-4 * mbs, fwd_cv=0.0,
                    bwd_cv=0.0, recompute_extra_s={"selective": 1e-5, "full": 1e-4} if kind == "block" else {},
                    params=count_params(case),
                    activation_bytes={str(m): saved_activation_bytes(case, m) for m in modes}))
    sizes = [1 << e for e in range(10, 24)]
    collectives = [fit_collective(op, 2, [(n, 2e-4 + n * 1e-9) for n in sizes])
                   for op in ("all_reduce", "all_gather", "reduce_scatter", "send_recv")]
    return Profile(model=TINY, precision="fp32",
                   device=DeviceInfo(device="cpu", name="test cpu", torch_version=torch.__version__, threads=1,
                                     matmul_tflops=0.1, date="2026-01-01T00:00:00+00:00"),
                   layers=layers, collectives=collectives, optimizer_bytes_per_param=8)


SHAPES = {
    "pp2-interleaved-none": Pins(pp=2, vpp=2, mbs=1, schedule=Schedule.INTERLEAVED, recompute=Recompute.NONE),
    "pp2-gpipe-full": Pins(pp=2, mbs=2, schedule=Schedule.GPIPE, recompute=Recompute.FULL),
    "pp2-1f1b-selective": Pins(pp=2, mbs=1, schedule=Schedule.ONE_F_ONE_B, recompute=Recompute.SELECTIVE),
    "dp2-ddp": Pins(dp=2, mbs=2, zero=0, recompute=Recompute.NONE),
    "dp2-zero2": Pins(dp=2, mbs=1, zero=2, recompute=Recompute.FULL),
    "dp2-zero3": Pins(dp=2, mbs=2, zero=3, recompute=Recompute.NONE),
    "tp2": Pins(tp=2, mbs=2, recompute=Recompute.NONE),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    path = tmp_path_factory.mktemp("memory") / "profile.json"
    path.write_text(measured_profile().to_json())
    req = SolveRequest.build(gpus=2, cluster="local", profile=path, global_batch=8)
    plans = {}
    for name, pins in SHAPES.items():
        result = run_solve(req, pins, top_k=1)
        assert result.plans, (name, [r.reason for r in result.rejected][:3])
        plans[name] = result.plans[0]
    # one world per plan, as `mpplan run` and `mpplan validate` run them: a plan run after others in the same
    # processes sometimes measured one gradient copy more (DDP after a pipeline plan; cause not found)
    return plans, {name: run_world(2, {name: plan}, steps=3)[name] for name, plan in plans.items()}


@pytest.mark.parametrize("name", list(SHAPES))
def test_predicted_peak_memory_of_every_rank_is_close_to_the_measured(runs, name):
    plans, reports = runs
    plan = plans[name]
    tolerance = TP_TOLERANCE if plan.parallel.tp > 1 else TOLERANCE
    rows = reports[name]["per_rank_memory"]
    # The meter counts a block freed on a thread it does not watch until its address is reused
    # (runtime/memory_meter.py); DDP reduces its bucket on gloo's worker thread, and once in ~10 runs one rank
    # measured exactly one gradient copy more (+1,757,092 bytes: 436,864 fp32 gradients; +0.1 % on the other
    # rank). Data-parallel ranks hold the same, so a model error shows on both: one must match as it is, the
    # other may carry that one block.
    # FSDP2 (ZeRO 2/3) gathers and reduces each unit on gloo's thread too: in 5 of 8 runs of the ZeRO-2 plan one
    # or both ranks carried a unit's buffer unseen (+147,968 bytes: the root unit's 36,992 parameters x 4;
    # +199,936: a block's), and in 2 of 5 full test runs one rank went over 10 % (the one logged: +826,304 bytes
    # over the other's); never more than the buffers of every unit, one gradient copy.
    unseen_free = 4 * TINY.total_params  # one fp32 gradient per parameter
    symmetric = plan.parallel.dp == len(rows)
    errors = sorted(abs(r["peak_memory_bytes"] - r["predicted_bytes"]) / r["predicted_bytes"] for r in rows)
    assert errors[0] <= tolerance, (name, rows)
    for row in rows:
        measured, predicted = row["peak_memory_bytes"], row["predicted_bytes"]
        extra = measured - predicted
        if symmetric and plan.zero == 0 and extra > tolerance * predicted:
            measured -= unseen_free
        elif symmetric and plan.zero >= 2 and extra > tolerance * predicted:
            assert extra <= tolerance * predicted + unseen_free, (name, row)
            continue
        assert abs(measured - predicted) <= tolerance * predicted, (name, row)


def test_the_meter_counts_exactly_what_tensors_hold():
    from runtime.memory_meter import MemoryMeter

    meter = MemoryMeter(torch.device("cpu"))
    a = torch.empty(1_000_000, dtype=torch.uint8)
    b = torch.empty(3_000_000, dtype=torch.uint8)
    del a
    c = torch.empty(500_000, dtype=torch.uint8)
    meter.stop_watching()
    assert meter.peak_bytes() == 4_000_000
    del b, c


def test_a_free_nobody_saw_ends_at_the_next_allocation_of_its_address():
    def event(ts, addr, nbytes):
        return {"name": "[memory]", "ts": ts, "args": {"Addr": addr, "Bytes": nbytes, "Device Type": 0}}

    events = [event(1, 0xA, 100), event(2, 0xB, 50),  # 150 live
              event(3, 0xA, 80),                      # 0xA was freed on an unwatched thread: 130 live
              event(4, 0xC, 10), event(5, 0xB, -50),  # 140, then 90
              {"name": "aten::mm", "ts": 6}]
    assert peak_allocated_from_trace(events) == 150
