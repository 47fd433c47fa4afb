"""How far to trust `mpplan profile` on this machine: repeatability, activation bytes against the analytic
formula, the collective fits' held-out error, and the wall time of the default command.

    python benchmarks/profile_stability.py --out benchmarks/profile_stability.json

1. Runs `mpplan profile` (tiny-gpt, defaults) ``--profiles`` times in a row as a user would (fresh processes),
   times each run, and compares every pair: every layer's own fwd / bwd / fwd+bwd cost at the machine's fast pace,
   the priced times (that cost x the profile's pace) and the paces themselves; and the blocks timed under
   DTensor TP and FSDP2 (the slowest rank's medians, what TP and ZeRO plans are priced from).
2. Compares the measured saved-activation bytes of a GPT block with Korthikanti et al. 2022 (arXiv 2205.05198,
   Table 2 / eq. 2, TP without sequence parallelism: sbh (10 + 24/t + 5as/(ht)) bytes at 16-bit with dropout),
   adapted to this model (fp32, no dropout: 4 sbh (4 + 12/t + as/(ht)); selective drops the as/(ht) term; full
   keeps the block input, 4 sbh) and to what torch 2.13's CPU SDPA actually saves (its flash kernel keeps a
   logsumexp of (a/t) s b floats instead of the s x s softmax; LayerNorms keep mean and rstd, 4 bs floats).
3. Reports each collective's held-out relative error (worst and median over the held-out sizes) and its mean
   stall per call from both runs, and from ``--comm-repeats`` more runs of the collective benchmark alone (as
   `mpplan profile` runs it, but holding out a size in every gap of the grid: ~30 s each), so the worst case is
   seen over more than two draws of this VM's noise and at every gap; and each fit against the mean of the
   other runs at the sizes it held out (against_other_runs: how far the fit is from a size's typical time,
   apart from the noise of one run's draw of it), beside the run's own measurement of those sizes against the same
   typical time (measured_worst_rel_error: the floor an exact fit of that run's data would reach).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from planner.presets import MODELS  # noqa: E402
from planner.collectives import CollectiveFit  # noqa: E402
from planner.profile import Profile, load_profile  # noqa: E402
from planner.specs import ModelSpec, Recompute  # noqa: E402


def run_cli(out: Path) -> tuple[Profile, float]:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "cli.app", "profile", "--out", str(out), "--force"], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return load_profile(out), time.perf_counter() - t0


def rel_diffs(a: float, b: float, c: float, d: float) -> dict:
    """Relative differences of forward (a vs c), backward (b vs d) and their sum, against the first profile."""
    return {"fwd_s": abs(a - c) / a, "bwd_s": abs(b - d) / b, "fwd_bwd": abs(a + b - c - d) / (a + b)}


def compare_runs(a: Profile, b: Profile) -> dict:
    """Every layer of two profiles: its own cost at the machine's fast pace (fwd_fast_s / bwd_fast_s, what the
    issue's 'within 10 %' is checked on) and the priced time (fast x pace, which moves with the machine)."""
    rows = []
    for la in a.layers:
        lb = b.layer(la.kind, la.tp, la.micro_batch_size)
        rows.append({"layer": la.kind, "tp": la.tp, "mbs": la.micro_batch_size,
                     "fwd_fast_ms": [la.fwd_fast_s * 1e3, lb.fwd_fast_s * 1e3],
                     "bwd_fast_ms": [la.bwd_fast_s * 1e3, lb.bwd_fast_s * 1e3],
                     "fwd_ms": [la.fwd_s * 1e3, lb.fwd_s * 1e3], "bwd_ms": [la.bwd_s * 1e3, lb.bwd_s * 1e3],
                     "cv": [la.fwd_cv, lb.fwd_cv],
                     "rel_diff": rel_diffs(la.fwd_fast_s, la.bwd_fast_s, lb.fwd_fast_s, lb.bwd_fast_s),
                     "priced_rel_diff": rel_diffs(la.fwd_s, la.bwd_s, lb.fwd_s, lb.bwd_s)})
    worst = max(max(r["rel_diff"].values()) for r in rows)
    wrapped = compare_wrapped_blocks(a, b)
    return {"pace": [a.pace, b.pace], "layers": rows, "max_rel_diff_any": worst,
            "max_rel_diff_fwd_bwd": max(r["rel_diff"]["fwd_bwd"] for r in rows),
            "max_priced_rel_diff_any": max(max(r["priced_rel_diff"].values()) for r in rows),
            "within_10pct": worst <= 0.10, "wrapped_blocks": wrapped,
            "max_wrapped_rel_diff_fwd_bwd": max((r["rel_diff"]["fwd_bwd"] for r in wrapped), default=None)}


def compare_wrapped_blocks(a: Profile, b: Profile) -> list[dict]:
    """The blocks timed as the runtime wraps them (DTensor TP, FSDP2 ZeRO 2 / 3; runtime/profile_tp.py), which
    the planner reads instead of the layers for TP and ZeRO plans: their medians, as priced."""
    pairs = [(f"tp{x.tp}", x, b.tp_block(x.tp, x.micro_batch_size)) for x in a.tp_blocks]
    pairs += [(f"zero{x.zero}", x, b.fsdp_block(x.zero, x.dp, x.micro_batch_size)) for x in a.fsdp_blocks]
    return [{"wrap": wrap, "mbs": x.micro_batch_size, "fwd_ms": [x.fwd_s * 1e3, y.fwd_s * 1e3],
             "bwd_ms": [x.bwd_s * 1e3, y.bwd_s * 1e3], "cv": [x.fwd_cv, y.fwd_cv],
             "rel_diff": rel_diffs(x.fwd_s, x.bwd_s, y.fwd_s, y.bwd_s)}
            for wrap, x, y in pairs if y is not None]


def analytic_bytes(spec: ModelSpec, tp: int, mbs: int) -> dict:
    s, b, h, a, t = spec.seq_len, mbs, spec.hidden_size, spec.num_heads, tp
    sbh = s * b * h
    return {
        "paper_16bit_dropout_none": sbh * (10 + 24 / t + 5 * a * s / (h * t)),
        "fp32_nodropout_none": 4 * sbh * (4 + 12 / t + a * s / (h * t)),
        "fp32_nodropout_selective": 4 * sbh * (4 + 12 / t),
        "fp32_full": 4 * sbh,
        "flash_sdpa_none": 4 * (sbh * (4 + 12 / t) + a // t * s * b + 4 * b * s),
    }


def activation_table() -> list[dict]:
    import torch

    from runtime.profile_layers import LayerCase, saved_activation_bytes

    wider = ModelSpec(name="gpt-h256-s256", flavour="gpt2", num_layers=2, hidden_size=256, num_heads=8,
                      vocab_size=256, seq_len=256)
    rows = []
    for spec in (MODELS["tiny-gpt"], wider, MODELS["tiny-llama"]):
        for tp in (1, 2):
            for mbs in (1, 4):
                case = LayerCase(spec, "block", tp, mbs, torch.device("cpu"), torch.float32)
                measured = {m.value: saved_activation_bytes(case, m) for m in Recompute}
                ref = analytic_bytes(spec, tp, mbs)
                rows.append({
                    "model": spec.name, "flavour": spec.flavour, "tp": tp, "mbs": mbs,
                    "as_over_h": spec.num_heads * spec.seq_len / spec.hidden_size,
                    "measured": measured, "analytic": ref,
                    "ratio_none_vs_fp32_formula": measured["none"] / ref["fp32_nodropout_none"],
                    "ratio_none_vs_flash_formula": measured["none"] / ref["flash_sdpa_none"],
                    "ratio_selective_vs_formula": measured["selective"] / ref["fp32_nodropout_selective"],
                    "ratio_full_vs_formula": measured["full"] / ref["fp32_full"],
                })
    return rows


def fit_rows(run: int, fits) -> list[dict]:
    """One row per collective fit of one profile (or one run of the collective benchmark)."""
    return [{"run": run, "op": c.op, "group_size": c.group_size, "alpha_us": c.alpha_s * 1e6,
             "GBps": 1e-9 / c.beta_s_per_byte if c.beta_s_per_byte else None, "pieces": len(c.pieces),
             "fit_rel_error": c.max_rel_error, "holdout_rel_error": c.holdout_rel_error,
             "holdout_median_rel_error": c.holdout_median_rel_error, "stall_us": c.stall_s * 1e6} for c in fits]


def collective_table(*profiles: Profile) -> list[dict]:
    return [row for run, prof in enumerate(profiles) for row in fit_rows(run, prof.collectives)]


def collective_repeats(count: int) -> list[list[CollectiveFit]]:
    """``count`` more runs of the collective benchmark on 2 ranks, as `mpplan profile` runs it but with a size
    held out in every gap of the fitted grid, not every other one (16 sizes, not 8)."""
    from runtime.profile_comm import CommConfig, measure_collectives

    every_gap = CommConfig(holdout_stride=1)
    return [measure_collectives(2, config=every_gap) for _ in range(count)]


def against_other_runs(runs: list[list[CollectiveFit]]) -> list[dict]:
    """Each run's fit at each size it held out, against that size's mean time over the other runs that measured
    it. One run's time of a size is itself a noisy draw: timed in two halves (alternate passes), a size's two
    halves put its own noise at 6-8 % (one standard deviation) at every size band and op on this VM, so the
    worst of 8-16 sizes in one run misses by ~2.5 of them. Where the machine holds its speed from run to run,
    the mean of the other runs is the size's typical time and this is the fit's own error; where it does not
    (alpha 0.42-0.66 ms in one evening's 9 runs), this is what a profile's prices miss by minutes later."""
    measured: dict[tuple[str, int, int], dict[int, float]] = defaultdict(dict)
    for run, fits in enumerate(runs):
        for fit in fits:
            for n, t in fit.holdout_points:
                measured[(fit.op, fit.group_size, n)][run] = t
    rows = []
    for run, fits in enumerate(runs):
        for fit in fits:
            errors, own = [], []
            for n, own_time in fit.holdout_points:
                others = [t for r, t in measured[(fit.op, fit.group_size, n)].items() if r != run]
                if others:
                    typical = statistics.fmean(others)
                    errors.append(abs(fit.time_s(n) - typical) / typical)
                    own.append(abs(own_time - typical) / typical)
            if errors:
                rows.append({"run": run, "op": fit.op, "group_size": fit.group_size, "sizes": len(errors),
                             "worst_rel_error": max(errors), "median_rel_error": statistics.median(errors),
                             # the same run's own measurement of those sizes against the same typical time: the
                             # floor a fit of this run's data could reach, were it exact at every size
                             "measured_worst_rel_error": max(own),
                             "measured_median_rel_error": statistics.median(own)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    parser.add_argument("--profiles", type=int, default=3, help="`mpplan profile` runs in a row (every pair compared)")
    parser.add_argument("--comm-repeats", type=int, default=6, help="extra runs of the collective benchmark alone")
    args = parser.parse_args()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        runs = [run_cli(Path(tmp) / f"{i}.json") for i in range(args.profiles)]
    profiles = [prof for prof, _ in runs]
    first = profiles[0]
    repeats = collective_repeats(args.comm_repeats)
    report = {
        "machine": {"cpu": first.device.name, "cores": os.cpu_count(), "torch": first.device.torch_version,
                    "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
                    "matmul_tflops_1_thread": [prof.device.matmul_tflops for prof in profiles]},
        "cli_wall_s": [wall for _, wall in runs],
        "repeatability": [{"profiles": [i, j], **compare_runs(profiles[i], profiles[j])}
                          for i in range(len(profiles)) for j in range(i + 1, len(profiles))],
        "activations": activation_table(),
        "collectives": collective_table(*profiles),
        "collective_repeats": [row for run, fits in enumerate(repeats) for row in fit_rows(run, fits)],
        # runs 0.. are the profiles' fits, then the repeats'
        "collectives_against_other_runs": against_other_runs([p.collectives for p in profiles] + repeats),
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
