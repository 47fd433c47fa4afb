"""`mpplan validate`, the torch-free half: which plans to run, and how well the predictions ranked and sized them.

Given every feasible plan the solver found and what each did when run (runtime/train.py's run report), this
module computes the figures issue 5 asks for:

- Spearman rank correlation between predicted and measured step time over all plans that ran;
- regret: measured step time of the plan the solver ranks first / the best measured step time;
- mean absolute percentage error of the step time, and of each rank's peak memory;
- memory-limit violations: a plan the model called feasible under ``--memory-limit`` that used more when run.

    plans = candidate_plans(request)                       # every feasible plan, each recompute mode pinned
    outcomes = [outcome_from_report(i, p, report) ...]     # after `mpplan run`ning each
    summary = summarize(outcomes, memory_limit_bytes=None)
"""
from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict, dataclass, field, replace
from typing import Iterable, Sequence

from planner.plan import Plan
from planner.profile import machine_slowdown
from planner.search import Pins
from planner.solve import SolveRequest, run_solve
from planner.specs import Recompute

# What issue 5 asks of the planner on this machine (2 ranks, one core each).
TARGET_SPEARMAN = 0.9
TARGET_REGRET = 1.05
TARGET_STEP_MAPE = 0.10
TARGET_MEMORY_MAPE = 0.15


# ------------------------------------------------------------------------------------------ statistics

def average_ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks; tied values share the mean of the ranks they span (the usual convention for Spearman)."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for k in range(start, end + 1):
            ranks[order[k]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def spearman(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Spearman's rho: Pearson correlation of the average ranks (Spearman 1904), so ties are handled. None for
    fewer than two points or when one side is constant (the correlation is undefined)."""
    if len(xs) != len(ys):
        raise ValueError(f"spearman needs pairs: {len(xs)} x values, {len(ys)} y values")
    if len(xs) < 2:
        return None
    rx, ry = average_ranks(xs), average_ranks(ys)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx = sum((a - mx) ** 2 for a in rx)
    syy = sum((b - my) ** 2 for b in ry)
    if sxx == 0 or syy == 0:
        return None
    return sxy / (sxx * syy) ** 0.5


def mean_abs_pct_error(predicted: Sequence[float], measured: Sequence[float]) -> float | None:
    """Mean of |predicted - measured| / measured (a fraction; 0.1 = 10 %). None when there is nothing to compare."""
    pairs = [(p, m) for p, m in zip(predicted, measured) if m > 0]
    if not pairs:
        return None
    return sum(abs(p - m) / m for p, m in pairs) / len(pairs)


# ------------------------------------------------------------------------------------------ candidates

def candidate_plans(request: SolveRequest, pins: Pins = Pins(),
                    recompute_modes: Iterable[Recompute | None] = tuple(Recompute),
                    zero_stages: Iterable[int | None] = (None,)) -> list[Plan]:
    """Every feasible plan (the solver with top_k=None: no pruning by bound), once per pinned recompute mode and
    ZeRO stage, so each configuration shows up with every mode rather than only the one the ILP would pick
    (with memory to spare it always picks "none"). None leaves the choice to the solver. Ranked as the solver
    ranks plans: by predicted step time, then predicted peak memory. Duplicates (the same plan reached through
    two pins) are kept once."""
    seen: dict[str, Plan] = {}
    for mode in recompute_modes:
        for zero in zero_stages:
            pinned = Pins(**{**asdict(pins), "recompute": mode if mode is not None else pins.recompute,
                             "zero": zero if zero is not None else pins.zero})
            for plan in run_solve(request, pinned, top_k=None).plans:
                if zero and plan.parallel.dp == 1:
                    continue  # ZeRO shards over data-parallel ranks: without them it is the zero-0 plan
                seen.setdefault(plan_key(plan), plan)
    return sorted(seen.values(), key=lambda p: (p.predicted.step_time_s, p.predicted.peak_memory_bytes))


def plan_key(plan: Plan) -> str:
    """What makes two plans the same run: everything but the prediction and the solver's bookkeeping."""
    return json.dumps(plan.model_dump(mode="json", exclude={"predicted", "solver"}), sort_keys=True)


def plan_label(plan: Plan) -> str:
    """Short, unique enough to read in a table: "tp1 pp2 dp1 v2 mbs4 z0 interleaved none"."""
    par = plan.parallel
    return (f"tp{par.tp} pp{par.pp} dp{par.dp} v{par.vpp}{' sp' if par.sp else ''} mbs{plan.micro_batch_size} "
            f"z{plan.zero} {plan.schedule} {plan.recompute}")


# ------------------------------------------------------------------------------------------ outcomes

@dataclass
class RankMemory:
    rank: int
    predicted_bytes: int
    measured_bytes: int


@dataclass
class PlanOutcome:
    """One plan: what the solver predicted and, when it ran, what was measured."""

    solver_rank: int
    """1 = the plan the solver ranks first."""
    label: str
    config: dict
    predicted_step_time_s: float
    predicted_peak_bytes: int
    measured_step_time_s: float | None = None
    ranks: list[RankMemory] = field(default_factory=list)
    error: str | None = None
    """Why the run failed (one line), or None."""
    busy_cpus: float | None = None
    """Other runnable processes seen just before the run (0 = quiet machine); timings beside busy CPUs are slow."""
    repeat_step_times_s: list[float] = field(default_factory=list)
    """Each run's median step time when the plan ran more than once; measured_step_time_s is their median."""
    machine_slowdown: float | None = None
    """The run's yardstick (a tp-1 block timed on every rank around the steps) / the same block in the profile:
    > 1 when the machine ran slower than when it was profiled (None without a profiled block to compare)."""
    same_speed_step_time_s: float | None = None
    """measured_step_time_s / machine_slowdown: the step time at the speed the machine had when profiled."""

    @property
    def run_spread(self) -> float | None:
        """Slowest / fastest repeat - 1: how far the same plan's step time moved between runs."""
        times = self.repeat_step_times_s
        return max(times) / min(times) - 1 if len(times) > 1 and min(times) > 0 else None

    @property
    def expected_error_of_exact_model(self) -> float | None:
        """The |error| a model that knew this plan's long-run mean step time would still show against
        measured_step_time_s, from the spread of the repeats: the standard error of their mean (s / sqrt(k),
        s their sample standard deviation) x sqrt(2 / pi), the mean absolute value of a normal error, as a
        fraction of the measured time (None with fewer than two runs). For k = 2 the median is the mean."""
        times = self.repeat_step_times_s
        if len(times) < 2 or not self.measured_step_time_s:
            return None
        return math.sqrt(2 / math.pi) * statistics.stdev(times) / math.sqrt(len(times)) / self.measured_step_time_s

    @property
    def ran(self) -> bool:
        return self.error is None and self.measured_step_time_s is not None

    @property
    def measured_peak_bytes(self) -> int | None:
        return max((r.measured_bytes for r in self.ranks), default=None)


def plan_kind(config: dict) -> str:
    """The parallelism a plan runs under, from plan_config: "tp2", "pp2", "dp2", "dp2 zero2", "pp2 dp2", ... ("one
    rank" without any). Plans of one kind share what the runtime wraps them in (DTensor, pipelining, DDP, FSDP2),
    which is where a cost model's errors cluster, so validate breaks the step-time error down by it."""
    parts = [f"{axis}{config[axis]}" for axis in ("tp", "pp", "dp") if config.get(axis, 1) > 1]
    if config.get("dp", 1) > 1 and config.get("zero", 0) >= 1:
        parts.append(f"zero{config['zero']}")
    return " ".join(parts) or "one rank"


def plan_config(plan: Plan) -> dict:
    par = plan.parallel
    return {"tp": par.tp, "pp": par.pp, "dp": par.dp, "vpp": par.vpp, "sp": par.sp, "mbs": plan.micro_batch_size,
            "microbatches": plan.num_microbatches, "zero": plan.zero, "schedule": str(plan.schedule),
            "recompute": plan.recompute, "stages": [list(s.layers) for s in plan.stages]}


def outcome_from_report(solver_rank: int, plan: Plan, report: dict | None, error: str | None = None,
                        busy_cpus: float | None = None, profiled_block_s: float | None = None) -> PlanOutcome:
    """Pair a plan with the run report `mpplan run` wrote for it (None and an error when the run failed);
    ``profiled_block_s``: the profile's tp-1 block forward + backward at the plan's micro-batch size."""
    outcome = PlanOutcome(solver_rank=solver_rank, label=plan_label(plan), config=plan_config(plan),
                          predicted_step_time_s=plan.predicted.step_time_s,
                          predicted_peak_bytes=plan.predicted.peak_memory_bytes, error=error, busy_cpus=busy_cpus)
    if report is not None:
        outcome.measured_step_time_s = report["measured"]["step_time_s"]
        outcome.machine_slowdown = machine_slowdown(report["measured"], profiled_block_s)
        if outcome.machine_slowdown is not None:
            outcome.same_speed_step_time_s = outcome.measured_step_time_s / outcome.machine_slowdown
        outcome.ranks = [RankMemory(rank=r["rank"], predicted_bytes=r["predicted_bytes"],
                                    measured_bytes=r["peak_memory_bytes"]) for r in report["per_rank_memory"]]
    return outcome


def combine_repeats(runs: Sequence[PlanOutcome]) -> PlanOutcome:
    """One outcome from several runs of the same plan (rounds a few minutes apart, so one slow spell of a shared
    machine does not decide a plan): the median step time and, per rank, the median peak; failed if any run
    failed."""
    first = runs[0]
    failed = next((r for r in runs if not r.ran), None)
    if len(runs) == 1 or failed is not None:
        return failed or first
    times = [r.measured_step_time_s for r in runs]
    ranks = [RankMemory(rank=r.rank, predicted_bytes=r.predicted_bytes,
                        measured_bytes=round(statistics.median(o.ranks[i].measured_bytes for o in runs)))
             for i, r in enumerate(first.ranks)]
    busy = [r.busy_cpus for r in runs if r.busy_cpus is not None]
    slowdowns = [r.machine_slowdown for r in runs if r.machine_slowdown is not None]
    same_speed = [r.same_speed_step_time_s for r in runs if r.same_speed_step_time_s is not None]
    return replace(first, measured_step_time_s=statistics.median(times), ranks=ranks,
                   busy_cpus=max(busy) if busy else None, repeat_step_times_s=list(times),
                   machine_slowdown=statistics.median(slowdowns) if len(slowdowns) == len(runs) else None,
                   same_speed_step_time_s=statistics.median(same_speed) if len(same_speed) == len(runs) else None)


# ------------------------------------------------------------------------------------------ summary

@dataclass
class Violation:
    label: str
    rank: int
    measured_bytes: int
    limit_bytes: int


@dataclass
class KindError:
    """The step-time error of the plans of one kind."""

    plans: int
    step_time_mape: float
    """Mean of |predicted - measured| / measured."""
    step_time_bias: float
    """Mean of (predicted - measured) / measured: > 0 where the model prices these plans slower than they run."""


def error_by_kind(outcomes: Sequence[PlanOutcome]) -> dict[str, KindError]:
    """KindError per plan_kind over the outcomes that ran, the kinds in the order they first appear."""
    groups: dict[str, list[tuple[float, float]]] = {}
    for o in outcomes:
        if o.ran and o.measured_step_time_s > 0:
            groups.setdefault(plan_kind(o.config), []).append((o.predicted_step_time_s, o.measured_step_time_s))
    return {kind: KindError(plans=len(pairs),
                            step_time_mape=mean_abs_pct_error([p for p, _ in pairs], [m for _, m in pairs]),
                            step_time_bias=statistics.fmean((p - m) / m for p, m in pairs))
            for kind, pairs in groups.items()}


@dataclass
class Summary:
    plans: int
    ran: int
    failed: int
    spearman: float | None
    regret: float | None
    """Measured step time of the solver's first plan (among those that ran) / the best measured."""
    step_time_mape: float | None
    memory_mape: float | None
    """Over every rank of every plan that ran."""
    solver_first: str | None
    measured_best: str | None
    memory_limit_bytes: int | None
    violations: list[Violation]
    max_busy_cpus: float | None
    step_time_noise_floor: float | None = None
    """Mean over plans of PlanOutcome.expected_error_of_exact_model: the step-time error that run-to-run noise
    alone gives an exact model against these measurements (None with one run per plan). step_time_mape near or
    below it is as good as these measurements can show."""
    run_spread: float | None = None
    """Median over plans of (slowest / fastest repeat - 1): the noise floor of the measurements themselves; no
    model can be more accurate than the same plan reproduces (None with one run per plan)."""
    machine_slowdown: float | None = None
    """Median over plans of PlanOutcome.machine_slowdown: how much slower the machine ran than when profiled."""
    step_time_mape_same_speed: float | None = None
    """step_time_mape against the step times brought back to the profiled speed (PlanOutcome.same_speed_step_time_s):
    the model's own error with the machine's drift since profiling taken out. The raw figure is the target's."""
    by_kind: dict[str, KindError] = field(default_factory=dict)
    """step-time error per plan_kind, over the plans that ran: where the model misses."""

    def checks(self) -> dict[str, bool | None]:
        """Each target of issue 5: met (True), missed (False) or not measurable (None)."""
        def at_most(value: float | None, limit: float) -> bool | None:
            return None if value is None else value <= limit

        return {"spearman": None if self.spearman is None else self.spearman >= TARGET_SPEARMAN,
                "regret": at_most(self.regret, TARGET_REGRET),
                "step_time_mape": at_most(self.step_time_mape, TARGET_STEP_MAPE),
                "memory_mape": at_most(self.memory_mape, TARGET_MEMORY_MAPE),
                "memory_limit": None if self.memory_limit_bytes is None else not self.violations}

    def to_dict(self) -> dict:
        return {**asdict(self), "checks": self.checks(),
                "targets": {"spearman_min": TARGET_SPEARMAN, "regret_max": TARGET_REGRET,
                            "step_time_mape_max": TARGET_STEP_MAPE, "memory_mape_max": TARGET_MEMORY_MAPE}}


def summarize(outcomes: Sequence[PlanOutcome], memory_limit_bytes: int | None = None) -> Summary:
    ran = [o for o in outcomes if o.ran]
    pred = [o.predicted_step_time_s for o in ran]
    meas = [o.measured_step_time_s for o in ran]
    regret = first = best = None
    if ran:
        first_o = min(ran, key=lambda o: o.solver_rank)
        best_o = min(ran, key=lambda o: o.measured_step_time_s)
        regret = first_o.measured_step_time_s / best_o.measured_step_time_s
        first, best = first_o.label, best_o.label
    rank_pairs = [(r.predicted_bytes, r.measured_bytes) for o in ran for r in o.ranks]
    violations = []
    if memory_limit_bytes is not None:
        violations = [Violation(o.label, r.rank, r.measured_bytes, memory_limit_bytes)
                      for o in ran for r in o.ranks if r.measured_bytes > memory_limit_bytes]
    busy = [o.busy_cpus for o in outcomes if o.busy_cpus is not None]
    spreads = [o.run_spread for o in ran if o.run_spread is not None]
    floors = [o.expected_error_of_exact_model for o in ran if o.expected_error_of_exact_model is not None]
    slowdowns = [o.machine_slowdown for o in ran if o.machine_slowdown is not None]
    same = [(o.predicted_step_time_s, o.same_speed_step_time_s) for o in ran if o.same_speed_step_time_s is not None]
    return Summary(plans=len(outcomes), ran=len(ran), failed=len(outcomes) - len(ran), spearman=spearman(pred, meas),
                   regret=regret, step_time_mape=mean_abs_pct_error(pred, meas),
                   memory_mape=mean_abs_pct_error([p for p, _ in rank_pairs], [m for _, m in rank_pairs]),
                   solver_first=first, measured_best=best, memory_limit_bytes=memory_limit_bytes,
                   violations=violations, max_busy_cpus=max(busy) if busy else None,
                   run_spread=statistics.median(spreads) if spreads else None,
                   step_time_noise_floor=statistics.fmean(floors) if floors and len(floors) == len(ran) else None,
                   machine_slowdown=statistics.median(slowdowns) if slowdowns else None,
                   step_time_mape_same_speed=mean_abs_pct_error([p for p, _ in same], [m for _, m in same])
                   if same and len(same) == len(ran) else None, by_kind=error_by_kind(ran))
