"""Time the pipeline hand-offs as torch.distributed.pipelining pays them, on stages that do almost nothing.

The planner charged each hand-off between CPU pipeline ranks at the send_recv benchmark's mean (the fitted
exchange plus its stall: ~0.9 ms for tiny-gpt's 16 KiB activation), and `mpplan run` measured interleaved plans
11-31 % slower than predicted (tp1 pp2 mbs1, 16 micro-batches, 3 runs each: v3 without recompute 248-261 ms
against 192 predicted), 1F1B ones within their noise. The schedules were run here on stages that only scale
their input by one parameter, with the model's activation shape, so that a step is its hand-offs and the
runtime's own work around them: 1F1B (16 waits per rank) 15-25 ms a step, interleaved v2 (48) 61-80 ms, v3 (80)
104-126, v4 (112) 151-163: 0.9-1.5 ms per hand-off under 1F1B, 1.3-1.65 under interleaved whatever its vpp.
The benchmark's exchange starts both ranks together after a barrier, while a pipeline's receiver waits for a
sender that is still computing, and each action adds the schedule's Python around its send and receive. So a
1F1B, a GPipe and an interleaved (v2) run are timed, and each gives its schedule's cost per hand-off
(planner/profiled.py pipeline_transfer_s moves it to other message sizes along the send_recv fit). GPipe has
1F1B's hand-offs but not its cost: with the same 16 micro-batches of tiny-gpt's activation on 2 ranks it took
12.5-13.0 ms a step against 1F1B's 6.6-8.3 (3 rounds), and in six profiles 0.50-0.91 ms a hand-off against
1F1B's 0.31-0.52 (more in all six). In its steady state torch's Schedule1F1B posts each send in one batch with
the next receive and waits once; ScheduleGPipe waits for every receive on its own and leaves its sends
outstanding until the phase ends. That is part of what GPipe costs on CPU: its plans of tiny-gpt ran 8-18 % over
a price with 1F1B's hand-offs, and still 11-30 % over with their own (traced: rank 0 waited 16-19 ms a step
under GPipe against 7-11 under 1F1B at 8 micro-batches; the two runs here price 0.3-3.8 ms of the difference).
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

from planner.plan import Schedule
from planner.profile import PipelineCalibration, PipelineRun
from planner.schedule import receives_per_rank
from planner.specs import ModelSpec
from runtime.spawned import report_and_leave, report_failure

SCHEDULES: tuple[tuple[str, int], ...] = (("1f1b", 1), ("gpipe", 1), ("interleaved", 2))
MICROBATCHES_PER_RANK = 8
WARMUP_STEPS = 2
TIMED_STEPS = 8


class PipelineBench:
    """The hand-off timing as one part of a spawned job (runtime/profile_concurrent.py runs it in the processes
    that timed the layers): every rank is one pipeline rank; rank 0's message carries the step times."""

    def __init__(self, spec: ModelSpec, world: int, micro_batch_size: int,
                 on_done: Callable[[str], None] | None = None, timeout_s: float = 120.0):
        from runtime.launch import free_port

        self.spec, self.world, self.mbs = spec, world, micro_batch_size
        self.on_done, self.timeout_s = on_done, timeout_s
        self.port = free_port()
        self.microbatches = MICROBATCHES_PER_RANK * world
        self.step_times: list[float] = []
        self.done = False

    def rank_job(self, rank: int) -> tuple[Callable[..., None], tuple]:
        """What rank ``rank`` runs: pipeline_rank(*args, results)."""
        return pipeline_rank, (rank, self.world, self.port, self.spec, self.mbs, self.microbatches)

    def handle(self, msg: tuple) -> bool:
        if msg[0] == "pipeline":
            self.step_times, self.done = msg[1], True
            if self.on_done is not None:
                self.on_done(f"pipeline hand-offs x{self.world}")
        return self.done

    def calibration(self) -> PipelineCalibration | None:
        """The runs and their hand-off cost; None before the ranks reported."""
        if not self.step_times:
            return None
        runs = [PipelineRun(schedule=name, vpp=vpp, num_microbatches=self.microbatches,
                            receives_per_rank=receives_per_rank(Schedule(name), self.world, vpp, self.microbatches),
                            step_time_s=t) for (name, vpp), t in zip(SCHEDULES, self.step_times)]
        message = self.mbs * self.spec.seq_len * self.spec.hidden_size * 4  # fp32 on CPU
        return PipelineCalibration(message_bytes=message, runs=runs)


def pipeline_rank(rank: int, world: int, port: int, spec: ModelSpec, mbs: int, microbatches: int,
                  results) -> None:
    """One pipeline rank: each schedule of SCHEDULES over ``world`` ranks, median of TIMED_STEPS steps (the
    slowest rank's); rank 0 sends ("pipeline", [seconds per schedule])."""
    try:
        import torch.distributed as dist
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

        torch.set_num_threads(1)  # one thread per rank, as the runtime runs
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        gen = torch.Generator().manual_seed(0)
        batch = torch.randn(mbs * microbatches, spec.seq_len, spec.hidden_size, generator=gen)
        medians = []
        for name, vpp in SCHEDULES:
            stages = [PipelineStage(_Scale(), rank + world * chunk, world * vpp, torch.device("cpu"))
                      for chunk in range(vpp)]
            single = {"1f1b": Schedule1F1B, "gpipe": ScheduleGPipe}.get(name)
            schedule = (single(stages[0], microbatches, loss_fn=_loss) if single is not None
                        else ScheduleInterleaved1F1B(stages, microbatches, loss_fn=_loss))
            times = []
            for _ in range(WARMUP_STEPS + TIMED_STEPS):
                dist.barrier()
                t0 = time.perf_counter()
                if rank == 0:
                    schedule.step(batch)
                elif rank == world - 1:
                    schedule.step(target=batch, losses=[])
                else:
                    schedule.step()
                times.append(time.perf_counter() - t0)
            slowest = torch.tensor(times[WARMUP_STEPS:], dtype=torch.float64)
            dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
            medians.append(statistics.median(slowest.tolist()))
        report_and_leave(dist, results, rank, ("pipeline", medians))
    except Exception as e:  # the parent turns this into one RuntimeError
        report_failure(results, rank, e)


def _loss(output, target):
    return (output - target).pow(2).mean()


class _Scale(torch.nn.Module):
    """A stage that multiplies its input by one parameter: a hand-off's tensor and its gradient, no work."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight
