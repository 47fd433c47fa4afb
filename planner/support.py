"""Which plans the runtime can execute correctly: the planner's search emits only these, `mpplan run` refuses the
rest at plan load with the reason (exit 2).

Torch-free on purpose (the planner imports it). Every refusal comes from a measurement on torch 2.13 / gloo
(../shared/facts/torch-2.13-gloo-and-pulp.md, "Failures") or from a run in tests/distributed; the comment beside
each rule says which. The data-parallel wrapper the runtime picks for each (zero, tp, pp) is chosen in
runtime/parallel/data.py among the combinations proven correct there, so the rules here are only about what no
proven wrapper covers.

Not reachable through plan.Schedule, hence not checked: the zero-bubble schedules (InterleavedZeroBubble,
ZBVZeroBubble) and DualPipeV, under which DDP asserts in reducer.cpp and FSDP2 with resharding after forward
silently leaves the last stage's grads None (facts file). Adding them to Schedule needs rules here first.
"""
from __future__ import annotations

from planner.plan import Parallel, Plan, Schedule
from planner.specs import ModelSpec


def unsupported_reason(parallel: Parallel, zero: int, schedule: Schedule, num_microbatches: int,
                       model: ModelSpec) -> str | None:
    """A one-line reason why the runtime cannot execute this combination correctly, or None when it can."""
    tp, pp = parallel.tp, parallel.pp
    if tp > 1:
        # Column-/row-wise sharding splits heads, kv heads and the MLP width evenly across the TP group.
        for what, size in (("num_heads", model.num_heads), ("kv heads", model.kv_heads), ("ffn", model.ffn)):
            if size % tp:
                return f"tp {tp} does not divide {what} ({size})"
        if model.tie_embeddings:
            # The tied weight would need two DTensor layouts at once (row-wise embedding, column-wise head).
            return f"tensor parallel (tp {tp}) with tied embeddings is not supported; untie them or use tp 1"
        if model.vocab_size % tp:
            return f"tp {tp} does not divide vocab_size ({model.vocab_size}) for the sharded embedding and head"
    if parallel.sp:
        if tp == 1:
            return "sequence parallel (sp) needs tp > 1"
        if model.seq_len % tp:
            return f"sequence parallel: tp {tp} does not divide seq_len ({model.seq_len})"
    if pp > 1:
        if model.tie_embeddings:
            # The head's copy of the embedding would sit on another pipeline rank and need a gradient tie
            # (Megatron's embedding group all-reduce), which the runtime does not implement.
            return f"tied embeddings across pipeline stages (pp {pp}) are not supported; untie them or use pp 1"
        if schedule == Schedule.ONE_F_ONE_B and num_microbatches < pp:
            # torch 2.13 Schedule1F1B: "Number of microbatches (2) must be greater than or equal to the number
            # of stages (4)."
            return f"1f1b needs num_microbatches ({num_microbatches}) >= pp ({pp})"
        if schedule == Schedule.INTERLEAVED:
            # torch 2.13 ScheduleInterleaved1F1B runs max(1, nmb // pp) rounds of equal size: that count must
            # divide nmb.
            rounds = max(1, num_microbatches // pp)
            if num_microbatches % rounds:
                return (f"interleaved needs num_microbatches ({num_microbatches}) to be a multiple of its "
                        f"{rounds} rounds (nmb // pp, pp = {pp})")
    if zero == 1 and tp > 1:
        # ZeroRedundancyOptimizer partitions and broadcasts plain tensors; measured in tests/distributed it
        # fails on DTensor (tensor-parallel) parameters.
        return "zero 1 (ZeroRedundancyOptimizer) does not work with tensor parallel (DTensor) parameters; use zero 2"
    return None


def plan_unsupported_reason(plan: Plan) -> str | None:
    """unsupported_reason for a whole plan. (Stages without blocks are fine: tests/distributed runs a plan whose
    middle stage holds no parameters at all under every ZeRO stage.)"""
    return unsupported_reason(plan.parallel, plan.zero, plan.schedule, plan.num_microbatches, plan.model)
