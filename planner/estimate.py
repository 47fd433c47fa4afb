"""From one parallel configuration to a priced partition problem, and from a partition to a full prediction:
per-rank memory broken down, the pipeline simulated over the uneven stages, communication over the topology."""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

from planner.costmodel import AnalyticCosts, LayerCost, RuntimeTraits, model_flops_per_step
from planner.partition import BlockOption, PartitionProblem, PartitionResult
from planner.plan import MemoryBreakdown, MeshAxis, Prediction, Schedule, StagePrediction
from planner.schedule import inflight_per_stage as _inflight_per_stage, interleaved_round_size, simulate
from planner.specs import ClusterSpec, ModelSpec, Recompute, TrainSpec
from planner.topology import Topology

GiB = 2**30

_inflight_cached = lru_cache(maxsize=8192)(_inflight_per_stage)


def inflight_per_stage(schedule: Schedule, pp: int, vpp: int, m: int) -> tuple[int, ...]:
    """Micro-batches in flight per virtual stage at its rank's peak, cached. The peak is reached within the
    first rounds, so long schedules are priced on a shorter one with the same shape: 1F1B saturates at m = pp
    (stage i holds min(pp - i, m)); torch's interleaved 1F1B repeats rounds of interleaved_round_size micro-batches,
    and two rounds give the same peaks (checked for every valid pp <= 12, vpp <= 6, m <= 12 pp in
    tests/unit/test_estimate.py)."""
    if schedule == Schedule.ONE_F_ONE_B:
        m = min(m, pp)
    elif schedule == Schedule.INTERLEAVED and m >= pp:
        r = interleaved_round_size(pp, m)
        m = r * min(m // r, 2)
    return _inflight_cached(schedule, pp, vpp, m)
# Memory no tensor of ours owns: CUDA context and kernels (~0.5-1 GiB), NCCL buffers and cuBLAS workspaces.
# On the CPU the runtime reports resident growth over the process's own baseline, which excludes them.
CUDA_FIXED_RESERVE_BYTES = 2 * GiB
# PyTorch's caching allocator rounds and fragments: 5 % of what we allocate is held on top (the gap between
# max_memory_allocated and max_memory_reserved in long runs, Megatron-LM's memory report).
FRAGMENTATION = 0.05
# torch DDP's default bucket_cap_mb (25 MiB): gradients are all-reduced in buckets of this size.
DDP_BUCKET_BYTES = 25 * 2**20


def recompute_transient_bytes(block: LayerCost, mode: Recompute) -> float:
    """A recomputing block's backward first redoes its forward, so for that one block and micro-batch the
    activations it did not keep are alive again on top of everything held (Chen et al. 2016, arXiv 1604.06174,
    section 3: the peak of a checkpointed segment is its stored inputs plus one segment's activations)."""
    return max(block.act_bytes[Recompute.NONE] - block.act_bytes.get(mode, block.act_bytes[Recompute.NONE]), 0.0)


@dataclass(frozen=True)
class Config:
    """One point of the search space."""

    tp: int
    pp: int
    dp: int
    vpp: int
    sp: bool
    micro_batch_size: int
    num_microbatches: int
    zero: int
    schedule: Schedule
    recompute: tuple[Recompute, ...]
    """Modes the ILP may choose from per stage: all three ("auto") or the one pinned."""
    mesh_order: tuple[MeshAxis, MeshAxis, MeshAxis] = (MeshAxis.PP, MeshAxis.DP, MeshAxis.TP)

    def summary(self) -> dict:
        return {"tp": self.tp, "pp": self.pp, "dp": self.dp, "vpp": self.vpp, "sp": self.sp,
                "mbs": self.micro_batch_size, "microbatches": self.num_microbatches, "zero": self.zero,
                "schedule": str(self.schedule), "recompute": "auto" if len(self.recompute) > 1 else str(self.recompute[0]),
                "mesh_order": "-".join(self.mesh_order)}


@dataclass(frozen=True)
class Comm:
    """Communication times of one configuration, per micro-batch unless said otherwise."""

    tp_block_fwd_s: float
    tp_block_bwd_s: float
    tp_edge_fwd_s: float   # embedding / head: one collective each way
    p2p_s: float           # one activation (or its gradient) between neighbouring pipeline ranks
    dp_step_s: float       # gradient reduction (+ parameter gathers) once per step
    dp_per_microbatch_s: float  # ZeRO-3 parameter all-gathers repeated every micro-batch


class Estimator:
    def __init__(self, model: ModelSpec, cluster: ClusterSpec, train: TrainSpec, costs: AnalyticCosts | None = None,
                 traits: RuntimeTraits = RuntimeTraits(), topology: Topology | None = None,
                 device: str = "cuda"):
        self.model, self.cluster, self.train, self.traits = model, cluster, train, traits
        self.costs = costs or AnalyticCosts(model, cluster.gpu, train, traits)
        self.topology = topology or Topology(cluster)
        self.device = device
        self._comm_cache: dict[tuple, Comm] = {}

    def unavailable(self, tp: int, sp: bool, mbs: int) -> str | None:
        """Why the costs cannot price this (tp, sp, micro-batch) choice, or None."""
        if sp and tp == 1:
            return "sequence parallel needs tp > 1"
        return self.costs.available(tp, sp, mbs)

    # ------------------------------------------------------------------ memory
    def static_bytes_per_param(self, zero: int, dp: int) -> tuple[float, float, float]:
        """(weights, grads, optimizer) bytes per parameter on one rank, by ZeRO stage (Rajbhandari et al. 2020,
        fig. 1: stage 1 shards optimizer state, 2 also gradients, 3 also the weights)."""
        w, g, o = self.train.weight_bytes, self.train.grad_bytes, self.train.optimizer_bytes
        if zero >= 1:
            o /= dp
        if zero >= 2:
            g /= dp
        if zero >= 3:
            w /= dp
        return w, g, o

    def fixed_reserve_bytes(self) -> float:
        """CUDA: context, kernels and library workspaces. CPU: what the runtime calibration measured beyond
        tensors (ProfiledCosts.runtime_fixed_bytes; 0 without one)."""
        if self.device == "cuda":
            return CUDA_FIXED_RESERVE_BYTES
        return self.costs.runtime_fixed_bytes

    def reserve_bytes(self, allocated: float) -> float:
        return self.fixed_reserve_bytes() + FRAGMENTATION * allocated

    def memory_cap_bytes(self) -> float:
        """What partitions may allocate: device memory minus the fixed reserve, less fragmentation."""
        return (self.cluster.gpu.memory_bytes - self.fixed_reserve_bytes()) / (1 + FRAGMENTATION)

    def zero3_gather_bytes(self, c: Config) -> float:
        """ZeRO-3 gathers one block's full weights ahead of use, and prefetches the next (x2)."""
        return 2 * self.costs.block(c.tp, c.sp, c.micro_batch_size).params * self.train.weight_bytes if c.zero == 3 else 0.0

    # ------------------------------------------------------------------ communication
    def comm(self, c: Config) -> Comm:
        """Communication of a configuration; the schedule and virtual stages do not change it (cached)."""
        key = (c.tp, c.pp, c.dp, c.sp, c.micro_batch_size, c.zero, c.num_microbatches > 1, c.mesh_order)
        if key not in self._comm_cache:
            self._comm_cache[key] = self._comm(c)
        return self._comm_cache[key]

    def _comm(self, c: Config) -> Comm:
        sizes = {MeshAxis.TP: c.tp, MeshAxis.PP: c.pp, MeshAxis.DP: c.dp}
        order = c.mesh_order

        def along(axis: MeshAxis, op: str, nbytes: float) -> float:
            return self.topology.axis_time_s(op, nbytes, order, sizes, axis)

        block = self.costs.block(c.tp, c.sp, c.micro_batch_size)
        if c.sp:  # each all-reduce becomes a reduce-scatter + an all-gather of the same tensor
            one = (along(MeshAxis.TP, "reduce_scatter", block.tp_comm_bytes)
                   + along(MeshAxis.TP, "all_gather", block.tp_comm_bytes))
        else:
            one = along(MeshAxis.TP, "all_reduce", block.tp_comm_bytes)
        tp_block = block.tp_collectives * one
        # neighbouring pipeline ranks: the activation of one micro-batch, sharded over TP when SP is on
        p2p_bytes = block.tp_comm_bytes / (c.tp if c.sp else 1)
        p2p = along(MeshAxis.PP, "send_recv", p2p_bytes) if c.pp > 1 else 0.0
        # data parallel: gradients of this rank's parameters, on the busiest pipeline rank
        rank_params = self.rank_params_upper(c)
        grad_bytes = rank_params * (self.traits.grad_reduce_bytes or self.train.grad_bytes)
        weight_bytes = rank_params * self.train.weight_bytes
        # Each collective pays its latency: DDP reduces gradients in buckets of DDP_BUCKET_BYTES, FSDP2 gathers and
        # reduce-scatters once per wrapped unit (every block on the rank, plus the root with embedding/head).
        def split(op: str, nbytes: float, pieces: int) -> float:
            return pieces * along(MeshAxis.DP, op, nbytes / pieces)

        if c.zero <= 1:
            dp_step = split("all_reduce", grad_bytes, max(1, math.ceil(grad_bytes / DDP_BUCKET_BYTES)))
            if c.zero == 1:  # updated shards are gathered back after the sharded optimizer step
                dp_step += along(MeshAxis.DP, "all_gather", weight_bytes)
        units = -(-self.model.num_layers // c.pp) + 1
        if c.zero >= 2:
            dp_step = split("reduce_scatter", grad_bytes, units) + split("all_gather", weight_bytes, units)
        per_mb = 0.0
        if c.zero == 3:  # weights re-gathered for forward and again for backward of every later micro-batch
            per_mb = 2 * split("all_gather", weight_bytes, units) * (c.num_microbatches > 1)
        # a profile may have timed ZeRO 2/3's wrapper per block per micro-batch (its gathers and FSDP2's hooks):
        # then only the reduce-scatter stays a once-a-step collective
        measured = self.costs.fsdp_block_extra_s(c.zero, c.dp, c.micro_batch_size) if c.zero >= 2 else None
        if measured is not None and c.tp == 1:
            dp_step = split("reduce_scatter", grad_bytes, units)
            per_mb = measured * -(-self.model.num_layers // c.pp)
        return Comm(tp_block_fwd_s=tp_block, tp_block_bwd_s=tp_block, tp_edge_fwd_s=one if c.tp > 1 else 0.0,
                    p2p_s=p2p, dp_step_s=dp_step, dp_per_microbatch_s=per_mb)

    def rank_params_upper(self, c: Config) -> float:
        """Parameters on the busiest pipeline rank for an even split (for DP volume before the partition)."""
        block = self.costs.block(c.tp, c.sp, c.micro_batch_size)
        blocks = -(-self.model.num_layers // c.pp)
        edge = max(self.costs.embedding(c.tp, c.sp, c.micro_batch_size).params,
                   self.costs.head(c.tp, c.sp, c.micro_batch_size).params)
        return blocks * block.params + (edge if c.pp > 1 else 2 * edge)

    # ------------------------------------------------------------------ the ILP's input
    def partition_problem(self, c: Config, comm: Comm | None = None) -> PartitionProblem:
        comm = comm or self.comm(c)
        mbs = c.micro_batch_size
        block, emb, head = (self.costs.block(c.tp, c.sp, mbs), self.costs.embedding(c.tp, c.sp, mbs),
                            self.costs.head(c.tp, c.sp, mbs))
        w, g, o = self.static_bytes_per_param(c.zero, c.dp)
        per_param = w + g + o
        options = tuple(BlockOption(mode=m, time_s=self.block_time_s(block, m, comm, c), act_bytes=block.act_bytes[m])
                        for m in c.recompute)
        stages = c.pp * c.vpp
        zb = c.zero == 3
        return PartitionProblem(
            num_blocks=self.model.num_layers, options=options, block_static_bytes=block.params * per_param,
            num_stages=stages, stage_rank=tuple(j % c.pp for j in range(stages)),
            inflight=tuple(float(x) for x in inflight_per_stage(c.schedule, c.pp, c.vpp, c.num_microbatches)),
            num_microbatches=c.num_microbatches,
            first_time_s=emb.time_s() + 2 * comm.tp_edge_fwd_s, first_static_bytes=emb.params * per_param,
            first_act_bytes=emb.act_bytes[Recompute.NONE],
            last_time_s=head.time_s() + 2 * comm.tp_edge_fwd_s, last_static_bytes=head.params * per_param,
            last_act_bytes=head.act_bytes[Recompute.NONE],
            boundary_time_s=comm.p2p_s * 2,  # the activation forward and its gradient backward
            # at least 1 byte: a limit below the fixed reserve (or the ZeRO-3 gathers) leaves room for
            # nothing, so the search rejects the configuration as out of memory instead of failing
            memory_cap_bytes=max(self.memory_cap_bytes() - (self.zero3_gather_bytes(c) if zb else 0.0)
                                 - max(recompute_transient_bytes(block, m) for m in c.recompute), 1.0),
            min_blocks_per_stage=1 if stages > 1 else 0)

    def block_time_s(self, block: LayerCost, mode: Recompute, comm: Comm, c: Config) -> float:
        recompute_comm = comm.tp_block_fwd_s if mode == Recompute.FULL else 0.0
        per_mb_gather = comm.dp_per_microbatch_s / self.model.num_layers * c.pp
        return block.time_s(mode) + comm.tp_block_fwd_s + comm.tp_block_bwd_s + recompute_comm + per_mb_gather

    # ------------------------------------------------------------------ prediction
    def predict(self, c: Config, part: PartitionResult, comm: Comm | None = None) -> Prediction:
        comm = comm or self.comm(c)
        mbs, stages = c.micro_batch_size, c.pp * c.vpp
        block, emb, head = (self.costs.block(c.tp, c.sp, mbs), self.costs.embedding(c.tp, c.sp, mbs),
                            self.costs.head(c.tp, c.sp, mbs))
        fwd, bwd = [], []
        for j, counts in enumerate(part.counts):
            n = sum(counts.values())
            f = n * (block.fwd_s + comm.tp_block_fwd_s)
            b = sum(k * (block.bwd_s + block.recompute_extra_s.get(m, 0.0) + comm.tp_block_bwd_s
                         + (comm.tp_block_fwd_s if m == Recompute.FULL else 0.0)) for m, k in counts.items())
            b += n * comm.dp_per_microbatch_s / self.model.num_layers * c.pp
            if j == 0:
                f, b = f + emb.fwd_s + comm.tp_edge_fwd_s, b + emb.bwd_s + comm.tp_edge_fwd_s
            if j == stages - 1:
                f, b = f + head.fwd_s + comm.tp_edge_fwd_s, b + head.bwd_s + comm.tp_edge_fwd_s
            # the runtime's own per-micro-batch work on every stage (calibrated from profile runs; 0 without)
            f_extra, b_extra = self.costs.stage_microbatch_overhead_s
            if self.device == "cpu":  # gloo moves the tensor on the receiving rank's own core: it cannot compute
                f_extra += comm.p2p_s if j > 0 else 0.0            # ... while it waits for the activation
                b_extra += comm.p2p_s if j < stages - 1 else 0.0   # ... or for the gradient
            fwd.append(f + f_extra)
            bwd.append(b + b_extra)
        # on CPU the transfer sits inside the receiving action (above), so it is not a latency on top of it
        sim = simulate(c.schedule, c.pp, c.vpp, c.num_microbatches, fwd, bwd,
                       p2p_s=0.0 if self.device == "cpu" else comm.p2p_s)
        # data-parallel gradient reduction: hidden behind the last micro-batch's backward when the runtime
        # overlaps it (DDP buckets / FSDP2 reduce-scatter in backward), else fully exposed
        inflight = inflight_per_stage(c.schedule, c.pp, c.vpp, c.num_microbatches)
        w, g, o = self.static_bytes_per_param(c.zero, c.dp)
        rank_stats = []
        for r in range(c.pp):
            js = [j for j in range(stages) if j % c.pp == r]
            params = sum(sum(part.counts[j].values()) * block.params for j in js)
            params += (emb.params if 0 in js else 0) + (head.params if stages - 1 in js else 0)
            acts = sum(sum(k * block.act_bytes[m] for m, k in part.counts[j].items()) * inflight[j] for j in js)
            acts += (emb.act_bytes[Recompute.NONE] * inflight[0] if 0 in js else 0)
            acts += (head.act_bytes[Recompute.NONE] * inflight[-1] if stages - 1 in js else 0)
            acts += max((recompute_transient_bytes(block, m) for j in js for m, k in part.counts[j].items() if k),
                        default=0.0)
            gather = self.zero3_gather_bytes(c)
            allocated = params * (w + g + o) + acts + gather
            mem = MemoryBreakdown(params_bytes=int(params * w + gather), grads_bytes=int(params * g),
                                  optimizer_bytes=int(params * o), activations_bytes=int(acts),
                                  reserve_bytes=int(self.reserve_bytes(allocated)),
                                  total_bytes=int(allocated + self.reserve_bytes(allocated)))
            rank_time = sum(fwd[j] + bwd[j] for j in js)
            rank_stats.append((mem, rank_time, params, min(bwd[j] for j in js)))
        max_params = max(s[2] for s in rank_stats)
        dp_scale = max_params / max(self.rank_params_upper(c), 1)
        dp_s = comm.dp_step_s * dp_scale if c.dp > 1 else 0.0
        # CPU ranks own one core each: gloo's reduction runs on that core, so nothing overlaps with backward
        overlap = self.traits.overlap_grad_reduce and self.device != "cpu"
        window = min(s[3] for s in rank_stats) if overlap else 0.0
        exposed_dp = max(dp_s - window, 0.0)
        step = (sim.step_time_s + exposed_dp + self.optimizer_step_s(max_params, c)
                + self.costs.step_overhead_s)
        flops = model_flops_per_step(self.model, self.train.global_batch)
        gpus = c.tp * c.pp * c.dp
        tflops = flops / step / gpus / 1e12
        stage_preds = [StagePrediction(memory=m, time_s=t) for m, t, _, _ in rank_stats]
        return Prediction(step_time_s=step, tokens_per_s=self.train.global_batch * self.model.seq_len / step,
                          tflops_per_gpu=tflops, mfu=tflops / self.cluster.gpu.peak_tflops,
                          bubble_fraction=sim.bubble_fraction,
                          peak_memory_bytes=max(m.total_bytes for m, *_ in rank_stats), stages=stage_preds)

    def optimizer_step_s(self, rank_params: float, c: Config) -> float:
        """Adam is memory-bound: read weights, grads, both moments and the master copy, write them back."""
        shard = rank_params / (c.dp if c.zero >= 1 else 1)
        measured = self.costs.optimizer_s_per_param  # AdamW timed by the profile, if it was
        if measured:
            return shard * measured
        touched = 2 * self.train.optimizer_bytes + self.train.grad_bytes + 2 * self.train.weight_bytes
        return self.costs.memory_time_s(shard * touched)
