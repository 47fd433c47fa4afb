"""profile.json: what `mpplan profile` measured on this machine, read by the cost model (`mpplan solve --profile`).

Torch-free on purpose: the planner reads a profile without importing torch; runtime/profile.py writes it.

Per layer kind (embedding, transformer block, final norm + head + loss) at each TP degree and micro-batch size:
forward and backward seconds (medians, with their coefficient of variation), the extra seconds of each recompute
mode, parameters, and saved-activation bytes per recompute mode. Per collective and group size: a latency-bandwidth
fit (planner/collectives.py CollectiveFit) with the raw points it was fitted on and its error on sizes held out of
the fit. Plus the optimizer-state bytes per parameter and the device it was measured on.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Literal, Sequence

from pydantic import Field

from planner.collectives import CollectiveFit
from planner.specs import ModelSpec, Precision, Recompute, SpecError, Strict, load_versioned

SCHEMA_VERSION = 2
"""2: collectives gained aligned_points / aligned_pieces (an mpplan that reads 1 alone says so, rather than
rejecting an unknown key). Version 1 files still load: what they lack has a default that prices as they did."""
OLDER_VERSIONS = (1,)

LayerKind = Literal["embedding", "block", "head"]


class LayerProfile(Strict):
    """One layer kind at one TP shard and micro-batch size. Blocks are identical, so one block stands for all."""

    kind: LayerKind
    """head = final norm + output projection + loss."""
    tp: int = Field(gt=0)
    """Profiled as its TP shard: attention width, heads, kv heads and ffn divided by tp (blocks); the vocabulary
    divided by tp (embedding and head: vocab-parallel embedding and output projection, as Megatron-LM does)."""
    micro_batch_size: int = Field(gt=0)
    fwd_s: float = Field(ge=0)
    """Forward seconds the planner prices: ``fwd_fast_s`` x the profile's ``pace`` (in profiles written before
    the pace was measured: the median of samples)."""
    bwd_s: float = Field(ge=0)
    """Seconds of the backward alone, priced likewise."""
    fwd_fast_s: float | None = Field(default=None, ge=0)
    """The layer's own forward at the machine's fast pace: its fastest call on the faster process
    (runtime/profile_layers.py; the 5th percentile in profiles before 2026-12-01). What repeats between profiles
    while the machine's speed moves; None in older profiles."""
    bwd_fast_s: float | None = Field(default=None, ge=0)
    fwd_cv: float = Field(ge=0)
    """Coefficient of variation (stdev / mean) of the forward over the repeats."""
    bwd_cv: float = Field(ge=0)
    recompute_extra_s: dict[Recompute, float] = {}
    """Extra seconds per forward + backward when the block runs with that mode: fast(fwd+bwd with the mode)
    minus fast(fwd+bwd without), floored at 0, x pace. Blocks only; {} for the embedding and head."""
    params: int = Field(ge=0)
    """Parameters of this layer's TP shard."""
    activation_bytes: dict[Recompute, int]
    """Bytes saved for backward per micro-batch for each recompute mode (embedding and head: only "none")."""


class BlockTiming(Strict):
    """One transformer block timed as the runtime wraps it, on spawned local ranks (runtime/profile_tp.py):
    medians of forward and backward, the slowest rank's, and their coefficients of variation."""

    micro_batch_size: int = Field(gt=0)
    fwd_s: float = Field(ge=0)
    bwd_s: float = Field(ge=0)
    fwd_cv: float = Field(ge=0)
    bwd_cv: float = Field(ge=0)


class TPBlockTiming(BlockTiming):
    """At TP degree ``tp`` > 1: DTensor-sharded over tp ranks, its collectives and DTensor's dispatch included."""

    tp: int = Field(gt=1)


class FSDPBlockTiming(BlockTiming):
    """For ZeRO ``zero`` (2 or 3) over ``dp`` ranks: FSDP2 fully_shard, in a micro-batch that does not reduce
    gradients, so its parameter gathers and hooks (what every micro-batch pays) are in it and the once-a-step
    gradient reduce-scatter is not. Means, not medians: its calls wait on gloo and now and then stall (2.9-24 ms
    for one block measured here), and a step pays the sum of all of them."""

    zero: Literal[2, 3]
    dp: int = Field(gt=1)


class DeviceInfo(Strict):
    device: Literal["cpu", "cuda"]
    name: str
    torch_version: str
    threads: int = Field(gt=0)
    """Threads per rank during the measurements."""
    matmul_tflops: float = Field(ge=0)
    """Measured dense matmul rate at the profile's precision, TFLOP/s."""
    date: str
    """ISO 8601, when the profile was taken."""


class RuntimeRun(Strict):
    """One calibration run of mpplan's own training loop on a single rank (no parallelism)."""

    micro_batch_size: int = Field(gt=0)
    num_microbatches: int = Field(gt=0)
    step_time_s: float = Field(ge=0)
    """Median step time after warm-up, as `mpplan run` reports it, at the speed the layers were profiled at
    (/ machine_slowdown; runtime/profile_runtime.py), averaged over the copies run side by side."""
    peak_bytes: int = Field(ge=0)
    """Peak memory as `mpplan run` reports it (CPU: live tensor bytes, runtime/memory_meter.py)."""


class RuntimeCalibration(Strict):
    """What mpplan's runtime adds to the sum of the layers, from single-rank runs of the whole model
    (runtime/profile_runtime.py; the parallel plans that `mpplan validate` checks are not among them)."""

    step_overhead_s: float = Field(ge=0)
    """Per optimizer step, beyond the layers and the optimizer: zero_grad, the loop, batch slicing."""
    microbatch_overhead_s: float = Field(ge=0)
    """Per whole-model micro-batch, beyond its layers' own forward and backward as timed alone (loss, autograd
    engine start, gradient accumulation into .grad); planner/profiled.py charges it as a share of the layers'
    time, so each pipeline stage pays in proportion to its work."""
    microbatch_overhead_by_mbs: dict[int, float] = {}
    """The same at each calibrated micro-batch size (the smallest and the largest profiled); the planner
    interpolates between them. Empty in profiles calibrated at one size, where microbatch_overhead_s holds for
    every size."""
    optimizer_s_per_param: float = Field(ge=0)
    """AdamW step seconds per parameter of the whole model (per-tensor overheads averaged in), one thread."""
    fixed_bytes: int = Field(ge=0)
    """Peak memory the runtime holds beyond parameters, gradients, optimizer state, activations and the loss's
    backward (kernel workspaces and the like)."""
    activation_peak_factor: float = Field(ge=1)
    """Peak bytes per saved-activation byte: backward holds activation gradients and temporaries beside what
    forward saved. 1 when not measurable."""
    runs: list[RuntimeRun] = []


def whole_model_sum(layers: Sequence[LayerProfile], spec: ModelSpec, mbs: int, what: str) -> float | None:
    """Every layer of ``spec`` at tp 1 and ``mbs``, each as profiled alone: forward + backward seconds
    (``what="time"``) or saved-activation bytes without recompute (``"bytes"``); None if a kind is missing."""
    by_kind = {lp.kind: lp for lp in layers if lp.tp == 1 and lp.micro_batch_size == mbs}
    if any(k not in by_kind for k in ("embedding", "block", "head")):
        return None
    if what == "time":
        def one(lp: LayerProfile) -> float:
            return lp.fwd_s + lp.bwd_s
    else:
        def one(lp: LayerProfile) -> float:
            return lp.activation_bytes[Recompute.NONE]
    return one(by_kind["embedding"]) + one(by_kind["head"]) + spec.num_layers * one(by_kind["block"])


def tp1_block_s(layers: Sequence[LayerProfile], mbs: int) -> float | None:
    """Forward + backward seconds of the tp-1 block at ``mbs`` as profiled (the block a run re-times as its
    yardstick, runtime/train.py); None if it was not profiled."""
    return next((lp.fwd_s + lp.bwd_s for lp in layers
                 if lp.kind == "block" and lp.tp == 1 and lp.micro_batch_size == mbs), None)


def machine_slowdown(measured: dict, profiled_block_s: float | None) -> float | None:
    """A run's yardstick (``measured["yardstick_block_s"]``, the block timed around its steps) / the same block
    as profiled: > 1 when the machine ran slower than when it was profiled; None when either is missing. A step
    time / this is the step time at the profiled speed."""
    yardstick = measured.get("yardstick_block_s")
    return yardstick / profiled_block_s if yardstick and profiled_block_s else None


class PipelineRun(Strict):
    """One schedule run by torch.distributed.pipelining on stages that do almost no work."""

    schedule: Literal["1f1b", "gpipe", "interleaved"]
    vpp: int = Field(gt=0)
    num_microbatches: int = Field(gt=0)
    receives_per_rank: int = Field(gt=0)
    """Activations and gradients the busiest rank waits for in a step (planner/schedule.py receives_per_rank)."""
    step_time_s: float = Field(gt=0)
    """Median step time, the slowest rank's."""

    @property
    def receive_s(self) -> float:
        """Seconds per hand-off: the step is its hand-offs."""
        return self.step_time_s / self.receives_per_rank


class DDPSyncTiming(Strict):
    """The whole model's forward + backward under torch DDP over ``dp`` ranks with gradient sync and without
    (runtime/profile_ddp.py): what DDP's reduction costs a step as the runtime runs it."""

    micro_batch_size: int = Field(gt=0)
    dp: int = Field(ge=2)
    synced_s: float = Field(gt=0)
    """Median step with gradient sync, the slowest rank's."""
    unsynced_s: float = Field(gt=0)
    """Median step under no_sync, the slowest rank's."""
    bucket_bytes: list[int] = Field(min_length=1)
    """DDP's buckets after its rebuild, in the order it sends them."""

    @property
    def excess_s(self) -> float:
        return max(0.0, self.synced_s - self.unsynced_s)


class PipelineCalibration(Strict):
    """What one hand-off between pipeline ranks costs in the real pipelining runtime (runtime/profile_pipeline.py):
    the stages only scale their input, so a step is its hand-offs."""

    message_bytes: int = Field(gt=0)
    """The activation passed: one micro-batch (the smallest profiled) x seq_len x hidden_size."""
    runs: list[PipelineRun] = Field(min_length=1)

    def receive_s(self, schedule: str) -> float:
        """Seconds per hand-off under ``schedule``'s own run. Profiles written before GPipe was timed price it
        at 1F1B's (the same hand-offs per chunk, posted apart); any run where the kind's is missing."""
        by_kind = {r.schedule: r for r in self.runs}
        run = by_kind.get(schedule) or by_kind.get("1f1b" if schedule == "gpipe" else schedule) or self.runs[0]
        return run.receive_s


class Profile(Strict):
    schema_version: Literal[1, 2] = SCHEMA_VERSION
    model: ModelSpec
    precision: Precision
    """fp32 on CPU, bf16 on CUDA."""
    device: DeviceInfo
    layers: list[LayerProfile]
    collectives: list[CollectiveFit]
    optimizer_bytes_per_param: int = Field(gt=0)
    """AdamW state per parameter, measured from a real step (plus the fp32 master copy under bf16)."""
    runtime: RuntimeCalibration | None = None
    """Overheads of mpplan's own runtime on this machine; None in profiles taken without calibration runs."""
    tp_blocks: list[TPBlockTiming] = []
    """Blocks timed as run under tensor parallelism (CPU: every profiled tp > 1 that fits in ``ranks``)."""
    fsdp_blocks: list[FSDPBlockTiming] = []
    """Blocks timed as run under ZeRO 2 and 3 (CPU: over all ``ranks``)."""
    pipeline: PipelineCalibration | None = None
    """CPU, 2+ ranks: the cost of a pipeline hand-off as the pipelining runtime pays it; None in profiles taken
    without it (the planner then charges the send_recv fit's expected_s)."""
    collective_after_compute_s: float | None = Field(default=None, ge=0)
    """CPU, 2+ ranks: what a collective issued right after compute pays beyond its fit's mean call
    (runtime/profile_comm.py AFTER_COMPUTE_BYTES); the planner charges it to every gradient reduction of a step.
    None where not measured (then nothing is added)."""
    ddp_sync: DDPSyncTiming | None = None
    """CPU, 2+ ranks: DDP's gradient reduction timed in a real step; where present it prices DDP's buckets instead
    of collective_after_compute_s. None in profiles taken without it."""
    pace: float | None = Field(default=None, ge=1)
    """How much slower than its fast pace the slowest process ran on average while the layers were timed (mean
    over fast seconds per call, runtime/profile_layers.py machine_pace); the layers' fwd_s / bwd_s include it.
    None in profiles written before it was measured."""

    def layer(self, kind: LayerKind, tp: int, micro_batch_size: int) -> LayerProfile | None:
        for lp in self.layers:
            if lp.kind == kind and lp.tp == tp and lp.micro_batch_size == micro_batch_size:
                return lp
        return None

    def tp_block(self, tp: int, micro_batch_size: int) -> TPBlockTiming | None:
        for t in self.tp_blocks:
            if t.tp == tp and t.micro_batch_size == micro_batch_size:
                return t
        return None

    def fsdp_block(self, zero: int, dp: int, micro_batch_size: int) -> FSDPBlockTiming | None:
        for t in self.fsdp_blocks:
            if (t.zero, t.dp, t.micro_batch_size) == (zero, dp, micro_batch_size):
                return t
        return None

    def collective(self, op: CollectiveOp, group_size: int) -> CollectiveFit | None:
        for fit in self.collectives:
            if fit.op == op and fit.group_size == group_size:
                return fit
        return None

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=2) + "\n"


def load_profile(path: str | Path) -> Profile:
    """Read and validate profile.json; any problem is a SpecError with one line naming the file and field."""
    return load_versioned(Profile, path, SCHEMA_VERSION, OLDER_VERSIONS)


# What decides a layer's cost; the name does not (a preset and its config.json twin measure the same).
_SHAPE_FIELDS = ("flavour", "hidden_size", "num_heads", "kv_heads", "ffn", "vocab_size", "seq_len", "num_layers",
                 "tie_embeddings")


def check_profile_matches(profile: Profile, model: ModelSpec, source: str = "profile.json") -> None:
    """SpecError unless the profile was measured for a model of the same shape as ``model``."""
    for field in _SHAPE_FIELDS:
        measured, wanted = getattr(profile.model, field), getattr(model, field)
        if measured != wanted:
            raise SpecError(f"{source} was measured for model {profile.model.name} ({field} {measured}), "
                            f"not {model.name} ({field} {wanted})")
