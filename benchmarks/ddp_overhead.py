"""Overhead of mpplan's runtime against a plain torch DDP script: same model, seed, data, optimizer and ranks.

    python benchmarks/ddp_overhead.py                       # tiny-gpt, 2 CPU ranks, 30 steps, 3 rounds
    python benchmarks/ddp_overhead.py --global-batch 32 --out ddp_overhead.json

A DP-only plan (dp = 2, zero 0: DDP) runs through `runtime.launch.spawn_local` exactly as `mpplan run` does;
the plain script is the textbook loop (DDP(model), forward, loss, backward, AdamW step). Both time the same
window per step (zero_grad .. optimizer.step) and report the median after warm-up; the rounds alternate the
two so that drift on a shared machine hits both. Goal: mpplan >= 0.95 x the plain tokens/s.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from planner.plan import MemoryBreakdown, Parallel, Plan, Prediction, Schedule, SolverInfo, StagePlan, StagePrediction  # noqa: E402
from planner.presets import MODELS  # noqa: E402
from planner.specs import TrainSpec, load_cluster  # noqa: E402

WORLD = 2


def dp_plan(model: str, global_batch: int, num_microbatches: int) -> Plan:
    spec = MODELS[model]
    mbs = global_batch // (WORLD * num_microbatches)
    mem = MemoryBreakdown(params_bytes=0, grads_bytes=0, optimizer_bytes=0, activations_bytes=0, reserve_bytes=0,
                          total_bytes=0)
    pred = Prediction(step_time_s=0, tokens_per_s=0, tflops_per_gpu=0, mfu=0, bubble_fraction=0, peak_memory_bytes=0,
                      stages=[StagePrediction(memory=mem, time_s=0)])
    return Plan(model=spec, cluster=load_cluster("local", WORLD), train=TrainSpec(global_batch=global_batch,
                precision="fp32"), parallel=Parallel(dp=WORLD), micro_batch_size=mbs,
                num_microbatches=num_microbatches, recompute="none", zero=0, schedule=Schedule.ONE_F_ONE_B,
                stages=[StagePlan(layers=(0, spec.num_layers), recompute={"none": spec.num_layers})],
                predicted=pred, solver=SolverInfo(solver="benchmark", status="n/a", gap=0, time_s=0))


def run_mpplan(plan: Plan, steps: int) -> dict:
    from runtime.launch import Job, spawn_local

    (report,) = spawn_local(Job(plans=[plan.model_dump_json()], steps=steps, seed=0), WORLD)
    return {"step_time_s": report["measured"]["step_time_s"], "tokens_per_s": report["measured"]["tokens_per_s"],
            "wrapper": report["wrappers"]["data"], "final_loss": report["losses"][-1]}


def _plain_worker(rank: int, plan_json: str, steps: int, port: int, out_path: str) -> None:
    """The plain DDP training script, one rank."""
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from runtime.data import TokenSource
    from runtime.model import Transformer, lm_loss

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    plan = Plan.model_validate_json(plan_json)
    model = DistributedDataParallel(Transformer(plan.model, seed=0))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    data = TokenSource(plan.model, 0)
    nmb, times, loss = plan.num_microbatches, [], None
    for step in range(steps):
        x, y = data.rank_batch(step, plan.train.global_batch, rank, WORLD)
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        for i, (xm, ym) in enumerate(zip(x.chunk(nmb), y.chunk(nmb))):
            ctx = model.no_sync() if i < nmb - 1 else torch.enable_grad()
            with ctx:
                loss = lm_loss(model(xm), ym)
                (loss / nmb).backward()
        opt.step()
        times.append(time.perf_counter() - start)
        loss.item()
    final = loss.detach() / WORLD  # the mean over ranks, as mpplan reports it (after the timed steps)
    dist.all_reduce(final)
    if rank == 0:
        Path(out_path).write_text(json.dumps({"times": times, "final_loss": final.item()}))
    dist.destroy_process_group()


def run_plain(plan: Plan, steps: int, warmup: int) -> dict:
    import torch.multiprocessing as mp

    from runtime.launch import _free_port

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "plain.json")
        os.environ["OMP_NUM_THREADS"] = "1"
        mp.spawn(_plain_worker, args=(plan.model_dump_json(), steps, _free_port(), out), nprocs=WORLD)
        result = json.loads(Path(out).read_text())
    step_time = statistics.median(result["times"][warmup:])
    return {"step_time_s": step_time, "tokens_per_s": plan.tokens_per_step / step_time,
            "final_loss": result["final_loss"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny-gpt")
    ap.add_argument("--global-batch", type=int, default=16)
    ap.add_argument("--microbatches", type=int, default=1)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    from runtime.train import RunSettings

    plan = dp_plan(args.model, args.global_batch, args.microbatches)
    warmup = RunSettings(steps=args.steps).warmup_steps  # the same warm-up as the runtime's report
    rounds = []
    for i in range(args.rounds):
        mpplan, plain = run_mpplan(plan, args.steps), run_plain(plan, args.steps, warmup)
        rounds.append({"mpplan": mpplan, "plain_ddp": plain, "ratio": mpplan["tokens_per_s"] / plain["tokens_per_s"]})
        print(f"round {i}: mpplan {mpplan['tokens_per_s']:,.0f} tok/s, plain DDP {plain['tokens_per_s']:,.0f} tok/s, "
              f"ratio {rounds[-1]['ratio']:.3f}", file=sys.stderr)
    best = {k: max(r[k]["tokens_per_s"] for r in rounds) for k in ("mpplan", "plain_ddp")}
    result = {"model": args.model, "world_size": WORLD, "global_batch": args.global_batch,
              "microbatches": args.microbatches, "steps": args.steps, "warmup_steps": warmup,
              "wrapper": rounds[0]["mpplan"]["wrapper"], "rounds": rounds,
              "best_tokens_per_s": best, "ratio_of_best": best["mpplan"] / best["plain_ddp"],
              "median_ratio": statistics.median(r["ratio"] for r in rounds), "goal": 0.95}
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
