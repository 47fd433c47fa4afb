"""`mpplan demo`: the whole loop on this machine — profile tiny-gpt, solve for local CPU ranks, run the best plan."""
from __future__ import annotations

import time
from pathlib import Path

import typer

from cli.console import stderr_console
from planner.solve import LOCAL_BATCH, LOCAL_MODEL


def demo_command(
    workdir: Path = typer.Option(Path("mpplan-demo"), "--dir", help="Each demo writes a new run-<time> folder here."),
    ranks: int = typer.Option(2, "--ranks", min=1, help="Local CPU ranks (one per core keeps timings honest)."),
    steps: int = typer.Option(10, "--steps", min=1, help="Training steps of the chosen plan."),
    global_batch: int = typer.Option(LOCAL_BATCH, "--global-batch", min=1, help="Sequences per step."),
) -> None:
    """Profile tiny-gpt here, solve for local CPU ranks, run the best plan, report measured vs predicted.

    Example: mpplan demo --ranks 2 --steps 10
    """
    from cli.app import app
    from cli.errors import fail

    out = workdir / time.strftime("run-%Y%m%d-%H%M%S")
    try:
        out.mkdir(parents=True, exist_ok=False)
    except OSError as e:
        fail(f"{out}: cannot create ({e.strerror})")
    profile, plan = out / "profile.json", out / "plan.json"
    console = stderr_console()
    for title, args in (
        (f"1/3 profile {LOCAL_MODEL}", ["profile", "--model", LOCAL_MODEL, "--ranks", str(ranks), "--out", str(profile)]),
        (f"2/3 solve for {ranks} local ranks", ["solve", "--cluster", "local", "--gpus", str(ranks), "--profile",
                                               str(profile), "--global-batch", str(global_batch), "--top", "3",
                                               "--out", str(plan)]),
        ("3/3 run the chosen plan", ["run", str(plan), "--steps", str(steps), "--report", str(out / "run.json")]),
    ):
        console.rule(title)
        code = app(args, standalone_mode=False)  # returns the command's exit code instead of exiting
        if code:
            raise typer.Exit(code)
    console.print(f"profile.json, plan.json and run.json are in {out}")
