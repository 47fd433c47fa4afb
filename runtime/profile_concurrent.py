"""Time the layers on every local rank at once, as the runtime keeps every core busy.

Measured here: two copies of mpplan's single-rank training step run side by side took 44-70 ms a step where one
alone took 40-42 ms (tiny-gpt, mbs 4 x 2; the slowdown moves with the host's load, and /proc/stat shows no steal
time). A layer timed alone on an idle 2-vCPU machine is faster than the same layer in a 2-rank run, so the
planner under-predicted every local plan. Here ``ranks`` spawned processes (one thread each) start together and
time the same cases round-robin (runtime/profile_layers.py); a case's time is the mean over the processes.
"""
from __future__ import annotations

import statistics
from typing import Callable

from planner.profile import LayerProfile
from runtime.profile_layers import LayerCase, TimingConfig, measure_layers
from runtime.spawned import report_failure, run_spawned


def measure_layers_concurrently(cases: list[LayerCase], config: TimingConfig, ranks: int,
                                on_round: Callable[[str], None] | None = None,
                                timeout_s: float = 600.0) -> list[LayerProfile]:
    """measure_layers in ``ranks`` CPU processes started together; per case the mean of their medians (the
    spread, cv, is the largest of theirs). One process (or fewer than 2 ranks): measure_layers here."""
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
    return [_mean_of(list(per_case)) for per_case in zip(*(measured[i] for i in range(ranks)))]


def _mean_of(profiles: list[LayerProfile]) -> LayerProfile:
    first = profiles[0]
    return first.model_copy(update={
        "fwd_s": statistics.fmean(p.fwd_s for p in profiles), "bwd_s": statistics.fmean(p.bwd_s for p in profiles),
        "fwd_cv": max(p.fwd_cv for p in profiles), "bwd_cv": max(p.bwd_cv for p in profiles),
        "recompute_extra_s": {m: statistics.fmean(p.recompute_extra_s[m] for p in profiles)
                              for m in first.recompute_extra_s}})


def _worker(index: int, cases: list[LayerCase], config: TimingConfig, start, results) -> None:
    try:
        import torch

        torch.set_num_threads(1)  # one thread per rank, as the runtime runs
        start.wait()
        report = (lambda label: results.put(("round", label))) if index == 0 else None
        results.put(("done", index, measure_layers(cases, config, lambda: None, report)))
    except Exception as e:  # the parent turns this into one RuntimeError
        report_failure(results, index, e)
