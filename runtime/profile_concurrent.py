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
"""
from __future__ import annotations

from typing import Callable

from planner.profile import LayerProfile
from planner.specs import Recompute
from runtime.profile_layers import LayerCase, Timing, TimingConfig, layer_profiles, time_cases
from runtime.profile_comm import CollectiveBench, benchmark_rank
from runtime.spawned import report_failure, run_spawned


def measure_layers_concurrently(cases: list[LayerCase], config: TimingConfig, ranks: int,
                                on_round: Callable[[str], None] | None = None, timeout_s: float = 600.0,
                                then: CollectiveBench | None = None) -> tuple[list[LayerProfile], float]:
    """time_cases in ``ranks`` CPU processes started together (one process, or fewer than 2 ranks: here); the
    layer profiles and the pace they are priced at (runtime/profile_layers.py layer_profiles). With ``then``,
    the same processes run that collective benchmark next (its fits: ``then.fits()``); one launch of torch in
    fresh processes costs ~3 s of a profile that must finish within a minute."""
    if ranks < 2:
        return layer_profiles(cases, [time_cases(cases, config, lambda: None, on_round)])
    measured: dict[int, list[dict[Recompute, Timing]]] = {}

    def handle(msg: tuple) -> bool:
        if msg[0] == "round" and on_round is not None:
            on_round(msg[1])
        elif msg[0] == "layers":
            measured[msg[1]] = msg[2]
        elif then is not None:
            then.handle(msg)
        return len(measured) == ranks and (then is None or then.done)

    def make_args(ctx) -> list[tuple]:
        start = ctx.Barrier(ranks)  # every process starts timing together
        return [(i, cases, config, start, then.rank_args(i) if then else None) for i in range(ranks)]

    run_spawned(_worker, make_args, "layer timing", timeout_s + (then.config.timeout_s if then else 0), handle)
    # after the processes are done: building the profiles runs forwards here, which would steal a core from them
    return layer_profiles(cases, [measured[i] for i in range(ranks)])


def _worker(index: int, cases: list[LayerCase], config: TimingConfig, start, then_args: tuple | None,
            results) -> None:
    try:
        import torch

        torch.set_num_threads(1)  # one thread per rank, as the runtime runs
        start.wait()
        report = (lambda label: results.put(("round", label))) if index == 0 else None
        results.put(("layers", index, time_cases(cases, config, lambda: None, report)))
    except Exception as e:  # the parent turns this into one RuntimeError
        report_failure(results, index, e)
    if then_args is not None:
        benchmark_rank(*then_args, results)
