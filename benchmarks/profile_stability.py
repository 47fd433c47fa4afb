"""How far to trust `mpplan profile` on this machine: repeatability, activation bytes against the analytic
formula, the collective fits' held-out error, and the wall time of the default command.

    python benchmarks/profile_stability.py --out benchmarks/profile_stability.json

1. Runs `mpplan profile` (tiny-gpt, defaults) twice in a row as a user would (fresh processes), times each run,
   and compares every layer's fwd / bwd / fwd+bwd median between the two.
2. Compares the measured saved-activation bytes of a GPT block with Korthikanti et al. 2022 (arXiv 2205.05198,
   Table 2 / eq. 2, TP without sequence parallelism: sbh (10 + 24/t + 5as/(ht)) bytes at 16-bit with dropout),
   adapted to this model (fp32, no dropout: 4 sbh (4 + 12/t + as/(ht)); selective drops the as/(ht) term; full
   keeps the block input, 4 sbh) and to what torch 2.13's CPU SDPA actually saves (its flash kernel keeps a
   logsumexp of (a/t) s b floats instead of the s x s softmax; LayerNorms keep mean and rstd, 4 bs floats).
3. Reports each collective's held-out relative error (worst and median over the held-out sizes) and its mean
   stall per call from both runs, and from ``--comm-repeats`` more runs of the collective benchmark alone (as
   `mpplan profile` runs it, ~20 s each), so the worst case is seen over more than two draws of this VM's noise.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from planner.presets import MODELS  # noqa: E402
from planner.profile import Profile, load_profile  # noqa: E402
from planner.specs import ModelSpec, Recompute  # noqa: E402


def run_cli(out: Path) -> tuple[Profile, float]:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "cli.app", "profile", "--out", str(out), "--force"], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return load_profile(out), time.perf_counter() - t0


def compare_runs(a: Profile, b: Profile) -> dict:
    rows = []
    for la in a.layers:
        lb = b.layer(la.kind, la.tp, la.micro_batch_size)
        diff = {k: abs(getattr(la, k) - getattr(lb, k)) / getattr(la, k) for k in ("fwd_s", "bwd_s")}
        total_a, total_b = la.fwd_s + la.bwd_s, lb.fwd_s + lb.bwd_s
        diff["fwd_bwd"] = abs(total_a - total_b) / total_a
        rows.append({"layer": la.kind, "tp": la.tp, "mbs": la.micro_batch_size, "fwd_ms": [la.fwd_s * 1e3, lb.fwd_s * 1e3],
                     "bwd_ms": [la.bwd_s * 1e3, lb.bwd_s * 1e3], "cv": [la.fwd_cv, la.bwd_cv],
                     "rel_diff": diff})
    worst = max(max(r["rel_diff"].values()) for r in rows)
    worst_total = max(r["rel_diff"]["fwd_bwd"] for r in rows)
    return {"layers": rows, "max_rel_diff_any": worst, "max_rel_diff_fwd_bwd": worst_total,
            "within_10pct": worst <= 0.10}


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
                    "model": spec.name, "flavour": spec.flavour, "tp": tp, "mbs": mbs, "as_over_h": spec.num_heads * spec.seq_len / spec.hidden_size,
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


def collective_repeats(count: int) -> list[dict]:
    """``count`` more runs of the collective benchmark on 2 ranks, as `mpplan profile` runs it."""
    from runtime.profile_comm import measure_collectives

    return [row for run in range(count) for row in fit_rows(run, measure_collectives(2))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    parser.add_argument("--comm-repeats", type=int, default=6, help="extra runs of the collective benchmark alone")
    args = parser.parse_args()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        first, wall_1 = run_cli(Path(tmp) / "a.json")
        second, wall_2 = run_cli(Path(tmp) / "b.json")
    report = {
        "machine": {"cpu": first.device.name, "cores": os.cpu_count(), "torch": first.device.torch_version,
                    "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
                    "matmul_tflops_1_thread": [first.device.matmul_tflops, second.device.matmul_tflops]},
        "cli_wall_s": [wall_1, wall_2],
        "repeatability": compare_runs(first, second),
        "activations": activation_table(),
        "collectives": collective_table(first, second),
        "collective_repeats": collective_repeats(args.comm_repeats),
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
