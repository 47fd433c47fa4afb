"""Per-layer measurements: forward/backward time, recompute overhead, parameters, saved-activation bytes.

Layers are runtime/model.py's own Embedding, Block and Head (+ lm_loss), built at the shape of one TP shard:
the block's q/k/v/o and MLP projections are replaced by Linear layers of the sharded widths (column-parallel
outputs and row-parallel inputs divided by tp, as Megatron-LM shards them, Shoeybi et al. 2019 section 3); the
attention reads its local head count from those widths. The embedding and the head hold vocab/tp rows
(vocab-parallel embedding and output projection). Norms and the row-parallel biases stay whole, as on every rank.
runtime/model.py is not changed.

Timing: one thread (the caller sets it), warm-up rounds, then ``repeats`` rounds; a round takes one sample of
every (layer case, recompute mode) in turn, and a sample runs ``calls`` forward + backward pairs (enough to last
``min_sample_s``, so a 0.1 ms layer is not timed one clock read at a time). Every call's forward and backward are
kept. Round-robin keeps a slow spell of the machine from landing on one layer only.

What is reported: each layer's time at the machine's fast pace times the machine's pace (layer_profiles).
Measured on this 2-vCPU VM (tiny-gpt, 2 processes side by side, four profiles a few seconds apart): a vCPU runs
either at full speed or ~1.4-1.6x slower, switching within a fraction of a second or staying slow for a whole
8 s timing. Each layer's calls are a mixture of the two, so its median moved 20-80 % between profiles with the
mixture (benchmarks/profile_stability.py). The fastest call of a layer on the faster process is its own cost
(``fwd_fast_s``): no call can run faster than the work takes, so it moves only with how much of the fast pace
the timing saw. On an Intel host the 5th percentile moved 2-7 % between profiles; on an AMD host, in 4 timings
a few seconds apart the worst layer moved 8-26 % between a pair by the minimum and 23-38 % by the 5th
percentile, and in 4 more 4-7 % and 4-11 % (the 1st percentile: 9-27 and 3-7 %). How slow the machine ran on
average, mean over fast summed over every case, is the pace (1.14-1.67 there); a synchronized plan waits for
its slowest rank, so the slowest process's pace prices the plans.
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from planner.profile import LayerKind, LayerProfile
from planner.specs import ModelSpec, Recompute, SpecError
from runtime.model import Block, Embedding, Head, init_weights, lm_loss


@dataclass(frozen=True)
class TimingConfig:
    warmup: int = 2
    """Untimed samples first (allocator, caches, lazy init)."""
    repeats: int = 15
    """Timed rounds; the median is reported."""
    min_sample_s: float = 0.01
    """A sample repeats forward + backward until it lasts about this long."""


@dataclass(frozen=True)
class LayerCase:
    """One thing to run: a layer at a TP shard and micro-batch size, on a device in a dtype."""

    spec: ModelSpec
    kind: LayerKind
    tp: int
    micro_batch_size: int
    device: torch.device
    dtype: torch.dtype


# --------------------------------------------------------------------------------------------- building

def check_tp(spec: ModelSpec, tp: int) -> None:
    if tp <= 0:
        raise SpecError(f"--tp {tp}: must be positive")
    for what, n in (("num_heads", spec.num_heads), ("num_kv_heads", spec.kv_heads), ("ffn_hidden_size", spec.ffn)):
        if n % tp:
            raise SpecError(f"--tp {tp} does not divide {spec.name}'s {what} ({n})")


class InitHolder(nn.Module):
    """Gives init_weights the .spec it reads, so a shard is initialised like the model (std 0.02, scaled out)."""

    def __init__(self, spec: ModelSpec, layer: nn.Module):
        super().__init__()
        self.spec, self.layer = spec, layer


def build_layer(case: LayerCase, seed: int = 0) -> nn.Module:
    spec, t = case.spec, case.tp
    check_tp(spec, t)
    h, bias = spec.hidden_size, spec.flavour == "gpt2"
    vocab_shard = -(-spec.vocab_size // t)  # Megatron pads the vocabulary to a multiple of tp
    if case.kind == "block":
        layer: nn.Module = Block(spec)
        if t > 1:
            attn, mlp = layer.attn, layer.mlp
            attn.q_proj = nn.Linear(h, h // t, bias=bias)
            attn.k_proj = nn.Linear(h, spec.kv_dim // t, bias=bias)
            attn.v_proj = nn.Linear(h, spec.kv_dim // t, bias=bias)
            attn.o_proj = nn.Linear(h // t, h, bias=bias)
            f = spec.ffn // t
            if mlp.gated:
                mlp.gate_proj, mlp.up_proj = nn.Linear(h, f, bias=False), nn.Linear(h, f, bias=False)
                mlp.down_proj = nn.Linear(f, h, bias=False)
            else:
                mlp.fc1, mlp.fc2 = nn.Linear(h, f), nn.Linear(f, h)
    elif case.kind == "embedding":
        layer = Embedding(spec)
        layer.tok = nn.Embedding(vocab_shard, h)
    else:
        layer = Head(spec)
        layer.proj = nn.Linear(h, vocab_shard, bias=False)
    init_weights(InitHolder(spec, layer), seed)
    return layer.to(device=case.device, dtype=case.dtype)


def layer_inputs(case: LayerCase, layer: nn.Module, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(input, backward seed): tokens and an output gradient for the embedding, activations (requiring grad,
    as a pipeline stage's input does) and an output gradient for a block, activations and targets for the head."""
    gen = torch.Generator().manual_seed(seed)
    b, s, h = case.micro_batch_size, case.spec.seq_len, case.spec.hidden_size
    if case.kind == "embedding":
        tokens = torch.randint(0, layer.tok.num_embeddings, (b, s), generator=gen)
        grad = torch.randn(b, s, h, generator=gen)
        return tokens.to(case.device), grad.to(case.device, case.dtype)
    x = torch.randn(b, s, h, generator=gen).to(case.device, case.dtype).requires_grad_(True)
    if case.kind == "block":
        return x, torch.randn(b, s, h, generator=gen).to(case.device, case.dtype)
    targets = torch.randint(0, layer.proj.out_features, (b, s), generator=gen)
    return x, targets.to(case.device)


def forward(case: LayerCase, layer: nn.Module, x: torch.Tensor, seed: torch.Tensor) -> torch.Tensor:
    """The layer's output, or the loss for the head (the head's backward starts from the scalar loss)."""
    out = layer(x)
    return lm_loss(out, seed) if case.kind == "head" else out


def backward(case: LayerCase, out: torch.Tensor, seed: torch.Tensor) -> None:
    if case.kind == "head":
        out.backward()
    else:
        out.backward(seed)


# ---------------------------------------------------------------------------------------------- timing

@dataclass(frozen=True)
class Timing:
    fwd_s: float
    bwd_s: float
    fwd_cv: float
    bwd_cv: float
    total_s: float
    """Median of per-sample forward + backward."""
    fwd_fast_s: float
    """FAST_QUANTILE of the calls' forward times: the layer at the machine's fast pace."""
    bwd_fast_s: float
    total_fast_s: float
    """FAST_QUANTILE of the calls' forward + backward."""
    mean_total_s: float
    """Mean forward + backward per call, slow spells included."""


FAST_QUANTILE = 0.0
"""Of the calls: the fastest (module docstring). A call cannot be lucky below the work it does; every quantile
above it moves with the share of the timing the vCPU spent slow."""


def quantile(values: list[float], q: float) -> float:
    """The q-quantile by linear interpolation between order statistics (numpy's default)."""
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def coefficient_of_variation(samples: list[float]) -> float:
    mean = statistics.fmean(samples)
    return statistics.stdev(samples) / mean if len(samples) > 1 and mean > 0 else 0.0


class _Timed:
    """One (layer case, recompute mode) ready to run: built once, inputs made once, calls per sample set."""

    def __init__(self, case: LayerCase, mode: Recompute, sync: Callable[[], None], min_sample_s: float):
        self.case, self.mode, self.sync = case, mode, sync
        self.layer = build_layer(case)
        if case.kind == "block":
            self.layer.set_recompute(mode)
        self.x, self.seed = layer_inputs(case, self.layer)
        self.one_call()
        fwd, bwd = self.one_call()
        self.calls = max(1, math.ceil(min_sample_s / max(fwd + bwd, 1e-7)))
        self.samples: list[tuple[float, float]] = []
        self.calls_kept: list[tuple[float, float]] = []

    def one_call(self) -> tuple[float, float]:
        self.sync()
        t0 = time.perf_counter()
        out = forward(self.case, self.layer, self.x, self.seed)
        self.sync()
        t1 = time.perf_counter()
        backward(self.case, out, self.seed)
        self.sync()
        t2 = time.perf_counter()
        if self.x.is_floating_point():
            self.x.grad = None  # a stage sends its input's gradient away; it does not accumulate
        return t1 - t0, t2 - t1

    def sample(self, keep: bool) -> None:
        calls = [self.one_call() for _ in range(self.calls)]
        if keep:
            self.calls_kept.extend(calls)
            self.samples.append((sum(c[0] for c in calls) / self.calls, sum(c[1] for c in calls) / self.calls))

    def timing(self) -> Timing:
        fwds, bwds = [p[0] for p in self.samples], [p[1] for p in self.samples]
        return Timing(fwd_s=statistics.median(fwds), bwd_s=statistics.median(bwds),
                      fwd_cv=coefficient_of_variation(fwds), bwd_cv=coefficient_of_variation(bwds),
                      total_s=statistics.median(f + b for f, b in self.samples),
                      fwd_fast_s=quantile([c[0] for c in self.calls_kept], FAST_QUANTILE),
                      bwd_fast_s=quantile([c[1] for c in self.calls_kept], FAST_QUANTILE),
                      total_fast_s=quantile([c[0] + c[1] for c in self.calls_kept], FAST_QUANTILE),
                      mean_total_s=statistics.fmean(c[0] + c[1] for c in self.calls_kept))


def modes_of(kind: LayerKind) -> list[Recompute]:
    return list(Recompute) if kind == "block" else [Recompute.NONE]


def time_cases(cases: list[LayerCase], config: TimingConfig, sync: Callable[[], None],
               on_round: Callable[[str], None] | None = None) -> list[dict[Recompute, Timing]]:
    """Time forward and backward of every case under each of its recompute modes, round-robin: each round
    takes one sample of every (case, mode), so a slow spell of a shared machine lands on all of them alike
    instead of on whichever layer happened to be timed then (measured here beside other jobs: timing one
    layer after another let two runs differ by up to 2.5x; see benchmarks/profile_stability.py)."""
    timed = [[_Timed(case, mode, sync, config.min_sample_s) for mode in modes_of(case.kind)] for case in cases]
    rounds = config.warmup + config.repeats
    for round_ in range(rounds):
        for per_case in timed:
            for t in per_case:
                t.sample(keep=round_ >= config.warmup)
        if on_round is not None:
            on_round(f"layers round {round_ + 1}/{rounds}")
    return [{t.mode: t.timing() for t in per_case} for per_case in timed]


YARDSTICK = TimingConfig(warmup=1, repeats=7, min_sample_s=0.005)


def yardstick_s(spec: ModelSpec, mbs: int, device: torch.device, sync: Callable[[], None]) -> float:
    """One tp-1 block's forward + backward at ``mbs``, the mean of its calls over short samples, as the profile
    prices it (fast time x pace, the pace being a mean over calls): a run times it again so that how fast the
    machine is now can be set against how fast it was when profiled."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # as `mpplan profile` times it
    timed = _Timed(LayerCase(spec, "block", 1, mbs, device, dtype), Recompute.NONE, sync, YARDSTICK.min_sample_s)
    for round_ in range(YARDSTICK.warmup + YARDSTICK.repeats):
        timed.sample(keep=round_ >= YARDSTICK.warmup)
    return timed.timing().mean_total_s


# ----------------------------------------------------------------------------------------------- memory

def saved_activation_bytes(case: LayerCase, mode: Recompute = Recompute.NONE) -> int:
    """Bytes autograd keeps from one forward for the backward, seen through saved_tensors_hooks.

    Every tensor that autograd saves passes the pack hook. Counted once per underlying storage (by its address,
    with the storage's full size): several saved tensors are often views of one buffer (q, k, v as transposed
    views of their projections; SDPA's output and the out-projection's input are one buffer), and a view keeps its
    whole storage alive. Storages of parameters and buffers are skipped: the weights (and their transposed views,
    which Linear saves) are parameter memory, counted in ``params``, not activations. The layer's input counts (the
    first norm saves it; under full recompute it is all that is kept): it is this layer's to keep alive.

    Recompute uses non-reentrant torch.utils.checkpoint: tensors saved inside the checkpointed region go to the
    checkpoint's own inner hooks (placeholders, no memory), while the region's inputs are saved by its
    _NoopSaveInputs node outside it, so this hook sees exactly what stays alive until backward.
    """
    layer = build_layer(case)
    if case.kind == "block":
        layer.set_recompute(mode)
    x, seed = layer_inputs(case, layer)
    weights = {t.untyped_storage().data_ptr() for t in [*layer.parameters(), *layer.buffers()]}
    kept: dict[int, torch.Tensor] = {}  # storage address -> one tensor on it (held, so no address is reused)

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights and storage.nbytes() > 0:
            kept.setdefault(storage.data_ptr(), t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward(case, layer, x, seed)
    return sum(t.untyped_storage().nbytes() for t in kept.values())


def count_params(case: LayerCase) -> int:
    return sum(p.numel() for p in build_layer(case).parameters())


LayerMemory = tuple[int, dict[Recompute, int]]
"""A layer case's parameter count and saved-activation bytes per recompute mode."""


def layer_memory(case: LayerCase) -> LayerMemory:
    return count_params(case), {m: saved_activation_bytes(case, m) for m in modes_of(case.kind)}


def measure_layers(cases: list[LayerCase], config: TimingConfig, sync: Callable[[], None],
                   on_round: Callable[[str], None] | None = None) -> list[LayerProfile]:
    """Time ``cases`` in this process: layer_profiles of one process's timings, at its own pace."""
    return layer_profiles(cases, [time_cases(cases, config, sync, on_round)])[0]


def machine_pace(timings: list[dict[Recompute, Timing]], fast: list[dict[Recompute, float]]) -> float:
    """Mean seconds per call over fast seconds per call, summed over every (case, mode): how much slower than its
    fast pace one process ran on average, slow spells included (>= 1)."""
    mean = sum(t.mean_total_s for per_case in timings for t in per_case.values())
    quick = sum(f for per_case in fast for f in per_case.values())
    return max(1.0, mean / quick) if quick > 0 else 1.0


def layer_profiles(cases: list[LayerCase], per_process: list[list[dict[Recompute, Timing]]],
                   memory: list[LayerMemory] | None = None) -> tuple[list[LayerProfile], float]:
    """The profiles of ``cases`` timed by one or more processes side by side, and the pace they are priced at.

    A layer's fast time is the fastest process's (a vCPU can stay slow for a whole timing, module docstring);
    the pace is the slowest process's (a synchronized plan waits for it). Every time the planner reads (fwd_s,
    bwd_s, the recompute extras) is fast time x pace; the cv is the largest of any process's samples. ``memory``
    (layer_memory of each case, from processes that had already run them) is measured here when not given."""
    fast = [{m: min(p[i][m].total_fast_s for p in per_process) for m in per_process[0][i]} for i in range(len(cases))]
    pace = max(machine_pace(timings, fast) for timings in per_process)
    memory = memory or [layer_memory(case) for case in cases]
    profiles = []
    for i, case in enumerate(cases):
        timings = [p[i] for p in per_process]
        plain = [t[Recompute.NONE] for t in timings]
        fwd_fast, bwd_fast = min(t.fwd_fast_s for t in plain), min(t.bwd_fast_s for t in plain)
        extra = {m: pace * max(0.0, f - fast[i][Recompute.NONE]) for m, f in fast[i].items() if m != Recompute.NONE}
        profiles.append(LayerProfile(
            kind=case.kind, tp=case.tp, micro_batch_size=case.micro_batch_size, fwd_s=pace * fwd_fast,
            bwd_s=pace * bwd_fast, fwd_fast_s=fwd_fast, bwd_fast_s=bwd_fast,
            fwd_cv=max(t.fwd_cv for t in plain), bwd_cv=max(t.bwd_cv for t in plain), recompute_extra_s=extra,
            params=memory[i][0], activation_bytes=memory[i][1]))
    return profiles, pace


# ----------------------------------------------------------------------------------- device and optimizer

def matmul_tflops(device: torch.device, dtype: torch.dtype, sync: Callable[[], None]) -> float:
    """Dense matmul rate: 2 n^3 FLOPs per n x n product, median of 10 after warm-up."""
    n = 4096 if device.type == "cuda" else 512
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    times = []
    for i in range(13):
        sync()
        t0 = time.perf_counter()
        a @ b
        sync()
        if i >= 3:
            times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times) / 1e12


def optimizer_bytes_per_param(mixed_precision: bool) -> int:
    """Bytes of torch.optim.AdamW state per parameter after a real step on fp32 parameters (exp_avg and
    exp_avg_sq; the per-tensor scalar ``step`` is not per parameter and is left out). Mixed precision adds the
    fp32 master copy of each half-precision weight (Micikevicius et al. 2018, arXiv 1710.03740 section 3.1;
    K = 12 in ZeRO, Rajbhandari et al. 2020 section 3.1)."""
    layer = nn.Linear(64, 64)
    opt = torch.optim.AdamW(layer.parameters())
    layer(torch.randn(4, 64)).sum().backward()
    opt.step()
    per_param = [sum(v.nbytes for v in opt.state[p].values() if torch.is_tensor(v) and v.numel() == p.numel())
                 / p.numel() for p in layer.parameters()]
    master = 4 if mixed_precision else 0
    return round(max(per_param)) + master
