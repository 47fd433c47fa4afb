"""Collective micro-benchmarks among local ranks (gloo on CPU, nccl on CUDA) and their alpha-beta fits.

``measure_collectives(ranks=2)`` spawns ``ranks`` processes that meet over 127.0.0.1, times all_reduce (SUM),
all_gather, reduce_scatter (SUM) and a send/recv ping-pong over geometric message sizes, for every group size
2, 4, ... up to ``ranks`` (and ``ranks`` itself), and fits ``time = alpha + beta * nbytes`` (piecewise where the
data show a knee) to a size in every octave from 1 KiB to 64 MiB (2^(k + 1/4): CommConfig.sizes says why not
2^k), and, apart, to the powers of two themselves from 64 KiB, which gloo moves more slowly than the sizes
around them;
extra sizes in the middle of the gaps of the grid are measured the same way but held out of the fits and report
how well they predict sizes they never saw.

Timing: ``rounds`` passes; a size is due calls(size) calls in all, spread over min(rounds, calls) of the passes
(a 64 MiB message, 8 calls, is visited in 8 passes of the 24, a 1 KiB one, 72 calls, in all 24), each pass visits its
(op, size)s in a shuffled order (the same on every rank), and every call is timed on its own after a barrier (and,
the first time an (op, size) is visited, a warm-up call: measured here, the first call of a later visit was no
slower than the second, 4-64 MiB, so a warm-up per visit only doubled the cost of the large sizes); a call's time
is the slowest rank's, and the point is the mean of the faster half of the calls of all passes. On this 2-vCPU
VM gloo calls stall for ~4 ms in spells (10-50 % of calls for a second or more, then none), so below ~2 MiB a
size's calls fall in two groups, ~0.3 ms and ~4 ms. Their median flipped between the two from
one size to the next (1 MiB all_reduce: median 2.2 ms, 1.5 MiB: 1.4 ms), and held-out sizes missed the fit by
20-95 %; the faster half holds the unstalled calls while at most half the calls stall. Its mean moved less
between runs than the lower quartile (which is one call's time): over 3 runs of 4 ops the worst held-out size was
12-29 % off (4 of 12 over 20 %), against 10-33 % (6 of 12) for the lower quartile; the fastest call, 17-81 %,
since the luckiest call of many is not the typical one. Visiting sizes in
order let one spell bend several neighbouring sizes, which the fit then took for a knee; the shuffle spreads each
spell thinly over all sizes, and more visits of fewer calls each keep one spell from owning a size. The fit is to
the unstalled call; how much the mean exceeds it (stall_of) is kept beside the fit, since a step that makes many
calls pays the mean.
"""
from __future__ import annotations

import math
import random
import statistics
import time
from dataclasses import dataclass
from typing import Callable

from planner.collectives import CollectiveFit, CollectiveOp, fit_collective, is_power_of_two
from runtime.spawned import report_failure, run_spawned

OPS: tuple[CollectiveOp, ...] = ("all_reduce", "all_gather", "reduce_scatter", "send_recv")


@dataclass(frozen=True)
class CommConfig:
    min_bytes: int = 1 << 10
    max_bytes: int = 64 << 20
    warmup_calls: int = 1
    """Untimed calls before the first timed call of each (op, size)."""
    rounds: int = 24
    """Passes over the ops and sizes, each in a shuffled order; a size with fewer calls than passes is visited in
    as many passes as it has calls."""
    sample_bytes: int = 64 << 20
    """Each size is timed over calls moving about this many bytes in all, within [min_calls, max_calls]."""
    min_calls: int = 8
    max_calls: int = 72
    """Caps the small sizes (below ~900 KiB), which move few bytes a call and are latency-bound: 3 calls in each
    of the 24 passes. What makes a size's time repeatable is how many passes it is spread over, not how many calls
    a pass makes (the VM's slow spells last seconds): in 8 runs, timing only the first 3 of each pass's 4 calls
    (96 in all) left the held-out error as it was (rms 7.7 % below 64 KiB, 8.0 % to 1 MiB, against 7.6 and
    7.9 %), the first 2 raised it to 9.1 % between 64 KiB and 1 MiB, while every other pass alone raised the
    worst held-out size per op from 17 to 25 % on average. 72 rather than 96 saves ~3 s of the profile."""
    timeout_s: float = 300.0

    holdout_stride: int = 2
    """Every how many gaps of the fitted grid a held-out size is measured in (benchmarks/profile_stability.py
    measures all of them; the profile, every other one, to keep under a minute)."""

    aligned_min_bytes: int = 64 << 10
    """The smallest power of two fitted on its own (aligned_sizes). Below it a power of two is priced by the main
    fit: over 8 runs, 1 to 32 KiB came within 6 % of it on average for every op (latency-bound: where the bytes
    sit does not matter), while from 64 KiB up send_recv cost 10-14 % more and from 256 KiB every op 5-18 % more.
    Not measuring the 6 sizes below saves ~2.7 s of the profile."""

    def powers_of_two(self, lo: int) -> list[int]:
        return [1 << e for e in range(int(math.log2(lo)), int(math.log2(self.max_bytes)) + 1)]

    def aligned_sizes(self) -> list[int]:
        """The powers of two from aligned_min_bytes (or min_bytes, if larger) to max_bytes (64 KiB .. 64 MiB:
        11), fitted on their own."""
        return self.powers_of_two(max(self.min_bytes, self.aligned_min_bytes))

    def sizes(self) -> list[int]:
        """The sizes the main fit is made from, which prices every message but an exact 2^k: a quarter of an
        octave above each power of two but the last (2^(k + 1/4) rounded to 256 bytes: 1.25 KiB .. 38 MiB), and
        max_bytes itself, so that a knee at 32 MiB has the two points a piece needs (17 in all).

        Why not the powers of two themselves: on gloo they are not typical sizes. Sweeps of all_reduce between
        256 KiB and 2 MiB (2 ranks, 12 sizes an octave) found 2^k and 2^k - 256 B 15-50 % slower than the sizes
        a few percent around them (512 KiB 1.42 ms against 1.1-1.3 ms from 542 to 724 KiB), while 0.98 x 2^k was
        not. Fitted to the powers of two, the fit priced the sizes held out between them (sqrt(2) x 2^k) 7-38 %
        high from 181 KiB to 1.4 MiB in every run; fitting 1.5 x 2^k as well did not help (5-30 % high between
        them), nor did MALLOC_MMAP_THRESHOLD_. Fitted to 2^(k + 1/4), in two runs beside the power-of-two fit:
        the worst held-out size per op 11-21 % (against 15-38 %), and the powers of two, priced by that fit,
        came out 4-16 % low on average per op from 256 KiB to 4 MiB (up to 24 %) and 41-43 % low for all_gather
        at 32 MiB (glibc's mmap threshold, planner/collectives.py fit_pieces): hence their own fit, from
        aligned_min_bytes up."""
        return [round(n * 2 ** 0.25 / 256) * 256 for n in self.powers_of_two(self.min_bytes)[:-1]] + [self.max_bytes]

    def holdout_sizes(self) -> list[int]:
        """Measured, not fitted: the geometric middle of every ``holdout_stride``-th gap of the fitted grid
        (2^(k + 3/4) rounded to 256 bytes), as far from what the fits saw as a size can be (1.75 KiB, 7 KiB ..
        27 MiB: 8 sizes at the default stride of 2; all 16 gaps at 1)."""
        grid = self.sizes()
        gaps = list(zip(grid, grid[1:]))[::self.holdout_stride]
        return sorted({round(math.sqrt(a * b) / 256) * 256 for a, b in gaps} - set(grid) - set(self.aligned_sizes()))

    def calls_per_size(self, nbytes: int) -> int:
        return max(self.min_calls, min(self.max_calls, self.sample_bytes // max(nbytes, 1)))

    def calls_in_round(self, nbytes: int, round_: int) -> int:
        """Calls of this size timed in pass ``round_``: calls_per_size spread as evenly as whole calls allow over
        min(rounds, calls) passes spaced through all ``rounds`` (0 in the passes it skips)."""
        calls = self.calls_per_size(nbytes)
        visits = min(self.rounds, calls)
        visited = [i * self.rounds // visits for i in range(visits)]
        if round_ not in visited:
            return 0
        i = visited.index(round_)
        return calls // visits + (1 if i < calls % visits else 0)


def group_sizes(ranks: int) -> list[int]:
    """2, 4, 8, ... up to ranks, and ranks itself."""
    sizes = [1 << e for e in range(1, int(math.log2(ranks)) + 1)] if ranks >= 2 else []
    return sorted({*sizes, ranks} - {1})


def measure_collectives(ranks: int = 2, device: str = "cpu", config: CommConfig = CommConfig(),
                        on_done: Callable[[str], None] | None = None) -> list[CollectiveFit]:
    """Spawn ``ranks`` processes, time every op at every group size, fit each. ``on_done(label)`` is called
    after each round of each group size. A rank that fails raises RuntimeError with its traceback's last line."""
    if ranks < 2:
        return []
    bench = CollectiveBench(ranks, device, config, on_done)
    run_spawned(benchmark_rank, lambda ctx: [bench.rank_args(rank) for rank in range(ranks)], "collective benchmark",
                bench.timeout_s, bench.handle)
    return bench.fits()


class CollectiveBench:
    """The collective benchmark as one part of a spawned job: what each rank's benchmark_rank takes, what the
    parent does with each message, and the fits once it is done (runtime/profile_concurrent.py runs it in the
    processes that timed the layers, which saves a launch)."""

    def __init__(self, ranks: int, device: str, config: CommConfig, on_done: Callable[[str], None] | None):
        from runtime.launch import free_port

        self.ranks, self.device, self.config, self.on_done = ranks, device, config, on_done
        self.timeout_s = config.timeout_s
        self.port = free_port()
        self.raw: dict[tuple[str, int], tuple[list[tuple[int, float]], list[tuple[int, float]], float]] = {}
        self.after_compute: tuple[int, float] | None = None  # (bytes, mean seconds), from _RankBench.after_compute
        self.done = False

    def rank_args(self, rank: int) -> tuple:
        return rank, self.ranks, self.port, self.device, self.config

    def rank_job(self, rank: int) -> tuple[Callable[..., None], tuple]:
        """What rank ``rank`` runs: benchmark_rank(*args, results)."""
        return benchmark_rank, self.rank_args(rank)

    def handle(self, msg: tuple) -> bool:
        """Takes one message from a rank; True once the benchmark is complete."""
        if msg[0] == "progress" and self.on_done is not None:
            self.on_done(msg[1])
        if msg[0] == "points":
            _, op, group, fitted, held, aligned, stall = msg
            self.raw[(op, group)] = (fitted, held, aligned, stall)
        if msg[0] == "after_compute":
            self.after_compute = (msg[1], msg[2])
        self.done = self.done or msg[0] == "done"
        return self.done

    def fits(self) -> list[CollectiveFit]:
        return [fit_collective(op, group, fitted, held, stall_s=stall, aligned=aligned)
                for (op, group), (fitted, held, aligned, stall) in self.raw.items()]

    def after_compute_extra_s(self, fits: list[CollectiveFit] | None = None) -> float | None:
        """What an all-reduce issued right after compute pays beyond the fit's mean call (expected_s), floored at
        0; None where it was not measured (CUDA, or no all-reduce fit over all ranks)."""
        fit = next((f for f in fits or self.fits() if (f.op, f.group_size) == ("all_reduce", self.ranks)), None)
        if self.after_compute is None or fit is None:
            return None
        nbytes, mean_s = self.after_compute
        return max(0.0, mean_s - fit.expected_s(nbytes))


STALL_MAX_BYTES = 1 << 20
"""Sizes whose mean - faster half's mean estimates the stall: above ~1 MiB a call's own spread swamps it."""


def stall_of(stats: dict[int, tuple[float, float]]) -> float:
    """The typical (median) mean - faster half's mean per call over sizes up to STALL_MAX_BYTES, floored at 0;
    measured (against the lower quartile) it is about constant per op below 1 MiB (all_reduce ~1 ms,
    reduce_scatter ~0.8, all_gather and send/recv ~0.3) and the same in repeated runs."""
    excess = [mean - typical for n, (typical, mean) in stats.items() if n <= STALL_MAX_BYTES]
    return max(0.0, statistics.median(excess)) if excess else 0.0


AFTER_COMPUTE_BYTES = 256 << 10
"""The all-reduce timed after compute (_RankBench.after_compute). Measured on this 2-vCPU VM (2 gloo ranks, 20
calls each after 0 / 30 / 100 ms of matmuls): 1.75 MB took 0.9-1.0 ms (median) back to back and 2.8-3.9 ms after
compute (mean 3.6-3.9 against 1.6-2.0), 16 KiB 1.8 ms after 30 ms of compute against 0.4 back to back: a
collective that meets a rank which was computing pays ~1.5-2 ms more, at any size (the rank's gloo thread and
the loopback's receive path wake up first). A 2-rank DDP step of tiny-gpt (mbs 4 x 2) took 5-7 ms longer with an
explicit all-reduce of its 1.75 MB of gradients than without, against the fit's 1.8 ms. Three profiles that
afternoon measured the excess over the fit's mean call at 1.6-3.9 ms."""


# ----------------------------------------------------------------------------------------------- in a rank

def benchmark_rank(rank: int, world: int, port: int, device: str, config: CommConfig, results) -> None:
    """One rank of the collective benchmark; its messages go to CollectiveBench.handle."""
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)  # one thread per rank, as the runtime runs (facts: 2 threads double under load)
        backend = "nccl" if device == "cuda" else "gloo"
        if device == "cuda":
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        bench = _RankBench(torch, dist, rank, world, device, config)
        for group in group_sizes(world):
            members = list(range(group))
            pg = dist.new_group(members)  # every rank must call new_group, members or not
            ops = [op for op in OPS if op != "send_recv" or group == 2]  # point-to-point is a pair
            times: dict[tuple[str, int], list[float]] = {}
            moved: dict[tuple[str, int], int] = {}
            for round_ in range(config.rounds):
                if rank in members:
                    bench.run_round(ops, group, pg, times, moved, round_, seed=group * 1000 + round_)
                dist.barrier()
                if rank == 0:
                    results.put(("progress", f"collectives x{group} round {round_ + 1}/{config.rounds}"))
            if rank in members:
                for op in ops:
                    stats = {n: bench.slowest_stats(times[(op, n)], pg) for n in bench.all_sizes()}
                    # by the size asked for: the bytes moved differ where a group does not divide it
                    fitted, held, aligned = ([(moved[(op, n)], stats[n][0]) for n in sizes] for sizes in
                                             (config.sizes(), config.holdout_sizes(), config.aligned_sizes()))
                    # a group of 3 moves 2^k rounded to the group: no longer a power of two, so not "aligned"
                    aligned = [(n, t) for n, t in aligned if is_power_of_two(n)]
                    if rank == 0:
                        results.put(("points", op, group, fitted, held, aligned, stall_of(stats)))
            dist.barrier()
        if device == "cpu":
            mean_s = bench.after_compute(AFTER_COMPUTE_BYTES)
            if rank == 0:
                results.put(("after_compute", AFTER_COMPUTE_BYTES, mean_s))
        if rank == 0:
            results.put(("done",))
        dist.destroy_process_group()
    except Exception as e:  # the parent turns this into one RuntimeError
        report_failure(results, rank, e)


class _RankBench:
    def __init__(self, torch, dist, rank: int, world: int, device: str, config: CommConfig):
        self.torch, self.dist, self.rank, self.world, self.config = torch, dist, rank, world, config
        self.device = torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else torch.device("cpu")
        self.dtype = torch.bfloat16 if device == "cuda" else torch.float32
        self.sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        # all_gather_single / reduce_scatter_single are the non-deprecated names in torch 2.13; older torch has
        # only the *_into_tensor / *_tensor spellings.
        self.all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        self.reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
        self.buffers: dict[str, object] = {}

    def buffer(self, name: str, numel: int):
        """The first ``numel`` elements of one buffer per role, allocated (and written, so its pages exist) once
        at the largest size and reused by every visit, as a training step reuses its buffers. A fresh untouched
        receive buffer per visit made send/recv at 24-64 MiB pay its page faults: 36-45 ms against 20 ms."""
        if name not in self.buffers:
            largest = max(self.all_sizes()) // (self.torch.finfo(self.dtype).bits // 8)
            self.buffers[name] = self.torch.zeros(largest, dtype=self.dtype, device=self.device)
        return self.buffers[name][:numel]

    def all_sizes(self) -> list[int]:
        return sorted({*self.config.sizes(), *self.config.holdout_sizes(), *self.config.aligned_sizes()})

    def run_round(self, ops: list[CollectiveOp], group: int, pg, times: dict, moved: dict, round_: int,
                  seed: int) -> None:
        """One pass: the (op, size)s due calls in pass ``round_``, in an order shuffled by ``seed`` (so the same on
        every rank), each call timed on its own."""
        visits = [(op, nbytes) for op in ops for nbytes in self.all_sizes()
                  if self.config.calls_in_round(nbytes, round_) > 0]
        random.Random(seed).shuffle(visits)
        for op, nbytes in visits:
            call, moved[(op, nbytes)] = self._call(op, group, pg, nbytes)
            per_round = self.config.calls_in_round(nbytes, round_)
            self.dist.barrier(group=pg)
            bucket = times.setdefault((op, nbytes), [])
            for _ in range(0 if bucket else self.config.warmup_calls):
                call()
            for _ in range(per_round):
                self.sync()
                t0 = time.perf_counter()
                call()
                self.sync()
                bucket.append(time.perf_counter() - t0)

    def after_compute(self, nbytes: int, calls: int = 12, warmup: int = 2, busy_s: float = 0.02) -> float:
        """Mean seconds of an all-reduce of ``nbytes`` over all ranks issued right after ``busy_s`` of compute on
        every rank (what DDP's gradient all-reduce and FSDP2's reduce-scatters meet in a step), the slowest rank's
        mean. The benchmark above times calls back to back; see AFTER_COMPUTE_BYTES for what compute before one
        adds here."""
        torch, dist = self.torch, self.dist
        full = torch.ones(nbytes // (torch.finfo(self.dtype).bits // 8), dtype=self.dtype, device=self.device)
        a = torch.randn(128, 128, dtype=self.dtype, device=self.device)
        times = []
        for i in range(warmup + calls):
            dist.barrier()
            start = time.perf_counter()
            while time.perf_counter() - start < busy_s:
                a @ a
            self.sync()
            t0 = time.perf_counter()
            dist.all_reduce(full)
            self.sync()
            if i >= warmup:
                times.append(time.perf_counter() - t0)
        mean = torch.tensor([statistics.fmean(times)], dtype=torch.float64, device=self.device)
        dist.all_reduce(mean, op=dist.ReduceOp.MAX)
        return mean.item()

    def slowest_stats(self, times: list[float], pg) -> tuple[float, float]:
        """A call's time is the slowest rank's; (mean of the faster half, mean) over the calls."""
        slowest = self.torch.tensor(times, dtype=self.torch.float64, device=self.device)
        self.dist.all_reduce(slowest, op=self.dist.ReduceOp.MAX, group=pg)
        calls = slowest.tolist()
        return statistics.fmean(sorted(calls)[:max(1, len(calls) // 2)]), statistics.fmean(calls)

    def _call(self, op: CollectiveOp, group: int, pg, nbytes: int) -> tuple[Callable[[], None], int]:
        """The call for one sample and the bytes it moves (by the convention in planner/collectives.py)."""
        torch, dist = self.torch, self.dist
        elem = torch.finfo(self.dtype).bits // 8
        numel = max(group, nbytes // elem // group * group)  # divisible by the group for gather/scatter
        full, shard = self.buffer("full", numel), self.buffer("shard", numel // group)
        if op == "all_reduce":
            return (lambda: dist.all_reduce(full, group=pg)), numel * elem
        if op == "all_gather":
            return (lambda: self.all_gather(full, shard, group=pg)), numel * elem
        if op == "reduce_scatter":
            return (lambda: self.reduce_scatter(shard, full, op=dist.ReduceOp.SUM, group=pg)), numel * elem
        # send_recv: ranks 0 and 1 send to each other at once (batch_isend_irecv, as pipelining's steady state
        # exchanges activations and gradients). A lone ping-pong on this 2-vCPU VM hit idle-CPU wake-ups that wait
        # for the 4 ms scheduler tick (1 KiB: median 3.95 ms, minimum 81 us), which no alpha-beta line describes.
        peer = 1 - self.rank
        received = self.buffer("received", numel)

        def exchange() -> None:
            for work in dist.batch_isend_irecv([dist.P2POp(dist.isend, full, peer, group=pg),
                                                dist.P2POp(dist.irecv, received, peer, group=pg)]):
                work.wait()
        return exchange, numel * elem
