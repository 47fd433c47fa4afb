"""plan.json: the contract between `mpplan solve` and `mpplan run` (and anything that exports plans).

Concrete numbers only, a schema version, the specs it was solved for, the mesh axis order, the stage boundaries
as block ranges, the schedule, and what the cost model predicts. Unknown keys are an error.

Layer units: the model is embedding, blocks 0..L-1, then final norm + head + loss. ``stages[j].layers`` is the
half-open block range [first, last) of virtual stage j; the embedding always sits on virtual stage 0 and the head
on the last. Virtual stage j runs on pipeline rank j % pp (interleaved schedules give each rank vpp of them).
"""
from __future__ import annotations

import json
from enum import StrEnum
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from planner.specs import ClusterSpec, ModelSpec, Recompute, SpecError, Strict, TrainSpec, load_versioned

SCHEMA_VERSION = 1


class Schedule(StrEnum):
    GPIPE = "gpipe"
    ONE_F_ONE_B = "1f1b"
    INTERLEAVED = "interleaved"  # interleaved 1F1B, Narayanan et al. 2021 section 2.2.2


class MeshAxis(StrEnum):
    """Mesh axes; "axis" for mesh axes, "dim" for tensor dimensions."""

    PP = "pp"
    DP = "dp"
    TP = "tp"


class Parallel(Strict):
    tp: int = Field(1, gt=0)
    pp: int = Field(1, gt=0)
    dp: int = Field(1, gt=0)
    vpp: int = Field(1, gt=0)
    """Virtual stages (model chunks) per pipeline rank; > 1 only with the interleaved schedule."""
    sp: bool = False
    """Sequence parallelism inside the TP group (Korthikanti et al. 2022)."""

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def num_stages(self) -> int:
        return self.pp * self.vpp

    def check_world(self, world_size: int) -> None:
        if self.world_size != world_size:
            raise SpecError(f"pp({self.pp}) * dp({self.dp}) * tp({self.tp}) = {self.world_size} != world size {world_size}")


class StagePlan(Strict):
    layers: tuple[int, int]
    """Half-open block range [first, last)."""
    recompute: dict[Recompute, int]
    """How many of the stage's blocks run with each recompute mode: the first `full` blocks of the stage
    recompute fully, the next `selective` selectively, the rest keep their activations."""

    @property
    def num_blocks(self) -> int:
        return self.layers[1] - self.layers[0]

    def block_modes(self) -> list[Recompute]:
        """The recompute mode of each block of the stage, in order."""
        modes: list[Recompute] = []
        for mode in (Recompute.FULL, Recompute.SELECTIVE, Recompute.NONE):
            modes += [mode] * self.recompute.get(mode, 0)
        return modes


class MemoryBreakdown(Strict):
    params_bytes: int
    grads_bytes: int
    optimizer_bytes: int
    activations_bytes: int
    """Saved activations at the peak, with the one-off transient of a backward (a recomputed block, the loss),
    net of what backward has freed where the gradients only appear during it (planner/memory.py)."""
    reserve_bytes: int
    """Allocator fragmentation, workspaces, communication buffers (see costmodel.RESERVE)."""
    total_bytes: int
    pipeline_buffers_bytes: int = 0
    """torch.distributed.pipelining's receive buffers and not yet waited sends."""


class StagePrediction(Strict):
    """One pipeline rank (all its virtual stages)."""

    memory: MemoryBreakdown
    time_s: float
    """Forward + backward (with recompute and TP communication) of one micro-batch on this rank."""


class Prediction(Strict):
    step_time_s: float
    tokens_per_s: float
    tflops_per_gpu: float
    """Model FLOPs (no recompute counted) per second per GPU."""
    mfu: float
    bubble_fraction: float
    peak_memory_bytes: int
    stages: list[StagePrediction]


class SolverInfo(Strict):
    solver: str
    status: str
    gap: float
    """Relative optimality gap of the stage-partition ILP; 0 when proven optimal."""
    time_s: float


class Plan(Strict):
    schema_version: Literal[1] = SCHEMA_VERSION
    model: ModelSpec
    cluster: ClusterSpec
    train: TrainSpec
    parallel: Parallel
    micro_batch_size: int = Field(gt=0)
    num_microbatches: int = Field(gt=0)
    recompute: Literal["none", "selective", "full", "mixed"]
    """Summary of the per-stage recompute counts."""
    zero: int = Field(ge=0, le=3)
    schedule: Schedule
    mesh_order: tuple[MeshAxis, MeshAxis, MeshAxis] = (MeshAxis.PP, MeshAxis.DP, MeshAxis.TP)
    """Outermost first: ranks are laid out as arange(world).view(*sizes in this order)."""
    stages: list[StagePlan]
    predicted: Prediction
    solver: SolverInfo
    cost_source: Literal["analytic", "profile"] = "analytic"

    @model_validator(mode="after")
    def _check(self) -> "Plan":
        par, L = self.parallel, self.model.num_layers
        par.check_world(self.cluster.num_gpus)
        if sorted(self.mesh_order) != sorted(MeshAxis):
            raise ValueError(f"mesh_order {list(self.mesh_order)} must name pp, dp and tp once each")
        if self.micro_batch_size * self.num_microbatches * par.dp != self.train.global_batch:
            raise ValueError(f"micro_batch_size({self.micro_batch_size}) * num_microbatches({self.num_microbatches})"
                             f" * dp({par.dp}) != global_batch({self.train.global_batch})")
        if len(self.stages) != par.num_stages:
            raise ValueError(f"{len(self.stages)} stages but pp({par.pp}) * vpp({par.vpp}) = {par.num_stages}")
        if par.vpp > 1 and self.schedule != Schedule.INTERLEAVED:
            raise ValueError(f"vpp {par.vpp} needs the interleaved schedule, not {self.schedule}")
        expected = 0
        for j, st in enumerate(self.stages):
            first, last = st.layers
            if first != expected or last < first:
                raise ValueError(f"stage {j} covers blocks [{first}, {last}) but should start at block {expected}")
            if sum(st.recompute.values()) != last - first:
                raise ValueError(f"stage {j}: recompute counts {dict(st.recompute)} do not add up to its {last - first} blocks")
            expected = last
        if expected != L:
            raise ValueError(f"stages cover blocks [0, {expected}) but the model has {L}")
        if par.tp > 1 and (self.model.num_heads % par.tp or self.model.kv_heads % par.tp or self.model.ffn % par.tp):
            raise ValueError(f"tp {par.tp} does not divide the heads ({self.model.num_heads}, kv {self.model.kv_heads})"
                             f" and ffn ({self.model.ffn})")
        return self

    @property
    def tokens_per_step(self) -> int:
        return self.train.global_batch * self.model.seq_len

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=2) + "\n"


def load_plan(path: str | Path) -> Plan:
    """Read and validate plan.json; any problem is a SpecError with one line naming the file and field."""
    return load_versioned(Plan, path, SCHEMA_VERSION)
