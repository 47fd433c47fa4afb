"""What the memory model adds beside weights and saved activations (planner/memory.py)."""
from planner.memory import gradients_persist, held_at_peak, pipeline_buffer_bytes
from planner.plan import Schedule

A, LOGITS = 10.0, 40.0  # one micro-batch's boundary activation and its logits


def test_interleaved_holds_every_send_until_the_step_ends():
    # a middle stage: receive buffers for all 8 micro-batches' activations (2 of them counted as block inputs)
    # and gradients, 8 sent outputs, 8 sent input gradients
    middle = pipeline_buffer_bytes(Schedule.INTERLEAVED, 1, 4, 8, A, LOGITS, inflight=2)
    assert middle == ((8 - 2) + 8 + 8) * A + 8 * A


def test_1f1b_keeps_outputs_only_while_in_flight():
    first = pipeline_buffer_bytes(Schedule.ONE_F_ONE_B, 0, 2, 8, A, LOGITS, inflight=2)
    assert first == 8 * A + 2 * A  # gradient receive buffers, outputs of the two micro-batches in flight
    last = pipeline_buffer_bytes(Schedule.ONE_F_ONE_B, 1, 2, 8, A, LOGITS, inflight=1)
    assert last == (8 - 1) * A + 1 * A + 1 * LOGITS  # activation buffers, one gradient sent, one logits kept


def test_gpipe_holds_its_forward_sends_to_the_end_of_forward():
    assert pipeline_buffer_bytes(Schedule.GPIPE, 0, 2, 4, A, LOGITS, inflight=4) == 4 * A + 4 * A


def test_gradients_meet_the_activations_only_after_a_backward():
    acts, one, grads = 100.0, 25.0, 60.0
    assert held_at_peak(acts, one, grads, loss=5.0, recomputed=0.0, grads_before_peak=True) == 165.0
    # every forward first (GPipe): the start of backward, or its end with the gradients but one micro-batch less
    assert held_at_peak(acts, one, grads, loss=5.0, recomputed=0.0, grads_before_peak=False) == 135.0
    assert held_at_peak(acts, one, 10.0, loss=5.0, recomputed=0.0, grads_before_peak=False) == 105.0
    # a recomputing block's backward at the end: beside nearly every gradient
    assert held_at_peak(acts, one, grads, loss=5.0, recomputed=30.0, grads_before_peak=False) == 165.0


def test_only_ddp_keeps_gradients_across_steps():
    assert gradients_persist(tp=1, pp=1, dp=2, zero=0) and gradients_persist(tp=1, pp=1, dp=2, zero=1)
    assert not gradients_persist(tp=1, pp=1, dp=2, zero=2)
    assert not gradients_persist(tp=1, pp=2, dp=2, zero=0) and not gradients_persist(tp=1, pp=1, dp=1, zero=0)
