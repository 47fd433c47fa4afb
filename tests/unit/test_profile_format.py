"""profile.json: validation on load, model matching, lookups, and the alpha-beta fits (torch-free)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from planner.presets import MODELS
from planner.profile import (CollectiveFit, DeviceInfo, LayerProfile, Profile, check_profile_matches,
                             fit_alpha_beta, fit_collective, fit_pieces, load_profile)
from planner.specs import SpecError

TINY = MODELS["tiny-gpt"]


def make_profile(**changes) -> Profile:
    block = LayerProfile(kind="block", tp=1, micro_batch_size=2, fwd_s=1e-3, bwd_s=2e-3, fwd_cv=0.02, bwd_cv=0.03,
                         recompute_extra_s={"selective": 1e-4, "full": 9e-4}, params=TINY.block_params,
                         activation_bytes={"none": 500_000, "selective": 490_000, "full": 32_768})
    head = LayerProfile(kind="head", tp=1, micro_batch_size=2, fwd_s=1e-4, bwd_s=2e-4, fwd_cv=0.1, bwd_cv=0.1,
                        params=TINY.head_params, activation_bytes={"none": 190_000})
    sizes = [1 << e for e in range(10, 27)]
    points = [(n, 2e-4 + n * 1e-9) for n in sizes]
    fit = fit_collective("all_reduce", 2, points[0::2], points[1::2])
    data = dict(model=TINY, precision="fp32",
                device=DeviceInfo(device="cpu", name="test cpu", torch_version="2.13.0", threads=1,
                                  matmul_tflops=0.05, date="2025-01-01T00:00:00+00:00"),
                layers=[block, head], collectives=[fit], optimizer_bytes_per_param=8)
    data.update(changes)
    return Profile(**data)


def write(tmp_path: Path, data: dict, name: str = "profile.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def test_round_trip_through_json(tmp_path):
    prof = make_profile()
    path = tmp_path / "profile.json"
    path.write_text(prof.to_json())
    assert load_profile(path) == prof


def test_a_version_1_profile_still_loads_and_prices_every_size_from_its_one_fit(tmp_path):
    data = make_profile().model_dump(mode="json")
    data["schema_version"] = 1
    for fit in data["collectives"]:  # what version 1 did not have
        del fit["aligned_points"], fit["aligned_pieces"]
    prof = load_profile(write(tmp_path, data))
    fit = prof.collective("all_reduce", 2)
    assert prof.schema_version == 1 and fit.aligned_pieces == []
    assert fit.time_s(1 << 20) == pytest.approx(2e-4 + (1 << 20) * 1e-9)


def test_lookups_find_the_measured_entry_or_none():
    prof = make_profile()
    assert prof.layer("block", 1, 2).activation_bytes["full"] == 32_768
    assert prof.layer("block", 2, 2) is None and prof.layer("embedding", 1, 2) is None
    assert prof.collective("all_reduce", 2).op == "all_reduce"
    assert prof.collective("all_reduce", 4) is None and prof.collective("send_recv", 2) is None


@pytest.mark.parametrize("mutate, expected", [
    (lambda d: d.update(schema_version=3), "schema_version 3 is not supported (this mpplan reads 1, 2)"),
    (lambda d: d.pop("schema_version"), "schema_version None is not supported"),
    (lambda d: d.update(surprise=1), "surprise: unknown key"),
    (lambda d: d["layers"][0].update(kind="mlp"), "layers.0.kind"),
    (lambda d: d["layers"][0]["activation_bytes"].update(partial=1), "layers.0.activation_bytes"),
    (lambda d: d["collectives"][0].update(group_size=1), "collectives.0.group_size"),
    (lambda d: d.pop("optimizer_bytes_per_param"), "optimizer_bytes_per_param: Field required"),
])
def test_bad_files_fail_with_one_line_naming_file_and_field(tmp_path, mutate, expected):
    data = make_profile().model_dump(mode="json")
    mutate(data)
    path = write(tmp_path, data)
    with pytest.raises(SpecError) as err:
        load_profile(path)
    message = str(err.value)
    assert str(path) in message and expected in message and "\n" not in message


def test_unreadable_and_non_json_files(tmp_path):
    with pytest.raises(SpecError, match="cannot read"):
        load_profile(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(SpecError, match="not valid JSON"):
        load_profile(bad)


def test_profile_of_another_shape_is_rejected_by_shape_not_name():
    prof = make_profile()
    check_profile_matches(prof, TINY)
    check_profile_matches(prof, TINY.model_copy(update={"name": "renamed-tiny"}))  # same shape, other name
    wider = TINY.model_copy(update={"name": "wide", "hidden_size": 128})
    expected = r"profile.json was measured for model tiny-gpt \(hidden_size 64\), not wide \(hidden_size 128\)"
    with pytest.raises(SpecError, match=expected):
        check_profile_matches(prof, wider)
    with pytest.raises(SpecError, match="seq_len"):
        check_profile_matches(prof, TINY.model_copy(update={"seq_len": 128}))
    with pytest.raises(SpecError, match="flavour"):
        check_profile_matches(prof, MODELS["tiny-llama"])


@settings(max_examples=60, deadline=None)
@given(alpha=st.floats(1e-6, 1e-2), beta=st.floats(1e-12, 1e-8))
def test_fit_recovers_exact_alpha_beta(alpha, beta):
    points = [(float(1 << e), alpha + beta * (1 << e)) for e in range(10, 27, 2)]
    a, b = fit_alpha_beta(points)
    assert a == pytest.approx(alpha, rel=1e-6, abs=1e-12) and b == pytest.approx(beta, rel=1e-6)


def test_fit_weighs_small_messages_relatively():
    # a large message 3x slower than the line: an unweighted least-squares fit (alpha -4.5e-5, beta 3.1e-9) is
    # off by 95-141 % on the three smallest sizes; the relative fit keeps them within 6 %
    points = [(float(n), 1e-4 + n * 1e-9) for n in (1e3, 4e3, 16e3, 64e3, 256e3)] + [(64e6, 0.2)]
    a, b = fit_alpha_beta(points)
    assert all(abs(a + b * n - t) / t < 0.06 for n, t in points[:3])


def test_fit_never_returns_negative_coefficients():
    falling = [(1e3, 5e-4), (1e6, 4e-4), (1e7, 3e-4)]  # noise can make time fall with size
    a, b = fit_alpha_beta(falling)
    assert a > 0 and b == 0.0
    a, b = fit_alpha_beta([(1e3, 1e-6), (1e6, 1e-3)])  # pure bandwidth
    assert a >= 0 and b > 0


def test_pieces_capture_a_cache_knee_that_one_line_misses():
    # below 2 MiB 4 GB/s, above 1 GB/s: one line is off by far more than 10 %, two pieces are exact
    sizes = [1 << e for e in range(10, 27)]
    points = [(n, 2e-4 + n * (0.25e-9 if n <= 2 << 20 else 1e-9)) for n in sizes]
    single = CollectiveFit(op="all_reduce", group_size=2, alpha_s=0, beta_s_per_byte=0, points=[], max_rel_error=0,
                           holdout_rel_error=0)
    a, b = fit_alpha_beta(points)
    assert max(abs(a + b * n - t) / t for n, t in points) > 0.1
    pieces = fit_pieces(points)
    assert 2 <= len(pieces) <= 3 and pieces[0].from_bytes == 0
    fit = single.model_copy(update={"pieces": pieces})
    assert max(abs(fit.time_s(n) - t) / t for n, t in points) < 0.05
    assert fit_pieces([(n, 2e-4 + n * 1e-9) for n in sizes]) == []  # one line suffices: no pieces


def test_pieces_do_not_chase_the_scatter_of_noisy_points():
    # one line with +-12 % scatter, as gloo's medians show on this VM: the scatter is not a knee
    sizes = [1 << e for e in range(10, 27)]
    scatter = [1.12, 0.9, 1.05, 0.88, 1.1, 0.95, 1.0, 1.12, 0.9, 1.04, 0.89, 1.1, 0.93, 1.08, 0.9, 1.0, 1.11]
    assert fit_pieces([(n, (2e-4 + n * 1e-9) * f) for n, f in zip(sizes, scatter)]) == []


def test_a_piece_starts_at_its_first_measured_size_as_a_threshold_does():
    # gloo's all_gather here: 0.82 ms/MiB up to 31.5 MiB, 1.6 ms/MiB from 32 MiB (glibc's mmap threshold);
    # 24 MiB, between the grid's 16 and 32, is on the fast line
    mib = 1 << 20
    sizes = [1 << e for e in range(10, 27)]
    points = [(n, 2e-4 + n / mib * (0.82e-3 if n < 32 * mib else 1.6e-3)) for n in sizes]
    pieces = fit_pieces(points)
    assert pieces and pieces[-1].from_bytes == 32 * mib
    fit = fit_collective("all_gather", 2, points, [(24 * mib, 2e-4 + 24 * 0.82e-3)])
    assert fit.holdout_rel_error < 0.01


def test_pieces_never_step_down_where_they_start():
    # send/recv lower quartiles measured on this VM (bytes, us): unconstrained, a piece fitted to a few noisy
    # small sizes starts below where the one before it ends
    measured = [(1024, 136), (2048, 172), (4096, 133), (8192, 197), (16384, 166), (32768, 130), (65536, 156),
                (131072, 192), (262144, 261), (524288, 419), (1048576, 858), (2097152, 1596), (4194304, 3263),
                (8388608, 6185), (16777216, 11149), (33554432, 22990), (67108864, 42601)]
    pieces = fit_pieces([(n, us * 1e-6) for n, us in measured])
    for before, after in zip(pieces, pieces[1:]):
        start = after.from_bytes
        assert after.alpha_s + after.beta_s_per_byte * start >= before.alpha_s + before.beta_s_per_byte * start


def test_collective_sizes_held_out_sit_in_the_middle_of_the_gaps_of_the_fitted_grid():
    from runtime.profile_comm import CommConfig

    config = CommConfig()
    aligned = config.aligned_sizes()
    assert aligned == [1 << e for e in range(16, 27)]  # 64 KiB .. 64 MiB: below, the main fit prices 2^k
    grid = config.sizes()  # a quarter octave above every power of two from 1 KiB but the last, to 256 bytes; the last
    assert len(grid) == 17 and grid[-1] == 64 << 20 and all(abs(n - (1 << e) * 2 ** 0.25) <= 128 and n % 256 == 0
                                                            for n, e in zip(grid[:-1], range(10, 26)))
    held = config.holdout_sizes()
    assert len(held) == 8 and not set(held) & (set(grid) | set(aligned))
    for n in held:  # each in the geometric middle of a gap of the grid, to 256 bytes, in every other gap
        i = max(i for i, g in enumerate(grid) if g < n)
        assert abs(n - (grid[i] * grid[i + 1]) ** 0.5) <= 128 and n % 256 == 0 and i % 2 == 0
    every_gap = CommConfig(holdout_stride=1).holdout_sizes()
    assert len(every_gap) == len(grid) - 1 and set(held) < set(every_gap)
    small = CommConfig(max_bytes=16 << 10, aligned_min_bytes=1 << 12)
    assert small.aligned_sizes() == [1 << e for e in range(12, 15)] and small.sizes() == [1280, 2560, 4864, 9728, 16384]
    assert CommConfig(max_bytes=16 << 10).aligned_sizes() == []  # none as large as aligned_min_bytes
    assert small.holdout_sizes() == [1792, 6912]  # none between 9.5 and 16 KiB: the stride


def test_a_power_of_two_is_priced_from_its_own_fit_and_every_other_size_from_the_main_one():
    # gloo here: 2^k cost ~25 % more than the sizes around it between 256 KiB and 4 MiB
    def trend(n: float) -> float:
        return 2e-4 + n * 1e-9

    def slow(n: int) -> float:
        return trend(n) * (1.25 if 1 << 18 <= n <= 1 << 22 else 1.0)

    grid = [round(n * 2 ** 0.25 / 256) * 256 for n in (1 << e for e in range(10, 26))]
    aligned = [(1 << e, slow(1 << e)) for e in range(10, 27)]
    held = [(n, trend(n)) for n in (1792, 440832, 1763584)]
    fit = fit_collective("all_reduce", 2, [(n, trend(n)) for n in grid], held, aligned=aligned)
    assert fit.holdout_rel_error < 1e-6 and fit.aligned_pieces
    assert fit.time_s(1 << 20) == pytest.approx(slow(1 << 20), rel=0.1)  # its own fit: 25 % over the trend
    assert fit.time_s((1 << 20) + 256) == pytest.approx(trend((1 << 20) + 256), rel=1e-6)
    assert fit.time_s(float(1 << 20)) == fit.time_s(1 << 20)
    # a power of two below the smallest aligned point is priced by the main fit, not the aligned one extrapolated
    upper = fit_collective("all_reduce", 2, [(n, trend(n)) for n in grid], aligned=aligned[8:])  # 256 KiB up
    assert upper.time_s(1 << 17) == pytest.approx(trend(1 << 17), rel=1e-6)
    assert upper.time_s(1 << 18) == pytest.approx(slow(1 << 18), rel=0.1)
    plain = fit_collective("all_reduce", 2, [(n, trend(n)) for n in grid], held)  # no aligned points measured
    assert plain.aligned_pieces == [] and plain.time_s(1 << 20) == pytest.approx(trend(1 << 20), rel=1e-6)
    with pytest.raises(ValueError, match="powers of two"):
        fit_collective("all_reduce", 2, aligned, aligned=[(3 << 10, 1e-4), (1 << 12, 1e-4)])


def test_a_piece_fitted_between_powers_of_two_starts_at_the_one_below_its_first_size():
    # the 32 MiB all_gather knee seen from the grid at 2^(k + 1/4) and 64 MiB: the last piece's first size is
    # 38 MiB, but 33 MiB already pays the slow line
    from runtime.profile_comm import CommConfig

    mib = 1 << 20
    grid = CommConfig().sizes()
    points = [(n, 2e-4 + n / mib * (0.82e-3 if n < 32 * mib else 1.6e-3)) for n in grid]
    pieces = fit_pieces(points)
    assert pieces and pieces[-1].from_bytes == 32 * mib
    fit = fit_collective("all_gather", 2, points, [(33 * mib, 2e-4 + 33 * 1.6e-3)])
    assert fit.holdout_rel_error < 0.01


def test_collective_calls_are_spread_over_the_passes():
    from runtime.profile_comm import CommConfig

    config = CommConfig()
    for nbytes in (1 << 10, 1 << 20, 6 << 20, 64 << 20):
        per_pass = [config.calls_in_round(nbytes, r) for r in range(config.rounds)]
        assert sum(per_pass) == config.calls_per_size(nbytes)
        visited = [c for c in per_pass if c]
        assert len(visited) == min(config.rounds, config.calls_per_size(nbytes))
        assert max(visited) - min(visited) <= 1
    big = [config.calls_in_round(64 << 20, r) for r in range(config.rounds)]
    assert sum(big[config.rounds // 2:]) >= sum(big) // 2  # spread through the passes, not bunched at the start


def test_layers_priced_at_the_fast_process_cost_times_the_slow_process_pace():
    import torch

    from planner.presets import MODELS
    from planner.specs import Recompute
    from runtime.profile_layers import LayerCase, Timing, layer_profiles, quantile

    def timing(fast: float, mean: float, cv: float) -> Timing:
        return Timing(fwd_s=mean / 3, bwd_s=2 * mean / 3, fwd_cv=cv, bwd_cv=cv, total_s=mean, fwd_fast_s=fast / 3,
                      bwd_fast_s=2 * fast / 3, total_fast_s=fast, mean_total_s=mean)

    cases = [LayerCase(MODELS["tiny-gpt"], kind, 1, 1, torch.device("cpu"), torch.float32)
             for kind in ("block", "head")]
    # process 0 ran at full speed (mean 1.1x its fast time); process 1 was slow throughout (1.5x, fast 1.4x)
    quick = [{Recompute.NONE: timing(1e-3, 1.1e-3, 0.02), Recompute.SELECTIVE: timing(1.2e-3, 1.3e-3, 0.02),
              Recompute.FULL: timing(1.5e-3, 1.6e-3, 0.02)}, {Recompute.NONE: timing(2e-4, 2.2e-4, 0.3)}]
    slow = [{m: timing(1.4 * t.total_fast_s, 1.5 * 1.4 * t.total_fast_s, 0.05) for m, t in per.items()}
            for per in quick]
    (block, head), pace = layer_profiles(cases, [quick, slow])
    assert pace == pytest.approx(1.5 * 1.4)  # the slow process's mean over the fast process's fast time
    assert block.fwd_fast_s == pytest.approx(1e-3 / 3) and head.bwd_fast_s == pytest.approx(4e-4 / 3)
    assert block.fwd_s == pytest.approx(pace * 1e-3 / 3) and head.bwd_s == pytest.approx(pace * 4e-4 / 3)
    assert block.recompute_extra_s[Recompute.FULL] == pytest.approx(pace * 0.5e-3)
    assert (block.fwd_cv, head.fwd_cv) == (0.05, 0.3)  # the largest spread of any process
    assert quantile([4.0, 1.0, 3.0, 2.0, 5.0], 0.05) == pytest.approx(1.2)


def test_fit_collective_reports_holdout_error_on_sizes_it_did_not_see():
    sizes = [1 << e for e in range(10, 27)]
    points = [(n, 3e-4 + n * 5e-10) for n in sizes]
    skewed = [(n, t * 1.3) for n, t in points[1::2]]  # held-out sizes measured 30 % slower
    fit = fit_collective("all_gather", 4, points[0::2], skewed)
    assert fit.max_rel_error < 1e-6
    assert fit.holdout_rel_error == pytest.approx(0.3 / 1.3, rel=1e-3)
    assert fit.holdout_median_rel_error == pytest.approx(0.3 / 1.3, rel=1e-3)
    assert fit.time_s(0) == pytest.approx(3e-4) and fit.time_s(1 << 20) == pytest.approx(3e-4 + (1 << 20) * 5e-10)
    with pytest.raises(ValueError, match="not a positive number"):
        fit_collective("all_gather", 4, [(1024, 0.0), (2048, 1e-4)])


def test_planner_profile_does_not_import_torch():
    code = "import sys, planner.profile; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.strip() == "False"


def test_a_call_is_priced_at_its_fit_plus_the_stall_the_mean_carries():
    from runtime.profile_comm import stall_of
    # below 1 MiB the mean exceeds the median by ~1 ms at every size; the large sizes do not count
    stats = {1 << 10: (2e-4, 1.2e-3), 1 << 14: (3e-4, 1.3e-3), 1 << 18: (5e-4, 1.5e-3), 1 << 26: (0.05, 0.04)}
    assert stall_of(stats) == pytest.approx(1e-3)
    assert stall_of({1 << 10: (2e-4, 1e-4)}) == 0.0  # a mean below the median is no stall
    fit = fit_collective("all_reduce", 2, [(1 << 10, 2e-4), (1 << 20, 1.2e-3)], stall_s=1e-3)
    assert fit.expected_s(1 << 10) == pytest.approx(fit.time_s(1 << 10) + 1e-3)


def test_a_block_timed_under_dtensor_replaces_shard_plus_fitted_collectives():
    from planner.presets import CLUSTERS
    from planner.profile import TPBlockTiming
    from planner.profiled import ProfiledCosts
    from planner.specs import Recompute

    shard = LayerProfile(kind="block", tp=2, micro_batch_size=2, fwd_s=1e-3, bwd_s=2e-3, fwd_cv=0, bwd_cv=0,
                         recompute_extra_s={"selective": 1e-4, "full": 9e-4}, params=TINY.block_params // 2,
                         activation_bytes={"none": 300_000, "selective": 290_000, "full": 32_768})
    gpu = CLUSTERS["local"].gpu
    without = ProfiledCosts(make_profile(layers=[shard]), gpu).block(2, False, 2)
    assert (without.fwd_s, without.bwd_s, without.tp_collectives) == (1e-3, 2e-3, 2)  # collectives priced apart
    real = TPBlockTiming(tp=2, micro_batch_size=2, fwd_s=6e-3, bwd_s=9e-3, fwd_cv=0.1, bwd_cv=0.1)
    with_real = ProfiledCosts(make_profile(layers=[shard], tp_blocks=[real]), gpu).block(2, False, 2)
    assert (with_real.fwd_s, with_real.bwd_s, with_real.tp_collectives) == (6e-3, 9e-3, 0)  # collectives inside
    # full recompute redoes the real forward: the shard's extra plus what DTensor adds to the forward
    assert with_real.recompute_extra_s[Recompute.FULL] == pytest.approx(9e-4 + 5e-3)
    assert with_real.recompute_extra_s[Recompute.SELECTIVE] == pytest.approx(1e-4)
    assert with_real.act_bytes == without.act_bytes


def test_zero_2_and_3_take_the_measured_fsdp2_cost_per_block_and_micro_batch(tmp_path):
    from planner.presets import CLUSTERS
    from planner.profile import FSDPBlockTiming
    from planner.profiled import ProfiledCosts

    gpu = CLUSTERS["local"].gpu
    assert ProfiledCosts(make_profile(), gpu).fsdp_block_extra_s(2, 2, 2) is None  # not measured
    real = FSDPBlockTiming(zero=2, dp=2, micro_batch_size=2, fwd_s=2.5e-3, bwd_s=4.5e-3, fwd_cv=0, bwd_cv=0)
    costs = ProfiledCosts(make_profile(fsdp_blocks=[real]), gpu)
    assert costs.fsdp_block_extra_s(2, 2, 2) == pytest.approx(7e-3 - 3e-3)  # less the plain block (1 + 2 ms)
    assert costs.fsdp_block_extra_s(3, 2, 2) is None and costs.fsdp_block_extra_s(2, 4, 2) is None


def test_calibration_runs_are_scaled_to_the_speed_the_layers_were_profiled_at():
    from planner.profile import machine_slowdown

    # the run's core timed the block at 1.5x its profiled time: its 30 ms step is 20 ms at the profiled speed
    run = {"step_time_s": 0.030, "yardstick_block_s": 0.003}
    assert run["step_time_s"] / machine_slowdown(run, profiled_block_s=0.002) == pytest.approx(0.020)
    # a report without a yardstick (written before runs timed one) is taken as it is
    assert machine_slowdown({"step_time_s": 0.030}, profiled_block_s=0.002) is None
