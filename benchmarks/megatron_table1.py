"""Accuracy on published runs: Megatron-LM's weak-scaling table (Narayanan et al. 2021, arXiv 2104.04473, Table 1).

Each row's plan is pinned (TP, PP, DP, micro-batch, virtual stages, full recompute, the interleaved schedule when
v > 1) on DGX A100-80GB nodes, and the predicted iteration time is compared with the published one, which follows
from the paper's eq. (3) FLOP count and the published TFLOP/s per GPU. The runtime modelled is Megatron-LM as it
ran then (planner.costmodel.MEGATRON_2021: unfused attention with dropout, no overlap of the DP all-reduce).
Then the search runs unpinned on the same model, GPUs and batch and must not predict a slower plan.

    python benchmarks/megatron_table1.py [--out results.json] [--no-unpinned]
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from planner.costmodel import MEGATRON_2021, megatron_flops_per_step
from planner.estimate import Estimator
from planner.plan import Schedule
from planner.search import Pins, solve
from planner.specs import ModelSpec, Precision, Recompute, TrainSpec, load_cluster

# params, heads, hidden, layers, tp, pp, gpus, batch, mbs, v, published TFLOP/s per GPU
# (micro-batch sizes and virtual stages as in NVIDIA/Megatron-LM examples/sc21/run_table_1.sh)
TABLE_1 = [
    ("1.7B", 24, 2304, 24, 1, 1, 32, 512, 16, 1, 137),
    ("3.6B", 32, 3072, 30, 2, 1, 64, 512, 16, 1, 138),
    ("7.5B", 32, 4096, 36, 4, 1, 128, 512, 16, 1, 142),
    ("18.4B", 48, 6144, 40, 8, 1, 256, 1024, 8, 1, 135),
    ("39.1B", 64, 8192, 48, 8, 2, 512, 1536, 4, 1, 138),
    ("76.1B", 80, 10240, 60, 8, 4, 1024, 1792, 2, 3, 140),
    ("145.6B", 96, 12288, 80, 8, 8, 1536, 2304, 2, 2, 148),
    ("310.1B", 128, 16384, 96, 8, 16, 1920, 2160, 1, 2, 155),
    ("529.6B", 128, 20480, 105, 8, 35, 2520, 2520, 1, 3, 163),
    ("1008B", 160, 25600, 128, 8, 64, 3072, 3072, 1, 1, 163),
]


def row_inputs(row):
    name, heads, hidden, layers, tp, pp, gpus, batch, mbs, v, tflops = row
    model = ModelSpec(name=f"megatron-{name}", flavour="gpt2", num_layers=layers, hidden_size=hidden,
                      num_heads=heads, vocab_size=51200, seq_len=2048)
    cluster = load_cluster("dgx-a100", gpus)
    train = TrainSpec(global_batch=batch, precision=Precision.FP16)
    schedule = Schedule.INTERLEAVED if v > 1 else Schedule.ONE_F_ONE_B
    pins = Pins(tp=tp, pp=pp, dp=gpus // (tp * pp), mbs=mbs, vpp=v, recompute=Recompute.FULL, sp=False, zero=0,
                schedule=schedule)
    published_s = megatron_flops_per_step(model, batch) / (gpus * tflops * 1e12)
    return model, cluster, train, pins, published_s


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="write the results as JSON here")
    ap.add_argument("--no-unpinned", action="store_true", help="skip the unpinned search per row")
    args = ap.parse_args()
    results, worst = [], 0.0
    print(f"{'model':>8} {'published s':>12} {'predicted s':>12} {'error':>8} {'TFLOP/s pub/pred':>17}"
          f" {'unpinned s':>11} {'unpinned plan':>40} {'solve s':>8}")
    for row in TABLE_1:
        model, cluster, train, pins, published_s = row_inputs(row)
        est = Estimator(model, cluster, train, traits=MEGATRON_2021)
        pinned = solve(est, pins, top_k=1)
        if not pinned.plans:
            print(f"{row[0]:>8}: pinned plan rejected: {pinned.no_fit_message()}")
            results.append({"model": row[0], "error": "pinned plan rejected"})
            worst = float("inf")
            continue
        pred = pinned.plans[0].predicted.step_time_s
        err = pred / published_s - 1
        worst = max(worst, abs(err))
        flops = megatron_flops_per_step(model, train.global_batch)
        entry = {"model": row[0], "published_s": published_s, "predicted_s": pred, "error": err,
                 "published_tflops": row[-1], "predicted_tflops": flops / pred / cluster.num_gpus / 1e12}
        line = (f"{row[0]:>8} {published_s:12.2f} {pred:12.2f} {err:+8.1%} "
                f"{row[-1]:8.0f}/{entry['predicted_tflops']:<8.0f}")
        if not args.no_unpinned:
            t = time.perf_counter()
            free = solve(est, Pins(), top_k=1)
            took = time.perf_counter() - t
            best = free.plans[0]
            p = best.parallel
            desc = (f"tp{p.tp} pp{p.pp} dp{p.dp} v{p.vpp} mbs{best.micro_batch_size} {best.recompute}"
                    f" z{best.zero} {best.schedule}{' sp' if p.sp else ''}")
            entry.update(unpinned_s=best.predicted.step_time_s, unpinned_plan=desc, unpinned_solve_s=took,
                         unpinned_not_slower=best.predicted.step_time_s <= pred * (1 + 1e-9))
            line += f" {best.predicted.step_time_s:11.2f} {desc:>40} {took:8.2f}"
        print(line, flush=True)
        results.append(entry)
    print(f"worst |error| {worst:.1%} (goal <= 10%)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"rows": results, "worst_abs_error": worst}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
