"""From one parallel configuration to a priced partition problem, and from a partition to a full prediction:
per-rank memory broken down, the pipeline simulated over the uneven stages, communication over the topology."""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

from planner.costmodel import AnalyticCosts, LayerCost, RuntimeTraits, model_flops_per_step
from planner.memory import (gradients_persist, held_at_peak, logits_bytes, loss_backward_bytes,
                            pipeline_buffer_bytes)
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
# On the CPU the runtime reports live tensor bytes (runtime/memory_meter.py), which excludes them.
CUDA_FIXED_RESERVE_BYTES = 2 * GiB
# PyTorch's caching allocator rounds and fragments: 5 % of what we allocate is held on top (the gap between
# max_memory_allocated and max_memory_reserved in long runs, Megatron-LM's memory report).
FRAGMENTATION = 0.05
# On CPU the prediction is held to exact live tensor bytes (runtime/memory_meter.py): its largest
# under-prediction there was 6 % (tests/distributed/test_memory_model.py), and the meter over-counts TP plans by
# up to ~10 %, so a plan is called feasible only with this share of the limit left free.
CPU_MODEL_HEADROOM = 0.10
# torch DDP's default bucket_cap_mb (25 MiB): gradients are all-reduced in buckets of this size ...
DDP_BUCKET_BYTES = 25 * 2**20
# ... except the first, which DDP caps at torch.distributed._DEFAULT_FIRST_BUCKET_BYTES (1 MiB) so that the first
# gradients backward produces go out early (torch/nn/parallel/distributed.py; measured with torch 2.13: tiny-gpt's
# 1,747,456 gradient bytes went as buckets of 1,048,576 + 698,880 once DDP rebuilt them after the first step).
DDP_FIRST_BUCKET_BYTES = 2**20


def gradient_buckets(grad_bytes: float, first_bucket: bool) -> list[float]:
    """Bytes of each gradient all-reduce of a step: the whole split evenly into pieces of at most DDP_BUCKET_BYTES,
    after one of DDP_FIRST_BUCKET_BYTES where ``first_bucket`` (torch DDP)."""
    head = [min(grad_bytes, DDP_FIRST_BUCKET_BYTES)] if first_bucket and grad_bytes > DDP_FIRST_BUCKET_BYTES else []
    rest = grad_bytes - sum(head)
    pieces = max(1, math.ceil(rest / DDP_BUCKET_BYTES))
    return head + [rest / pieces] * pieces


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

    def held_bytes_per_param(self, c: Config) -> tuple[float, float, float]:
        """(weights, grads, optimizer) bytes per parameter one rank holds at its peak with mpplan's runtime:
        ZeRO's partitioning, and what FSDP2 (ZeRO 2/3, runtime/parallel/data.py) holds beside it, found in the
        allocation events of real runs (torch 2.13):
        - the weights are sharded at ZeRO 2 too, and every block's gathered weights stay from its forward to its
          backward beside the shards at ZeRO 2
          (reshard_after_forward=False) and inside a pipeline (torch.distributed.pipelining turns
          reshard_after_backward off between micro-batches);
        - with several micro-batches the gradients accumulate unsharded between reduce-scatters
          (requires_gradient_sync off), so each rank holds them in full."""
        w, g, o = self.static_bytes_per_param(c.zero, c.dp)
        if c.zero >= 2 and c.dp > 1 and self.traits.torch_distributed:
            w = self.train.weight_bytes / c.dp  # FSDP2 shards the weights at ZeRO 2 as well
            if c.zero == 2 or c.pp > 1:
                w += self.train.weight_bytes
            if c.num_microbatches > 1:
                g = self.train.grad_bytes
        return w, g, o

    def fixed_reserve_bytes(self) -> float:
        """CUDA: context, kernels and library workspaces. CPU: what the runtime calibration measured beyond
        tensors (ProfiledCosts.runtime_fixed_bytes; 0 without one)."""
        if self.device == "cuda":
            return CUDA_FIXED_RESERVE_BYTES
        return self.costs.runtime_fixed_bytes

    def fragmentation(self) -> float:
        """CUDA's caching allocator holds more than it hands out; on CPU the measured peak is of live tensor
        bytes (runtime/memory_meter.py), with nothing held on top."""
        return FRAGMENTATION if self.device == "cuda" else 0.0

    def reserve_bytes(self, allocated: float) -> float:
        return self.fixed_reserve_bytes() + self.fragmentation() * allocated

    def memory_cap_bytes(self) -> float:
        """What partitions may allocate: device memory minus the fixed reserve, less fragmentation (CUDA) or
        the model's own headroom (CPU)."""
        margin = FRAGMENTATION if self.device == "cuda" else CPU_MODEL_HEADROOM
        return (self.cluster.gpu.memory_bytes - self.fixed_reserve_bytes()) / (1 + margin)

    def boundary_bytes(self, c: Config) -> float:
        """One micro-batch's activation between neighbouring pipeline stages, sharded over TP when SP is on."""
        return self.costs.block(c.tp, c.sp, c.micro_batch_size).tp_comm_bytes / (c.tp if c.sp else 1)

    def loss_transient_bytes(self, c: Config) -> float:
        return loss_backward_bytes(c.micro_batch_size, self.model.seq_len, self.model.vocab_size)

    def pipeline_buffers(self, c: Config, inflight: tuple[int, ...]) -> list[float]:
        """Per virtual stage, torch.distributed.pipelining's receive and send buffers (0 without a pipeline)."""
        stages, a = c.pp * c.vpp, self.boundary_bytes(c)
        if c.pp == 1 or not self.traits.torch_distributed:
            return [0.0] * stages
        logits = logits_bytes(c.micro_batch_size, self.model.seq_len, self.model.vocab_size, self.costs.elem_bytes)
        return [pipeline_buffer_bytes(c.schedule, j, stages, c.num_microbatches, a, logits, inflight[j])
                for j in range(stages)]

    def zero3_gather_bytes(self, c: Config) -> float:
        """ZeRO-3 gathers one block's full weights ahead of use, and prefetches the next (x2); inside a pipeline
        they are all held already (held_bytes_per_param)."""
        if c.zero != 3 or (c.pp > 1 and self.traits.torch_distributed):
            return 0.0
        return 2 * self.costs.block(c.tp, c.sp, c.micro_batch_size).params * self.train.weight_bytes

    # ------------------------------------------------------------------ communication
    def comm(self, c: Config) -> Comm:
        """Communication of a configuration (cached); the schedule changes only a profile's pipeline hand-offs."""
        key = (c.tp, c.pp, c.dp, c.sp, c.micro_batch_size, c.zero, c.num_microbatches > 1, c.mesh_order,
               c.schedule)
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
        p2p = 0.0
        if c.pp > 1:  # as a profile measured the pipelining runtime's hand-offs, else as a send_recv
            measured = self.costs.pipeline_transfer_s(p2p_bytes, c.schedule)
            p2p = measured if measured is not None else along(MeshAxis.PP, "send_recv", p2p_bytes)
        # data parallel: gradients of this rank's parameters, on the busiest pipeline rank
        rank_params = self.rank_params_upper(c)
        grad_bytes = rank_params * (self.traits.grad_reduce_bytes or self.train.grad_bytes)
        weight_bytes = rank_params * self.train.weight_bytes
        # Each collective pays its latency: gradients are all-reduced in buckets (gradient_buckets; torch DDP, which
        # wraps a tp-1 pp-1 rank at zero 0/1 in runtime/parallel/data.py, sends a small first one), FSDP2 gathers
        # and reduce-scatters once per wrapped unit (every block on the rank, plus the root with embedding/head).
        def split(op: str, nbytes: float, pieces: int) -> float:
            return pieces * along(MeshAxis.DP, op, nbytes / pieces)

        # every gradient reduction is issued as a rank's backward hands it over, i.e. right after compute, which
        # costs a collective more on CPU than back to back (measured by a profile; 0 otherwise): once per bucket
        # and per FSDP2 unit (ZeRO-2 plans of tiny-gpt ran 15-24 ms a step over their price at 2 and 8
        # micro-batches alike, about its 9 units x 2 ms); DDP's buckets at what a timed DDP step paid, where the
        # profile has one (planner/profiled.py ddp_bucket_after_compute_s)
        ddp = self.traits.torch_distributed and c.tp == 1 and c.pp == 1 and c.zero <= 1
        buckets = gradient_buckets(grad_bytes, ddp)
        units = -(-self.model.num_layers // c.pp) + 1
        after = self.costs.collective_after_compute_s
        per_bucket = self.costs.ddp_bucket_after_compute_s if ddp else None
        after_compute = (units * after if c.zero >= 2
                         else len(buckets) * (after if per_bucket is None else per_bucket) + (c.zero == 1) * after)
        if c.zero <= 1:
            dp_step = sum(along(MeshAxis.DP, "all_reduce", b) for b in buckets)
            if c.zero == 1:  # updated shards are gathered back after the sharded optimizer step
                dp_step += along(MeshAxis.DP, "all_gather", weight_bytes)
        if c.zero >= 2:
            dp_step = split("reduce_scatter", grad_bytes, units) + split("all_gather", weight_bytes, units)
        per_mb = 0.0
        if c.zero == 3:  # weights re-gathered for forward and again for backward of every later micro-batch
            per_mb = 2 * split("all_gather", weight_bytes, units) * (c.num_microbatches > 1)
        # a profile may have timed ZeRO 2/3's wrapper per block per micro-batch (its gathers and FSDP2's hooks):
        # then only the reduce-scatter stays a once-a-step collective, and every FSDP unit pays the wrapper each
        # micro-batch: the blocks and the stage's root unit (runtime/parallel/data.py _fully_shard)
        measured = self.costs.fsdp_block_extra_s(c.zero, c.dp, c.micro_batch_size) if c.zero >= 2 else None
        if measured is not None and c.tp == 1:
            dp_step = split("reduce_scatter", grad_bytes, units)
            per_mb = measured * units
        dp_step += after_compute
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
        w, g, o = self.held_bytes_per_param(c)
        per_param = w + g + o
        options = tuple(BlockOption(mode=m, time_s=self.block_time_s(block, m, comm, c), act_bytes=block.act_bytes[m])
                        for m in c.recompute)
        stages = c.pp * c.vpp
        inflight = inflight_per_stage(c.schedule, c.pp, c.vpp, c.num_microbatches)
        extra = self.pipeline_buffers(c, inflight)
        extra[-1] += self.loss_transient_bytes(c)
        return PartitionProblem(
            num_blocks=self.model.num_layers, options=options, block_static_bytes=block.params * per_param,
            num_stages=stages, stage_rank=tuple(j % c.pp for j in range(stages)),
            inflight=tuple(float(x) for x in inflight), stage_extra_bytes=tuple(extra),
            num_microbatches=c.num_microbatches,
            first_time_s=emb.time_s() + 2 * comm.tp_edge_fwd_s, first_static_bytes=emb.params * per_param,
            first_act_bytes=emb.act_bytes[Recompute.NONE],
            last_time_s=head.time_s() + 2 * comm.tp_edge_fwd_s, last_static_bytes=head.params * per_param,
            last_act_bytes=head.act_bytes[Recompute.NONE],
            boundary_time_s=comm.p2p_s * 2,  # the activation forward and its gradient backward
            # at least 1 byte: a limit below the fixed reserve (or the ZeRO-3 gathers) leaves room for
            # nothing, so the search rejects the configuration as out of memory instead of failing
            memory_cap_bytes=max(self.memory_cap_bytes() - self.zero3_gather_bytes(c)
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
            # ZeRO 2/3's per-micro-batch gathers: FSDP2's wrapper as timed around real blocks, or collectives
            gather = n * comm.dp_per_microbatch_s / self.model.num_layers * c.pp
            if j == 0:
                f, b = f + emb.fwd_s + comm.tp_edge_fwd_s, b + emb.bwd_s + comm.tp_edge_fwd_s
            if j == stages - 1:
                f, b = f + head.fwd_s + comm.tp_edge_fwd_s, b + head.bwd_s + comm.tp_edge_fwd_s
            # what a whole-model step adds to its layers timed alone, as a share of them (calibrated on tp-1
            # layers; a profile's TP blocks were timed inside the DTensor runtime already, and FSDP2's wrapper
            # around the blocks, so the gathers take no share; 0 without)
            share = self.costs.layer_overhead_fraction(mbs) if c.tp == 1 else 0.0
            f_extra, b_extra = f * share, b * share + gather
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
        w, g, o = self.held_bytes_per_param(c)
        buffers = self.pipeline_buffers(c, inflight)
        grads_persist = gradients_persist(c.tp, c.pp, c.dp, c.zero) or not self.traits.torch_distributed
        rank_stats = []
        for r in range(c.pp):
            js = [j for j in range(stages) if j % c.pp == r]
            params = sum(sum(part.counts[j].values()) * block.params for j in js)
            params += (emb.params if 0 in js else 0) + (head.params if stages - 1 in js else 0)
            acts = sum(sum(k * block.act_bytes[m] for m, k in part.counts[j].items()) * inflight[j] for j in js)
            acts += (emb.act_bytes[Recompute.NONE] * inflight[0] if 0 in js else 0)
            acts += (head.act_bytes[Recompute.NONE] * inflight[-1] if stages - 1 in js else 0)
            recomputed = max((recompute_transient_bytes(block, m) for j in js for m, k in part.counts[j].items() if k),
                             default=0.0)
            loss = self.loss_transient_bytes(c) if stages - 1 in js else 0.0
            in_flight = sum(inflight[j] for j in js)
            # a forward after a backward on this rank: the most micro-batches in flight meet every gradient
            grads_first = grads_persist or in_flight < c.num_microbatches * len(js)
            held = held_at_peak(acts, acts / max(in_flight, 1), params * g, loss, recomputed, grads_first)
            pipe = sum(buffers[j] for j in js)
            gather = self.zero3_gather_bytes(c)
            allocated = params * (w + o) + held + pipe + gather
            mem = MemoryBreakdown(params_bytes=int(params * w + gather), grads_bytes=int(params * g),
                                  optimizer_bytes=int(params * o), activations_bytes=int(held - params * g),
                                  pipeline_buffers_bytes=int(pipe), reserve_bytes=int(self.reserve_bytes(allocated)),
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
