"""How fast `mpplan solve` is: gpt3-175b on dgx-a100 at 64, 1,024 and 16,384 GPUs, global batch 1536.

Goal (issue 2): under 1 s, 3 s and 20 s on a 2-core machine, ILP gap 0. Prints one line per size and writes
JSON with --out. Each size is solved `--repeats` times in one process; the median is reported (the first call
also pays for imports being warm, so it is reported separately).

    python benchmarks/solve_speed.py [--out solve_speed.json] [--repeats 3] [--exhaustive]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from planner.search import Pins
from planner.solve import SolveRequest, run_solve


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--exhaustive", action="store_true", help="no screening: ILP every candidate the bounds keep")
    ap.add_argument("--gpus", type=int, nargs="*", default=[64, 1024, 16384])
    args = ap.parse_args()
    rows = []
    for gpus in args.gpus:
        times, result = [], None
        for _ in range(args.repeats):
            start = time.perf_counter()
            req = SolveRequest.build(gpus=gpus, model="gpt3-175b", cluster="dgx-a100", global_batch=1536)
            result = run_solve(req, Pins(), top_k=5, exhaustive=args.exhaustive)
            times.append(time.perf_counter() - start)
        best = result.plans[0]
        p = best.parallel
        row = {"gpus": gpus, "first_s": times[0], "median_s": statistics.median(times), "configurations": result.considered,
               "ilp_calls": result.ilp_calls, "max_gap": max(pl.solver.gap for pl in result.plans),
               "statuses": sorted({pl.solver.status for pl in result.plans}),
               "best": f"tp{p.tp} pp{p.pp} dp{p.dp} v{p.vpp}{' sp' if p.sp else ''} mbs{best.micro_batch_size} "
                       f"{best.recompute} zero{best.zero} {best.schedule}",
               "best_step_s": best.predicted.step_time_s, "best_mfu": best.predicted.mfu}
        rows.append(row)
        print(f"{gpus:>6} GPUs: median {row['median_s']:.2f} s (first {row['first_s']:.2f} s), "
              f"{row['configurations']} configurations, {row['ilp_calls']} ILPs, max gap {row['max_gap']:.2%} "
              f"{row['statuses']}; best {row['best']} {row['best_step_s']:.2f} s/step MFU {row['best_mfu']:.1%}",
              flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
