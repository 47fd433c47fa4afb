"""`mpplan profile`: measure a model on this machine and return a planner.profile.Profile.

    profile = profile_model(load_model("tiny-gpt"), micro_batch_sizes=[1, 2, 4], tp_degrees=[1, 2], ranks=2)
    Path("profile.json").write_text(profile.to_json())

What is measured and how: runtime/profile_layers.py (per-layer time, recompute overhead, parameters and
saved-activation bytes; one block stands for all blocks, which are identical; all cases timed round-robin) and
runtime/profile_comm.py (collective micro-benchmarks among spawned local ranks, alpha-beta fits). Everything runs
with one thread per process, as the runtime's ranks do (facts: with two threads the mean doubles beside a busy process).

A caller that spawns ranks (ranks >= 2) must run under ``if __name__ == "__main__":`` (multiprocessing spawn
re-imports the main module); the mpplan console script and pytest do.
"""
from __future__ import annotations

import datetime
from dataclasses import replace
import platform
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import torch

from planner.profile import DeviceInfo, LayerKind, Profile
from planner.specs import ModelSpec, Precision, SpecError
from runtime.profile_comm import CollectiveBench, CommConfig, group_sizes, measure_collectives
from runtime.profile_concurrent import measure_layers_concurrently
from runtime.profile_ddp import DDPBench
from runtime.profile_pipeline import PipelineBench
from runtime.profile_runtime import OptimizerBench, calibrate_runtime
from runtime.profile_tp import ShardedBench, measure_sharded_blocks
from runtime.profile_layers import (LayerCase, TimingConfig, check_tp, layer_profiles, matmul_tflops,
                                    optimizer_bytes_per_param, time_cases)

KINDS: tuple[LayerKind, ...] = ("embedding", "block", "head")

SHARDED_REPEATS = 24
"""Samples of a block under DTensor TP or FSDP2 (runtime/profile_tp.py) per micro-batch size (at most twice the
layers' repeats, so quick test timings stay quick). A wrapped block's calls wait on gloo and spread 25-50 % (cv)
while the same plain blocks timed in between moved under 5 %, so its own calls, not the machine, set how far one
profile's figure lands from the next: with 9 samples a ZeRO-2 block of tiny-gpt came out 2.5-4.5 ms at mbs 1 in
three launches, with 30 2.8-3.5 (the priced plans of `mpplan validate` followed: ZeRO-2 and TP-2 ran 17-34 %
under their price in runs whose profile drew high). 24 costs ~3.5 s of the profile more than 9."""

Progress = Callable[[str], None]
"""Called with a short label each time one step (a layer case, a collective) is done."""


def tp_blocks_to_time(device: str, tp_degrees: Sequence[int], ranks: int) -> list[int]:
    """TP degrees whose DTensor block is timed on spawned ranks: CPU only (on CUDA the shard + fitted NCCL
    collectives stand), those > 1 that ``ranks`` local ranks can hold."""
    return sorted(t for t in set(tp_degrees) if 1 < t <= ranks) if device == "cpu" else []


def times_fsdp_blocks(device: str, tp_degrees: Sequence[int], ranks: int) -> bool:
    """ZeRO 2 / 3 blocks are timed under FSDP2 over all ranks on CPU (tp 1 profiled, 2+ ranks)."""
    return device == "cpu" and ranks >= 2 and 1 in tp_degrees


def times_pipeline(device: str, ranks: int) -> bool:
    """Pipeline hand-offs are timed under torch.distributed.pipelining over all ranks on CPU (2+ ranks)."""
    return device == "cpu" and ranks >= 2


def times_ddp(device: str, ranks: int) -> bool:
    """DDP's gradient sync is timed in a whole-model step over all ranks on CPU (2+ ranks; on CUDA it overlaps
    backward and the planner prices the collectives alone)."""
    return device == "cpu" and ranks >= 2


def count_steps(ranks: int, timing: TimingConfig = TimingConfig(), comm: CommConfig = CommConfig(),
                tp_to_time: Sequence[int] = (), fsdp: bool = False, pipeline: bool = False,
                ddp: bool = False) -> int:
    """How many times profile_model calls its progress callback (for a progress bar's total)."""
    sharded_worlds = {*tp_to_time, *([ranks] if fsdp else [])}
    return (timing.warmup + timing.repeats + 1 + len(group_sizes(ranks)) * comm.rounds + len(sharded_worlds)
            + int(pipeline) + int(ddp) + 1)


def check_request(spec: ModelSpec, device: str, micro_batch_sizes: Sequence[int], tp_degrees: Sequence[int],
                  ranks: int) -> None:
    """SpecError (one line) for anything that cannot be profiled, before any time is spent."""
    if device not in ("cpu", "cuda"):
        raise SpecError(f"--device {device}: must be cpu or cuda")
    if not micro_batch_sizes or any(m <= 0 for m in micro_batch_sizes):
        raise SpecError(f"--mbs {','.join(map(str, micro_batch_sizes))}: micro-batch sizes must be positive")
    if not tp_degrees:
        raise SpecError("--tp: give at least one degree")
    for t in tp_degrees:
        check_tp(spec, t)
    if ranks < 1:
        raise SpecError(f"--ranks {ranks}: must be at least 1 (1 skips the collective benchmarks)")
    if device == "cuda":
        if not torch.cuda.is_available():
            raise SpecError("--device cuda: this torch has no CUDA device (use --device cpu)")
        if ranks > 1 and torch.cuda.device_count() < ranks:
            raise SpecError(f"--ranks {ranks}: only {torch.cuda.device_count()} CUDA devices (nccl needs one per rank)")


@contextmanager
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:  # platform.processor() is often empty on Linux; /proc/cpuinfo names the model
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def profile_model(spec: ModelSpec, device: str = "cpu", micro_batch_sizes: Sequence[int] = (1, 2, 4),
                  tp_degrees: Sequence[int] = (1, 2), ranks: int = 2, timing: TimingConfig = TimingConfig(),
                  comm: CommConfig = CommConfig(), progress: Progress | None = None,
                  calibrate: bool = True) -> Profile:
    """Measure every layer kind at every (tp, micro-batch size), the collectives among ``ranks`` local ranks,
    the optimizer state and the device. bf16 on CUDA, fp32 on CPU. ``calibrate`` also runs the runtime on one
    rank to measure its overheads (runtime/profile_runtime.py; needs tp 1 among ``tp_degrees``)."""
    check_request(spec, device, micro_batch_sizes, tp_degrees, ranks)
    step = progress or (lambda label: None)
    dev = torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else torch.device("cpu")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    cases = [LayerCase(spec, kind, tp, mbs, dev, dtype) for tp in tp_degrees for mbs in micro_batch_sizes
             for kind in KINDS]
    # on CPU every rank's core is busy in a run, so the layers are timed on all of them at once
    concurrent = ranks if device == "cpu" else 1
    # blocks under DTensor / FSDP2: one warm-up sample, and more samples than a plain layer (SHARDED_REPEATS)
    sharded = replace(timing, warmup=min(timing.warmup, 1), repeats=min(SHARDED_REPEATS, 2 * timing.repeats))
    tp_worlds, fsdp = tp_blocks_to_time(device, tp_degrees, ranks), times_fsdp_blocks(device, tp_degrees, ranks)
    # ... and the sharded blocks over all ranks, then the collectives, next in the same processes (two launches
    # fewer); sharded blocks over fewer ranks get processes of their own. The sharded blocks come before the
    # collectives: timed after them, DTensor TP blocks took 12-27 % longer (tiny-gpt, 2 ranks, mean over mbs 1/2/4
    # in four alternating pairs of launches: 13.1-14.9 ms a block after, 10.8-13.0 before); FSDP2 ZeRO-2 blocks
    # showed no steady difference (0.81-1.13x). A run's processes have not moved 64 MiB messages either
    bench = CollectiveBench(ranks, device, comm, step) if concurrent > 1 else None
    over_all = ShardedBench(spec, ranks, ranks in tp_worlds, fsdp, micro_batch_sizes, sharded, step)
    optimizer = OptimizerBench(spec, mixed_precision=device == "cuda")
    # CPU: a pipeline hand-off as torch.distributed.pipelining pays it, at the smallest micro-batch's activation
    pipeline = PipelineBench(spec, ranks, min(micro_batch_sizes), step) if times_pipeline(device, ranks) else None
    # CPU: DDP's gradient all-reduce as a whole-model step pays it (runtime/profile_ddp.py)
    ddp = DDPBench(spec, ranks, min(micro_batch_sizes), step) if times_ddp(device, ranks) else None
    with one_thread():
        if concurrent > 1:
            then = [*([over_all] if over_all.wraps else []), bench, *([ddp] if ddp else []),
                    *([pipeline] if pipeline else []), optimizer]
            layers, pace = measure_layers_concurrently(cases, timing, concurrent, on_round=step, then=then)
        else:
            layers, pace = layer_profiles(cases, [time_cases(cases, timing, sync, on_round=step)])
        info = DeviceInfo(device=device, name=device_name(dev), torch_version=torch.__version__, threads=1,
                          matmul_tflops=matmul_tflops(dev, dtype, sync),
                          date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
        optimizer_bytes = optimizer.bytes_per_param or optimizer_bytes_per_param(mixed_precision=device == "cuda")
        step("device")
    collectives = bench.fits() if bench else measure_collectives(ranks, device, comm, on_done=step)
    after_compute = bench.after_compute_extra_s(collectives) if bench else None
    tp_blocks, fsdp_blocks = over_all.timings()  # timed only on CPU with 2+ ranks, i.e. when concurrent > 1
    for world in sorted(set(tp_worlds) - {ranks}):
        tp, _ = measure_sharded_blocks(spec, world, True, False, micro_batch_sizes, sharded, on_done=step)
        tp_blocks = sorted(tp_blocks + tp, key=lambda b: (b.tp, b.micro_batch_size))
    precision = Precision.BF16 if device == "cuda" else Precision.FP32
    runtime = None
    if calibrate and any(lp.tp == 1 for lp in layers):
        with one_thread():
            runtime = calibrate_runtime(spec, layers, precision, device, optimizer_bytes, concurrent, optimizer.adamw)
    step("runtime calibration")
    return Profile(model=spec, precision=precision, device=info, layers=layers, collectives=collectives,
                   optimizer_bytes_per_param=optimizer_bytes, runtime=runtime, tp_blocks=tp_blocks,
                   fsdp_blocks=fsdp_blocks, pipeline=pipeline.calibration() if pipeline else None, pace=pace,
                   collective_after_compute_s=after_compute, ddp_sync=ddp.result if ddp else None)
