"""profile.json: validation on load, model matching, lookups and layer pricing (torch-free); the collective fits
are tested in test_collectives.py."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from planner.collectives import fit_collective
from planner.presets import MODELS
from planner.profile import DeviceInfo, LayerProfile, Profile, check_profile_matches, load_profile
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


def test_planner_profile_does_not_import_torch():
    code = "import sys, planner.profile, planner.collectives; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.strip() == "False"


def tp_shard(mbs: int = 2, scale: float = 1.0) -> LayerProfile:
    return LayerProfile(kind="block", tp=2, micro_batch_size=mbs, fwd_s=1e-3 * scale, bwd_s=2e-3 * scale, fwd_cv=0,
                        bwd_cv=0, recompute_extra_s={"selective": 1e-4, "full": 9e-4}, params=TINY.block_params // 2,
                        activation_bytes={"none": 300_000, "selective": 290_000, "full": 32_768})


def test_a_block_timed_under_dtensor_adds_its_dispatch_to_shard_plus_fitted_collectives():
    from planner.presets import CLUSTERS
    from planner.profile import TPBlockTiming
    from planner.profiled import ProfiledCosts
    from planner.specs import Recompute

    shard, gpu = tp_shard(), CLUSTERS["local"].gpu
    without = ProfiledCosts(make_profile(layers=[shard]), gpu).block(2, False, 2)
    assert (without.fwd_s, without.bwd_s, without.tp_collectives) == (1e-3, 2e-3, 2)  # collectives priced apart
    real = TPBlockTiming(tp=2, micro_batch_size=2, fwd_s=6e-3, bwd_s=9e-3, fwd_cv=0.1, bwd_cv=0.1)
    prof = make_profile(layers=[shard], tp_blocks=[real])
    reduce_s = prof.collective("all_reduce", 2).expected_s(4 * 2 * TINY.seq_len * TINY.hidden_size)
    with_real = ProfiledCosts(prof, gpu).block(2, False, 2)
    # the block plus the estimator's two all-reduces each way is what was measured; the rest is DTensor's dispatch
    assert with_real.tp_collectives == 2
    assert with_real.fwd_s + 2 * reduce_s == pytest.approx(6e-3)
    assert with_real.bwd_s + 2 * reduce_s == pytest.approx(9e-3)
    # full recompute redoes the forward: the shard's extra plus DTensor's dispatch (the estimator adds the reduces)
    assert with_real.recompute_extra_s[Recompute.FULL] == pytest.approx(9e-4 + 6e-3 - 1e-3 - 2 * reduce_s)
    assert with_real.recompute_extra_s[Recompute.SELECTIVE] == pytest.approx(1e-4)
    assert with_real.act_bytes == without.act_bytes
    # without an all-reduce fit the measured block holds its collectives
    alone = ProfiledCosts(make_profile(layers=[shard], tp_blocks=[real], collectives=[]), gpu).block(2, False, 2)
    assert (alone.fwd_s, alone.bwd_s, alone.tp_collectives) == (pytest.approx(6e-3), pytest.approx(9e-3), 0)


def test_rising_line_is_least_squares_and_never_falls():
    from planner.profiled import rising_line

    a, b = rising_line([(1, 3.0), (2, 5.0), (4, 9.0)])  # on the line 1 + 2 x
    assert (a, b) == (pytest.approx(1.0), pytest.approx(2.0))
    a, b = rising_line([(1, 3.0), (2, 4.0), (4, 4.0)])  # least squares: slope 2/7 through the means
    assert b == pytest.approx(2 / 7) and a + b * 7 / 3 == pytest.approx(11 / 3)
    assert rising_line([(1, 9.0), (2, 6.0), (4, 6.0)]) == (pytest.approx(7.0), 0.0)  # falls: the mean
    assert rising_line([(2, 5.0)]) == (5.0, 0.0)


def _dtensor_dispatch(fwd_bwd_at_2: tuple[float, float], fwd_bwd_at_4: tuple[float, float]):
    """Costs of a profile whose tp-2 block was timed at mbs 2 and 4, and the dispatch measured at each size."""
    from planner.presets import CLUSTERS
    from planner.profile import TPBlockTiming
    from planner.profiled import ProfiledCosts

    shards = [tp_shard(2), tp_shard(4, scale=2.0)]
    reals = [TPBlockTiming(tp=2, micro_batch_size=mbs, fwd_s=f, bwd_s=b, fwd_cv=0.1, bwd_cv=0.1)
             for mbs, (f, b) in ((2, fwd_bwd_at_2), (4, fwd_bwd_at_4))]
    prof = make_profile(layers=shards, tp_blocks=reals)
    fit = prof.collective("all_reduce", 2)
    reduce_s = [fit.expected_s(4 * r.micro_batch_size * TINY.seq_len * TINY.hidden_size) for r in reals]
    dispatch = [(r.fwd_s - s.fwd_s - 2 * x, r.bwd_s - s.bwd_s - 2 * x) for s, r, x in zip(shards, reals, reduce_s)]
    return ProfiledCosts(prof, CLUSTERS["local"].gpu), shards, dispatch


def test_dtensor_dispatch_that_grows_with_the_micro_batch_is_priced_per_size():
    costs, shards, dispatch = _dtensor_dispatch((6e-3, 9e-3), (12e-3, 16e-3))
    assert dispatch[1][0] > dispatch[0][0] and dispatch[1][1] > dispatch[0][1]
    # two sizes: the line passes through both, so each size is priced at its own measurement
    for shard, (fwd_extra, bwd_extra) in zip(shards, dispatch):
        assert costs.tp_wrapper_extra_s(2, shard.micro_batch_size) == (pytest.approx(fwd_extra),
                                                                       pytest.approx(bwd_extra))
        block = costs.block(2, False, shard.micro_batch_size)
        assert (block.fwd_s, block.bwd_s) == (pytest.approx(shard.fwd_s + fwd_extra),
                                              pytest.approx(shard.bwd_s + bwd_extra))
    # between and beyond the sizes, along the line
    assert costs.tp_wrapper_extra_s(2, 3)[0] == pytest.approx((dispatch[0][0] + dispatch[1][0]) / 2)
    assert costs.tp_wrapper_extra_s(4, 2) is None


def test_dtensor_dispatch_that_falls_with_the_micro_batch_is_one_price_the_mean_of_the_sizes():
    costs, shards, dispatch = _dtensor_dispatch((9e-3, 12e-3), (8e-3, 11e-3))
    assert dispatch[1][0] < dispatch[0][0] and dispatch[1][1] < dispatch[0][1]
    mean = ((dispatch[0][0] + dispatch[1][0]) / 2, (dispatch[0][1] + dispatch[1][1]) / 2)
    for shard in shards:
        assert costs.tp_wrapper_extra_s(2, shard.micro_batch_size) == (pytest.approx(mean[0]), pytest.approx(mean[1]))
        block = costs.block(2, False, shard.micro_batch_size)
        assert (block.fwd_s, block.bwd_s) == (pytest.approx(shard.fwd_s + mean[0]),
                                              pytest.approx(shard.bwd_s + mean[1]))


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
    # the wrapper moves parameters, not activations: one price for every micro-batch size, the mean of the sizes'
    plain4 = make_profile().layers[0].model_copy(update={"micro_batch_size": 4, "fwd_s": 2e-3, "bwd_s": 4e-3})
    real4 = real.model_copy(update={"micro_batch_size": 4, "fwd_s": 5e-3, "bwd_s": 7e-3})
    both = make_profile(fsdp_blocks=[real, real4])
    both = both.model_copy(update={"layers": [*both.layers, plain4]})
    pooled = ProfiledCosts(both, gpu)
    assert pooled.fsdp_block_extra_s(2, 2, 2) == pooled.fsdp_block_extra_s(2, 2, 4) == pytest.approx((4e-3 + 6e-3) / 2)


def test_calibration_runs_are_scaled_to_the_speed_the_layers_were_profiled_at():
    from planner.profile import machine_slowdown

    # the run's core timed the block at 1.5x its profiled time: its 30 ms step is 20 ms at the profiled speed
    run = {"step_time_s": 0.030, "yardstick_block_s": 0.003}
    assert run["step_time_s"] / machine_slowdown(run, profiled_block_s=0.002) == pytest.approx(0.020)
    # a report without a yardstick (written before runs timed one) is taken as it is
    assert machine_slowdown({"step_time_s": 0.030}, profiled_block_s=0.002) is None
