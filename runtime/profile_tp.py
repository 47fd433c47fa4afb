"""Time one transformer block as the runtime runs it under tensor parallelism: DTensor-sharded over ``tp`` spawned
local ranks (runtime/parallel/tensor.py's plan), collectives included.

The layer profile times a TP degree as its shard, a plain block of hidden/t width, and prices the collectives
from the alpha-beta fits. On CPU with gloo that missed most of a TP step: DTensor dispatches every sharded op in
Python and redistributes through extra collectives, and `mpplan validate` measured TP plans 3-6x slower than
predicted from shard + fitted all-reduces. This measures the real thing; planner/profiled.py prefers it for blocks.

Timing as runtime/profile_layers.py: warm-up samples, then the median of ``repeats`` samples, each repeating
forward + backward until it lasts ``min_sample_s``; a sample's time is the slowest rank's.
"""
from __future__ import annotations

import math
import multiprocessing as mp
import queue
import statistics
import time
import traceback
from typing import Callable, Sequence

from planner.profile import TPBlockTiming
from planner.specs import ModelSpec
from runtime.profile_layers import TimingConfig, coefficient_of_variation


def measure_tp_blocks(spec: ModelSpec, tp: int, micro_batch_sizes: Sequence[int], timing: TimingConfig = TimingConfig(),
                      timeout_s: float = 300.0, on_done: Callable[[str], None] | None = None) -> list[TPBlockTiming]:
    """Spawn ``tp`` CPU ranks (gloo, one thread each) and time the DTensor block at every micro-batch size."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    from runtime.launch import free_port

    port = free_port()
    procs = [ctx.Process(target=_worker, args=(rank, tp, port, spec, list(micro_batch_sizes), timing, results),
                         daemon=True) for rank in range(tp)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            try:
                msg = results.get(timeout=1.0)
            except queue.Empty:
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(f"TP block benchmark rank died with exit code {dead[0].exitcode}") from None
                if time.monotonic() > deadline:
                    raise RuntimeError(f"TP block benchmark did not finish in {timeout_s:.0f} s") from None
                continue
            if msg[0] == "error":
                raise RuntimeError(f"TP block benchmark rank {msg[1]} failed: {msg[2]}")
            if msg[0] == "done":
                if on_done is not None:
                    on_done(f"tensor-parallel block x{tp}")
                return msg[1]
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()
                p.join()


def _worker(rank: int, tp: int, port: int, spec: ModelSpec, sizes: list[int], timing: TimingConfig, results) -> None:
    try:
        import torch
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor.parallel import parallelize_module

        from runtime.model import Block
        from runtime.profile_layers import InitHolder, init_weights
        from runtime.parallel.tensor import block_plan

        torch.set_num_threads(1)  # one thread per rank, as the runtime runs
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=tp)
        mesh = init_device_mesh("cpu", (tp,))
        block = Block(spec)
        init_weights(InitHolder(spec, block), 0)
        parallelize_module(block, mesh, block_plan(spec.flavour == "llama", sp=False))
        out = []
        for mbs in sizes:
            gen = torch.Generator().manual_seed(mbs)
            x = torch.randn(mbs, spec.seq_len, spec.hidden_size, generator=gen).requires_grad_(True)
            grad = torch.randn(mbs, spec.seq_len, spec.hidden_size, generator=gen)
            fwds, bwds = _time(block, x, grad, timing, dist)
            out.append(TPBlockTiming(tp=tp, micro_batch_size=mbs, fwd_s=statistics.median(fwds),
                                     bwd_s=statistics.median(bwds), fwd_cv=coefficient_of_variation(fwds),
                                     bwd_cv=coefficient_of_variation(bwds)))
        if rank == 0:
            results.put(("done", out))
        dist.barrier()
        dist.destroy_process_group()
    except Exception as e:  # the parent turns this into one RuntimeError
        results.put(("error", rank, f"{type(e).__name__}: {e} [{traceback.format_exc().strip().splitlines()[-2]}]"))
        raise SystemExit(1)


def _time(block, x, grad, timing: TimingConfig, dist) -> tuple[list[float], list[float]]:
    import torch

    def one() -> tuple[float, float]:
        t0 = time.perf_counter()
        y = block(x)
        t1 = time.perf_counter()
        y.backward(grad)
        t2 = time.perf_counter()
        x.grad = None
        return t1 - t0, t2 - t1

    one()
    f, b = one()
    # every rank must make the same number of calls: agree on the slowest rank's count
    calls = torch.tensor([max(1, math.ceil(timing.min_sample_s / max(f + b, 1e-7)))])
    dist.all_reduce(calls, op=dist.ReduceOp.MAX)
    samples = []
    for i in range(timing.warmup + timing.repeats):
        pairs = [one() for _ in range(int(calls.item()))]
        if i >= timing.warmup:
            samples.append((sum(p[0] for p in pairs) / len(pairs), sum(p[1] for p in pairs) / len(pairs)))
    slowest = torch.tensor(samples, dtype=torch.float64)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    return slowest[:, 0].tolist(), slowest[:, 1].tolist()

