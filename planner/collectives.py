"""The collective model of a profile: a latency-bandwidth fit per collective and group size, and how it is fitted.

``time = alpha + beta * nbytes`` (Hockney 1994, "The communication challenge for MPP", the alpha-beta model),
piecewise where the measured points show a knee, with the raw points it was fitted on and its error on sizes held
out of the fit. runtime/profile_comm.py measures the points; planner/profile.py keeps one CollectiveFit per op
and group size in profile.json.

Byte conventions of ``CollectiveFit.points``: all_reduce = the buffer; all_gather = the full gathered output;
reduce_scatter = the full input; send_recv = the message (one direction).
"""
from __future__ import annotations

import math
import statistics
from typing import Literal, Sequence

from pydantic import Field

from planner.specs import Strict

CollectiveOp = Literal["all_reduce", "all_gather", "reduce_scatter", "send_recv"]


class AlphaBetaPiece(Strict):
    """alpha-beta over one range of message sizes (from ``from_bytes`` up to the next piece's)."""

    from_bytes: int = Field(ge=0)
    alpha_s: float = Field(ge=0)
    beta_s_per_byte: float = Field(ge=0)


class CollectiveFit(Strict):
    op: CollectiveOp
    group_size: int = Field(gt=1)
    alpha_s: float = Field(ge=0)
    """Latency: seconds of a zero-byte message."""
    beta_s_per_byte: float = Field(ge=0)
    """Inverse bandwidth: seconds per byte (nbytes convention in the module docstring)."""
    points: list[tuple[int, float]]
    """Raw (nbytes, median seconds) the fit was made from."""
    max_rel_error: float = Field(ge=0)
    """Largest |fit - measured| / measured over ``points``."""
    holdout_rel_error: float = Field(ge=0)
    """Largest relative error on message sizes measured but kept out of the fit."""
    holdout_median_rel_error: float | None = Field(default=None, ge=0)
    """Median relative error on the held-out sizes (None in profiles written before it was recorded)."""
    holdout_points: list[tuple[int, float]] = []
    """The held-out (nbytes, median seconds)."""
    pieces: list[AlphaBetaPiece] = []
    """Piecewise alpha-beta (at most 4 pieces) where one line does not fit: on CPUs a message that fits in cache
    moves several times faster per byte than one that does not. time_s uses them when present; alpha_s and
    beta_s_per_byte stay the single-line fit over all sizes."""
    aligned_points: list[tuple[int, float]] = []
    """Raw (nbytes, seconds) at exact powers of two, fitted apart from ``points`` (runtime/profile_comm.py: on gloo
    a power of two cost 4-16 % more on average per op than the sizes around it from 256 KiB to 4 MiB, up to 24 %;
    all_gather at 32 MiB 40 % more in two runs, as much as its neighbours in 8 later ones), from 64 KiB up (below,
    within 6 % of the main fit). Empty in profiles whose ``points`` are the powers of two themselves."""
    aligned_pieces: list[AlphaBetaPiece] = []
    """The fit of ``aligned_points`` (one piece or more); time_s uses it for a message of exactly 2^k bytes from
    the smallest aligned point up (the main fit prices smaller ones)."""

    stall_s: float = Field(default=0.0, ge=0)
    """Mean minus median seconds per call, typical over sizes up to 1 MiB: what this machine's scheduling stalls
    add to a call on average (gloo on this 2-vCPU VM: 10-50 % of calls wait ~4 ms). The fit describes the common
    call; a step that makes many calls pays the mean, so the planner prices each call at time_s + stall_s."""

    def expected_s(self, nbytes: float) -> float:
        """Mean seconds of one call: the fitted common case plus the stall a call pays on average."""
        return self.time_s(nbytes) + self.stall_s

    def prices_as_aligned(self, nbytes: float) -> bool:
        """A power of two no smaller than the smallest aligned point: below it (64 KiB) the main fit holds."""
        smallest = min((n for n, _ in self.aligned_points), default=0)
        return bool(self.aligned_pieces) and is_power_of_two(nbytes) and nbytes >= smallest

    def time_s(self, nbytes: float) -> float:
        """Predicted seconds for a message of ``nbytes`` (by the op's nbytes convention)."""
        alpha, beta = self.alpha_s, self.beta_s_per_byte
        for piece in self.aligned_pieces if self.prices_as_aligned(nbytes) else self.pieces:
            if nbytes >= piece.from_bytes:
                alpha, beta = piece.alpha_s, piece.beta_s_per_byte
        return alpha + beta * nbytes


# ------------------------------------------------------------------------------------------- alpha-beta fit

def fit_alpha_beta(points: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares alpha, beta >= 0 of ``t = alpha + beta * n`` minimising the *relative* squared error
    sum(((alpha + beta n - t) / t)^2), so a 1 KiB message weighs as much as a 64 MiB one (an unweighted fit
    would let the largest sizes set alpha). Weighted normal equations with weights 1/t^2; if the unconstrained
    optimum has a negative coefficient, that coefficient is 0 and the other is refitted alone."""
    if len(points) < 2:
        raise ValueError("an alpha-beta fit needs at least two points")
    w = [1.0 / (t * t) for _, t in points]
    sw = sum(w)
    swn = sum(wi * n for wi, (n, _) in zip(w, points))
    swnn = sum(wi * n * n for wi, (n, _) in zip(w, points))
    swt = sum(wi * t for wi, (_, t) in zip(w, points))
    swnt = sum(wi * n * t for wi, (n, t) in zip(w, points))
    det = sw * swnn - swn * swn
    alpha, beta = ((swt * swnn - swn * swnt) / det, (sw * swnt - swn * swt) / det) if det > 0 else (-1.0, -1.0)
    if alpha >= 0 and beta >= 0:
        return alpha, beta
    only_beta = swnt / swnn if swnn > 0 else 0.0
    only_alpha = swt / sw

    def rel_sq(a: float, b: float) -> float:
        return sum(((a + b * n - t) / t) ** 2 for n, t in points)

    return min(((0.0, max(only_beta, 0.0)), (max(only_alpha, 0.0), 0.0)), key=lambda ab: rel_sq(*ab))


PIECE_NOISE = 0.05
"""Relative scatter of a measured point (the faster half of its calls) on this VM, from repeated profiles: a split
that fits the points closer than this is fitting noise, so fit_pieces scores no split below it. Per-point scatter
between runs was 3-12 % (AMD host, 8 runs of the benchmark); against 0.08, 0.05 let a second piece follow the
bend from latency to bandwidth (128 KiB-1 MiB), and the mean worst held-out error fell from 17 to 14 % and from
24 to 22 % in two sets of 4 runs (0.04: the same)."""


def fit_pieces(points: Sequence[tuple[float, float]], max_pieces: int = 4) -> list[AlphaBetaPiece]:
    """Split the size-sorted points into at most ``max_pieces`` runs of >= 2 (>= 3 for the first, whose alpha
    is the latency), fit each by fit_alpha_beta, and keep the split with the lowest Bayesian information
    criterion n ln(max(SSE/n, PIECE_NOISE^2)) + 2k ln(n) over the relative squared error SSE (Schwarz 1978; k
    pieces of 2 parameters): a piece more must explain a real knee (a cache or protocol threshold), not the
    scatter of noisy points. Judging splits by their worst point instead let one noisy small size decide, and
    missed the knees. A split is kept only if time never drops where a piece starts (more bytes never cost less):
    pieces fitted to two noisy small sizes had slopes 10x the bandwidth's and priced the sizes between 50 % high.
    A piece starts at the power of two at or below its first measured size (at that size itself on a grid of
    powers of two): the knees are thresholds of the form size >= 2^k. Measured here:
    gloo's all_gather doubles its time per byte from exactly 32 MiB (31.5 MiB: 0.82 ms/MiB, 32 MiB: 1.60), which
    is glibc's largest mmap threshold (DEFAULT_MMAP_THRESHOLD_MAX, 32 MiB on 64-bit; MALLOC_MMAP_THRESHOLD_=1 GiB
    removes the knee), so every call page-faults a fresh buffer; a boundary at the geometric middle of 16 and
    32 MiB priced 24 MiB on the slow line, 60-94 % high. One piece means no split: returns []."""
    pts = sorted(points)
    n = len(pts)
    best: tuple[float, list[AlphaBetaPiece]] | None = None
    for count in range(1, max_pieces + 1):
        for cuts in _cuts(n, count):
            split = _fit_split(pts, cuts)
            if split is None:
                continue
            pieces, sse = split
            bic = n * math.log(max(sse / n, PIECE_NOISE ** 2)) + 2 * count * math.log(n)
            if best is None or bic < best[0]:
                best = (bic, pieces)
    assert best is not None  # one piece is always monotone
    return best[1] if len(best[1]) > 1 else []


def _fit_split(pts: Sequence[tuple[float, float]], cuts: tuple[int, ...]
               ) -> tuple[list[AlphaBetaPiece], float] | None:
    """The pieces of one split and their relative SSE; None if a piece starts where the one before does or below
    where it ends."""
    pieces: list[AlphaBetaPiece] = []
    sse = 0.0
    for lo, hi in zip((0, *cuts), (*cuts, len(pts))):
        alpha, beta = fit_alpha_beta(pts[lo:hi])
        start = 0 if lo == 0 else 1 << int(math.log2(pts[lo][0]))  # the power of two at or below its first size
        if pieces and (start <= pieces[-1].from_bytes
                       or alpha + beta * start < pieces[-1].alpha_s + pieces[-1].beta_s_per_byte * start):
            return None
        pieces.append(AlphaBetaPiece(from_bytes=start, alpha_s=alpha, beta_s_per_byte=beta))
        sse += sum(((alpha + beta * x - t) / t) ** 2 for x, t in pts[lo:hi])
    return pieces, sse


def _cuts(n: int, count: int, first_min: int = 3, min_len: int = 2) -> list[tuple[int, ...]]:
    """Start indices of pieces 2..count splitting range(n) into ``count`` runs (the first >= first_min long)."""
    if count == 1:
        return [()]
    out = []
    for first_cut in range(first_min, n - min_len * (count - 1) + 1):
        for rest in _cuts(n - first_cut, count - 1, min_len, min_len):
            out.append((first_cut, *(first_cut + c for c in rest)))
    return out


def is_power_of_two(nbytes: float) -> bool:
    n = int(nbytes)
    return n == nbytes and n > 0 and n & (n - 1) == 0


def fit_collective(op: CollectiveOp, group_size: int, points: Sequence[tuple[int, float]],
                   holdout: Sequence[tuple[int, float]] = (), stall_s: float = 0.0,
                   aligned: Sequence[tuple[int, float]] = ()) -> CollectiveFit:
    """Fit ``points`` (one alpha-beta line, and pieces where the data show a knee) and, apart, the ``aligned``
    points at exact powers of two; report the error on both and on the ``holdout`` sizes kept out of the fit."""
    for n, t in [*points, *holdout, *aligned]:
        if not (t > 0 and math.isfinite(t)):
            raise ValueError(f"{op} over {group_size} ranks: time {t!r} s at {n} bytes is not a positive number")
    if any(not is_power_of_two(n) for n, _ in aligned):
        raise ValueError(f"{op} over {group_size} ranks: aligned sizes must be powers of two")
    alpha, beta = fit_alpha_beta(points)
    aligned_pieces = []
    if len(aligned) >= 2:  # one piece where no split pays: time_s needs the line there too
        a, b = fit_alpha_beta(aligned)
        aligned_pieces = fit_pieces(aligned) or [AlphaBetaPiece(from_bytes=0, alpha_s=a, beta_s_per_byte=b)]

    def raw(pairs: Sequence[tuple[int, float]]) -> list[tuple[int, float]]:
        return [(int(n), float(t)) for n, t in pairs]

    fit = CollectiveFit(op=op, group_size=group_size, alpha_s=alpha, beta_s_per_byte=beta, points=raw(points),
                        max_rel_error=0.0, holdout_rel_error=0.0, holdout_points=raw(holdout),
                        pieces=fit_pieces(points), aligned_points=raw(aligned), aligned_pieces=aligned_pieces,
                        stall_s=stall_s)
    held = _rel_errors(fit, holdout)
    return fit.model_copy(update={"max_rel_error": max(_rel_errors(fit, [*points, *aligned]), default=0.0),
                                  "holdout_rel_error": max(held, default=0.0),
                                  "holdout_median_rel_error": statistics.median(held) if held else None})


def _rel_errors(fit: CollectiveFit, points: Sequence[tuple[float, float]]) -> list[float]:
    return [abs(fit.time_s(n) - t) / t for n, t in points]
