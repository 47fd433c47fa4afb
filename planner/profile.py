"""profile.json: what `mpplan profile` measured on this machine, read by the cost model (`mpplan solve --profile`).

Torch-free on purpose: the planner reads a profile without importing torch; runtime/profile.py writes it.

Per layer kind (embedding, transformer block, final norm + head + loss) at each TP degree and micro-batch size:
forward and backward seconds (medians, with their coefficient of variation), the extra seconds of each recompute
mode, parameters, and saved-activation bytes per recompute mode. Per collective and group size: a latency-bandwidth
fit ``time = alpha + beta * nbytes`` (Hockney 1994, "The communication challenge for MPP", the alpha-beta model)
with the raw points it was fitted on and its error on sizes held out of the fit. Plus the optimizer-state bytes per
parameter and the device it was measured on.

Byte conventions of ``CollectiveFit.points``: all_reduce = the buffer; all_gather = the full gathered output;
reduce_scatter = the full input; send_recv = the message (one direction).
"""
from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Literal, Sequence

from pydantic import Field

from planner.specs import ModelSpec, Precision, Recompute, SpecError, Strict, load_versioned

SCHEMA_VERSION = 2
"""2: collectives gained aligned_points / aligned_pieces (an mpplan that reads 1 alone says so, rather than
rejecting an unknown key). Version 1 files still load: what they lack has a default that prices as they did."""
OLDER_VERSIONS = (1,)

LayerKind = Literal["embedding", "block", "head"]
CollectiveOp = Literal["all_reduce", "all_gather", "reduce_scatter", "send_recv"]


class LayerProfile(Strict):
    """One layer kind at one TP shard and micro-batch size. Blocks are identical, so one block stands for all."""

    kind: LayerKind
    """head = final norm + output projection + loss."""
    tp: int = Field(gt=0)
    """Profiled as its TP shard: attention width, heads, kv heads and ffn divided by tp (blocks); the vocabulary
    divided by tp (embedding and head: vocab-parallel embedding and output projection, as Megatron-LM does)."""
    micro_batch_size: int = Field(gt=0)
    fwd_s: float = Field(ge=0)
    """Forward seconds the planner prices: ``fwd_fast_s`` x the profile's ``pace`` (in profiles written before
    the pace was measured: the median of samples)."""
    bwd_s: float = Field(ge=0)
    """Seconds of the backward alone, priced likewise."""
    fwd_fast_s: float | None = Field(default=None, ge=0)
    """The layer's own forward at the machine's fast pace: its fastest call on the faster process
    (runtime/profile_layers.py; the 5th percentile in profiles before 2026-12-01). What repeats between profiles
    while the machine's speed moves; None in older profiles."""
    bwd_fast_s: float | None = Field(default=None, ge=0)
    fwd_cv: float = Field(ge=0)
    """Coefficient of variation (stdev / mean) of the forward over the repeats."""
    bwd_cv: float = Field(ge=0)
    recompute_extra_s: dict[Recompute, float] = {}
    """Extra seconds per forward + backward when the block runs with that mode: fast(fwd+bwd with the mode)
    minus fast(fwd+bwd without), floored at 0, x pace. Blocks only; {} for the embedding and head."""
    params: int = Field(ge=0)
    """Parameters of this layer's TP shard."""
    activation_bytes: dict[Recompute, int]
    """Bytes saved for backward per micro-batch for each recompute mode (embedding and head: only "none")."""


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


class BlockTiming(Strict):
    """One transformer block timed as the runtime wraps it, on spawned local ranks (runtime/profile_tp.py):
    medians of forward and backward, the slowest rank's, and their coefficients of variation."""

    micro_batch_size: int = Field(gt=0)
    fwd_s: float = Field(ge=0)
    bwd_s: float = Field(ge=0)
    fwd_cv: float = Field(ge=0)
    bwd_cv: float = Field(ge=0)


class TPBlockTiming(BlockTiming):
    """At TP degree ``tp`` > 1: DTensor-sharded over tp ranks, its collectives and DTensor's dispatch included."""

    tp: int = Field(gt=1)


class FSDPBlockTiming(BlockTiming):
    """For ZeRO ``zero`` (2 or 3) over ``dp`` ranks: FSDP2 fully_shard, in a micro-batch that does not reduce
    gradients, so its parameter gathers and hooks (what every micro-batch pays) are in it and the once-a-step
    gradient reduce-scatter is not."""

    zero: Literal[2, 3]
    dp: int = Field(gt=1)


class DeviceInfo(Strict):
    device: Literal["cpu", "cuda"]
    name: str
    torch_version: str
    threads: int = Field(gt=0)
    """Threads per rank during the measurements."""
    matmul_tflops: float = Field(ge=0)
    """Measured dense matmul rate at the profile's precision, TFLOP/s."""
    date: str
    """ISO 8601, when the profile was taken."""


class RuntimeRun(Strict):
    """One calibration run of mpplan's own training loop on a single rank (no parallelism)."""

    micro_batch_size: int = Field(gt=0)
    num_microbatches: int = Field(gt=0)
    step_time_s: float = Field(ge=0)
    """Median step time after warm-up, as `mpplan run` reports it, at the speed the layers were profiled at
    (/ machine_slowdown; runtime/profile_runtime.py), averaged over the copies run side by side."""
    peak_bytes: int = Field(ge=0)
    """Peak memory as `mpplan run` reports it (CPU: live tensor bytes, runtime/memory_meter.py)."""


class RuntimeCalibration(Strict):
    """What mpplan's runtime adds to the sum of the layers, from single-rank runs of the whole model
    (runtime/profile_runtime.py; the parallel plans that `mpplan validate` checks are not among them)."""

    step_overhead_s: float = Field(ge=0)
    """Per optimizer step, beyond the layers and the optimizer: zero_grad, the loop, batch slicing."""
    microbatch_overhead_s: float = Field(ge=0)
    """Per whole-model micro-batch, beyond its layers' own forward and backward as timed alone (loss, autograd
    engine start, gradient accumulation into .grad); planner/profiled.py charges it as a share of the layers'
    time, so each pipeline stage pays in proportion to its work."""
    optimizer_s_per_param: float = Field(ge=0)
    """AdamW step seconds per parameter of the whole model (per-tensor overheads averaged in), one thread."""
    fixed_bytes: int = Field(ge=0)
    """Peak memory the runtime holds beyond parameters, gradients, optimizer state, activations and the loss's
    backward (kernel workspaces and the like)."""
    activation_peak_factor: float = Field(ge=1)
    """Peak bytes per saved-activation byte: backward holds activation gradients and temporaries beside what
    forward saved. 1 when not measurable."""
    runs: list[RuntimeRun] = []


def whole_model_sum(layers: Sequence[LayerProfile], spec: ModelSpec, mbs: int, what: str) -> float | None:
    """Every layer of ``spec`` at tp 1 and ``mbs``, each as profiled alone: forward + backward seconds
    (``what="time"``) or saved-activation bytes without recompute (``"bytes"``); None if a kind is missing."""
    by_kind = {lp.kind: lp for lp in layers if lp.tp == 1 and lp.micro_batch_size == mbs}
    if any(k not in by_kind for k in ("embedding", "block", "head")):
        return None
    if what == "time":
        def one(lp: LayerProfile) -> float:
            return lp.fwd_s + lp.bwd_s
    else:
        def one(lp: LayerProfile) -> float:
            return lp.activation_bytes[Recompute.NONE]
    return one(by_kind["embedding"]) + one(by_kind["head"]) + spec.num_layers * one(by_kind["block"])


def tp1_block_s(layers: Sequence[LayerProfile], mbs: int) -> float | None:
    """Forward + backward seconds of the tp-1 block at ``mbs`` as profiled (the block a run re-times as its
    yardstick, runtime/train.py); None if it was not profiled."""
    return next((lp.fwd_s + lp.bwd_s for lp in layers
                 if lp.kind == "block" and lp.tp == 1 and lp.micro_batch_size == mbs), None)


def machine_slowdown(measured: dict, profiled_block_s: float | None) -> float | None:
    """A run's yardstick (``measured["yardstick_block_s"]``, the block timed around its steps) / the same block
    as profiled: > 1 when the machine ran slower than when it was profiled; None when either is missing. A step
    time / this is the step time at the profiled speed."""
    yardstick = measured.get("yardstick_block_s")
    return yardstick / profiled_block_s if yardstick and profiled_block_s else None


class PipelineRun(Strict):
    """One schedule run by torch.distributed.pipelining on stages that do almost no work."""

    schedule: Literal["1f1b", "interleaved"]
    vpp: int = Field(gt=0)
    num_microbatches: int = Field(gt=0)
    receives_per_rank: int = Field(gt=0)
    """Activations and gradients the busiest rank waits for in a step (planner/schedule.py receives_per_rank)."""
    step_time_s: float = Field(gt=0)
    """Median step time, the slowest rank's."""

    @property
    def receive_s(self) -> float:
        """Seconds per hand-off: the step is its hand-offs."""
        return self.step_time_s / self.receives_per_rank


class PipelineCalibration(Strict):
    """What one hand-off between pipeline ranks costs in the real pipelining runtime (runtime/profile_pipeline.py):
    the stages only scale their input, so a step is its hand-offs."""

    message_bytes: int = Field(gt=0)
    """The activation passed: one micro-batch (the smallest profiled) x seq_len x hidden_size."""
    runs: list[PipelineRun] = Field(min_length=1)

    def receive_s(self, interleaved: bool) -> float:
        """Seconds per hand-off under the interleaved schedule's run, or else under the one-chunk (1F1B) run
        (GPipe has the same hand-offs per chunk); the other run where one is missing."""
        kind = "interleaved" if interleaved else "1f1b"
        run = next((r for r in self.runs if r.schedule == kind), self.runs[0])
        return run.receive_s


class Profile(Strict):
    schema_version: Literal[1, 2] = SCHEMA_VERSION
    model: ModelSpec
    precision: Precision
    """fp32 on CPU, bf16 on CUDA."""
    device: DeviceInfo
    layers: list[LayerProfile]
    collectives: list[CollectiveFit]
    optimizer_bytes_per_param: int = Field(gt=0)
    """AdamW state per parameter, measured from a real step (plus the fp32 master copy under bf16)."""
    runtime: RuntimeCalibration | None = None
    """Overheads of mpplan's own runtime on this machine; None in profiles taken without calibration runs."""
    tp_blocks: list[TPBlockTiming] = []
    """Blocks timed as run under tensor parallelism (CPU: every profiled tp > 1 that fits in ``ranks``)."""
    fsdp_blocks: list[FSDPBlockTiming] = []
    """Blocks timed as run under ZeRO 2 and 3 (CPU: over all ``ranks``)."""
    pipeline: PipelineCalibration | None = None
    """CPU, 2+ ranks: the cost of a pipeline hand-off as the pipelining runtime pays it; None in profiles taken
    without it (the planner then charges the send_recv fit's expected_s)."""
    pace: float | None = Field(default=None, ge=1)
    """How much slower than its fast pace the slowest process ran on average while the layers were timed (mean
    over fast seconds per call, runtime/profile_layers.py machine_pace); the layers' fwd_s / bwd_s include it.
    None in profiles written before it was measured."""

    def layer(self, kind: LayerKind, tp: int, micro_batch_size: int) -> LayerProfile | None:
        for lp in self.layers:
            if lp.kind == kind and lp.tp == tp and lp.micro_batch_size == micro_batch_size:
                return lp
        return None

    def tp_block(self, tp: int, micro_batch_size: int) -> TPBlockTiming | None:
        for t in self.tp_blocks:
            if t.tp == tp and t.micro_batch_size == micro_batch_size:
                return t
        return None

    def fsdp_block(self, zero: int, dp: int, micro_batch_size: int) -> FSDPBlockTiming | None:
        for t in self.fsdp_blocks:
            if (t.zero, t.dp, t.micro_batch_size) == (zero, dp, micro_batch_size):
                return t
        return None

    def collective(self, op: CollectiveOp, group_size: int) -> CollectiveFit | None:
        for fit in self.collectives:
            if fit.op == op and fit.group_size == group_size:
                return fit
        return None

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=2) + "\n"


def load_profile(path: str | Path) -> Profile:
    """Read and validate profile.json; any problem is a SpecError with one line naming the file and field."""
    return load_versioned(Profile, path, SCHEMA_VERSION, OLDER_VERSIONS)


# What decides a layer's cost; the name does not (a preset and its config.json twin measure the same).
_SHAPE_FIELDS = ("flavour", "hidden_size", "num_heads", "kv_heads", "ffn", "vocab_size", "seq_len", "num_layers",
                 "tie_embeddings")


def check_profile_matches(profile: Profile, model: ModelSpec, source: str = "profile.json") -> None:
    """SpecError unless the profile was measured for a model of the same shape as ``model``."""
    for field in _SHAPE_FIELDS:
        measured, wanted = getattr(profile.model, field), getattr(model, field)
        if measured != wanted:
            raise SpecError(f"{source} was measured for model {profile.model.name} ({field} {measured}), "
                            f"not {model.name} ({field} {wanted})")


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


def max_rel_error(alpha: float, beta: float, points: Sequence[tuple[float, float]]) -> float:
    return max((abs(alpha + beta * n - t) / t for n, t in points), default=0.0)


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
