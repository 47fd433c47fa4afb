"""planner/validate.py (ranking statistics, summary, candidate plans) and the runtime calibration's effect on
the CPU cost model (planner/profiled.py, planner/estimate.py). Torch-free."""
from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from planner.memory import loss_backward_bytes
from planner.presets import MODELS
from planner.collectives import fit_collective
from planner.profile import (DDPSyncTiming, DeviceInfo, FSDPBlockTiming, LayerProfile, Profile, RuntimeCalibration,
                             RuntimeRun)
from planner.search import Pins
from planner.solve import SolveRequest, run_solve
from planner.specs import Recompute
from planner.validate import (PlanOutcome, RankMemory, average_ranks, candidate_plans, combine_repeats,
                              mean_abs_pct_error, outcome_from_report, plan_key, plan_kind, spearman, summarize)

TINY = MODELS["tiny-gpt"]


def synthetic_profile(runtime: RuntimeCalibration | None = None) -> Profile:
    """tiny-gpt at tp 1 and 2, mbs 1, 2, 4: time and activations linear in the micro-batch, TP halving the block."""
    layers = []
    for tp in (1, 2):
        for mbs in (1, 2, 4):
            layers += [
                LayerProfile(kind="embedding", tp=tp, micro_batch_size=mbs, fwd_s=2e-5 * mbs, bwd_s=4e-5 * mbs,
                             fwd_cv=0.0, bwd_cv=0.0, params=TINY.vocab_size * 64 // tp + 64 * 64,
                             activation_bytes={"none": 1000 * mbs}),
                LayerProfile(kind="block", tp=tp, micro_batch_size=mbs, fwd_s=2e-4 * mbs / tp, bwd_s=4e-4 * mbs / tp,
                             fwd_cv=0.0, bwd_cv=0.0, recompute_extra_s={"selective": 5e-5 * mbs, "full": 2e-4 * mbs},
                             params=TINY.block_params // tp,
                             activation_bytes={"none": 160_000 * mbs // tp, "selective": 150_000 * mbs // tp,
                                               "full": 16_384 * mbs}),
                LayerProfile(kind="head", tp=tp, micro_batch_size=mbs, fwd_s=5e-5 * mbs, bwd_s=1e-4 * mbs,
                             fwd_cv=0.0, bwd_cv=0.0, params=TINY.head_params // tp,
                             activation_bytes={"none": 65_000 * mbs}),
            ]
    sizes = [1 << e for e in range(10, 24)]
    collectives = [fit_collective(op, 2, [(n, 2e-4 + n * 1e-9) for n in sizes])
                   for op in ("all_reduce", "all_gather", "reduce_scatter", "send_recv")]
    return Profile(model=TINY, precision="fp32",
                   device=DeviceInfo(device="cpu", name="test cpu", torch_version="2.13.0", threads=1,
                                     matmul_tflops=0.1, date="2025-01-01T00:00:00+00:00"),
                   layers=layers, collectives=collectives, optimizer_bytes_per_param=8, runtime=runtime)


def request(tmp_path, profile: Profile, memory_limit: int | None = None) -> SolveRequest:
    path = tmp_path / "profile.json"
    path.write_text(profile.to_json())
    return SolveRequest.build(gpus=2, cluster="local", profile=path, global_batch=16, memory_limit=memory_limit)


# ------------------------------------------------------------------------------------------ statistics

def test_average_ranks_share_ties():
    assert average_ranks([10, 30, 20, 30]) == [1, 3.5, 2, 3.5]


def test_spearman_of_monotone_and_reversed_orders():
    xs = [0.1, 0.5, 0.2, 0.9]
    assert spearman(xs, [x ** 3 for x in xs]) == pytest.approx(1.0)
    assert spearman(xs, [-x for x in xs]) == pytest.approx(-1.0)


def test_spearman_hand_computed_with_one_swap():
    # ranks 1..5 against 1, 2, 3, 5, 4: d^2 = 2, rho = 1 - 6 * 2 / (5 * 24) = 0.9
    assert spearman([1, 2, 3, 4, 5], [1, 2, 3, 5, 4]) == pytest.approx(0.9)


def test_spearman_undefined_cases():
    assert spearman([1.0], [2.0]) is None
    assert spearman([1, 2, 3], [7, 7, 7]) is None
    with pytest.raises(ValueError):
        spearman([1, 2], [1])


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(min_value=0.001, max_value=10), min_size=3, max_size=20, unique=True))
def test_spearman_is_symmetric_and_bounded(xs):
    ys = [math.sin(7 * x) for x in xs]
    rho = spearman(xs, ys)
    if rho is not None:
        assert -1 - 1e-12 <= rho <= 1 + 1e-12
        assert spearman(ys, xs) == pytest.approx(rho)


def test_mean_abs_pct_error_is_relative_to_measured():
    assert mean_abs_pct_error([110, 80], [100, 100]) == pytest.approx(0.15)
    assert mean_abs_pct_error([], []) is None


# ------------------------------------------------------------------------------------------ summary

def outcome(rank: int, pred_s: float, meas_s: float | None, pred_b: int = 100, meas_b: int = 100,
            error: str | None = None) -> PlanOutcome:
    ranks = [] if meas_s is None else [RankMemory(0, pred_b, meas_b), RankMemory(1, pred_b, meas_b + 10)]
    return PlanOutcome(solver_rank=rank, label=f"plan{rank}", config={}, predicted_step_time_s=pred_s,
                       predicted_peak_bytes=pred_b, measured_step_time_s=meas_s, ranks=ranks, error=error)


def test_summary_regret_is_solver_first_over_best_measured():
    s = summarize([outcome(1, 1.0, 1.2), outcome(2, 1.1, 1.0), outcome(3, 2.0, 2.5)])
    assert s.regret == pytest.approx(1.2) and s.solver_first == "plan1" and s.measured_best == "plan2"
    assert s.spearman == pytest.approx(0.5)
    assert s.step_time_mape == pytest.approx((0.2 / 1.2 + 0.1 / 1.0 + 0.5 / 2.5) / 3)
    assert s.checks()["regret"] is False and s.checks()["memory_limit"] is None


def test_failed_runs_are_counted_but_left_out_of_the_figures():
    s = summarize([outcome(1, 1.0, None, error="rank 1 failed: boom"), outcome(2, 1.1, 1.1), outcome(3, 2.0, 2.0)])
    assert (s.plans, s.ran, s.failed) == (3, 2, 1)
    assert s.solver_first == "plan2" and s.regret == pytest.approx(1.0)


def test_memory_error_is_per_rank_and_limit_violations_are_listed():
    s = summarize([outcome(1, 1.0, 1.0, pred_b=100, meas_b=100)], memory_limit_bytes=105)
    assert s.memory_mape == pytest.approx((0 + 10 / 110) / 2)
    assert [(v.rank, v.measured_bytes) for v in s.violations] == [(1, 110)]
    assert s.checks()["memory_limit"] is False


def test_plan_kinds_name_the_parallelism_and_zero_only_with_data_parallel():
    def kind(**par) -> str:
        return plan_kind({"tp": 1, "pp": 1, "dp": 1, "zero": 0, **par})

    assert kind(tp=2) == "tp2" and kind(pp=2) == "pp2" and kind(dp=2) == "dp2" and kind() == "one rank"
    assert kind(dp=2, zero=2) == "dp2 zero2" and kind(tp=2, pp=2, dp=4, zero=1) == "tp2 pp2 dp4 zero1"
    assert kind(pp=2, zero=2) == "pp2"  # ZeRO shards over data-parallel ranks: nothing to shard at dp 1


def test_step_time_error_is_broken_down_by_plan_kind_with_its_direction():
    def ran(rank: int, pred: float, meas: float, **par) -> PlanOutcome:
        o = outcome(rank, pred, meas)
        o.config = {"tp": 1, "pp": 1, "dp": 1, "zero": 0, **par}
        return o

    s = summarize([ran(1, 1.0, 1.25, dp=2), ran(2, 1.2, 1.0, pp=2), ran(3, 2.0, 1.0, tp=2), ran(4, 3.0, 2.0, tp=2),
                   ran(5, 1.0, 0.8, dp=2), outcome(6, 1.0, None, error="failed")])
    assert list(s.by_kind) == ["dp2", "pp2", "tp2"]  # in order of first appearance; the failed run left out
    tp = s.by_kind["tp2"]
    assert (tp.plans, tp.step_time_mape, tp.step_time_bias) == (2, pytest.approx(0.75), pytest.approx(0.75))
    dp = s.by_kind["dp2"]  # one priced 20 % low, one 25 % high: they cancel in the bias, not in the error
    assert dp.step_time_mape == pytest.approx((0.2 + 0.25) / 2) and dp.step_time_bias == pytest.approx(0.025)
    assert s.by_kind["pp2"].step_time_bias == pytest.approx(0.2)
    assert s.to_dict()["by_kind"]["tp2"]["plans"] == 2


# ------------------------------------------------------------------------------------------ candidates

def test_candidates_cover_every_recompute_mode_and_are_ranked(tmp_path):
    req = request(tmp_path, synthetic_profile())
    plans = candidate_plans(req)
    modes = {p.recompute for p in plans}
    assert {"none", "selective", "full"} <= modes
    times = [p.predicted.step_time_s for p in plans]
    assert times == sorted(times)
    assert len({plan_key(p) for p in plans}) == len(plans)
    # the unpinned solver (auto recompute) finds only a subset: with memory to spare it never recomputes
    auto = run_solve(req, Pins(), top_k=None).plans
    assert len(plans) > len(auto)


def test_all_zero_stages_only_add_data_parallel_plans(tmp_path):
    req = request(tmp_path, synthetic_profile())
    plans = candidate_plans(req, Pins(recompute=Recompute.NONE), recompute_modes=(None,), zero_stages=(0, 1, 2, 3))
    assert all(p.zero == 0 for p in plans if p.parallel.dp == 1)
    assert {p.zero for p in plans if p.parallel.dp == 2} >= {0, 2, 3}


def test_memory_limit_leaves_out_plans_predicted_over_it(tmp_path):
    prof = synthetic_profile()
    everything = candidate_plans(request(tmp_path, prof))
    peaks = sorted(p.predicted.peak_memory_bytes for p in everything)
    limit = peaks[len(peaks) // 2]
    limited = candidate_plans(request(tmp_path, prof, memory_limit=limit))
    assert 0 < len(limited) < len(everything)
    assert all(p.predicted.peak_memory_bytes <= limit for p in limited)


# ------------------------------------------------------------------------------------------ calibration

CALIBRATION = RuntimeCalibration(step_overhead_s=0.004, microbatch_overhead_s=0.003, optimizer_s_per_param=5e-9,
                                 fixed_bytes=12_000_000, activation_peak_factor=2.0,
                                 runs=[RuntimeRun(micro_batch_size=1, num_microbatches=1, step_time_s=0.01,
                                                  peak_bytes=1)])


def by_label(plans):
    """ZeRO 0 plans by their shape (the only ZeRO stage these tests reason about)."""
    return {(p.parallel.tp, p.parallel.pp, p.parallel.dp, p.parallel.vpp, p.micro_batch_size, str(p.schedule),
             p.recompute): p for p in plans if p.zero == 0}


def test_runtime_calibration_adds_its_overheads_to_the_prediction(tmp_path):
    plain = by_label(candidate_plans(request(tmp_path, synthetic_profile()), recompute_modes=(Recompute.NONE,)))
    calibrated = by_label(candidate_plans(request(tmp_path, synthetic_profile(CALIBRATION)),
                                          recompute_modes=(Recompute.NONE,)))
    key = (1, 1, 2, 1, 4, "1f1b", "none")  # dp 2: one stage, 2 micro-batches of 4
    a, b = plain[key], calibrated[key]
    params = a.predicted.stages[0].memory.params_bytes / 4
    # time: the step overhead; the micro-batch overhead once on each of the 2 micro-batches, whatever their
    # size (a fixed cost of the loop: calibrated at mbs 1, not grown 4x with the layers at mbs 4); AdamW at the
    # measured rate instead of the placeholder bandwidth
    old_optimizer = params * (2 * 8 + 4 + 2 * 4) / 10e9
    expected = a.predicted.step_time_s + 0.004 + 2 * 0.003 + params * 5e-9 - old_optimizer
    assert b.predicted.step_time_s == pytest.approx(expected, rel=1e-6)
    # memory: saved activations doubled (the loss's backward transient is not scaled), the fixed bytes on top;
    # no fragmentation allowance on CPU
    ma, mb = a.predicted.stages[0].memory, b.predicted.stages[0].memory
    saved = ma.activations_bytes - loss_backward_bytes(4, a.model.seq_len, a.model.vocab_size)
    assert saved > 0
    assert mb.activations_bytes - ma.activations_bytes == pytest.approx(saved, abs=2)
    assert mb.total_bytes - ma.total_bytes == pytest.approx(12_000_000 + saved, abs=4)


def test_micro_batch_overhead_is_interpolated_between_the_calibrated_sizes(tmp_path):
    from planner.profiled import ProfiledCosts
    from planner.specs import load_cluster

    two_sizes = CALIBRATION.model_copy(update={"microbatch_overhead_by_mbs": {4: 0.006, 1: 0.003}})
    costs = ProfiledCosts(synthetic_profile(two_sizes), load_cluster("local", 2).gpu)
    assert [costs.microbatch_overhead_at(m) for m in (1, 2, 4, 8)] == pytest.approx([0.003, 0.004, 0.006, 0.006])
    # one calibrated size (older profiles): its figure at every size
    one_size = ProfiledCosts(synthetic_profile(CALIBRATION), load_cluster("local", 2).gpu)
    assert [one_size.microbatch_overhead_at(m) for m in (1, 4)] == [0.003, 0.003]
    # a single-stage plan of 2 micro-batches of 4 pays the overhead at mbs 4 on each
    fixed, grown = (by_label(candidate_plans(request(tmp_path, synthetic_profile(cal)),
                                             recompute_modes=(Recompute.NONE,))) for cal in (CALIBRATION, two_sizes))
    key = (1, 1, 2, 1, 4, "1f1b", "none")
    assert grown[key].predicted.step_time_s - fixed[key].predicted.step_time_s == pytest.approx(2 * 0.003, rel=1e-6)


def test_cpu_gradient_reduction_is_not_hidden_behind_backward(tmp_path):
    plans = by_label(candidate_plans(request(tmp_path, synthetic_profile()), recompute_modes=(Recompute.NONE,)))
    one_mb = plans[(1, 1, 2, 1, 4, "1f1b", "none")]
    per_rank_work = 2 * (8 * 6e-4 + 6e-5 + 1.5e-4) * 4  # 2 micro-batches of 4: blocks + embedding + head
    # the gradient all-reduce (~1.8 MB at 1 ns/B + 0.2 ms) is paid in full on top of the compute
    assert one_mb.predicted.step_time_s > per_rank_work + 1.8e-3


def one_f_one_b_plans(tmp_path, prof: Profile) -> dict:
    return {(p.parallel.tp, p.parallel.pp, p.parallel.dp, p.micro_batch_size, p.zero, p.recompute): p
            for p in candidate_plans(request(tmp_path, prof), recompute_modes=(Recompute.NONE,))
            if p.schedule == "1f1b"}


def test_each_gradient_reduction_pays_what_a_collective_after_compute_costs(tmp_path):
    def plans(after_compute_s):
        return one_f_one_b_plans(tmp_path, synthetic_profile().model_copy(
            update={"collective_after_compute_s": after_compute_s}))

    plain, woken = plans(None), plans(0.002)
    step = {key: woken[key].predicted.step_time_s - p.predicted.step_time_s for key, p in plain.items()}
    # (within 2 %: the once-a-step collectives are scaled to the busiest rank's share of the parameters, 0.99 here)
    # DDP: tiny-gpt's 1.75 MB of gradients go as a 1 MiB first bucket and the rest
    assert step[(1, 1, 2, 4, 0, "none")] == pytest.approx(2 * 0.002, rel=0.02)
    units = TINY.num_layers + 1  # FSDP2 reduce-scatters every block and the root unit
    assert step[(1, 1, 2, 4, 2, "none")] == pytest.approx(units * 0.002, rel=0.02)
    assert step[(1, 2, 1, 4, 0, "none")] == 0 and step[(2, 1, 1, 4, 0, "none")] == 0  # no data parallelism


def test_ddp_buckets_are_priced_from_a_timed_ddp_step_where_the_profile_has_one(tmp_path):
    base = synthetic_profile().model_copy(update={"collective_after_compute_s": 0.002})
    fit, buckets = base.collective("all_reduce", 2), [2**20, 698_880]
    calls = sum(fit.expected_s(b) for b in buckets)
    # the synced step took its buckets' calls and 0.5 ms a bucket more than the unsynced one
    timed = DDPSyncTiming(micro_batch_size=1, dp=2, synced_s=0.010 + calls + 2 * 5e-4, unsynced_s=0.010,
                          bucket_bytes=buckets)
    before, after = one_f_one_b_plans(tmp_path, base), one_f_one_b_plans(tmp_path, base.model_copy(
        update={"ddp_sync": timed}))
    step = {key: after[key].predicted.step_time_s - p.predicted.step_time_s for key, p in before.items()}
    # DDP (tp 1, pp 1, zero 0): 2 buckets at 0.5 ms instead of the synthetic benchmark's 2 ms
    assert step[(1, 1, 2, 4, 0, "none")] == pytest.approx(2 * (5e-4 - 0.002), rel=0.02)
    assert step[(1, 1, 2, 4, 2, "none")] == 0  # FSDP2's units keep the after-compute benchmark's price
    # a DDP step faster than its buckets' calls adds nothing beyond them
    quick = timed.model_copy(update={"synced_s": 0.010 + calls / 2})
    floored = one_f_one_b_plans(tmp_path, base.model_copy(update={"ddp_sync": quick}))
    assert (floored[(1, 1, 2, 4, 0, "none")].predicted.step_time_s - before[(1, 1, 2, 4, 0, "none")].predicted
            .step_time_s) == pytest.approx(-2 * 0.002, rel=0.02)


def test_fsdp2_wrapper_time_is_paid_per_unit_and_micro_batch_without_the_layers_overhead_share(tmp_path):
    def plans(extra_s: float) -> dict:
        blocks = [FSDPBlockTiming(micro_batch_size=mbs, fwd_s=2e-4 * mbs + extra_s, bwd_s=4e-4 * mbs, fwd_cv=0.0,
                                  bwd_cv=0.0, zero=2, dp=2) for mbs in (1, 2, 4)]
        return one_f_one_b_plans(tmp_path, synthetic_profile(CALIBRATION).model_copy(update={"fsdp_blocks": blocks}))

    low, high = plans(1e-3), plans(2e-3)
    units = TINY.num_layers + 1  # every block and the root unit
    for mbs, microbatches in ((1, 8), (4, 2)):
        key = (1, 1, 2, mbs, 2, "none")
        assert low[key].num_microbatches == microbatches
        # the calibration's share of the layers (> 0 here) is not charged on the wrapper's own time: it was timed
        # around real blocks already
        assert high[key].predicted.step_time_s - low[key].predicted.step_time_s == pytest.approx(
            units * microbatches * 1e-3, rel=1e-6)


def test_repeats_combine_to_the_median_and_report_their_spread():
    runs = [outcome(1, 1.0, t, meas_b=b) for t, b in ((1.2, 100), (1.0, 120), (1.5, 110))]
    one = combine_repeats(runs)
    assert one.measured_step_time_s == pytest.approx(1.2) and one.repeat_step_times_s == [1.2, 1.0, 1.5]
    assert one.run_spread == pytest.approx(0.5)
    assert [r.measured_bytes for r in one.ranks] == [110, 120]  # per rank, the median peak
    s = summarize([one, combine_repeats([outcome(2, 2.0, 2.0), outcome(2, 2.0, 2.2)])])
    assert s.run_spread == pytest.approx((0.5 + 0.1) / 2)
    failed = combine_repeats([outcome(1, 1.0, 1.0), outcome(1, 1.0, None, error="rank 0 failed: boom")])
    assert not failed.ran and failed.error == "rank 0 failed: boom"
    assert combine_repeats([outcome(1, 1.0, 1.3)]).run_spread is None
    assert summarize([outcome(1, 1.0, 1.3)]).run_spread is None


def test_the_noise_floor_is_the_error_an_exact_model_would_show_from_the_repeats_spread():
    import math

    pair = combine_repeats([outcome(1, 1.0, 0.9), outcome(1, 1.0, 1.1)])
    # two runs 0.2 apart: sample sd 0.1414, standard error of their mean 0.1, times sqrt(2/pi), over the mean 1.0
    assert pair.expected_error_of_exact_model == pytest.approx(0.1 * math.sqrt(2 / math.pi))
    steady = combine_repeats([outcome(2, 2.0, 2.0), outcome(2, 2.0, 2.0), outcome(2, 2.0, 2.0)])
    assert steady.expected_error_of_exact_model == 0.0
    assert summarize([pair, steady]).step_time_noise_floor == pytest.approx(0.05 * math.sqrt(2 / math.pi))
    # one run per plan: nothing to tell noise from error
    assert outcome(1, 1.0, 1.3).expected_error_of_exact_model is None
    assert summarize([pair, outcome(2, 2.0, 2.0)]).step_time_noise_floor is None


def test_on_cpu_a_pipeline_receive_occupies_the_receiving_rank(tmp_path):
    """gloo moves a pipeline tensor on the receiving rank's core: each receiving forward / backward pays it in
    full, not only as a latency that other work may hide."""
    from dataclasses import replace

    from planner.estimate import Config
    from planner.partition import PartitionResult
    from planner.plan import Schedule

    est = request(tmp_path, synthetic_profile()).estimator()
    c = Config(tp=1, pp=2, dp=1, vpp=1, sp=False, micro_batch_size=2, num_microbatches=4, zero=0,
               schedule=Schedule.ONE_F_ONE_B, recompute=(Recompute.NONE,))
    half = TINY.num_layers // 2
    part = PartitionResult(counts=({Recompute.NONE: half}, {Recompute.NONE: half}), stage_time_s=(0, 0),
                           rank_time_s=(0, 0), rank_memory_bytes=(0, 0), objective_s=0, solver="test",
                           status="optimal", gap=0.0, time_s=0.0)
    comm = est.comm(c)
    free = est.predict(c, part, replace(comm, p2p_s=0.0)).step_time_s
    priced = est.predict(c, part, replace(comm, p2p_s=1e-3)).step_time_s
    # as a pure latency, 2-stage 1F1B with 4 micro-batches exposes 4 transfers on its critical path; occupying
    # the receiver, the transfers also delay the receiving rank's own work (5 here)
    assert priced - free > 4.5e-3


def test_measured_pipeline_hand_offs_price_each_schedule_kind_and_move_with_the_message_size(tmp_path):
    from planner.estimate import Config
    from planner.plan import Schedule
    from planner.profile import PipelineCalibration, PipelineRun

    runs = [PipelineRun(schedule="1f1b", vpp=1, num_microbatches=16, receives_per_rank=16, step_time_s=0.016),
            PipelineRun(schedule="interleaved", vpp=2, num_microbatches=16, receives_per_rank=48,
                        step_time_s=0.072)]
    cal = PipelineCalibration(message_bytes=8 * 1024, runs=runs)
    timed = synthetic_profile().model_copy(update={"pipeline": cal})

    def p2p(profile, schedule: Schedule, vpp: int, mbs: int) -> float:
        c = Config(tp=1, pp=2, dp=1, vpp=vpp, sp=False, micro_batch_size=mbs, num_microbatches=8, zero=0,
                   schedule=schedule, recompute=(Recompute.NONE,))
        return request(tmp_path, profile).estimator().comm(c).p2p_s

    fit = synthetic_profile().collective("send_recv", 2)  # 0.2 ms + 1 ns per byte
    act = TINY.seq_len * TINY.hidden_size * 4  # one micro-batch's activation, fp32
    assert p2p(synthetic_profile(), Schedule.INTERLEAVED, 2, 1) == pytest.approx(fit.expected_s(act))
    # 1 ms per hand-off under 1F1B (16 ms / 16), 1.5 ms interleaved (72 / 48), measured at 8 KiB; moved along
    # the fit's 1 ns per byte to the activation's size
    assert p2p(timed, Schedule.ONE_F_ONE_B, 1, 1) == pytest.approx(1e-3 + (act - 8192) * 1e-9)
    # without a GPipe run (profiles written before it was timed) GPipe pays 1F1B's
    assert p2p(timed, Schedule.GPIPE, 1, 2) == pytest.approx(1e-3 + (2 * act - 8192) * 1e-9)
    assert p2p(timed, Schedule.INTERLEAVED, 2, 1) == pytest.approx(1.5e-3 + (act - 8192) * 1e-9)
    # GPipe's own run, once the profile has one: 1.25 ms per hand-off (20 ms / 16)
    gpipe = PipelineRun(schedule="gpipe", vpp=1, num_microbatches=16, receives_per_rank=16, step_time_s=0.020)
    with_gpipe = synthetic_profile().model_copy(update={"pipeline": cal.model_copy(update={"runs": runs + [gpipe]})})
    assert p2p(with_gpipe, Schedule.GPIPE, 1, 1) == pytest.approx(1.25e-3 + (act - 8192) * 1e-9)
    assert p2p(with_gpipe, Schedule.ONE_F_ONE_B, 1, 1) == pytest.approx(1e-3 + (act - 8192) * 1e-9)
    # a measured hand-off below the fit's own time is floored at the fit
    cheap = cal.model_copy(update={"runs": [runs[0].model_copy(update={"step_time_s": 1e-4})]})
    assert p2p(synthetic_profile().model_copy(update={"pipeline": cheap}), Schedule.ONE_F_ONE_B, 1, 1) == (
        pytest.approx(fit.time_s(act)))


def test_measured_fsdp2_cost_is_paid_every_micro_batch_by_every_block_and_the_root_unit(tmp_path):
    from planner.estimate import Config
    from planner.plan import Schedule
    from planner.profile import FSDPBlockTiming

    c = Config(tp=1, pp=1, dp=2, vpp=1, sp=False, micro_batch_size=2, num_microbatches=4, zero=2,
               schedule=Schedule.ONE_F_ONE_B, recompute=(Recompute.NONE,))
    priced = request(tmp_path, synthetic_profile()).estimator().comm(c)
    plain = synthetic_profile().layer("block", 1, 2)
    real = FSDPBlockTiming(zero=2, dp=2, micro_batch_size=2, fwd_s=plain.fwd_s + 1e-3, bwd_s=plain.bwd_s + 2e-3,
                           fwd_cv=0, bwd_cv=0)
    measured = request(tmp_path, synthetic_profile().model_copy(update={"fsdp_blocks": [real]})).estimator().comm(c)
    assert priced.dp_per_microbatch_s == 0.0  # ZeRO 2 gathers once a step in the collective model
    assert measured.dp_per_microbatch_s == pytest.approx(3e-3 * (TINY.num_layers + 1))  # + the root unit
    assert measured.dp_step_s < priced.dp_step_s  # the gathers moved into the per-micro-batch cost


def test_a_run_on_a_slower_machine_is_brought_back_to_the_profiled_speed(tmp_path):
    plan = candidate_plans(request(tmp_path, synthetic_profile()), recompute_modes=(Recompute.NONE,))[0]
    report = {"measured": {"step_time_s": 0.3, "yardstick_block_s": 0.006},
              "per_rank_memory": [{"rank": 0, "predicted_bytes": 10, "peak_memory_bytes": 11}]}
    one = outcome_from_report(1, plan, report, profiled_block_s=0.004)  # the block ran 1.5x its profiled time
    assert one.machine_slowdown == pytest.approx(1.5) and one.same_speed_step_time_s == pytest.approx(0.2)
    other = outcome_from_report(1, plan, {**report, "measured": {"step_time_s": 0.25, "yardstick_block_s": 0.005}},
                                profiled_block_s=0.004)
    both = combine_repeats([one, other])
    assert both.machine_slowdown == pytest.approx(1.375) and both.same_speed_step_time_s == pytest.approx(0.2)
    s = summarize([both])
    expected = abs(plan.predicted.step_time_s - 0.2) / 0.2
    assert s.step_time_mape_same_speed == pytest.approx(expected) and s.machine_slowdown == pytest.approx(1.375)
    # without a profiled block to compare there is no correction, and no corrected error
    assert summarize([outcome_from_report(1, plan, report)]).step_time_mape_same_speed is None
