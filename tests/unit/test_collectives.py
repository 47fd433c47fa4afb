"""The collective model (planner/collectives.py): alpha-beta fits, pieces, the aligned fit of the powers of two,
held-out errors and stalls; and the benchmark's size grid and pass schedule (runtime/profile_comm.py CommConfig)."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from planner.collectives import CollectiveFit, fit_alpha_beta, fit_collective, fit_pieces


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


MIB = 1 << 20


def all_gather_with_knee(sizes) -> list[tuple[int, float]]:
    """gloo's all_gather here: 0.82 ms/MiB up to 31.5 MiB, 1.6 ms/MiB from 32 MiB (glibc's mmap threshold)."""
    return [(n, 2e-4 + n / MIB * (0.82e-3 if n < 32 * MIB else 1.6e-3)) for n in sizes]


def test_a_piece_starts_at_its_first_measured_size_as_a_threshold_does():
    # 24 MiB, between the grid's 16 and 32, is on the fast line
    points = all_gather_with_knee([1 << e for e in range(10, 27)])
    pieces = fit_pieces(points)
    assert pieces and pieces[-1].from_bytes == 32 * MIB
    fit = fit_collective("all_gather", 2, points, [(24 * MIB, 2e-4 + 24 * 0.82e-3)])
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

    points = all_gather_with_knee(CommConfig().sizes())
    pieces = fit_pieces(points)
    assert pieces and pieces[-1].from_bytes == 32 * MIB
    fit = fit_collective("all_gather", 2, points, [(33 * MIB, 2e-4 + 33 * 1.6e-3)])
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


def test_a_call_is_priced_at_its_fit_plus_the_stall_the_mean_carries():
    from runtime.profile_comm import stall_of
    # below 1 MiB the mean exceeds the median by ~1 ms at every size; the large sizes do not count
    stats = {1 << 10: (2e-4, 1.2e-3), 1 << 14: (3e-4, 1.3e-3), 1 << 18: (5e-4, 1.5e-3), 1 << 26: (0.05, 0.04)}
    assert stall_of(stats) == pytest.approx(1e-3)
    assert stall_of({1 << 10: (2e-4, 1e-4)}) == 0.0  # a mean below the median is no stall
    fit = fit_collective("all_reduce", 2, [(1 << 10, 2e-4), (1 << 20, 1.2e-3)], stall_s=1e-3)
    assert fit.expected_s(1 << 10) == pytest.approx(fit.time_s(1 << 10) + 1e-3)
