"""Time DDP's gradient reduction as the runtime runs it: the whole model wrapped in torch DDP over all ranks, a
forward and backward with gradient sync against one without (no_sync), alternating.

A profile used to price every gradient reduction's stay beyond its fitted call from a synthetic all-reduce after
20 ms of matmuls (runtime/profile_comm.py after_compute), and it drew 0.06-3.94 ms in eight profiles on this
2-vCPU VM (1.9-2.7 ms in four runs of the collective benchmark alone). DDP meets it differently: its first
bucket goes out while backward still computes, and its last right after. Measured on tiny-gpt (2 gloo ranks,
16 pairs a round, 7 rounds over two launches): a synced step took 3.5-5.9 ms (mean 4.9) more than an unsynced
one, where its two buckets' fitted calls with their stall come to ~2.7 ms; so ~1.1 ms a bucket beyond the fit,
against the synthetic benchmark's ~2.2. planner/profiled.py spreads the measured excess over DDP's buckets.
"""
from __future__ import annotations

import contextlib
import gc
import statistics
import time
from typing import Callable

import torch

from planner.profile import DDPSyncTiming
from planner.specs import ModelSpec
from runtime.spawned import report_and_leave, report_failure

WARMUP_STEPS = 3
"""Synced steps before timing: DDP rebuilds its buckets in the order backward produced the gradients after the
first one."""
PAIRS = 24
"""Timed (synced, unsynced) pairs, in alternating order. 16 pairs gave the excess to about +-1 ms (7 rounds)."""


class DDPBench:
    """The DDP timing as one part of a spawned job (runtime/profile_concurrent.py runs it in the processes that
    timed the layers); rank 0's message carries the medians and DDP's bucket sizes."""

    def __init__(self, spec: ModelSpec, world: int, micro_batch_size: int,
                 on_done: Callable[[str], None] | None = None, timeout_s: float = 120.0):
        from runtime.launch import free_port

        self.spec, self.world, self.mbs = spec, world, micro_batch_size
        self.on_done, self.timeout_s = on_done, timeout_s
        self.port = free_port()
        self.result: DDPSyncTiming | None = None
        self.done = False

    def rank_job(self, rank: int) -> tuple[Callable[..., None], tuple]:
        """What rank ``rank`` runs: ddp_rank(*args, results)."""
        return ddp_rank, (rank, self.world, self.port, self.spec, self.mbs)

    def handle(self, msg: tuple) -> bool:
        if msg[0] == "ddp":
            synced, unsynced, buckets = msg[1:]
            self.result = DDPSyncTiming(micro_batch_size=self.mbs, dp=self.world, synced_s=synced,
                                        unsynced_s=unsynced, bucket_bytes=buckets)
            self.done = True
            if self.on_done is not None:
                self.on_done(f"DDP gradient sync x{self.world}")
        return self.done


def ddp_rank(rank: int, world: int, port: int, spec: ModelSpec, mbs: int, results) -> None:
    """One rank: the whole model under DDP as runtime/parallel/data.py wraps it (gradient_as_bucket_view), fp32;
    rank 0 sends ("ddp", median synced step, median unsynced step, [bucket bytes]), each step the slowest rank's."""
    try:
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel

        from runtime.model import Transformer, lm_loss

        torch.set_num_threads(1)  # one thread per rank, as the runtime runs
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        model = DistributedDataParallel(Transformer(spec, seed=0), gradient_as_bucket_view=True)
        gen = torch.Generator().manual_seed(rank)
        tokens = torch.randint(0, spec.vocab_size, (mbs, spec.seq_len), generator=gen)

        def step(sync: bool) -> float:
            dist.barrier()
            t0 = time.perf_counter()
            with contextlib.nullcontext() if sync else model.no_sync():
                lm_loss(model(tokens), tokens).backward()
            return time.perf_counter() - t0

        for _ in range(WARMUP_STEPS):
            step(True)
        times: dict[bool, list[float]] = {True: [], False: []}
        for i in range(PAIRS):
            for sync in ((True, False) if i % 2 else (False, True)):
                times[sync].append(step(sync))
        medians = []
        for sync in (True, False):
            slowest = torch.tensor(times[sync], dtype=torch.float64)
            dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
            medians.append(statistics.median(slowest.tolist()))
        logged = model._get_ddp_logging_data()  # its buckets after the rebuild, e.g. "1048576, 698880"
        sizes = str(logged.get("rebuilt_bucket_sizes") or logged.get("bucket_sizes", ""))
        buckets = [int(s) for s in sizes.split(",") if s.strip()]
        # DDP's reducer holds the process group: freed after destroy_process_group, its ProcessGroupGloo
        # destructor hung joining a gloo worker thread (seen once in ~10 profiles), so it goes first
        del model, step
        gc.collect()
        report_and_leave(dist, results, rank, ("ddp", *medians, buckets))
    except Exception as e:  # the parent turns this into one RuntimeError
        report_failure(results, rank, e)
