"""Rich rendering of solve results. The only place that turns bytes into GiB and seconds into ms."""
from __future__ import annotations

from collections import Counter

from rich.console import Console
from rich.table import Table

from planner.plan import Plan
from planner.search import SolveResult

GiB = 2**30


def fmt_time(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.3f} s"


def fmt_gib(nbytes: float) -> str:
    return f"{nbytes / GiB:.2f}"


def plans_table(plans: list[Plan], title: str) -> Table:
    t = Table(title=title, title_justify="left")
    for col in ("#", "TP", "PP", "DP", "VP", "SP", "MBS", "µbatches", "recompute", "ZeRO", "schedule", "mesh",
                "step", "tokens/s", "TFLOP/s/GPU", "MFU", "peak GiB", "bubble"):
        t.add_column(col, justify="right" if col not in ("recompute", "schedule", "mesh") else "left")
    for i, p in enumerate(plans, 1):
        par, pr = p.parallel, p.predicted
        t.add_row(str(i), str(par.tp), str(par.pp), str(par.dp), str(par.vpp), "y" if par.sp else "-",
                  str(p.micro_batch_size), str(p.num_microbatches), p.recompute, str(p.zero), str(p.schedule),
                  "-".join(p.mesh_order), fmt_time(pr.step_time_s), f"{pr.tokens_per_s:,.0f}",
                  f"{pr.tflops_per_gpu:.1f}", f"{pr.mfu:.1%}", fmt_gib(pr.peak_memory_bytes),
                  f"{pr.bubble_fraction:.1%}")
    return t


def stages_table(plan: Plan) -> Table:
    t = Table(title="Chosen plan: pipeline ranks (memory per GPU, GiB)", title_justify="left")
    for col in ("rank", "blocks", "recompute (full/sel/none)", "time/µbatch", "params", "grads", "optimizer",
                "activations", "pipeline buffers", "reserve", "total", "of device"):
        t.add_column(col, justify="left" if col in ("blocks", "recompute (full/sel/none)") else "right")
    cap = plan.cluster.gpu.memory_bytes
    pp = plan.parallel.pp
    for r, sp in enumerate(plan.predicted.stages):
        mine = [s for j, s in enumerate(plan.stages) if j % pp == r]
        blocks = ", ".join(f"{s.layers[0]}-{s.layers[1] - 1}" if s.num_blocks else "(none)" for s in mine)
        if r == 0:
            blocks = "emb + " + blocks
        if r == (len(plan.stages) - 1) % pp:
            blocks += " + head"
        rec = ", ".join("/".join(str(s.recompute.get(m, 0)) for m in ("full", "selective", "none")) for s in mine)
        m = sp.memory
        t.add_row(str(r), blocks, rec, fmt_time(sp.time_s), fmt_gib(m.params_bytes), fmt_gib(m.grads_bytes),
                  fmt_gib(m.optimizer_bytes), fmt_gib(m.activations_bytes), fmt_gib(m.pipeline_buffers_bytes),
                  fmt_gib(m.reserve_bytes),
                  fmt_gib(m.total_bytes), f"{m.total_bytes / cap:.0%}")
    return t


def rejected_table(result: SolveResult, examples: int = 8) -> Table:
    counts = Counter(r.kind for r in result.rejected)
    t = Table(title=f"Rejected: {len(result.rejected)} configurations ("
                    + ", ".join(f"{k} {v}" for k, v in counts.most_common()) + ")", title_justify="left")
    t.add_column("configuration")
    t.add_column("why")
    shown = sorted((r for r in result.rejected if r.kind == "oom"), key=lambda r: r.shortfall_bytes)[: examples // 2]
    shown += [r for r in result.rejected if r.kind == "slower"][: examples // 4]
    shown += [r for r in result.rejected if r.kind in ("unsupported", "indivisible")][: examples - len(shown)]
    for r in shown:
        t.add_row(" ".join(f"{k}={v}" for k, v in r.config.items()), r.reason)
    return t


def render_solve(console: Console, result: SolveResult, top: int) -> None:
    for note in result.notes:
        console.print(f"[dim]{note}[/dim]")
    console.print(plans_table(result.plans[:top], f"Top {min(top, len(result.plans))} plans "
                              f"(solved in {result.solve_time_s:.2f} s, {result.considered} configurations, "
                              f"{result.ilp_calls} ILPs)"))
    if result.plans:
        best = result.plans[0]
        console.print(stages_table(best))
        s = best.solver
        console.print(f"[dim]stage partition: {s.solver} {s.status}, gap {s.gap:.2%}, {s.time_s * 1e3:.0f} ms; "
                      f"costs: {best.cost_source}[/dim]")
    if result.rejected:
        console.print(rejected_table(result))
