import pytest

from planner.costmodel import (MEGATRON_2021, AnalyticCosts, RuntimeTraits, block_activation_bytes,
                               gemm_efficiency, megatron_flops_per_step, model_flops_per_step)
from planner.presets import GPUS, MODELS
from planner.specs import Precision, Recompute, TrainSpec

M175 = MODELS["gpt3-175b"]


@pytest.mark.parametrize("t", [1, 2, 8])
@pytest.mark.parametrize("b", [1, 4])
def test_activations_reproduce_korthikanti_table_2(t, b):
    # arXiv 2205.05198 Table 2 (16-bit activations, dropout, no fused attention)
    s, h, a = M175.seq_len, M175.hidden_size, M175.num_heads
    got = block_activation_bytes(M175, b, t, False, 2, dropout=True, flash=False)
    assert got[Recompute.NONE] == pytest.approx(s * b * h * (10 + 24 / t + 5 * a * s / (h * t)))
    assert got[Recompute.SELECTIVE] == pytest.approx(s * b * h * (10 + 24 / t))
    assert got[Recompute.FULL] == pytest.approx(2 * s * b * h)
    sp = block_activation_bytes(M175, b, t, True, 2, dropout=True, flash=False)
    assert sp[Recompute.NONE] == pytest.approx(s * b * h / t * (34 + 5 * a * s / h))
    assert sp[Recompute.SELECTIVE] == pytest.approx(s * b * h / t * 34)
    assert sp[Recompute.FULL] == pytest.approx(2 * s * b * h / t)


def test_fused_attention_saves_no_scores_and_selective_equals_none():
    acts = block_activation_bytes(M175, 1, 8, False, 2, dropout=False, flash=True)
    assert acts[Recompute.SELECTIVE] == acts[Recompute.NONE]
    assert acts[Recompute.NONE] < block_activation_bytes(M175, 1, 8, False, 2, dropout=False, flash=False)[Recompute.NONE]


def test_gemm_efficiency_grows_with_shape_and_stays_below_one():
    small, large = gemm_efficiency(256, 256, 256), gemm_efficiency(8192, 8192, 8192)
    assert 0 < small < large < 1


def test_block_time_scales_with_tp_and_recompute_costs_a_forward():
    costs = AnalyticCosts(M175, GPUS["a100-80g"], TrainSpec(global_batch=8))
    b1, b8 = costs.block(1, False, 1), costs.block(8, False, 1)
    assert b8.fwd_s < b1.fwd_s / 4  # sharded 8 ways, less efficient per GEMM but far faster
    assert b8.params * 8 == pytest.approx(M175.block_params, rel=1e-3)
    assert b1.recompute_extra_s[Recompute.FULL] == pytest.approx(b1.fwd_s)
    assert 0 < b1.recompute_extra_s[Recompute.SELECTIVE] < b1.recompute_extra_s[Recompute.FULL]
    assert b8.tp_collectives == 2 and b1.tp_collectives == 0


def test_megatron_flops_exceed_model_flops_by_the_recomputed_forward():
    # eq. (3) counts 4 forward passes (recompute), model FLOPs count 3: the ratio is close to 4/3
    ratio = megatron_flops_per_step(M175, 1536) / model_flops_per_step(M175, 1536)
    assert ratio == pytest.approx(4 / 3, rel=0.03)


def test_fp32_training_doubles_activation_bytes():
    half = AnalyticCosts(M175, GPUS["a100-80g"], TrainSpec(global_batch=8)).block(8, False, 1)
    full = AnalyticCosts(M175, GPUS["a100-80g"], TrainSpec(global_batch=8, precision=Precision.FP32)).block(8, False, 1)
    assert full.act_bytes[Recompute.FULL] == 2 * half.act_bytes[Recompute.FULL]


def test_megatron_traits_differ_from_default():
    assert MEGATRON_2021 != RuntimeTraits() and not MEGATRON_2021.overlap_grad_reduce
