"""Pipeline parallelism: each rank builds only its own stage(s) from the plan's block ranges and runs the plan's
schedule with torch.distributed.pipelining.

Virtual stage j runs on pipeline rank j % pp (planner/plan.py), so with pp=2 and vpp=2 rank 0 holds stages 0
and 2, rank 1 stages 1 and 3. Stages may be uneven. The embedding sits on stage 0, final norm + head + loss on
the last. With pp == 1 there is no pipeline: the one rank holds every block and runs plain gradient
accumulation over the micro-batches (a one-stage torch schedule under DDP hits a reducer assert, facts file).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

from planner.plan import Plan, Schedule
from runtime.model import Transformer, lm_loss


@dataclass
class LocalStage:
    """One virtual stage held by this rank (with pp == 1: the whole model, index 0)."""

    index: int
    module: torch.nn.Module
    is_first: bool
    is_last: bool


def local_stage_indices(plan: Plan, pp_rank: int) -> list[int]:
    """The virtual stages on pipeline rank ``pp_rank``: pp_rank, pp_rank + pp, pp_rank + 2 pp, ..."""
    return list(range(pp_rank, plan.parallel.num_stages, plan.parallel.pp))


def build_local_stages(plan: Plan, pp_rank: int, seed: int) -> list[LocalStage]:
    """This rank's stage modules with the embedding/head where they belong and each block's recompute mode
    from the plan (StagePlan.block_modes)."""
    modes = {}
    for stage in plan.stages:
        modes.update(zip(range(*stage.layers), stage.block_modes()))
    if plan.parallel.pp == 1:
        model = Transformer(plan.model, seed=seed)
        model.set_recompute(modes)
        return [LocalStage(0, model, True, True)]
    last = plan.parallel.num_stages - 1
    stages = []
    for j in local_stage_indices(plan, pp_rank):
        blocks = range(*plan.stages[j].layers)
        module = Transformer(plan.model, layers=blocks, embed=j == 0, head=j == last, seed=seed)
        module.set_recompute({i: modes[i] for i in blocks})
        stages.append(LocalStage(j, module, j == 0, j == last))
    return stages


_SCHEDULES = {Schedule.GPIPE: ScheduleGPipe, Schedule.ONE_F_ONE_B: Schedule1F1B}


class PipelineRunner:
    """Runs one training step's forward and backward over the plan's micro-batches through the pipeline."""

    def __init__(self, plan: Plan, stages: list[LocalStage], pp_group: dist.ProcessGroup, device: torch.device):
        pipeline_stages = [PipelineStage(s.module, s.index, plan.parallel.num_stages, device, group=pp_group)
                           for s in stages]
        # mean micro-batch loss: scale_grads=True divides the accumulated grads by the number of micro-batches,
        # so the step's gradient equals the full-batch reference
        if plan.schedule == Schedule.INTERLEAVED:
            self.schedule = ScheduleInterleaved1F1B(pipeline_stages, plan.num_microbatches, loss_fn=lm_loss,
                                                    scale_grads=True)
        else:
            (stage,) = pipeline_stages
            self.schedule = _SCHEDULES[plan.schedule](stage, plan.num_microbatches, loss_fn=lm_loss, scale_grads=True)
        self.holds_first = any(s.is_first for s in stages)
        self.holds_last = any(s.is_last for s in stages)
        self.name = type(self.schedule).__name__

    def step(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor | None:
        """Forward + backward of the rank's whole batch (all micro-batches); the mean micro-batch loss on the
        rank holding the last stage, None elsewhere."""
        losses: list[torch.Tensor] = []
        args = (tokens,) if self.holds_first else ()
        kwargs = dict(target=targets, losses=losses) if self.holds_last else {}
        self.schedule.step(*args, return_outputs=False, **kwargs)
        return torch.stack([l.detach().float() for l in losses]).mean() if self.holds_last else None
