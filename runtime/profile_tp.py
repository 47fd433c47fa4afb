"""Time a transformer block as the runtime runs it under tensor parallelism (DTensor-sharded over ``tp``
spawned local ranks, runtime/parallel/tensor.py's plan) or under ZeRO 2 / 3 (FSDP2 over ``dp`` ranks),
collectives included: a chain of such blocks, as a stage runs them (CHAIN_BLOCKS), per block.

The layer profile times a TP degree as its shard, a plain block of hidden/t width, and prices the collectives
from the alpha-beta fits. On CPU with gloo that missed most of a TP step: DTensor dispatches every sharded op in
Python and redistributes through extra collectives, and `mpplan validate` measured TP plans 3-6x slower than
predicted from shard + fitted all-reduces. This measures the real thing; planner/profiled.py prefers it for
blocks. Likewise FSDP2 on CPU: its hooks and per-micro-batch parameter gathers made ZeRO 2 / 3 plans run
1.6-2.7x their prediction.

Timing as runtime/profile_layers.py: warm-up samples, then the median of ``repeats`` samples, each repeating
the chain's forward + backward until it lasts ``min_sample_s``; a sample's time is the slowest rank's.

Why a median here and not the layers' fastest call x pace: a wrapped block waits on gloo inside every call, and that
wait varies from call to call whatever the vCPU's speed. Measured here (2 ranks, tiny-gpt, four runs of this
benchmark alone): its mean was 1.5-2.7x its fastest call (slowest rank per call), against a layer pace of 1.2-1.6,
so the fastest call x pace would have priced these blocks at 0.45-1.05x their mean, most often ~0.8x. Its medians
moved up to 65 % between those runs, the fastest call up to 57 % (benchmarks/profile_stability.py: 43-53 % between
profiles).
"""
from __future__ import annotations

import math
import statistics
import time
from typing import Callable, Sequence

from planner.profile import FSDPBlockTiming, TPBlockTiming
from planner.specs import ModelSpec
from runtime.profile_layers import TimingConfig, coefficient_of_variation
from runtime.spawned import report_and_leave, report_failure, run_spawned

# A run's stage chains its blocks: forward through all, then one backward. Timed so, FSDP2's ZeRO-2 block cost
# 11-22 % less a block than when each call was one block's forward + backward (chains of 8, tiny-gpt, 2 ranks,
# three launches); DTensor TP blocks the same within 5 %. Each sample also averages CHAIN_BLOCKS calls, which a
# wrapped block's 30-60 % spread from call to call needs (coefficients of variation of tiny-gpt's profiles).
CHAIN_BLOCKS = 4


def measure_sharded_blocks(spec: ModelSpec, world: int, tp: bool, fsdp: bool, micro_batch_sizes: Sequence[int],
                           timing: TimingConfig = TimingConfig(), timeout_s: float = 300.0,
                           on_done: Callable[[str], None] | None = None
                           ) -> tuple[list[TPBlockTiming], list[FSDPBlockTiming]]:
    """Spawn ``world`` CPU ranks (gloo, one thread each) once and time, at every micro-batch size, the block under
    DTensor TP over all of them (``tp``) and as wrapped for ZeRO 2 and 3 (``fsdp``: FSDP2 fully_shard,
    reshard_after_forward for 3) in a micro-batch that does not reduce gradients, i.e. the parameter gathers and
    FSDP2's hooks that every micro-batch pays (runtime/parallel/data.py)."""
    bench = ShardedBench(spec, world, tp, fsdp, micro_batch_sizes, timing, on_done, timeout_s)
    if bench.wraps:
        run_spawned(block_rank, lambda ctx: [bench.rank_args(rank) for rank in range(world)],
                    f"{bench.label} benchmark", bench.timeout_s, bench.handle)
    return bench.timings()


class ShardedBench:
    """The sharded-block timing as one part of a spawned job (as runtime/profile_comm.py's CollectiveBench): what
    each rank's block_rank takes, what the parent does with its message, and the timings once it is done.
    runtime/profile_concurrent.py runs it in the processes that timed the layers and the collectives, which saves
    a launch of torch in fresh processes (~3 s)."""

    def __init__(self, spec: ModelSpec, world: int, tp: bool, fsdp: bool, micro_batch_sizes: Sequence[int],
                 timing: TimingConfig, on_done: Callable[[str], None] | None, timeout_s: float = 300.0):
        from runtime.launch import free_port

        self.spec, self.world, self.sizes, self.timing = spec, world, list(micro_batch_sizes), timing
        self.on_done, self.timeout_s = on_done, timeout_s
        self.wraps = (["tp"] if tp else []) + (["zero2", "zero3"] if fsdp else [])
        self.label = f"{'/'.join(self.wraps)} blocks x{world}"
        self.port = free_port()
        self.measured: list[list[tuple[float, float, float, float]]] = []
        self.done = not self.wraps

    def rank_args(self, rank: int) -> tuple:
        return rank, self.world, self.port, self.spec, self.wraps, self.sizes, self.timing

    def rank_job(self, rank: int) -> tuple[Callable[..., None], tuple]:
        """What rank ``rank`` runs: block_rank(*args, results)."""
        return block_rank, self.rank_args(rank)

    def handle(self, msg: tuple) -> bool:
        """Takes one message from a rank; True once the timings are in."""
        if msg[0] == "blocks":
            self.measured, self.done = msg[1], True
            if self.on_done is not None:
                self.on_done(self.label)
        return self.done

    def timings(self) -> tuple[list[TPBlockTiming], list[FSDPBlockTiming]]:
        """Per wrap, per micro-batch size, the slowest rank's medians (TP) or means (FSDP2) (empty lists for what
        was not timed)."""
        per_wrap = dict(zip(self.wraps, self.measured))
        tp_blocks = [TPBlockTiming(tp=self.world, micro_batch_size=mbs, fwd_s=f, bwd_s=b, fwd_cv=fcv, bwd_cv=bcv)
                     for mbs, (f, b, fcv, bcv) in zip(self.sizes, per_wrap.get("tp", []))]
        fsdp_blocks = [FSDPBlockTiming(zero=zero, dp=self.world, micro_batch_size=mbs, fwd_s=f, bwd_s=b,
                                       fwd_cv=fcv, bwd_cv=bcv)
                       for zero in (2, 3)
                       for mbs, (f, b, fcv, bcv) in zip(self.sizes, per_wrap.get(f"zero{zero}", []))]
        return tp_blocks, fsdp_blocks


def block_rank(rank: int, world: int, port: int, spec: ModelSpec, wraps: list[str], sizes: list[int],
               timing: TimingConfig, results) -> None:
    """One rank of the sharded-block timing; its one message (\"blocks\", timings) goes to ShardedBench.handle."""
    try:
        import torch
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor.parallel import parallelize_module

        from runtime.model import Block
        from runtime.profile_layers import InitHolder, init_weights
        from runtime.parallel.tensor import block_plan

        torch.set_num_threads(1)  # one thread per rank, as the runtime runs
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        mesh = init_device_mesh("cpu", (world,))
        out = []
        for wrap in wraps:
            chain = []
            for i in range(chain_length(spec)):
                block = Block(spec)
                init_weights(InitHolder(spec, block), i)
                if wrap == "tp":
                    parallelize_module(block, mesh, block_plan(spec.flavour == "llama", sp=False))
                else:  # as runtime/parallel/data.py wraps each block for ZeRO 2 / 3, in a non-reducing micro-batch
                    block = fully_shard(block, mesh=mesh, reshard_after_forward=wrap == "zero3")
                    block.set_requires_gradient_sync(False)
                chain.append(block)
            per_size = []
            for mbs in sizes:
                gen = torch.Generator().manual_seed(mbs)
                x = torch.randn(mbs, spec.seq_len, spec.hidden_size, generator=gen).requires_grad_(True)
                grad = torch.randn(mbs, spec.seq_len, spec.hidden_size, generator=gen)
                fwds, bwds = _time(chain, x, grad, timing, dist)
                # FSDP2's per-call stalls are part of what a step pays (planner/profile.py FSDPBlockTiming)
                centre = statistics.median if wrap == "tp" else statistics.fmean
                per_size.append((centre(fwds), centre(bwds), coefficient_of_variation(fwds),
                                 coefficient_of_variation(bwds)))
            out.append(per_size)
        report_and_leave(dist, results, rank, ("blocks", out))
    except Exception as e:  # the parent turns this into one RuntimeError
        report_failure(results, rank, e)


def chain_length(spec: ModelSpec) -> int:
    """Blocks timed one after another, as a stage runs them: up to CHAIN_BLOCKS, never more than the model has."""
    return max(1, min(CHAIN_BLOCKS, spec.num_layers))


def _time(chain: list, x, grad, timing: TimingConfig, dist) -> tuple[list[float], list[float]]:
    """Per block: the chain's forward and its one backward, each divided by the chain's length."""
    import torch

    def one() -> tuple[float, float]:
        t0 = time.perf_counter()
        y = x
        for block in chain:
            y = block(y)
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
        if i >= timing.warmup:  # per block: each call ran every block of the chain once
            block_calls = len(pairs) * len(chain)
            samples.append((sum(p[0] for p in pairs) / block_calls, sum(p[1] for p in pairs) / block_calls))
    slowest = torch.tensor(samples, dtype=torch.float64)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    return slowest[:, 0].tolist(), slowest[:, 1].tolist()

