"""Time the layers on every local rank at once, as the runtime keeps every core busy.

Measured here: two copies of mpplan's single-rank training step run side by side took 44-70 ms a step where one
alone took 40-42 ms (tiny-gpt, mbs 4 x 2; the slowdown moves with the host's load, and /proc/stat shows no steal
time). A layer timed alone on an idle 2-vCPU machine is faster than the same layer in a 2-rank run, so the
planner under-predicted every local plan. Here ``ranks`` spawned processes (one thread each) start together and
time the same cases round-robin (runtime/profile_layers.py), and the profile keeps the slower process's times.

Why the slower, not the mean: this VM's two vCPUs do not run at one speed. Two copies of the same single-rank run
side by side took 46 and 80 ms a step, 54 and 77 in the next pair (the gap holds for a whole run; /proc/stat
shows no steal), and a 2-rank plan goes at its slowest rank's pace: DDP waits for it at every step's all-reduce,
a pipeline at every hand-off, TP at every collective. Priced at the mean, validate's plans ran 10-30 % slower
than predicted, almost all of them in the same direction.
"""
from __future__ import annotations

from typing import Callable

from planner.profile import LayerProfile
from runtime.profile_layers import LayerCase, TimingConfig, measure_layers
from runtime.spawned import report_failure, run_spawned


def measure_layers_concurrently(cases: list[LayerCase], config: TimingConfig, ranks: int,
                                on_round: Callable[[str], None] | None = None,
                                timeout_s: float = 600.0) -> list[LayerProfile]:
    """measure_layers in ``ranks`` CPU processes started together; every case as the slowest process timed it
    (the one whose layers took longest in all), with the largest spread (cv) of any process. One process (or
    fewer than 2 ranks): measure_layers here."""
    if ranks < 2:
        return measure_layers(cases, config, lambda: None, on_round)
    measured: dict[int, list[LayerProfile]] = {}

    def handle(msg: tuple) -> bool:
        if msg[0] == "round" and on_round is not None:
            on_round(msg[1])
        elif msg[0] == "done":
            measured[msg[1]] = msg[2]
        return len(measured) == ranks

    def make_args(ctx) -> list[tuple]:
        start = ctx.Barrier(ranks)  # every process starts timing together
        return [(i, cases, config, start) for i in range(ranks)]

    run_spawned(_worker, make_args, "layer timing", timeout_s, handle)
    return slowest_process([measured[i] for i in range(ranks)])


def slowest_process(per_process: list[list[LayerProfile]]) -> list[LayerProfile]:
    """The cases as the process whose fwd + bwd medians sum highest timed them (one process's times, not a
    per-case maximum, which two equally fast processes' noise would bias up), each with the largest cv of any."""
    slowest = max(per_process, key=lambda layers: sum(lp.fwd_s + lp.bwd_s for lp in layers))
    return [kept.model_copy(update={"fwd_cv": max(p.fwd_cv for p in case), "bwd_cv": max(p.bwd_cv for p in case)})
            for kept, case in zip(slowest, zip(*per_process))]


def _worker(index: int, cases: list[LayerCase], config: TimingConfig, start, results) -> None:
    try:
        import torch

        torch.set_num_threads(1)  # one thread per rank, as the runtime runs
        start.wait()
        report = (lambda label: results.put(("round", label))) if index == 0 else None
        results.put(("done", index, measure_layers(cases, config, lambda: None, report)))
    except Exception as e:  # the parent turns this into one RuntimeError
        report_failure(results, index, e)
