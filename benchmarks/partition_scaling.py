"""How long the stage-partition ILP takes, and whether it proves optimality, as pipelines grow.

    python benchmarks/partition_scaling.py --out partition_scaling.json [--solver HiGHS] [--time-limit 10]

Instances: 128 identical blocks priced like a 10 ms block (none / selective / full recompute: +4 % / +33 % time,
Korthikanti et al. 2022 Table 2 proportions), 1F1B in-flight counts (interleaved: Narayanan et al. 2021
section 2.2.2), a memory cap that binds (30 % of the way from all-full to no recompute), is tight (2 % above all-full) or none.
Writes one JSON record per instance; prints a table to stderr.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from planner.partition import BlockOption, PartitionProblem, min_rank_memory_bytes, solve_partition  # noqa: E402
from planner.specs import Recompute  # noqa: E402

OPTIONS = (BlockOption(Recompute.NONE, 10e-3, 1.2e9), BlockOption(Recompute.SELECTIVE, 10.4e-3, 0.5e9),
           BlockOption(Recompute.FULL, 13.3e-3, 0.08e9))


def instance(ranks: int, vpp: int, microbatches: int, cap_bytes: float) -> PartitionProblem:
    stages = ranks * vpp
    # interleaved 1F1B warm-up: chunk c of rank r holds (ranks - r) + (vpp - 1 - c) * ranks micro-batches
    inflight = tuple(float(min(ranks - j % ranks + (vpp - 1 - j // ranks) * ranks, microbatches)) for j in range(stages))
    return PartitionProblem(num_blocks=128, options=OPTIONS, block_static_bytes=1.6e9, num_stages=stages,
                            stage_rank=tuple(j % ranks for j in range(stages)), inflight=inflight,
                            num_microbatches=microbatches, first_time_s=4e-3, first_static_bytes=6e9,
                            first_act_bytes=0.3e9, last_time_s=9e-3, last_static_bytes=6e9, last_act_bytes=1.5e9,
                            boundary_time_s=0.2e-3, memory_cap_bytes=cap_bytes, min_blocks_per_stage=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("partition_scaling.json"))
    parser.add_argument("--solver", default=None)
    parser.add_argument("--time-limit", type=float, default=10.0)
    args = parser.parse_args()
    records = []
    for ranks, vpp in [(4, 1), (8, 1), (16, 1), (32, 1), (64, 1), (8, 4), (16, 4), (32, 2)]:
        for microbatches in sorted({ranks * vpp, 4 * ranks, 256}):
            unbounded = instance(ranks, vpp, microbatches, math.inf)
            lean = min_rank_memory_bytes(unbounded)  # everything fully recomputed
            fat = min_rank_memory_bytes(dataclasses.replace(unbounded, options=OPTIONS[:1]))  # nothing recomputed
            for label, cap in [("none", math.inf), ("binding", lean + 0.3 * (fat - lean)), ("tight", lean * 1.02)]:
                problem = instance(ranks, vpp, microbatches, cap)
                start = time.perf_counter()
                result = solve_partition(problem, args.time_limit, args.solver)
                wall_s = time.perf_counter() - start
                record = dict(ranks=ranks, vpp=vpp, stages=ranks * vpp, microbatches=microbatches, cap=label,
                              status=result.status if result else "infeasible", gap=result.gap if result else None,
                              wall_s=round(wall_s, 4), objective_s=result.objective_s if result else None,
                              solver=result.solver if result else None)
                records.append(record)
                print(f"{ranks:3d}x{vpp} m={microbatches:3d} cap={label:8s} {record['status']:9s} "
                      f"gap={record['gap'] if record['gap'] is not None else '-'!s:10.8} {wall_s:7.3f} s", file=sys.stderr)
    args.out.write_text(json.dumps(records, indent=1) + "\n")


if __name__ == "__main__":
    main()
