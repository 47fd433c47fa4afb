"""The profiler's measurements: layer shards, saved-activation bytes, optimizer state, collectives over gloo."""
from __future__ import annotations

import pytest
import torch

from planner.presets import MODELS
from planner.specs import Recompute, SpecError
from runtime.profile import check_request, count_steps, profile_model
from runtime.profile_comm import CommConfig, measure_collectives
from runtime.profile_layers import (LayerCase, TimingConfig, count_params, measure_layers, optimizer_bytes_per_param,
                                    saved_activation_bytes)

pytestmark = pytest.mark.distributed

GPT, LLAMA = MODELS["tiny-gpt"], MODELS["tiny-llama"]
QUICK = TimingConfig(warmup=1, repeats=3, min_sample_s=0.001)
CPU = torch.device("cpu")


def case(kind, tp=1, mbs=2, spec=GPT) -> LayerCase:
    return LayerCase(spec, kind, tp, mbs, CPU, torch.float32)


@pytest.mark.parametrize("spec", [GPT, LLAMA], ids=["gpt", "llama"])
def test_params_of_the_whole_layers_match_the_spec(spec):
    assert count_params(case("block", spec=spec)) == spec.block_params
    assert count_params(case("embedding", spec=spec)) == spec.embedding_params
    assert count_params(case("head", spec=spec)) == spec.head_params


def test_params_of_a_tp_shard():
    h, f, v, s, t = GPT.hidden_size, GPT.ffn, GPT.vocab_size, GPT.seq_len, 2
    # column-parallel q/k/v and fc1 (weights and biases split), row-parallel o/fc2 (weights split, biases whole),
    # norms whole
    shard = (h * 3 * h // t + 3 * h // t) + (h // t * h + h) + (h * f // t + f // t) + (f // t * h + h) + 4 * h
    assert count_params(case("block", tp=t)) == shard
    assert count_params(case("embedding", tp=t)) == v // t * h + s * h
    assert count_params(case("head", tp=t)) == 2 * h + h * v // t


@pytest.mark.parametrize("tp", [1, 2])
def test_saved_bytes_of_a_gpt_block_match_its_ops_exactly(tp):
    """fp32, no dropout, CPU SDPA (flash kernel: saves q, k, v, its output and a logsumexp, not the s x s
    softmax). Per block, in elements: input x, LN1 out, q k v (3/t), attention out (1/t; the out-projection's
    input is a view of it), residual, LN2 out, fc1 out (4/t), GELU out (4/t) = (4 + 12/t) sbh; plus the
    logsumexp (a/t) s b and two LayerNorms' mean and rstd, 4 b s."""
    b, s, h, a = 2, GPT.seq_len, GPT.hidden_size, GPT.num_heads
    sbh = s * b * h
    none = saved_activation_bytes(case("block", tp=tp), Recompute.NONE)
    assert none == 4 * ((4 + 12 // tp) * sbh + a // tp * s * b + 4 * b * s)
    # selective: the attention core runs again in backward; its inputs q, k, v stay, only the logsumexp goes
    assert saved_activation_bytes(case("block", tp=tp), Recompute.SELECTIVE) == none - 4 * a // tp * s * b
    # full: only the block's input
    assert saved_activation_bytes(case("block", tp=tp), Recompute.FULL) == 4 * sbh


def test_saved_bytes_skip_parameters_and_scale_with_the_micro_batch():
    one, four = (saved_activation_bytes(case("block", spec=LLAMA, mbs=m)) for m in (1, 4))
    assert four == 4 * one  # nothing fixed-size (weights, rope tables) is counted
    head = saved_activation_bytes(case("head", mbs=1))
    b, s, h, v = 1, GPT.seq_len, GPT.hidden_size, GPT.vocab_size
    # norm input, norm output (the projection's input), mean + rstd, log-softmax output, int64 targets, and
    # nll_loss's fp32 total_weight scalar
    assert head == 4 * (2 * s * b * h + 2 * s * b + s * b * v) + 8 * s * b + 4
    # token ids and position ids (int64); the embedding tables are parameters
    assert saved_activation_bytes(case("embedding", mbs=1)) == 8 * s * b + 8 * s


def test_measure_layer_reports_times_spreads_and_all_modes():
    block = measure_layers([case("block")], QUICK, lambda: None)[0]
    assert block.fwd_s > 0 and block.bwd_s > 0 and block.fwd_cv >= 0 and block.bwd_cv >= 0
    assert set(block.recompute_extra_s) == {Recompute.SELECTIVE, Recompute.FULL}
    assert set(block.activation_bytes) == set(Recompute)
    assert block.activation_bytes[Recompute.NONE] > block.activation_bytes[Recompute.FULL]
    head = measure_layers([case("head")], QUICK, lambda: None)[0]
    assert head.recompute_extra_s == {} and set(head.activation_bytes) == {Recompute.NONE}


def test_blocks_timed_under_dtensor_and_fsdp2_on_two_gloo_ranks():
    from runtime.profile_tp import measure_sharded_blocks

    done = []
    tp, fsdp = measure_sharded_blocks(GPT, 2, True, True, [1, 2], QUICK, on_done=done.append)
    assert [(t.tp, t.micro_batch_size) for t in tp] == [(2, 1), (2, 2)] and done == ["tp/zero2/zero3 blocks x2"]
    assert [(t.zero, t.dp, t.micro_batch_size) for t in fsdp] == [(2, 2, 1), (2, 2, 2), (3, 2, 1), (3, 2, 2)]
    shard = measure_layers([case("block", tp=2, mbs=2)], QUICK, lambda: None)[0]
    plain = measure_layers([case("block", mbs=2)], QUICK, lambda: None)[0]
    for t in [*tp, *fsdp]:
        assert t.fwd_s > 0 and t.bwd_s > 0 and t.fwd_cv >= 0
    # the real blocks also run their collectives and the wrappers' dispatch: never faster than the bare layer
    assert tp[1].fwd_s + tp[1].bwd_s > shard.fwd_s + shard.bwd_s
    assert fsdp[1].fwd_s + fsdp[1].bwd_s > plain.fwd_s + plain.bwd_s
    assert measure_sharded_blocks(GPT, 2, False, False, [1], QUICK) == ([], [])


class _NoCollectives:
    """Stands in for torch.distributed on one process: every all-reduce leaves its tensor as it is."""

    class ReduceOp:
        MAX = None

    @staticmethod
    def all_reduce(tensor, op=None):
        return tensor


def test_wrapped_blocks_are_timed_as_a_chain_and_priced_per_block(monkeypatch):
    import runtime.profile_tp as profile_tp

    assert profile_tp.chain_length(GPT) == min(profile_tp.CHAIN_BLOCKS, GPT.num_layers)
    assert profile_tp.chain_length(GPT.model_copy(update={"num_layers": 1})) == 1
    clock = iter(range(10_000))  # every reading of the clock is one second after the last
    monkeypatch.setattr(profile_tp.time, "perf_counter", lambda: float(next(clock)))
    chain = [torch.nn.Linear(4, 4) for _ in range(3)]
    x = torch.randn(2, 4, requires_grad=True)
    fwds, bwds = profile_tp._time(chain, x, torch.ones(2, 4), TimingConfig(warmup=1, repeats=5, min_sample_s=0.5),
                                  _NoCollectives)
    # one second for the chain's forward and one for its backward: a third of each per block
    assert fwds == bwds == [pytest.approx(1 / 3)] * 5
    assert all(layer.weight.grad is not None for layer in chain)  # the backward ran through every block


def test_layers_timed_on_two_processes_at_once_then_collectives_tp_blocks_ddp_pipeline_and_adamw_in_them():
    from runtime.profile_comm import AFTER_COMPUTE_BYTES, CollectiveBench
    from runtime.profile_concurrent import measure_layers_concurrently
    from runtime.profile_ddp import DDPBench
    from runtime.profile_pipeline import PipelineBench
    from runtime.profile_runtime import OptimizerBench
    from runtime.profile_tp import ShardedBench

    rounds, labels = [], []
    comm = CollectiveBench(2, "cpu", CommConfig(max_bytes=16 << 10, rounds=2), labels.append)
    blocks = ShardedBench(GPT, 2, True, False, [1], QUICK, labels.append)
    optimizer = OptimizerBench(GPT, mixed_precision=False)
    pipeline = PipelineBench(GPT, 2, 1, labels.append)
    ddp = DDPBench(GPT, 2, 2, labels.append)
    (both,), pace = measure_layers_concurrently([case("block")], QUICK, 2, on_round=rounds.append,
                                                then=[comm, blocks, ddp, pipeline, optimizer])
    (alone,) = measure_layers([case("block")], QUICK, lambda: None)
    assert len(rounds) == QUICK.warmup + QUICK.repeats  # one process reports progress
    assert labels == ["collectives x2 round 1/2", "collectives x2 round 2/2", "tp blocks x2",
                      "DDP gradient sync x2", "pipeline hand-offs x2"]
    sync = ddp.result
    assert (sync.micro_batch_size, sync.dp) == (2, 2) and sync.synced_s > 0 and sync.unsynced_s > 0
    # DDP's buckets (after its rebuild) hold every fp32 gradient of the whole model
    assert sum(sync.bucket_bytes) == 4 * (GPT.num_layers * GPT.block_params + GPT.embedding_params + GPT.head_params)
    hand_offs = pipeline.calibration()
    assert hand_offs.message_bytes == GPT.seq_len * GPT.hidden_size * 4
    assert [(r.schedule, r.vpp, r.receives_per_rank) for r in hand_offs.runs] == [
        ("1f1b", 1, 16), ("gpipe", 1, 16), ("interleaved", 2, 48)]
    assert all(r.step_time_s > 0 for r in hand_offs.runs)
    assert sorted(f.op for f in comm.fits()) == ["all_gather", "all_reduce", "reduce_scatter", "send_recv"]
    assert comm.after_compute[0] == AFTER_COMPUTE_BYTES and comm.after_compute[1] > 0
    assert comm.after_compute_extra_s() >= 0
    tp, fsdp = blocks.timings()
    assert [(t.tp, t.micro_batch_size) for t in tp] == [(2, 1)] and tp[0].fwd_s > 0 and fsdp == []
    assert optimizer.bytes_per_param == 8 and optimizer.adamw[0] > 0
    assert optimizer.adamw[1] == GPT.num_layers * GPT.block_params + GPT.embedding_params + GPT.head_params
    assert both.fwd_s > 0 and both.bwd_s > 0 and set(both.recompute_extra_s) == set(alone.recompute_extra_s)
    assert pace >= 1 and both.fwd_s == pytest.approx(pace * both.fwd_fast_s)
    assert (both.params, both.activation_bytes) == (alone.params, alone.activation_bytes)


def test_optimizer_state_bytes_from_a_real_adamw_step():
    assert optimizer_bytes_per_param(mixed_precision=False) == 8  # exp_avg + exp_avg_sq in fp32
    assert optimizer_bytes_per_param(mixed_precision=True) == 12  # + the fp32 master weight


def test_bad_requests_are_spec_errors():
    with pytest.raises(SpecError, match="--tp 3 does not divide tiny-gpt's num_heads"):
        check_request(GPT, "cpu", [1], [3], 2)
    with pytest.raises(SpecError, match="--tp 4 does not divide tiny-llama's num_kv_heads"):
        check_request(LLAMA, "cpu", [1], [4], 2)
    with pytest.raises(SpecError, match="micro-batch"):
        check_request(GPT, "cpu", [0], [1], 2)
    if not torch.cuda.is_available():
        with pytest.raises(SpecError, match="no CUDA device"):
            check_request(GPT, "cuda", [1], [1], 2)


def test_collectives_over_two_gloo_ranks():
    labels = []
    config = CommConfig(max_bytes=64 << 10, aligned_min_bytes=4 << 10)
    fits = measure_collectives(2, "cpu", config, on_done=labels.append)
    assert sorted((f.op, f.group_size) for f in fits) == [("all_gather", 2), ("all_reduce", 2),
                                                         ("reduce_scatter", 2), ("send_recv", 2)]
    assert len(labels) == CommConfig().rounds
    for fit in fits:  # every size measured lands where it belongs, by the size asked for
        assert [n for n, _ in fit.points] == config.sizes()
        assert [n for n, _ in fit.holdout_points] == [1792, 6912, 27392]
        assert [n for n, _ in fit.aligned_points] == [1 << e for e in range(12, 17)] and fit.aligned_pieces
        assert all(t > 0 for _, t in fit.points + fit.aligned_points) and fit.alpha_s + fit.beta_s_per_byte > 0


def test_profile_model_without_collectives_covers_every_case():
    steps = []
    prof = profile_model(GPT, micro_batch_sizes=[1, 2], tp_degrees=[1, 2], ranks=1, timing=QUICK,
                         progress=steps.append)
    assert len(steps) == count_steps(1, QUICK) and prof.collectives == []
    assert {(lp.kind, lp.tp, lp.micro_batch_size) for lp in prof.layers} == {
        (k, t, m) for k in ("embedding", "block", "head") for t in (1, 2) for m in (1, 2)}
    assert prof.device.threads == 1 and prof.device.matmul_tflops > 0 and prof.precision == "fp32"
    assert torch.get_num_threads() >= 1  # restored after profiling


def test_a_collective_after_compute_is_priced_as_its_excess_over_the_fits_mean_call():
    from runtime.profile_comm import CollectiveBench

    bench = CollectiveBench(2, "cpu", CommConfig(), None)
    sizes = [1 << e for e in range(10, 20)]
    bench.raw[("all_reduce", 2)] = ([(n, 1e-4 + n * 1e-9) for n in sizes], [], [], 5e-4)
    assert bench.after_compute_extra_s() is None  # not measured (CUDA)
    bench.after_compute = (1 << 18, 3e-3)
    fit = bench.fits()[0]
    assert fit.expected_s(1 << 18) == pytest.approx(1e-4 + (1 << 18) * 1e-9 + 5e-4)
    assert bench.after_compute_extra_s() == pytest.approx(3e-3 - fit.expected_s(1 << 18))
    bench.after_compute = (1 << 18, 1e-4)  # faster than back to back: nothing is added
    assert bench.after_compute_extra_s() == 0.0
