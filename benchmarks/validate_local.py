"""Issue 5's figures: how well the planner ranks and sizes every feasible plan on this machine.

    python benchmarks/validate_local.py --steps 8 --max-plans 16 --repeats 2 --out benchmarks/validate_local.json

For each model (tiny-gpt, and benchmarks/models/wide-gpt.yaml, 4x wider so compute rather than overheads sets
the step time), runs `mpplan validate` on 2 ranks (one core each on this 2-core machine) with global batch 16:
profile here, solve keeping every feasible plan with each recompute mode pinned in turn, run every plan for
``--steps`` steps (``--repeats`` rounds over all plans; a plan's time is the median of its runs, and the spread
between runs is the noise floor), then compare. Then once more for tiny-gpt under a ``--memory-limit`` that the solver's
cheapest plans just fit, so the memory model decides feasibility and every plan it allows must stay under it
when run. Writes one JSON with each validation's summary (Spearman, regret, step-time and peak-memory mean
absolute error, limit violations) and every plan's outcome, plus the load average before and after.

Measure on a quiet machine: timings beside other jobs are inflated (each outcome records the runnable processes
seen just before it ran, "busy_cpus").
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
MODELS = ("tiny-gpt", str(ROOT / "benchmarks" / "models" / "wide-gpt.yaml"))


def loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def validate(args: list[str], report: Path) -> dict:
    cmd = [sys.executable, "-m", "cli.app", "validate", *args, "--report", str(report), "--force"]
    print("$ mpplan validate " + " ".join(args), file=sys.stderr, flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    result = json.loads(report.read_text())
    result["wall_s"] = time.perf_counter() - start
    return result


def memory_limit_for(result: dict, fraction: float) -> int:
    """A per-rank limit between the smallest and the largest predicted peak: the smallest plus ``fraction`` of
    the spread, so some plans are predicted to fit and others not."""
    peaks = sorted(o["predicted_peak_bytes"] for o in result["outcomes"])
    return int(peaks[0] + fraction * (peaks[-1] - peaks[0]))


def profile_summary(path: Path) -> dict:
    """What the predictions were priced from beyond the layers, kept to tell later which part missed: the
    runtime calibration, the pace, the FSDP2 and TP block timings, a collective's cost after compute, the timed
    DDP step and the machine."""
    profile = json.loads(path.read_text())
    return {key: profile.get(key) for key in ("device", "pace", "runtime", "tp_blocks", "fsdp_blocks", "pipeline",
                                              "collective_after_compute_s", "ddp_sync")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "validate_local.json")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--global-batch", type=int, default=16)
    parser.add_argument("--max-plans", type=int, default=None, help="Per model (default: every feasible plan).")
    parser.add_argument("--repeats", type=int, default=2, help="Runs of every plan, in rounds over all plans.")
    args = parser.parse_args()
    common = ["--ranks", "2", "--global-batch", str(args.global_batch), "--steps", str(args.steps),
              "--repeats", str(args.repeats)]
    if args.max_plans:
        common += ["--max-plans", str(args.max_plans)]
    out: dict = {"command": "python benchmarks/validate_local.py " + " ".join(sys.argv[1:]),
                 "cores": os.cpu_count(), "loadavg_before": loadavg(), "validations": []}
    with tempfile.TemporaryDirectory(prefix="validate-local-") as tmp:
        for model in MODELS:
            name = Path(model).stem
            profile = Path(tmp) / f"{name}.profile.json"
            result = validate(["--model", model, "--save-profile", str(profile), *common], Path(tmp) / f"{name}.json")
            out["validations"].append({"name": name, **result, "profile": profile_summary(profile)})
            if name == "tiny-gpt":
                limit = memory_limit_for(result, 0.5)
                limited = validate(["--profile", str(profile), "--memory-limit", str(limit), *common],
                                   Path(tmp) / f"{name}-limit.json")
                out["validations"].append({"name": f"{name} --memory-limit {limit}", **limited,
                                           "profile": profile_summary(profile)})
    out["loadavg_after"] = loadavg()
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    for v in out["validations"]:
        s = v["summary"]
        print(f"{v['name']}: {s['ran']}/{s['plans']} plans, Spearman {s['spearman']}, regret {s['regret']}, "
              f"step MAE {s['step_time_mape']}, memory MAE {s['memory_mape']}, violations {len(s['violations'])}, "
              f"noise floor {s['run_spread']} (an exact model's error: {s['step_time_noise_floor']}), "
              f"machine slowdown vs profile {s['machine_slowdown']}, "
              f"step MAE at the profiled speed {s['step_time_mape_same_speed']}")
        for kind, k in s["by_kind"].items():
            print(f"  {kind}: {k['plans']} plans, step MAE {k['step_time_mape']:.3f}, bias {k['step_time_bias']:+.3f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
