"""What a rank holds at its memory peak beyond weights, optimizer state and saved activations: the pipeline
library's buffers, the loss's backward, and whether the gradients exist yet.

Each term was found by replaying torch.profiler's allocation events of real runs on this machine and grouping the
bytes live at the peak by the operation that allocated them (runtime/memory_meter.py measures the same peak).
"""
from __future__ import annotations

from planner.plan import Schedule

# cross_entropy runs on fp32 logits (runtime/model.py lm_loss; autocast keeps log_softmax in fp32 on CUDA)
LOSS_BYTES = 4


def pipeline_buffer_bytes(schedule: Schedule, stage: int, stages: int, microbatches: int, boundary_bytes: float,
                          logits_bytes: float, inflight: float) -> float:
    """torch.distributed.pipelining's own tensors on one (virtual) stage, in bytes.

    - Receive buffers, allocated once per micro-batch and kept (stage.py ``_setup_forward_recv_info`` and
      ``_create_grad_recv_info``): one activation per micro-batch on every stage but the first, one gradient per
      micro-batch on every stage but the last. A received activation in flight is the saved input of the stage's
      first block, already counted among the activations, so those are not counted twice.
    - Outputs: kept for backward while their micro-batch is in flight (``fwd_cache``; on the last stage, the
      logits the loss is taken of), and until their send is waited on (schedules.py): the interleaved runtime
      schedule waits every send at the end of the step, GPipe its forward sends after the last forward, 1F1B
      each send at its next exchange.
    - Input gradients sent back: until the end of the step in the interleaved schedule, else one."""
    first, last = stage == 0, stage == stages - 1
    recv = (0.0 if first else microbatches - inflight) + (0.0 if last else microbatches)
    waited_late = microbatches if schedule in (Schedule.INTERLEAVED, Schedule.GPIPE) else 1
    outputs = logits_bytes * inflight if last else boundary_bytes * max(inflight, waited_late)
    grads_sent = 0 if first else (microbatches if schedule == Schedule.INTERLEAVED else 1)
    return (recv + grads_sent) * boundary_bytes + outputs


def logits_bytes(micro_batch_size: int, seq_len: int, vocab_size: int, elem_bytes: int) -> float:
    """One micro-batch's logits: the head projects to the full vocabulary on every TP rank (its output is
    replicated, runtime/parallel/tensor.py)."""
    return float(micro_batch_size * seq_len * vocab_size * elem_bytes)


def loss_backward_bytes(micro_batch_size: int, seq_len: int, vocab_size: int) -> float:
    """The last stage's backward starts with two logits-sized gradients alive at once (of the log-softmax output
    and of the logits) beside the saved log-softmax output, in fp32."""
    return 2.0 * logits_bytes(micro_batch_size, seq_len, vocab_size, LOSS_BYTES)


def gradients_persist(tp: int, pp: int, dp: int, zero: int) -> bool:
    """Whether a rank's gradients outlive the step: DDP with gradient_as_bucket_view (zero 0/1 with dp > 1 and no
    TP or pipeline, runtime/parallel/data.py) zeroes them in place; every other wrapper sets them to None."""
    return dp > 1 and zero <= 1 and tp == 1 and pp == 1


def held_at_peak(activations: float, one_microbatch: float, grads: float, loss: float, recomputed: float,
                 grads_before_peak: bool) -> float:
    """Activations, gradients and the one-off transients of backward held together at the rank's peak: the
    loss's logits-sized gradients (at the start of the last stage's backward) and a recomputed block's
    activations (during that block's backward).

    Where a forward runs after a backward in the same step (or gradients persist), the most micro-batches are in
    flight with every gradient already allocated. Where the rank runs every forward before its first backward
    (GPipe; one micro-batch), the gradients appear only as that backward frees activations: the peak is the
    larger of its start and its end, where the last block recomputes beside nearly every gradient."""
    if grads_before_peak:
        return activations + grads + max(loss, recomputed)
    return max(activations + max(loss, recomputed), activations - one_microbatch + grads + recomputed)
