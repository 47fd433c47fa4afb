"""Data parallelism by the plan's ZeRO stage (Rajbhandari et al. 2020, arXiv 1910.02054, section 5):

| zero | what is partitioned over dp      | wrapper used here                                                     |
|------|----------------------------------|-----------------------------------------------------------------------|
| 0    | nothing (grads all-reduced)      | DDP when tp == 1 and pp == 1; else FSDP2-based ``replicate``          |
| 1    | optimizer state                  | ZeroRedundancyOptimizer + DDP (pp == 1) or a gradient all-reduce      |
|      |                                  | after the pipeline step (pp > 1); tp == 1 only (planner/support.py)   |
| 2    | + gradients                      | FSDP2 ``fully_shard(reshard_after_forward=False)`` per block + root   |
| 3    | + parameters                     | FSDP2 ``fully_shard(reshard_after_forward=True)`` per block + root    |

Why ``replicate`` and not DDP for zero 0 with TP or pipelining (facts file, torch 2.13): DDP over DTensor
parameters raises "aten.cat.default got mixed torch.Tensor and DTensor"; the older DDP-based
``_composable.replicate`` gives silently wrong grads inside a pipeline schedule with several micro-batches; the
FSDP2-based ``replicate_with_fsdp.replicate`` was correct with TP and every schedule. Both all-reduce the same
averaged gradient, so the plan's zero 0 semantics hold; the run report names the wrapper.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import ContextManager, Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._composable.replicate_with_fsdp import replicate
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.nn.parallel import DistributedDataParallel

from runtime.model import Transformer

BUCKET_BYTES = 25 * 2**20  # gradient all-reduce bucket: DDP's default bucket_cap_mb = 25


@dataclass
class DataParallel:
    wrapper: str
    """What was applied, for the run report (e.g. "DDP", "FSDP2 fully_shard(reshard_after_forward=True)")."""
    modules: list[nn.Module]
    """The stage modules after wrapping, to call and to hand to the pipeline, in the input order."""
    zero_optimizer: bool
    dp_mesh: DeviceMesh
    all_reduce_after_backward: bool = False
    """Gradients are averaged over dp by ``finish_backward`` rather than by a wrapper's hooks."""
    grads_are_bucket_views: bool = False
    """DDP with gradient_as_bucket_view: .grad aliases the reduction buckets once a synced backward has run. Zero
    the views in place between steps (zero_grad(set_to_none=False)): dropping them made the next step's unsynced
    micro-batches allocate a second copy of every gradient beside the buckets (measured: +1 gradient copy of peak
    memory on dp 2 with several micro-batches)."""

    def gradient_sync(self, enabled: bool) -> ContextManager[None]:
        """Around one micro-batch's forward+backward in a gradient-accumulation loop: reduce gradients only when
        ``enabled`` (the last micro-batch)."""
        stack = contextlib.ExitStack()
        for module in self.modules:
            if isinstance(module, DistributedDataParallel) and not enabled:
                stack.enter_context(module.no_sync())
            elif isinstance(module, FSDPModule):
                module.set_requires_gradient_sync(enabled)
        return stack

    def finish_backward(self) -> None:
        """After the step's last backward: average the gradients over dp when no wrapper did."""
        if not self.all_reduce_after_backward:
            return
        group = self.dp_mesh.get_group()
        params = [p for m in self.modules for p in m.parameters() if p.requires_grad]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        for bucket in _buckets(params, BUCKET_BYTES):
            flat = torch.cat([p.grad.reshape(-1) for p in bucket])
            dist.all_reduce(flat, group=group)
            flat /= self.dp_mesh.size()
            offset = 0
            for p in bucket:
                p.grad.copy_(flat[offset: offset + p.numel()].view_as(p.grad))
                offset += p.numel()

    def make_optimizer(self, lr: float, weight_decay: float) -> torch.optim.Optimizer:
        params = [p for m in self.modules for p in m.parameters()]
        if self.zero_optimizer:
            return ZeroRedundancyOptimizer(params, optimizer_class=torch.optim.AdamW,
                                           process_group=self.dp_mesh.get_group(), lr=lr, weight_decay=weight_decay)
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def _buckets(params: list[nn.Parameter], cap_bytes: int) -> Iterator[list[nn.Parameter]]:
    bucket, size = [], 0
    for p in params:
        bucket.append(p)
        size += p.numel() * p.element_size()
        if size >= cap_bytes:
            yield bucket
            bucket, size = [], 0
    if bucket:
        yield bucket


def _fully_shard(model: Transformer, dp_mesh: DeviceMesh, reshard: bool) -> nn.Module:
    # one FSDP unit per block (its all-gather / reduce-scatter overlaps the neighbours' compute), the
    # embedding and head in the root unit
    for block in model.layers.values():
        fully_shard(block, mesh=dp_mesh, reshard_after_forward=reshard)
    return fully_shard(model, mesh=dp_mesh, reshard_after_forward=reshard)


def apply_data_parallel(modules: list[Transformer], zero: int, dp_mesh: DeviceMesh, tp: int, pp: int) -> DataParallel:
    """Wrap this rank's stage modules for data parallelism over ``dp_mesh`` (after tensor parallel)."""
    if dp_mesh.size() == 1:
        return DataParallel("none (dp = 1)", list(modules), False, dp_mesh)
    if zero in (2, 3):
        reshard = zero == 3
        wrapped = [_fully_shard(m, dp_mesh, reshard) for m in modules]
        return DataParallel(f"FSDP2 fully_shard(reshard_after_forward={reshard}) per block + root", wrapped, False, dp_mesh)
    if tp == 1 and pp == 1:
        # gradient_as_bucket_view: .grad aliases the reduction buckets instead of a second copy of every gradient
        wrapped = [DistributedDataParallel(m, process_group=dp_mesh.get_group(), gradient_as_bucket_view=True)
                   for m in modules]
        return DataParallel("DDP + ZeroRedundancyOptimizer" if zero == 1 else "DDP", wrapped, zero == 1, dp_mesh,
                            grads_are_bucket_views=True)
    if zero == 1:
        # DDP inside a pipeline schedule asserts in reducer.cpp (GPipe, measured here) and ZeroRedundancyOptimizer
        # cannot broadcast replicate's DTensor parameters ("c10d.broadcast_.default does not have a sharding
        # strategy"), so the stage modules stay plain and their gradients are all-reduced after the schedule.
        return DataParallel("gradient all-reduce after the pipeline step + ZeroRedundancyOptimizer",
                            list(modules), True, dp_mesh, all_reduce_after_backward=True)
    wrapped = [replicate(m, mesh=dp_mesh) for m in modules]
    return DataParallel("replicate (FSDP2-based, replicate_with_fsdp)", wrapped, False, dp_mesh)
