"""The training loop of one rank: apply the plan (mesh -> stages + recompute -> tensor parallel -> data parallel
-> pipeline schedule), run the steps, measure, and let rank 0 assemble the run report.

Order of application as torchtitan's ``parallelize``: TP first (it turns parameters into DTensors), then the data
parallel wrapper (FSDP2 shards those DTensors further over dp), then the pipeline stages around the wrapped modules.

``reference_losses`` is the one-process run of the same model, seed and data that the distributed tests compare
against.
"""
from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from planner.plan import MeshAxis, Plan
from planner.specs import ModelSpec
from runtime.data import TokenSource
from runtime.memory_meter import MemoryMeter
from runtime.model import Transformer, lm_loss
from runtime.profile_layers import yardstick_s
from runtime.parallel.data import apply_data_parallel
from runtime.parallel.mesh import build_mesh
from runtime.parallel.pipeline import PipelineRunner, build_local_stages
from runtime.parallel.tensor import apply_tensor_parallel


# Steps the CPU memory meter watches: the second is the first with AdamW's state alive through forward and backward
MEMORY_STEPS = 2


@dataclass(frozen=True)
class RunSettings:
    steps: int = 10
    seed: int = 0
    data: str | None = None
    """A text file trained on as bytes; None for seeded synthetic tokens."""
    lr: float = 1e-3
    weight_decay: float = 0.01

    @property
    def warmup_steps(self) -> int:
        """Steps left out of the step-time median: first-call allocations, lazy pipeline shape inference, and the
        MEMORY_STEPS the CPU memory meter watches (where there are more steps than those)."""
        return min(max(MEMORY_STEPS, self.steps // 5), self.steps - 1) if self.steps > 1 else 0


def _autocast(device: torch.device):
    # bf16 autocast on CUDA; fp32 on CPU (the numerical-equivalence tests rely on it)
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_plan(plan: Plan, settings: RunSettings, device: torch.device) -> dict | None:
    """Train with ``plan`` on the initialised default process group; the run report on global rank 0, None
    on the other ranks."""
    pmesh = build_mesh(plan, device.type)
    par = plan.parallel
    yardsticks = [_yardstick(plan, device)]  # before the memory meter's profiler starts, which would slow it
    memory = MemoryMeter(device)
    local = build_local_stages(plan, pmesh.pp_rank, settings.seed)
    for stage in local:
        stage.module.to(device)
    tensor_desc = "none (tp = 1)"
    if par.tp > 1:
        for stage in local:
            tensor_desc = apply_tensor_parallel(stage.module, pmesh.axis(MeshAxis.TP), par.sp)
    dp = apply_data_parallel([s.module for s in local], plan.zero, pmesh.axis(MeshAxis.DP), par.tp, par.pp)
    for stage, module in zip(local, dp.modules):
        stage.module = module
    optimizer = dp.make_optimizer(settings.lr, settings.weight_decay)
    pipeline = PipelineRunner(plan, local, pmesh.group(MeshAxis.PP), device) if par.pp > 1 else None
    source = TokenSource(plan.model, settings.seed, settings.data)
    rows = plan.train.global_batch

    losses, times, cpu_times = [], [], []
    for step in range(settings.steps):
        tokens, targets = (t.to(device) for t in source.rank_batch(step, rows, pmesh.dp_rank, par.dp))
        _sync(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        optimizer.zero_grad(set_to_none=not dp.grads_are_bucket_views)
        with _autocast(device):
            if pipeline is not None:
                loss = pipeline.step(tokens, targets)
            else:
                loss = _accumulate(dp, tokens, targets, plan.num_microbatches)
        dp.finish_backward()
        optimizer.step()
        _sync(device)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
        losses.append(_global_mean_loss(loss, par.dp * par.tp, device))
        if step + 1 == min(MEMORY_STEPS, settings.steps):
            memory.stop_watching()  # the CPU meter's profiler would slow the timed steps ...
            dist.barrier()  # ... and so would a rank still writing out its events
    yardsticks.append(_yardstick(plan, device))
    peaks = _gather_ints(memory.peak_bytes(), device)
    yardstick_ns = _gather_ints(round(1e9 * statistics.fmean(yardsticks)), device)
    steady = zip(cpu_times[settings.warmup_steps:], times[settings.warmup_steps:])
    busy_ppm = round(1e6 * statistics.median(c / t for c, t in steady if t > 0))  # gathered as an integer
    busy_per_rank = [b / 1e6 for b in _gather_ints(busy_ppm, device)]
    dist.barrier()
    if dist.get_rank() != 0:
        return None
    step_time = statistics.median(times[settings.warmup_steps:])
    pp_ranks = [_pp_rank_of(plan, r) for r in range(par.world_size)]
    report = build_report(plan, settings, device, losses, step_time, peaks, pp_ranks,
                        {"tensor": tensor_desc, "data": dp.wrapper,
                         "pipeline": pipeline.name if pipeline else "none (pp = 1): gradient accumulation",
                         "recompute": plan.recompute}, source.description, memory.kind)
    # CPU time of the rank's process (all its threads) per second of step: near 1 computing, lower waiting
    report["measured"]["cpu_busy_per_rank"] = busy_per_rank
    report["measured"]["step_times_s"] = times  # every step on rank 0, warm-up included
    # the machine's speed now: a tp-1 block at this micro-batch size, timed on every rank at once before and after
    # the steps, as `mpplan profile` times it (runtime/profile_layers.py yardstick_s); the slowest rank's, as the
    # profile keeps its slowest process's times (runtime/profile_concurrent.py)
    report["measured"]["yardstick_block_s"] = max(yardstick_ns) / 1e9
    return report


def _yardstick(plan: Plan, device: torch.device) -> float:
    dist.barrier()  # every rank times it at once, as the profile timed its layers on every core
    return yardstick_s(plan.model, plan.micro_batch_size, device, lambda: _sync(device))


def _accumulate(dp, tokens: torch.Tensor, targets: torch.Tensor, num_microbatches: int) -> torch.Tensor:
    """pp == 1: forward+backward per micro-batch, gradients reduced only on the last; the mean loss."""
    (model,) = dp.modules
    total = torch.zeros((), device=tokens.device)
    for i, (x, y) in enumerate(zip(tokens.chunk(num_microbatches), targets.chunk(num_microbatches))):
        with dp.gradient_sync(i == num_microbatches - 1):
            loss = lm_loss(model(x), y)
            (loss / num_microbatches).backward()
        total += loss.detach().float()
    return total / num_microbatches


def _global_mean_loss(loss: torch.Tensor | None, replicas: int, device: torch.device) -> float:
    """Mean over data-parallel ranks of the last stage's loss (every TP rank holds the same value)."""
    value = torch.zeros((), device=device) if loss is None else loss.detach().float().to(device) / replicas
    dist.all_reduce(value)
    return value.item()


def _gather_ints(value: int, device: torch.device) -> list[int]:
    mine = torch.tensor([value], dtype=torch.int64, device=device)
    out = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(out, mine)
    return [int(t.item()) for t in out]


def _pp_rank_of(plan: Plan, rank: int) -> int:
    sizes = {MeshAxis.PP: plan.parallel.pp, MeshAxis.DP: plan.parallel.dp, MeshAxis.TP: plan.parallel.tp}
    coords, rest = {}, rank
    for axis in reversed(plan.mesh_order):  # innermost axis varies fastest
        coords[axis], rest = rest % sizes[axis], rest // sizes[axis]
    return coords[MeshAxis.PP]


def _error_pct(measured: float, predicted: float) -> float | None:
    return None if predicted <= 0 else 100.0 * (measured - predicted) / predicted


def build_report(plan: Plan, settings: RunSettings, device: torch.device, losses: list[float], step_time_s: float,
                 peaks: list[int], pp_ranks: list[int], wrappers: dict[str, str], data: str,
                 memory_kind: str) -> dict:
    """The run report: what ran, what was measured, and each measurement beside the plan's prediction."""
    par, pred = plan.parallel, plan.predicted
    tokens_per_s = plan.tokens_per_step / step_time_s
    per_rank = []
    for rank, (peak, pp_rank) in enumerate(zip(peaks, pp_ranks)):
        predicted = pred.stages[pp_rank].memory.total_bytes if pp_rank < len(pred.stages) else 0
        per_rank.append({"rank": rank, "pp_rank": pp_rank, "peak_memory_bytes": peak,
                         "predicted_bytes": predicted, "error_pct": _error_pct(peak, predicted)})
    return {
        "plan": {"model": plan.model.name, "cluster": plan.cluster.name, "world_size": par.world_size,
                 "tp": par.tp, "pp": par.pp, "dp": par.dp, "vpp": par.vpp, "sp": par.sp, "zero": plan.zero,
                 "schedule": str(plan.schedule), "micro_batch_size": plan.micro_batch_size,
                 "num_microbatches": plan.num_microbatches, "global_batch": plan.train.global_batch,
                 "recompute": plan.recompute, "mesh_order": [str(a) for a in plan.mesh_order]},
        "wrappers": wrappers,
        "device": device.type, "backend": dist.get_backend_config(),
        "precision": "bf16 autocast" if device.type == "cuda" else "fp32",
        "data": data, "steps": settings.steps, "warmup_steps": settings.warmup_steps, "seed": settings.seed,
        "losses": losses,
        "measured": {"step_time_s": step_time_s, "tokens_per_s": tokens_per_s,
                     "peak_memory_bytes": max(peaks), "memory_kind": memory_kind},
        "predicted": {"step_time_s": pred.step_time_s, "tokens_per_s": pred.tokens_per_s,
                      "peak_memory_bytes": pred.peak_memory_bytes},
        "error_pct": {"step_time_s": _error_pct(step_time_s, pred.step_time_s),
                      "tokens_per_s": _error_pct(tokens_per_s, pred.tokens_per_s),
                      "peak_memory_bytes": _error_pct(max(peaks), pred.peak_memory_bytes)},
        "per_rank_memory": per_rank,
    }


def reference_losses(model: ModelSpec, global_batch: int, settings: RunSettings) -> list[float]:
    """The one-process run: the whole model, the whole global batch per step, the same seed, data and AdamW.
    Recompute changes no numbers, so the reference keeps all activations."""
    torch.manual_seed(settings.seed)
    net = Transformer(model, seed=settings.seed)
    optimizer = torch.optim.AdamW(net.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    source = TokenSource(model, settings.seed, settings.data)
    losses = []
    for step in range(settings.steps):
        tokens, targets = source.global_batch(step, global_batch)
        optimizer.zero_grad(set_to_none=True)
        loss = lm_loss(net(tokens), targets)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses
