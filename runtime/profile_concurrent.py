"""Time the layers on every local rank at once, as the runtime keeps every core busy.

Measured here: two copies of mpplan's single-rank training step run side by side took 44-70 ms a step where one
alone took 40-42 ms (tiny-gpt, mbs 4 x 2; the slowdown moves with the host's load, and /proc/stat shows no steal
time). A layer timed alone on an idle 2-vCPU machine is faster than the same layer in a 2-rank run, so the
planner under-predicted every local plan. Here ``ranks`` spawned processes (one thread each) start together and
time the same cases round-robin (runtime/profile_layers.py).

Why not the mean of the processes: this VM's two vCPUs do not run at one speed. Two copies of the same
single-rank run side by side took 46 and 80 ms a step, 54 and 77 in the next pair, and a 2-rank plan goes at its
slowest rank's pace: DDP waits for it at every step's all-reduce, a pipeline at every hand-off, TP at every
collective. Priced at the mean, validate's plans ran 10-30 % slower than predicted, almost all of them in the
same direction. So each layer's own cost is the fastest process's fast time and the plans are priced at the
slowest process's pace (runtime/profile_layers.py layer_profiles).

Why the layers are timed in one go before the other measurements, not in passes between them: tried on
2026-12-05 (Intel host, six profiles each way, alternating), three passes spread over the profile's first ~35 s
left each layer's own cost no steadier (consecutive profiles 2.3-4.5 % apart at worst, against 1.2-4.5 % in one
pass) and raised the pace a little (1.20-1.30 against 1.19-1.26; in the passes, the first ran up to 1.4x its
fast time on one process, the later ones 1.1-1.25x). Profile wall time was the same (47-50 s either way).
"""
from __future__ import annotations

from typing import Callable, Protocol, Sequence

from planner.profile import LayerProfile
from planner.specs import Recompute
from runtime.profile_layers import (LayerCase, LayerMemory, Timing, TimingConfig, layer_memory, layer_profiles,
                                    time_cases)
from runtime.spawned import report_failure, run_spawned


class FollowOn(Protocol):
    """A spawned measurement that can run in the layer-timing processes after the layers (CollectiveBench,
    ShardedBench, OptimizerBench): each rank runs ``fn(*args, results)`` from rank_job, the parent hands every
    message to handle, and ``done`` says it has all it needs."""

    done: bool
    timeout_s: float

    def rank_job(self, rank: int) -> tuple[Callable[..., None], tuple]: ...

    def handle(self, msg: tuple) -> bool: ...


def measure_layers_concurrently(cases: list[LayerCase], config: TimingConfig, ranks: int,
                                on_round: Callable[[str], None] | None = None, timeout_s: float = 600.0,
                                then: Sequence[FollowOn] = ()) -> tuple[list[LayerProfile], float]:
    """time_cases in ``ranks`` CPU processes started together (one process, or fewer than 2 ranks: here); the
    layer profiles and the pace they are priced at (runtime/profile_layers.py layer_profiles). The same processes
    then run each measurement of ``then`` in turn, over all ``ranks`` (their results: each one's own, e.g.
    CollectiveBench.fits()); one launch of torch in fresh processes costs ~3 s of a profile that must finish
    within a minute."""
    if ranks < 2 and then:
        raise ValueError("follow-on measurements need at least 2 ranks")
    if ranks < 2:
        return layer_profiles(cases, [time_cases(cases, config, lambda: None, on_round)])
    measured: dict[int, list[dict[Recompute, Timing]]] = {}
    memory: dict[int, LayerMemory] = {}

    def handle(msg: tuple) -> bool:
        if msg[0] == "round" and on_round is not None:
            on_round(msg[1])
        elif msg[0] == "layers":
            measured[msg[1]] = msg[2]
            memory.update(msg[3])
        else:  # message kinds differ between the follow-ons: each takes its own
            for step in then:
                step.handle(msg)
        return len(measured) == ranks and all(step.done for step in then)

    def make_args(ctx) -> list[tuple]:
        start = ctx.Barrier(ranks)  # every process starts timing together
        return [(i, ranks, cases, config, start, [step.rank_job(i) for step in then]) for i in range(ranks)]

    run_spawned(_worker, make_args, "layer timing", timeout_s + sum(step.timeout_s for step in then), handle)
    return layer_profiles(cases, [measured[i] for i in range(ranks)], [memory[i] for i in range(len(cases))])


def _worker(index: int, ranks: int, cases: list[LayerCase], config: TimingConfig, start,
            then: list[tuple[Callable[..., None], tuple]], results) -> None:
    try:
        import torch

        torch.set_num_threads(1)  # one thread per rank, as the runtime runs
        start.wait()
        report = (lambda label: results.put(("round", label))) if index == 0 else None
        timings = time_cases(cases, config, lambda: None, report)
        # parameters and saved bytes here, each process a share of the cases: in the parent the first recompute
        # forward alone costs ~2 s (torch.utils.checkpoint imports torch._dynamo), which these processes have paid
        share = {i: layer_memory(case) for i, case in enumerate(cases) if i % ranks == index}
        results.put(("layers", index, timings, share))
    except Exception as e:  # the parent turns this into one RuntimeError
        report_failure(results, index, e)
    for fn, args in then:
        fn(*args, results)
