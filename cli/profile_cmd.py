"""`mpplan profile`: measure the model's layers and this machine's collectives, write profile.json.

Registered by cli/app.py as the ``profile`` command. torch is imported only when the command runs, so
`mpplan solve` stays torch-free.
"""
from __future__ import annotations

import json
import os
from functools import partial
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from cli.console import stderr_console
from cli.errors import EXIT_BAD_INPUT, fail
from planner.profile import Profile
from planner.specs import SpecError, load_model


_fail = partial(fail, command="profile")


def parse_int_list(option: str, text: str) -> list[int]:
    """"1,2,4" -> [1, 2, 4] (sorted, without repeats); SpecError naming the option otherwise."""
    try:
        values = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise SpecError(f"{option} {text}: expected comma-separated positive integers, e.g. 1,2,4") from None
    if not values or values[0] <= 0:
        raise SpecError(f"{option} {text}: expected comma-separated positive integers, e.g. 1,2,4")
    return values


def busy_warning(console: Console) -> None:
    """Timings taken beside other jobs are inflated and noisy (facts: with 2 threads the mean doubles beside
    one busy process); say so, since the user can often wait for a quiet machine."""
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load > cores:
        console.print(f"warning: this machine is busy (load {load:.1f} on {cores} cores); "
                      "timings will be inflated and noisy", style="yellow")


def summary_tables(profile: Profile) -> list[Table]:
    layers = Table(title=f"{profile.model.name} on {profile.device.name} ({profile.precision}, 1 thread)",
                   title_justify="left")
    for col in ("layer", "tp", "mbs", "fwd ms (cv)", "bwd ms (cv)", "+sel/+full ms", "params", "act KiB n/s/f"):
        layers.add_column(col, justify="left" if col == "layer" else "right")
    for lp in profile.layers:
        extra = "/".join(f"{lp.recompute_extra_s[m] * 1e3:.2f}" for m in ("selective", "full")
                         if m in lp.recompute_extra_s) or "-"
        acts = "/".join(str(round(lp.activation_bytes[m] / 1024)) for m in ("none", "selective", "full")
                        if m in lp.activation_bytes)
        layers.add_row(lp.kind, str(lp.tp), str(lp.micro_batch_size), f"{lp.fwd_s * 1e3:.3f} ({lp.fwd_cv:.0%})",
                       f"{lp.bwd_s * 1e3:.3f} ({lp.bwd_cv:.0%})", extra, f"{lp.params:,}", acts)
    comms = Table(title="collectives: time = alpha + beta * bytes", title_justify="left")
    for col in ("op", "ranks", "alpha us", "stall us", "GB/s", "pieces", "fit err max", "held-out err median/max"):
        comms.add_column(col, justify="left" if col == "op" else "right")
    for c in profile.collectives:
        rate = f"{1e-9 / c.beta_s_per_byte:.2f}" if c.beta_s_per_byte > 0 else "-"
        comms.add_row(c.op, str(c.group_size), f"{c.alpha_s * 1e6:.0f}", f"{c.stall_s * 1e6:.0f}", rate,
                      str(max(1, len(c.pieces))), f"{c.max_rel_error:.0%}", _held_out(c))
    tables = [layers, comms]
    if profile.pipeline is not None:
        hand_offs = Table(title=f"pipeline hand-offs ({profile.pipeline.message_bytes // 1024} KiB, "
                                "torch.distributed.pipelining)", title_justify="left")
        for col in ("schedule", "vpp", "micro-batches", "waits per rank", "step ms", "ms per hand-off"):
            hand_offs.add_column(col, justify="left" if col == "schedule" else "right")
        for r in profile.pipeline.runs:
            hand_offs.add_row(r.schedule, str(r.vpp), str(r.num_microbatches), str(r.receives_per_rank),
                              f"{r.step_time_s * 1e3:.1f}", f"{r.receive_s * 1e3:.2f}")
        tables.append(hand_offs)
    if profile.ddp_sync is not None:
        d = profile.ddp_sync
        sync = Table(title=f"DDP gradient sync (whole model, mbs {d.micro_batch_size}, {d.dp} ranks)",
                     title_justify="left")
        for col in ("step ms synced", "step ms unsynced", "excess ms", "buckets KiB"):
            sync.add_column(col, justify="right")
        sync.add_row(f"{d.synced_s * 1e3:.2f}", f"{d.unsynced_s * 1e3:.2f}", f"{d.excess_s * 1e3:.2f}",
                     " + ".join(str(round(b / 1024)) for b in d.bucket_bytes))
        tables.append(sync)
    return tables


def _held_out(fit) -> str:
    median = "-" if fit.holdout_median_rel_error is None else f"{fit.holdout_median_rel_error:.0%}"
    return f"{median}/{fit.holdout_rel_error:.0%}"


def profile_command(
    model: str = typer.Option("tiny-gpt", "--model", help="Preset, HF config.json or model YAML/JSON."),
    device: str = typer.Option("cpu", "--device", help="cpu (fp32, gloo) or cuda (bf16, nccl)."),
    mbs: str = typer.Option("1,2,4", "--mbs", help="Micro-batch sizes to profile, comma-separated."),
    tp: str = typer.Option("1,2", "--tp", help="Tensor-parallel degrees to profile (each as its shard)."),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", help="Override the model's sequence length."),
    ranks: int = typer.Option(2, "--ranks", help="Local ranks for the collective benchmarks (1 skips them)."),
    out: Path = typer.Option(Path("profile.json"), "--out", help="Where to write the profile."),
    json_out: bool = typer.Option(False, "--json", help="Also print the profile as JSON on stdout."),
    force: bool = typer.Option(False, "--force", help="Overwrite --out if it exists."),
) -> None:
    """Measure per-layer time and memory and the collectives on this machine; write profile.json.

    Example: mpplan profile --model tiny-gpt --mbs 1,2,4 --tp 1,2 --ranks 2 --out profile.json
    then:    mpplan solve --cluster local --gpus 2 --profile profile.json
    """
    if out.exists() and not force:
        _fail(f"{out} exists; pass --force to overwrite it")
    try:
        spec = load_model(model, seq_len)
        micro_batch_sizes, tp_degrees = parse_int_list("--mbs", mbs), parse_int_list("--tp", tp)
        from runtime.profile import (check_request, count_steps, profile_model,  # torch from here on
                                     times_ddp, times_fsdp_blocks, times_pipeline, tp_blocks_to_time)

        check_request(spec, device, micro_batch_sizes, tp_degrees, ranks)
    except SpecError as e:
        _fail(str(e))
    console = stderr_console()
    busy_warning(console)
    with Progress(TextColumn("{task.description:<28}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, disable=not console.is_terminal, transient=True) as bar:
        task = bar.add_task(f"profiling {spec.name}", total=count_steps(
            ranks, tp_to_time=tp_blocks_to_time(device, tp_degrees, ranks),
            fsdp=times_fsdp_blocks(device, tp_degrees, ranks), pipeline=times_pipeline(device, ranks),
            ddp=times_ddp(device, ranks)))
        try:
            profile = profile_model(spec, device, micro_batch_sizes, tp_degrees, ranks,
                                    progress=lambda label: bar.update(task, advance=1, description=label))
        except SpecError as e:
            _fail(str(e))
        except RuntimeError as e:  # a measuring rank failed (its error is in the message and its log)
            _fail(f"profiling failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}", 1)
    text = profile.to_json()
    try:
        out.write_text(text)
    except OSError as e:
        _fail(f"{out}: cannot write ({e.strerror})")
    if json_out:
        print(json.dumps(json.loads(text)))
    if not json_out or console.is_terminal:
        for table in summary_tables(profile):
            console.print(table)
        console.print(f"wrote {out}")
