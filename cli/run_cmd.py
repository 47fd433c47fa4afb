"""`mpplan run plan.json`: train with exactly the plan and report measured against predicted.

Registered by cli/app.py as the ``run`` command. torch is imported only when ranks actually run here.
"""
from __future__ import annotations

import json
import os
from functools import partial
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from cli.console import stderr_console
from cli.errors import EXIT_BAD_INPUT, EXIT_FAILED_RUN, fail
from planner.plan import Plan, load_plan
from planner.specs import SpecError
from planner.support import plan_unsupported_reason

MiB = 2**20


_fail = partial(fail, command="run")


def _fmt_pct(value: float | None) -> str:
    return "-" if value is None else f"{value:+.0f}%"


def render_report(console: Console, report: dict) -> None:
    """Measured beside predicted (and the error) on stderr."""
    p, m, pred, err = report["plan"], report["measured"], report["predicted"], report["error_pct"]
    console.print(f"ran {p['model']} on {p['world_size']} {report['device']} ranks: tp {p['tp']} pp {p['pp']} "
                  f"dp {p['dp']} vpp {p['vpp']}{' sp' if p['sp'] else ''}, zero {p['zero']}, {p['schedule']}, "
                  f"{p['num_microbatches']} x {p['micro_batch_size']} micro-batches, recompute {p['recompute']}")
    for what, wrapper in report["wrappers"].items():
        console.print(f"  {what}: {wrapper}")
    table = Table(title="measured vs predicted", title_justify="left")
    for col in ("quantity", "measured", "predicted", "error"):
        table.add_column(col, justify="left" if col == "quantity" else "right")
    table.add_row("step time", f"{m['step_time_s'] * 1e3:.1f} ms", f"{pred['step_time_s'] * 1e3:.1f} ms",
                  _fmt_pct(err["step_time_s"]))
    table.add_row("tokens/s", f"{m['tokens_per_s']:,.0f}", f"{pred['tokens_per_s']:,.0f}", _fmt_pct(err["tokens_per_s"]))
    for r in report["per_rank_memory"]:
        table.add_row(f"peak memory rank {r['rank']} (pp {r['pp_rank']})", f"{r['peak_memory_bytes'] / MiB:.1f} MiB",
                      f"{r['predicted_bytes'] / MiB:.1f} MiB", _fmt_pct(r["error_pct"]))
    console.print(table)
    losses = report["losses"]
    console.print(f"loss: {losses[0]:.4f} -> {losses[-1]:.4f} over {len(losses)} steps "
                  f"(step time: median of the last {len(losses) - report['warmup_steps']}); memory: {m['memory_kind']}")


def _resolve_device(device: str) -> str:
    if device not in ("auto", "cpu", "cuda"):
        _fail(f"--device {device}: choose auto, cpu or cuda", EXIT_BAD_INPUT)
    if device == "cpu":
        return "cpu"
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        _fail("--device cuda: no CUDA device is available", EXIT_BAD_INPUT)
    return "cuda" if torch.cuda.is_available() else "cpu"


def _check_inputs(plan: Plan, plan_path: Path, steps: int, data: Optional[Path]) -> None:
    reason = plan_unsupported_reason(plan)
    if reason:
        _fail(f"{plan_path}: the runtime cannot execute this plan: {reason}", EXIT_BAD_INPUT)
    if steps < 1:
        _fail(f"--steps {steps}: must be at least 1", EXIT_BAD_INPUT)
    if data is not None:
        from runtime.data import TokenSource

        try:
            TokenSource(plan.model, 0, data)
        except SpecError as e:
            _fail(str(e), EXIT_BAD_INPUT)


def run_command(
    plan_path: Annotated[Path, typer.Argument(help="plan.json written by `mpplan solve`.")],
    steps: Annotated[int, typer.Option("--steps", help="Optimizer steps to run.")] = 10,
    data: Annotated[Optional[Path], typer.Option("--data", help="Train on this text file as bytes (vocab 256) "
                                                 "instead of seeded synthetic tokens.")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the weights and the data.")] = 0,
    report: Annotated[Optional[Path], typer.Option("--report", help="Write the run report (JSON) here.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite --report if it exists.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print only the run report JSON to stdout.")] = False,
    print_launch: Annotated[bool, typer.Option("--print-launch", help="Print the multi-node torchrun and srun "
                                               "lines for this plan instead of running.")] = False,
    device: Annotated[str, typer.Option("--device", help="auto, cpu (gloo) or cuda (nccl).")] = "auto",
    nproc: Annotated[Optional[int], typer.Option("--nproc", help="Local ranks to spawn [default: the plan's "
                                                 "world size]; must match the plan.")] = None,
    timeout: Annotated[float, typer.Option("--timeout", help="Stop the whole run after this many seconds.")] = 3600.0,
    log_dir: Annotated[Optional[Path], typer.Option("--log-dir", help="Per-rank logs [default: a new temp "
                                                    "directory].")] = None,
    collective_timeout: Annotated[float, typer.Option("--collective-timeout", help="Seconds a collective may wait "
                                                      "for a silent rank before failing.")] = 600.0,
) -> None:
    """Train with exactly the plan (spawning its world size of local ranks, or as one rank under torchrun) and
    report measured step time, tokens/s and per-rank peak memory beside the plan's prediction.

    Example: mpplan run plan.json --steps 20 --report run.json
    """
    try:
        plan = load_plan(plan_path)
    except SpecError as e:
        _fail(str(e), EXIT_BAD_INPUT)
    _check_inputs(plan, plan_path, steps, data)
    if report is not None:  # checked before a run that may take an hour, not after
        if report.exists() and not force:
            _fail(f"--report {report} exists; pass --force to overwrite it", EXIT_BAD_INPUT)
        if not report.parent.is_dir():
            _fail(f"--report {report}: no such directory {report.parent}", EXIT_BAD_INPUT)
    world = plan.parallel.world_size
    if print_launch:
        from runtime.launch import launch_commands

        print("\n".join(launch_commands(plan, str(plan_path))))
        return
    from runtime.launch import Job, RankFailed, run_rank, spawn_local

    device_kind = _resolve_device(device)
    job = Job(plans=[plan.model_dump_json()], steps=steps, seed=seed, data=str(data) if data else None,
              device=device_kind, pg_timeout_s=collective_timeout)
    console = stderr_console()
    try:
        if "RANK" in os.environ:  # one rank of torchrun
            launched = int(os.environ.get("WORLD_SIZE", "1"))
            if launched != world:
                _fail(f"{plan_path} is for world size {world} (pp {plan.parallel.pp} x dp {plan.parallel.dp} x "
                      f"tp {plan.parallel.tp}) but torchrun launched {launched} ranks", EXIT_BAD_INPUT)
            try:
                reports = run_rank(job)
            except Exception as e:  # noqa: BLE001 - this rank's error, one line; torchrun stops the others
                import traceback

                from runtime.launch import one_line_error

                traceback.print_exc()
                _fail(f"rank {os.environ['RANK']} failed: {one_line_error(e)}", EXIT_FAILED_RUN)
            if reports is None:  # not rank 0: rank 0 reports
                return
        else:
            launched = world if nproc is None else nproc
            if launched != world:
                _fail(f"{plan_path} is for world size {world} (pp {plan.parallel.pp} x dp {plan.parallel.dp} x "
                      f"tp {plan.parallel.tp}) but --nproc asks for {launched} ranks", EXIT_BAD_INPUT)
            if console.is_terminal and not json_out:
                console.print(f"spawning {world} local {device_kind} ranks ...")
            reports = spawn_local(job, world, log_dir=log_dir, timeout_s=timeout)
    except RankFailed as e:
        _fail(str(e), EXIT_FAILED_RUN)
    (result,) = reports
    if report is not None:
        try:
            report.write_text(json.dumps(result, indent=2) + "\n")
        except OSError as e:
            _fail(f"--report {report}: cannot write ({e.strerror})", EXIT_BAD_INPUT)
    if not json_out or console.is_terminal:
        render_report(console, result)
    if json_out:
        print(json.dumps(result))
