"""What choosing recompute per stage (the ILP's per-stage mode counts) gains over the best uniform choice.

For each case the search runs three times with the same pins: recompute free (per stage), and pinned to each
uniform mode (none / selective / full); the gain is best uniform step time / per-stage step time - 1. Cases are
memory-tight on purpose (that is where the choice matters); a case where everything fits without recompute gains 0.

    python benchmarks/per_stage_recompute.py [--out per_stage_recompute.json]
"""
from __future__ import annotations

import argparse
import json
import sys

from planner.plan import Schedule
from planner.search import Pins
from planner.solve import SolveRequest, run_solve
from planner.specs import Recompute

CASES = [  # (label, model, gpus, global batch, memory limit bytes or None, pins)
    ("gpt3-175b 64xA100 tp8 pp8 1f1b", "gpt3-175b", 64, 512, None, dict(tp=8, pp=8, mbs=1, schedule=Schedule.ONE_F_ONE_B)),
    # batch 64: torch.distributed.pipelining's receive buffers for 512 micro-batches alone leave no room at 55-60 GB
    ("gpt3-175b 64xA100 tp8 pp8 1f1b, batch 64, 60 GB", "gpt3-175b", 64, 64, 60 * 10**9, dict(tp=8, pp=8, mbs=1, schedule=Schedule.ONE_F_ONE_B)),
    ("gpt3-175b 128xA100 tp8 pp16 mbs2", "gpt3-175b", 128, 1024, None, dict(tp=8, pp=16, mbs=2, schedule=Schedule.ONE_F_ONE_B)),
    ("llama3-70b 64xH100 tp8 pp4 mbs1", "llama3-70b", 64, 256, None, dict(tp=8, pp=4, mbs=1, schedule=Schedule.ONE_F_ONE_B)),
    ("llama3-70b 64xH100 tp4 pp8 mbs1", "llama3-70b", 64, 256, None, dict(tp=4, pp=8, mbs=1, schedule=Schedule.ONE_F_ONE_B)),
    ("llama3-405b 512xH100 tp8 pp16", "llama3-405b", 512, 512, None, dict(tp=8, pp=16, mbs=1, schedule=Schedule.ONE_F_ONE_B)),
    ("gpt3-13b 16xA100 (free)", "gpt3-13b", 16, 256, None, dict()),
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out")
    args = ap.parse_args()
    rows = []
    for label, model, gpus, batch, limit, pins in CASES:
        cluster = "dgx-h100" if model.startswith("llama") else "dgx-a100"
        req = SolveRequest.build(gpus=gpus, model=model, cluster=cluster, global_batch=batch, memory_limit=limit)
        times = {}
        for mode in (None, Recompute.NONE, Recompute.SELECTIVE, Recompute.FULL):
            res = run_solve(req, Pins(recompute=mode, **pins), top_k=1)
            times[str(mode) if mode else "per-stage"] = res.plans[0].predicted.step_time_s if res.plans else None
        uniform = [t for k, t in times.items() if k != "per-stage" and t is not None]
        gain = (min(uniform) / times["per-stage"] - 1) if uniform and times["per-stage"] else None
        rows.append({"case": label, **times, "gain": gain})
        fmt = lambda t: "does not fit" if t is None else f"{t:.3f} s"
        print(f"{label:<40} per-stage {fmt(times['per-stage']):>12} | none {fmt(times['none']):>12} | "
              f"selective {fmt(times['selective']):>12} | full {fmt(times['full']):>12} | gain "
              f"{'n/a' if gain is None else f'{gain:+.1%}'}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
