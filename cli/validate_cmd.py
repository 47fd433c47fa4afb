"""`mpplan validate`: profile the model here, solve for the local ranks keeping every feasible plan, run each one
with `mpplan run`'s runtime, and report how well the predictions ranked and sized them (planner/validate.py).

Registered by cli/app.py as the ``validate`` command. torch is imported only when something runs.

Why two ranks on this 2-core machine: each rank runs with one thread, so with more ranks than cores they
time-share the cores and a step's time measures the kernel's scheduler (and gloo's busy-polling peers) rather
than the plan; the planner prices each rank as owning its core.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from cli.console import stderr_console
from cli.errors import EXIT_BAD_INPUT, EXIT_NO_PLAN, fail
from planner.plan import Plan, Schedule
from planner.profile import tp1_block_s
from planner.search import Pins
from planner.specs import Recompute, SpecError
from planner.validate import (PlanOutcome, Summary, candidate_plans, combine_repeats, outcome_from_report, plan_label,
                              summarize)

MiB = 2**20


_fail = partial(fail, command="validate")


def busy_cpus(samples: int = 5, interval_s: float = 0.1) -> float | None:
    """Runnable processes other than this one, averaged over a short window (/proc/loadavg's fourth field,
    "running/total", proc(5)); 0 on a quiet machine. None where /proc is missing."""
    seen = []
    for i in range(samples):
        try:
            running = int(Path("/proc/loadavg").read_text().split()[3].split("/")[0])
        except (OSError, IndexError, ValueError):
            return None
        seen.append(max(0, running - 1))
        if i + 1 < samples:
            time.sleep(interval_s)
    return sum(seen) / len(seen)


def spread(plans: list[Plan], limit: int | None) -> list[tuple[int, Plan]]:
    """(solver rank, plan) for at most ``limit`` plans taken evenly along the solver's ranking (the first
    always), so a short validation still spans fast and slow plans."""
    ranked = list(enumerate(plans, 1))
    if limit is None or limit >= len(ranked):
        return ranked
    if limit == 1:
        return ranked[:1]
    picks = sorted({round(i * (len(ranked) - 1) / (limit - 1)) for i in range(limit)})
    return [ranked[i] for i in picks]


def _pct(predicted: float, measured: float | None) -> str:
    return "-" if not measured else f"{100 * (predicted - measured) / measured:+.0f}%"


def render(console: Console, outcomes: list[PlanOutcome], summary: Summary) -> None:
    table = Table(title="predicted vs measured, in the solver's order", title_justify="left")
    for col in ("#", "plan", "pred ms", "meas ms", "err", "pred MiB", "meas MiB", "err", "busy"):
        table.add_column(col, justify="left" if col == "plan" else "right", no_wrap=col == "plan")
    for o in outcomes:
        if not o.ran:
            table.add_row(str(o.solver_rank), o.label, f"{o.predicted_step_time_s * 1e3:.1f}", "failed", "-",
                          f"{o.predicted_peak_bytes / MiB:.1f}", "-", "-", "-")
            continue
        worst = max(o.ranks, key=lambda r: abs(r.predicted_bytes - r.measured_bytes) / max(r.measured_bytes, 1))
        table.add_row(str(o.solver_rank), o.label, f"{o.predicted_step_time_s * 1e3:.1f}",
                      f"{o.measured_step_time_s * 1e3:.1f}", _pct(o.predicted_step_time_s, o.measured_step_time_s),
                      f"{o.predicted_peak_bytes / MiB:.1f}", f"{o.measured_peak_bytes / MiB:.1f}",
                      _pct(worst.predicted_bytes, worst.measured_bytes),
                      "-" if o.busy_cpus is None else f"{o.busy_cpus:.1f}")
    console.print(table)
    for o in outcomes:
        if o.error:
            console.print(f"  #{o.solver_rank} {o.label} failed: {o.error}", style="red")
    marks = {True: "ok", False: "MISSED", None: "n/a"}
    checks = summary.checks()

    def fmt(value: float | None, pattern: str) -> str:
        return "-" if value is None else pattern.format(value)

    console.print(f"{summary.ran} of {summary.plans} plans ran; solver's first: {summary.solver_first}; "
                  f"fastest measured: {summary.measured_best}")
    console.print(f"Spearman {fmt(summary.spearman, '{:.3f}')} (>= 0.9: {marks[checks['spearman']]}), "
                  f"regret {fmt(summary.regret, '{:.3f}')} (<= 1.05: {marks[checks['regret']]}), "
                  f"step-time error {fmt(summary.step_time_mape, '{:.1%}')} (<= 10%: {marks[checks['step_time_mape']]}), "
                  f"peak-memory error {fmt(summary.memory_mape, '{:.1%}')} (<= 15%: {marks[checks['memory_mape']]})")
    if summary.run_spread is not None:
        console.print(f"noise floor: the same plan's step time moved {summary.run_spread:.1%} between runs "
                      "(median over plans)" + ("" if summary.step_time_noise_floor is None else
                                              f"; an exact model would show {summary.step_time_noise_floor:.1%} "
                                              "step-time error against these runs"))
    if summary.machine_slowdown is not None and summary.step_time_mape_same_speed is not None:
        console.print(f"machine speed: a profiled block ran {summary.machine_slowdown:.2f}x its profiled time "
                      f"(median over plans); step-time error at the profiled speed "
                      f"{summary.step_time_mape_same_speed:.1%}")
    if len(summary.by_kind) > 1:
        console.print("step-time error by kind: " + ", ".join(
            f"{kind} {k.step_time_mape:.1%} ({k.plans} plan{'s' if k.plans > 1 else ''}, priced "
            f"{'high' if k.step_time_bias > 0 else 'low'} by {abs(k.step_time_bias):.1%} on average)"
            for kind, k in summary.by_kind.items()))
    if summary.memory_limit_bytes is not None:
        console.print(f"memory limit {summary.memory_limit_bytes / MiB:.1f} MiB per rank: "
                      f"{len(summary.violations)} rank(s) over it")
    if summary.max_busy_cpus:
        console.print(f"note: up to {summary.max_busy_cpus:.1f} other runnable processes were seen beside the runs; "
                      "their timings are inflated", style="yellow")


def _profile(model: str, ranks: int, mbs: str, tp: str, console: Console, out: Path) -> None:
    from cli.profile_cmd import parse_int_list
    from planner.specs import load_model
    from runtime.profile import profile_model

    spec = load_model(model)
    console.print(f"profiling {spec.name} (mbs {mbs}, tp {tp}, {ranks} ranks) ...")
    profile = profile_model(spec, "cpu", parse_int_list("--profile-mbs", mbs), parse_int_list("--profile-tp", tp),
                            ranks)
    out.write_text(profile.to_json())


def validate_command(
    model: Annotated[str, typer.Option("--model", help="Preset or model YAML/JSON (ignored with --profile, "
                                       "whose model is used).")] = "tiny-gpt",
    ranks: Annotated[int, typer.Option("--ranks", help="Local CPU ranks (one core each: keep <= cores).")] = 2,
    global_batch: Annotated[int, typer.Option("--global-batch", help="Sequences per step.")] = 16,
    steps: Annotated[int, typer.Option("--steps", help="Optimizer steps per plan (median after warm-up).")] = 10,
    memory_limit: Annotated[Optional[int], typer.Option("--memory-limit", min=1, help="Pretend each rank has this many "
                                                        "bytes: plans predicted over it are left out, and no "
                                                        "plan run may exceed it.")] = None,
    profile: Annotated[Optional[Path], typer.Option("--profile", help="profile.json to use instead of "
                                                    "profiling now.")] = None,
    save_profile: Annotated[Optional[Path], typer.Option("--save-profile", help="Keep the profile taken now "
                                                         "here.")] = None,
    profile_mbs: Annotated[str, typer.Option("--profile-mbs", help="Micro-batch sizes to profile.")] = "1,2,4",
    profile_tp: Annotated[str, typer.Option("--profile-tp", help="TP degrees to profile.")] = "1,2",
    tp: Annotated[Optional[int], typer.Option("--tp", min=1, help="Pin tensor-parallel degree.")] = None,
    pp: Annotated[Optional[int], typer.Option("--pp", min=1, help="Pin pipeline-parallel degree.")] = None,
    mbs: Annotated[Optional[int], typer.Option("--mbs", min=1, help="Pin micro-batch size.")] = None,
    schedule: Annotated[Optional[Schedule], typer.Option("--schedule", help="Pin the pipeline schedule.")] = None,
    recompute: Annotated[Optional[Recompute], typer.Option("--recompute", help="Pin one recompute mode [default: "
                                                           "each of none, selective, full in turn].")] = None,
    all_zero: Annotated[bool, typer.Option("--all-zero", help="Also pin each ZeRO stage 0-3 in turn (default: "
                                           "the solver's choice).")] = False,
    max_plans: Annotated[Optional[int], typer.Option("--max-plans", min=1, help="Run at most this many plans, "
                                                     "spread evenly over the solver's ranking.")] = None,
    report: Annotated[Optional[Path], typer.Option("--report", help="Write the figures and every plan's "
                                                   "outcome here (JSON).")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print only the JSON report to stdout.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Overwrite --report / --save-profile.")] = False,
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds one plan's run may take.")] = 600.0,
    repeats: Annotated[int, typer.Option("--repeats", min=1, help="Run every plan this many times, in rounds over "
                                         "all plans; a plan's step time is the median of its runs, and the spread "
                                         "between runs is reported as the noise floor.")] = 1,
) -> None:
    """Run every feasible plan here and check that the planner ranks and sizes them right.

    Example: mpplan validate --model tiny-gpt --ranks 2 --global-batch 16 --steps 10 --report validate.json
    """
    from planner.solve import SolveRequest

    for path in (report, save_profile):
        if path is not None and path.exists() and not force:
            _fail(f"{path} exists; pass --force to overwrite it")
    if steps < 2:
        _fail(f"--steps {steps}: need at least 2 (the first is warm-up)")
    if ranks < 2:
        _fail(f"--ranks {ranks}: validation runs distributed plans; use at least 2")
    console = stderr_console(quiet=json_out and not sys.stderr.isatty())
    cores = os.cpu_count() or 1
    if ranks > cores:
        console.print(f"warning: {ranks} ranks on {cores} cores time-share the cores; measured step times will "
                      "not match a model that gives each rank a core", style="yellow")
    with tempfile.TemporaryDirectory(prefix="mpplan-validate-") as tmp:
        try:
            if profile is None:
                profile = save_profile or Path(tmp) / "profile.json"
                _profile(model, ranks, profile_mbs, profile_tp, console, profile)
            req = SolveRequest.build(gpus=ranks, cluster="local", profile=profile, global_batch=global_batch,
                                     memory_limit=memory_limit)
            pins = Pins(tp=tp, pp=pp, mbs=mbs, schedule=schedule)
            plans = candidate_plans(req, pins, recompute_modes=(recompute,) if recompute else tuple(Recompute),
                                    zero_stages=(0, 1, 2, 3) if all_zero else (None,))
        except SpecError as e:
            _fail(str(e))
        if not plans:
            _fail("no feasible plan to run (see `mpplan solve --cluster local --profile ...` for why)", EXIT_NO_PLAN)
        chosen = spread(plans, max_plans)
        console.print(f"{len(plans)} feasible plans; running {len(chosen)} for {steps} steps each on {ranks} ranks"
                      + (f", {repeats} rounds" if repeats > 1 else ""))
        rounds = [[_run_one(rank, plan, steps, timeout, console, _profiled_block_s(req, plan)) for rank, plan in chosen]
                  for _ in range(repeats)]
        outcomes = [combine_repeats(runs) for runs in zip(*rounds)]
    summary = summarize(outcomes, memory_limit)
    result = {"model": req.model.name, "ranks": ranks, "cores": cores, "global_batch": global_batch,
              "steps": steps, "memory_limit_bytes": memory_limit, "feasible_plans": len(plans),
              "summary": summary.to_dict(), "outcomes": [_outcome_dict(o) for o in outcomes]}
    render(console, outcomes, summary)
    if report is not None:
        try:
            report.write_text(json.dumps(result, indent=2) + "\n")
        except OSError as e:
            _fail(f"--report {report}: cannot write ({e.strerror})")
    if json_out:
        print(json.dumps(result))


def _profiled_block_s(req, plan: Plan) -> float | None:
    return tp1_block_s(req.profile.layers, plan.micro_batch_size) if req.profile else None


def _run_one(solver_rank: int, plan: Plan, steps: int, timeout: float, console: Console,
             profiled_block_s: float | None) -> PlanOutcome:
    from runtime.launch import Job, RankFailed, spawn_local

    busy = busy_cpus()
    console.print(f"  #{solver_rank} {plan_label(plan)} ...")
    try:
        (report,) = spawn_local(Job(plans=[plan.model_dump_json()], steps=steps, device="cpu"),
                                plan.parallel.world_size, timeout_s=timeout)
    except RankFailed as e:
        return outcome_from_report(solver_rank, plan, None, error=str(e), busy_cpus=busy)
    return outcome_from_report(solver_rank, plan, report, busy_cpus=busy, profiled_block_s=profiled_block_s)


def _outcome_dict(o: PlanOutcome) -> dict:
    from dataclasses import asdict

    return {**asdict(o), "measured_peak_bytes": o.measured_peak_bytes, "run_spread": o.run_spread}
