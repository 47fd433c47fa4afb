"""Calibrate what mpplan's own training loop adds to the sum of the profiled layers, on this machine.

The layer profile (runtime/profile_layers.py) times each layer alone. A training step also pays the optimizer,
zero_grad, the loop and the loss per micro-batch, and its peak holds more than the saved activations (backward's
activation gradients, kernels' workspaces). Single-rank runs of the whole model with the real runtime
(runtime/launch.py, runtime/train.py, no parallelism) of three shapes, in CALIBRATION_CYCLES cycles, measure
these; the parallel plans `mpplan validate` checks are not among them.

    t(mbs, m) = step + m * (layers(mbs) + per_microbatch(mbs)) + optimizer    runs (mbs0, 1), (mbs0, 4), (mbs1, 1)
    peak(mbs) = fixed + static + factor * saved_activations(mbs) + loss(mbs)   runs (mbs0, 1) and (mbs1, 1)

with static = parameters x (weight + AdamW state) bytes (one micro-batch peaks before its gradients exist) and
loss the logits-sized gradients at the start of backward (planner/memory.py). The AdamW step is timed separately
on the model's own parameters. Each run's t is taken at the speed the layers were profiled at (planner/profile.py
machine_slowdown), so that the overheads are what the runtime adds, not how far the machine's speed moved in between.
"""
from __future__ import annotations

import statistics
import threading
import time
from typing import Sequence

import torch

from planner.memory import loss_backward_bytes
from planner.plan import MemoryBreakdown, Parallel, Plan, Prediction, Schedule, SolverInfo, StagePlan, StagePrediction
from planner.profile import (LayerProfile, RuntimeCalibration, RuntimeRun, machine_slowdown, tp1_block_s,
                             whole_model_sum)
from planner.specs import ModelSpec, Precision, Recompute, TrainSpec, load_cluster
from runtime.launch import Job, spawn_local
from runtime.model import Transformer

CALIBRATION_STEPS = 10
"""Steps of each calibration run (the first 2 are warm-up)."""
CALIBRATION_CYCLES = 3
"""Cycles of runs in one process: one micro-batch and MICROBATCHES_LONG micro-batches of the smallest profiled
size, then one of the largest. The per-micro-batch overhead is a difference of two runs' step times, a few ms out
of ~30, and a slow spell of the VM that falls on one run moved it: with one run of each kind, 24 steps, it came
out 0.69-1.63 ms over six calibrations on one profile (tiny-gpt; 16 micro-batches x that spread is a tenth of a
100 ms step; 0.35-2.57 ms with 8 steps), and a validate run's calibration drew 2.14 ms, another's 0.0. One step
time of the 4-micro-batch run was 29.2 ms in one copy and 37.7 in the other at the same moment, with the
yardsticks around them 2 % apart. So each cycle gives the differences, at its runs' mean speed, and the median
over cycles and copies is taken: a spell moves one cycle. Three cycles: 0.42-0.77 ms over six calibrations."""
MICROBATCHES_LONG = 4


def single_rank_plan(spec: ModelSpec, mbs: int, microbatches: int, precision: Precision) -> Plan:
    """The whole model on one rank, no recompute; its prediction is unused (zeros)."""
    memory = MemoryBreakdown(params_bytes=0, grads_bytes=0, optimizer_bytes=0, activations_bytes=0,
                             reserve_bytes=0, total_bytes=0)
    predicted = Prediction(step_time_s=0.0, tokens_per_s=0.0, tflops_per_gpu=0.0, mfu=0.0, bubble_fraction=0.0,
                           peak_memory_bytes=0, stages=[StagePrediction(memory=memory, time_s=0.0)])
    return Plan(model=spec, cluster=load_cluster("local", 1),
                train=TrainSpec(global_batch=mbs * microbatches, precision=precision), parallel=Parallel(),
                micro_batch_size=mbs, num_microbatches=microbatches, recompute="none", zero=0,
                schedule=Schedule.ONE_F_ONE_B,
                stages=[StagePlan(layers=(0, spec.num_layers), recompute={Recompute.NONE: spec.num_layers})],
                predicted=predicted, solver=SolverInfo(solver="calibration", status="none", gap=0.0, time_s=0.0),
                cost_source="profile")


def adamw_s_per_param(spec: ModelSpec, device: torch.device, repeats: int = 10) -> tuple[float, int]:
    """Median torch.optim.AdamW step over the whole model's parameters, per parameter (one thread), and the
    model's parameter count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank runs
    try:
        return _adamw_s_per_param(spec, device, repeats)
    finally:
        torch.set_num_threads(before)


def _adamw_s_per_param(spec: ModelSpec, device: torch.device, repeats: int) -> tuple[float, int]:
    model = Transformer(spec, seed=0).to(device)
    params = list(model.parameters())
    for p in params:
        p.grad = torch.randn_like(p)
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
    times = []
    for i in range(repeats + 2):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= 2:
            times.append(time.perf_counter() - start)
    count = sum(p.numel() for p in params)
    return statistics.median(times) / count, count


class OptimizerBench:
    """AdamW's state bytes per parameter and its step time per parameter (adamw_s_per_param), measured on rank 0
    of the layer-timing processes after their other work (runtime/profile_concurrent.py FollowOn): the first
    torch.optim step in a process costs ~2.5 s of imports (torch._dynamo), which those processes have paid and
    the parent has not."""

    def __init__(self, spec: ModelSpec, mixed_precision: bool, timeout_s: float = 120.0):
        self.spec, self.mixed_precision, self.timeout_s = spec, mixed_precision, timeout_s
        self.bytes_per_param: int | None = None
        self.adamw: tuple[float, int] | None = None
        self.done = False

    def rank_job(self, rank: int) -> tuple:
        return optimizer_rank, (rank, self.spec, self.mixed_precision)

    def handle(self, msg: tuple) -> bool:
        if msg[0] == "optimizer":
            self.bytes_per_param, self.adamw, self.done = msg[1], msg[2], True
        return self.done


def optimizer_rank(rank: int, spec: ModelSpec, mixed_precision: bool, results) -> None:
    """Rank 0 measures (OptimizerBench); the others have nothing to do."""
    if rank != 0:
        return
    from runtime.profile_layers import optimizer_bytes_per_param
    from runtime.spawned import report_failure

    try:
        results.put(("optimizer", optimizer_bytes_per_param(mixed_precision),
                     adamw_s_per_param(spec, torch.device("cpu"))))
    except Exception as e:  # the parent turns this into one RuntimeError
        report_failure(results, rank, e)


def _layer_sum(layers: Sequence[LayerProfile], spec: ModelSpec, mbs: int, what: str) -> float:
    total = whole_model_sum(layers, spec, mbs, what)
    assert total is not None, f"calibrating without every tp-1 layer profiled at mbs {mbs}"
    return total


def _loss_bytes(spec: ModelSpec, mbs: int) -> float:
    return loss_backward_bytes(mbs, spec.seq_len, spec.vocab_size)


def side_by_side(jobs: list[Job]) -> list[list[dict]]:
    """Run each of ``jobs`` on one rank, all at once (as the layers were timed: every core busy, see
    runtime/profile_concurrent.py); every job's reports, one list per job."""
    if len(jobs) == 1:
        return [spawn_local(jobs[0], 1)]
    outs: list[list[dict] | BaseException] = [[] for _ in jobs]

    def run(i: int) -> None:
        try:
            outs[i] = spawn_local(jobs[i], 1)
        except BaseException as e:  # re-raised below, in the caller's thread
            outs[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for out in outs:
        if isinstance(out, BaseException):
            raise out
    return outs  # type: ignore[return-value]


def calibrate_runtime(spec: ModelSpec, layers: Sequence[LayerProfile], precision: Precision, device: str,
                      optimizer_bytes_per_param: int, concurrent: int = 1,
                      adamw: tuple[float, int] | None = None) -> RuntimeCalibration:
    """Run the three calibration plans (smallest and largest profiled tp-1 micro-batch) and solve for the
    overheads; each is floored at its physical minimum (0 s, 0 bytes, factor 1). ``concurrent`` copies run side
    by side when the layers were timed that way. ``adamw``: adamw_s_per_param already measured (else here)."""
    sizes = sorted({lp.micro_batch_size for lp in layers if lp.tp == 1})
    small, large = sizes[0], sizes[-1]
    # one cycle: the small micro-batch once and MICROBATCHES_LONG times, the large once (paired differences)
    cycle = [(small, 1), (small, MICROBATCHES_LONG)] + ([(large, 1)] if large != small else [])
    timed = cycle * CALIBRATION_CYCLES
    fresh = [(large, 1)] if large != small else []

    def job(shapes: list[tuple[int, int]]) -> Job:
        plans = [single_rank_plan(spec, mbs, m, precision).model_dump_json() for mbs, m in shapes]
        return Job(plans=plans, steps=CALIBRATION_STEPS, device=device)

    # A memory peak is only clean as the first run of a fresh process (a later run reuses the workspaces and the
    # heap the earlier left behind): the first copy's first run gives the small peak; the large peak comes from
    # a process of its own. Side by side, that process is the second copy, which then times the small runs too
    # (one launch instead of two saves ~6 s of a profile that must finish within a minute).
    if concurrent > 1:
        copies = side_by_side([job(timed), job(fresh + timed)] + [job(timed)] * (concurrent - 2))
        large_report = copies[1][0] if fresh else None
    else:
        copies = side_by_side([job(timed)])
        large_report = side_by_side([job(fresh)])[0][0] if fresh else None
    # at the speed the layers were profiled at: the runs come minutes later, on cores that differ in speed
    # (46 vs 80 ms a step side by side), and raw step times minus the layers' sum put the per-micro-batch
    # overhead anywhere from 0 to 7 ms between profiles
    def slowdown(r: dict) -> float:
        return machine_slowdown(r, tp1_block_s(layers, r["micro_batch_size"])) or 1.0

    cycles = [[dict(r["measured"], micro_batch_size=mbs) for r, (mbs, _) in zip(c[len(c) - len(timed):], timed)]
              for c in copies]
    cycles = [c[i:i + len(cycle)] for c in cycles for i in range(0, len(timed), len(cycle))]
    runs = []
    for k, (mbs, m) in enumerate(cycle[:2]):
        at_speed = [c[k]["step_time_s"] / slowdown(c[k]) for c in cycles]
        runs.append(RuntimeRun(micro_batch_size=mbs, num_microbatches=m, step_time_s=statistics.fmean(at_speed),
                               peak_bytes=copies[0][k]["measured"]["peak_memory_bytes"]))

    def longer_by(k: int) -> float:
        """Median over cycles of what run k took beyond the cycle's first run, at the two runs' mean speed."""
        return statistics.median((c[k]["step_time_s"] - c[0]["step_time_s"])
                                 / statistics.fmean(slowdown(r) for r in (c[0], c[k])) for c in cycles)

    if large_report is not None:
        measured = large_report["measured"]  # its peak is what counts; its time is kept like the others'
        runs.append(RuntimeRun(micro_batch_size=large, num_microbatches=1,
                               step_time_s=measured["step_time_s"] / slowdown(dict(measured, micro_batch_size=large)),
                               peak_bytes=measured["peak_memory_bytes"]))
    dev = torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else torch.device("cpu")
    opt_per_param, params = adamw or adamw_s_per_param(spec, dev)
    one, long_ = runs[0], runs[1]
    layer_time = _layer_sum(layers, spec, small, "time")
    per_mb = max(0.0, longer_by(1) / (MICROBATCHES_LONG - 1) - layer_time)
    step = max(0.0, one.step_time_s - layer_time - per_mb - opt_per_param * params)
    # the large micro-batch against the small one: the step, the loop and the optimizer cancel, what is left is
    # the layers' difference and the two overheads'
    by_mbs = {small: per_mb}
    if large != small:
        by_mbs[large] = max(0.0, per_mb + longer_by(2) - (_layer_sum(layers, spec, large, "time") - layer_time))
    weight = 4 if precision == Precision.FP32 else 2
    # one micro-batch, gradients set to None: the peak is the start of backward, before any gradient exists
    # (planner/memory.py held_at_peak), with the loss's backward transient on top of the saved activations
    static = params * (weight + optimizer_bytes_per_param)
    factor = 1.0
    if len(runs) == 3:
        extra_acts = _layer_sum(layers, spec, large, "bytes") - _layer_sum(layers, spec, small, "bytes")
        extra_loss = _loss_bytes(spec, large) - _loss_bytes(spec, small)
        if extra_acts > 0:
            factor = max(1.0, (runs[2].peak_bytes - one.peak_bytes - extra_loss) / extra_acts)
    modelled = static + factor * _layer_sum(layers, spec, small, "bytes") + _loss_bytes(spec, small)
    fixed = max(0, round(one.peak_bytes - modelled))
    return RuntimeCalibration(step_overhead_s=step, microbatch_overhead_s=per_mb, optimizer_s_per_param=opt_per_param,
                              fixed_bytes=fixed, activation_peak_factor=factor, runs=runs,
                              microbatch_overhead_by_mbs=by_mbs)
