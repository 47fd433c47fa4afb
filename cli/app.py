"""mpplan: plan how to split a transformer's training over GPUs, then prove the plan by running it.

\b
  mpplan demo                                   profile -> solve -> run tiny-gpt on 2 local CPU ranks
  mpplan solve --gpus 64                        plan gpt3-13b on 8 DGX-A100 nodes (defaults said aloud)
  mpplan solve --gpus 1024 --model gpt3-175b --global-batch 1536 --out plan.json
  mpplan profile --model tiny-gpt --out profile.json
  mpplan solve --cluster local --gpus 2 --profile profile.json --out plan.json
  mpplan run plan.json --steps 20               train with the plan, report measured vs predicted
  mpplan run plan.json --print-launch           the torchrun / srun lines for a cluster

Exit codes: 0 ok, 1 a run failed, 2 bad input, 3 no plan fits.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from cli.console import stderr_console
from cli.errors import EXIT_BAD_INPUT, EXIT_NO_PLAN, fail
from planner.plan import Schedule
from planner.solve import DEFAULT_BATCH, DEFAULT_CLUSTER, DEFAULT_MODEL, LOCAL_BATCH, LOCAL_MODEL
from planner.specs import Recompute, SpecError

app = typer.Typer(help=__doc__, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  rich_markup_mode=None)


def write_new(path: Path, text: str, force: bool) -> None:
    """Write a file the user named, refusing to overwrite one unless --force."""
    if path.exists() and not force:
        fail(f"{path} exists; pass --force to overwrite it")
    try:
        path.write_text(text)
    except OSError as e:
        fail(f"{path}: cannot write ({e.strerror})")


@app.command()
def solve(
    gpus: int = typer.Option(..., "--gpus", help="Total GPUs (a multiple of the cluster's GPUs per node)."),
    model: Optional[str] = typer.Option(None, help=f"Preset, HF config.json or model YAML/JSON [default: {DEFAULT_MODEL}]."),
    cluster: Optional[str] = typer.Option(None, help=f"Preset (dgx-a100, dgx-h100, local) or YAML/JSON [default: {DEFAULT_CLUSTER}; local with --profile]."),
    global_batch: Optional[int] = typer.Option(None, "--global-batch", help=f"Sequences per step [default: {DEFAULT_BATCH}; {LOCAL_BATCH} on local]."),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", help="Override the model's sequence length."),
    profile: Optional[Path] = typer.Option(None, "--profile", help="profile.json from `mpplan profile`: plan from measured costs."),
    tp: Optional[int] = typer.Option(None, "--tp", min=1, help="Pin tensor-parallel degree."),
    pp: Optional[int] = typer.Option(None, "--pp", min=1, help="Pin pipeline-parallel degree."),
    dp: Optional[int] = typer.Option(None, "--dp", min=1, help="Pin data-parallel degree."),
    vpp: Optional[int] = typer.Option(None, "--vpp", min=1, help="Pin virtual stages per pipeline rank (interleaved)."),
    mbs: Optional[int] = typer.Option(None, "--mbs", min=1, help="Pin micro-batch size."),
    recompute: Optional[Recompute] = typer.Option(None, "--recompute", help="Pin recompute for every block (default: chosen per stage)."),
    sp: Optional[bool] = typer.Option(None, "--sp/--no-sp", help="Pin sequence parallelism."),
    zero: Optional[int] = typer.Option(None, "--zero", min=0, max=3, help="Pin ZeRO stage 0-3."),
    schedule: Optional[Schedule] = typer.Option(None, "--schedule", help="Pin the pipeline schedule."),
    memory_limit: Optional[int] = typer.Option(None, "--memory-limit", min=1, help="Pretend each GPU has this many bytes."),
    top: int = typer.Option(5, "--top", min=1, help="How many plans to show and return."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write the best plan here (plan.json)."),
    force: bool = typer.Option(False, "--force", help="Overwrite --out if it exists."),
    json_out: bool = typer.Option(False, "--json", help="Print only JSON to stdout: {plans, rejected, solve_time_s}."),
    exhaustive: bool = typer.Option(False, "--exhaustive", help="Partition every candidate the bounds do not exclude (no screening)."),
) -> None:
    """Choose TP/PP/DP, micro-batching, recompute, schedule and stage boundaries.

    Example: mpplan solve --gpus 1024 --model gpt3-175b --global-batch 1536 --out plan.json
    """
    from planner.search import Pins
    from planner.solve import SolveRequest, run_solve

    console = stderr_console()
    if out and out.exists() and not force:
        fail(f"{out} exists; pass --force to overwrite it")
    try:
        req = SolveRequest.build(gpus=gpus, model=model, cluster=cluster, global_batch=global_batch, seq_len=seq_len,
                                 profile=profile, memory_limit=memory_limit)
        pins = Pins(tp=tp, pp=pp, dp=dp, vpp=vpp, mbs=mbs, recompute=recompute, sp=sp, zero=zero, schedule=schedule)
        result = run_solve(req, pins, top_k=top, exhaustive=exhaustive)
    except SpecError as e:
        fail(str(e))
    show_tables = not json_out or console.is_terminal
    if show_tables:
        from cli.render import render_solve
        render_solve(console, result, top)
    if json_out:
        print(json.dumps({"plans": [p.model_dump(mode="json") for p in result.plans],
                          "rejected": [{"config": r.config, "kind": r.kind, "reason": r.reason} for r in result.rejected],
                          "solve_time_s": result.solve_time_s, "defaults": result.notes}))
    if not result.plans:
        fail(result.no_fit_message(), EXIT_NO_PLAN)
    if out:
        write_new(out, result.plans[0].to_json(), force)
        if show_tables:
            console.print(f"wrote {out}")


# These modules import torch only inside their commands, so `mpplan solve` stays torch-free.
from cli.demo_cmd import demo_command  # noqa: E402
from cli.profile_cmd import profile_command  # noqa: E402
from cli.run_cmd import run_command  # noqa: E402
from cli.validate_cmd import validate_command  # noqa: E402

app.command("profile")(profile_command)
app.command("run")(run_command)
app.command("validate")(validate_command)
app.command("demo")(demo_command)


def main() -> None:
    try:
        app()
    except SpecError as e:  # a spec error raised outside a command's own handling
        print(f"mpplan: {e}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)


if __name__ == "__main__":
    main()
