"""Pipeline schedules as per-rank action orders, and an event simulation of one training step over stage costs.

A step runs ``m`` micro-batches through ``S = pp * vpp`` virtual stages; virtual stage j lives on pipeline rank
j % pp. Each rank executes its forwards F(mb, j) and backwards B(mb, j) strictly in the order ``rank_orders``
gives, which is the order torch 2.13's ``torch.distributed.pipelining`` schedules use (the runtime runs those):

* gpipe       -- ``ScheduleGPipe``: all forwards, then all backwards (Huang et al. 2019, GPipe).
* 1f1b        -- ``Schedule1F1B``: PipeDream-Flush (Narayanan et al. 2021, section 2.2.1): rank r runs
                 pp - r - 1 warm-up forwards, then one forward + one backward until the forwards run out, then
                 the remaining backwards.
* interleaved -- ``ScheduleInterleaved1F1B`` (Narayanan et al. 2021, section 2.2.2): each rank holds vpp model
                 chunks. Forwards go through the chunks in rounds of ``mpr`` micro-batches (chunk 0 for mpr
                 micro-batches, then chunk 1, ...), backwards through the chunks in reverse; rank r warms up with
                 (vpp - 1) * mpr + 2 * (pp - 1 - r) forwards, then alternates F, B, then drains.
                 Where torch differs from Megatron-LM: Megatron groups micro-batches in rounds of exactly pp and
                 requires m % pp == 0; torch uses ``rounds = max(1, m // pp)`` and ``mpr = m // rounds`` (so pp <=
                 mpr < 2 pp when m >= pp, mpr = m when m < pp) and only requires m % rounds == 0. With m a
                 multiple of pp the two orders are identical. We follow torch, since that is what runs.

``simulate`` replays the orders with per-virtual-stage costs: an action starts when its rank is free and its
dependencies are done -- F(mb, j) after F(mb, j-1) (+ p2p), B(mb, j) after B(mb, j+1) (+ p2p) and F(mb, j).
It is exact for that model (no compute/communication contention, sends never block) and O(number of actions):
each action is visited once; a rank that reaches an action whose input is not ready parks until that input's
producer finishes. Where a closed form is exact, ``closed_form_step_time_s`` gives the same answer in O(stages) (below).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from planner.plan import Schedule
from planner.specs import SpecError


class ActionKind(StrEnum):
    FORWARD = "F"
    BACKWARD = "B"


@dataclass(frozen=True)
class Action:
    kind: ActionKind
    microbatch: int
    stage: int
    """Virtual stage index in model order (runs on pipeline rank stage % pp)."""

    def __str__(self) -> str:
        return f"{self.kind}{self.microbatch}@{self.stage}"


# Internally an action is one int, so that orders and the simulation stay light:
#   code = 2 * (stage * m + microbatch) + (0 for F, 1 for B)
# F(mb, j - 1) is then code - 2 m, B(mb, j + 1) is code + 2 m and F(mb, j) for B(mb, j) is code - 1.


def _decode(code: int, m: int) -> Action:
    stage, mb = divmod(code >> 1, m)
    return Action(ActionKind.BACKWARD if code & 1 else ActionKind.FORWARD, mb, stage)


def validate_schedule(schedule: Schedule, pp: int, vpp: int, num_microbatches: int) -> str | None:
    """Why (schedule, pp, vpp, num_microbatches) cannot run, or None when it can.

    The rules are torch 2.13's (torch/distributed/pipelining/schedules.py): Schedule1F1B raises when
    n_microbatches < number of stages; ScheduleInterleaved1F1B raises unless n_microbatches is a multiple of
    rounds = max(1, n_microbatches // pp) -- it accepts m < pp (one round of m micro-batches). gpipe and 1f1b run
    one stage per rank (vpp 1); interleaved needs vpp >= 2 and pp >= 2 (chunks on a single rank overlap nothing).
    """
    schedule = Schedule(schedule)
    for name, value in (("pp", pp), ("vpp", vpp), ("num_microbatches", num_microbatches)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            return f"{name} must be a positive integer, got {value!r}"
    m = num_microbatches
    if schedule in (Schedule.GPIPE, Schedule.ONE_F_ONE_B) and vpp != 1:
        return f"{schedule} runs one stage per rank (vpp 1), got vpp {vpp}; use the interleaved schedule"
    if schedule == Schedule.ONE_F_ONE_B and m < pp:
        return f"1f1b needs num_microbatches ({m}) >= pp ({pp})"
    if schedule == Schedule.INTERLEAVED:
        if vpp < 2:
            return f"interleaved needs vpp >= 2, got {vpp}; use 1f1b"
        if pp < 2:
            return f"interleaved needs pp >= 2, got {pp}"
        rounds = max(1, m // pp)
        if m % rounds:
            return (f"interleaved needs num_microbatches ({m}) to be a multiple of its rounds max(1, m // pp) = "
                    f"{rounds} (torch ScheduleInterleaved1F1B)")
    return None


def _checked(schedule: Schedule, pp: int, vpp: int, m: int) -> Schedule:
    reason = validate_schedule(schedule, pp, vpp, m)
    if reason is not None:
        raise SpecError(reason)
    return Schedule(schedule)


def _gpipe_codes(rank: int, m: int) -> list[int]:
    base = 2 * rank * m
    return [base + 2 * mb for mb in range(m)] + [base + 2 * mb + 1 for mb in range(m)]


def _one_f_one_b_codes(rank: int, pp: int, m: int) -> list[int]:
    """torch Schedule1F1B._get_pipeline_order: pp - rank - 1 warm-up forwards, F/B pairs, then the backwards."""
    base = 2 * rank * m
    warmup = min(pp - rank - 1, m)
    codes = [base + 2 * mb for mb in range(warmup)]
    for k in range(m - warmup):
        codes += (base + 2 * (warmup + k), base + 2 * k + 1)
    codes += [base + 2 * mb + 1 for mb in range(m - warmup, m)]
    return codes


def interleaved_round_size(pp: int, num_microbatches: int) -> int:
    """Micro-batches per round in torch's ScheduleInterleaved1F1B: m // max(1, m // pp)."""
    return num_microbatches // max(1, num_microbatches // pp)


def _interleaved_codes(rank: int, pp: int, vpp: int, m: int) -> list[int]:
    """torch ScheduleInterleaved1F1B._calculate_single_rank_operations + _get_1f1b_rank_ops, without the no-ops."""
    mpr = interleaved_round_size(pp, m)
    # _get_warmup_ops: (vpp - 1) rounds for the last rank, two more forwards per hop away from it, capped.
    warmup = min((vpp - 1) * mpr + 2 * (pp - 1 - rank), m * vpp)
    total = m * vpp
    fwd_next = [0] * vpp  # next micro-batch per local chunk
    bwd_next = [0] * vpp
    two_m = 2 * m

    def forward(op: int) -> int:
        chunk = (op // mpr) % vpp
        mb = fwd_next[chunk]
        fwd_next[chunk] = mb + 1
        return two_m * (chunk * pp + rank) + 2 * mb

    def backward(op: int) -> int:
        chunk = vpp - 1 - ((op - warmup) // mpr) % vpp
        mb = bwd_next[chunk]
        bwd_next[chunk] = mb + 1
        return two_m * (chunk * pp + rank) + 2 * mb + 1

    codes = [forward(op) for op in range(warmup)]
    for op in range(warmup, total):
        codes += (forward(op), backward(op))
    codes += [backward(op) for op in range(total, total + warmup)]
    return codes


def _rank_codes(schedule: Schedule, pp: int, vpp: int, m: int) -> list[list[int]]:
    schedule = _checked(schedule, pp, vpp, m)
    if schedule == Schedule.GPIPE:
        return [_gpipe_codes(r, m) for r in range(pp)]
    if schedule == Schedule.ONE_F_ONE_B:
        return [_one_f_one_b_codes(r, pp, m) for r in range(pp)]
    return [_interleaved_codes(r, pp, vpp, m) for r in range(pp)]


def rank_orders(schedule: Schedule, pp: int, vpp: int, num_microbatches: int) -> list[list[Action]]:
    """Per pipeline rank, the actions it runs, in order. Raises SpecError when validate_schedule objects."""
    m = num_microbatches
    return [[_decode(c, m) for c in codes] for codes in _rank_codes(schedule, pp, vpp, m)]


def receives_per_rank(schedule: Schedule, pp: int, vpp: int, num_microbatches: int) -> int:
    """The most pipeline transfers one rank waits for in a step: a forward of every virtual stage but the first
    receives an activation, a backward of every stage but the last a gradient (the hand-offs planner/estimate.py
    charges on CPU)."""
    m, last = num_microbatches, pp * vpp - 1

    def receives(code: int) -> bool:
        stage = (code >> 1) // m
        return stage < last if code & 1 else stage > 0
    return max(sum(map(receives, codes)) for codes in _rank_codes(schedule, pp, vpp, m))


def _rank_peaks(schedule: Schedule, pp: int, vpp: int, m: int,
                weight: Sequence[int] | None) -> list[tuple[int, list[int]]]:
    """Per rank: (peak of sum over its stages of weight[j] * held[j], held per local chunk at the first such peak)."""
    peaks = []
    for codes in _rank_codes(schedule, pp, vpp, m):
        held = [0] * vpp  # per local chunk; virtual stage j is chunk j // pp of rank j % pp
        total = best = 0
        best_held = list(held)
        for code in codes:
            stage = (code >> 1) // m
            w = 1 if weight is None else weight[stage]
            if code & 1:
                held[stage // pp] -= 1
                total -= w
            else:
                held[stage // pp] += 1
                total += w
                if total > best:
                    best, best_held = total, list(held)
        peaks.append((best, best_held))
    return peaks


def inflight_per_stage(schedule: Schedule, pp: int, vpp: int, num_microbatches: int) -> tuple[int, ...]:
    """Per virtual stage: micro-batches whose activations it holds at its rank's peak.

    Held = forwards done minus backwards done (a micro-batch's saved activations live from its forward to its
    backward). A rank with several chunks (interleaved) is counted at one moment: the first point of its order
    where the total held over all its chunks is largest; each chunk reports its own count at that moment, so
    summing a rank's stages gives the rank's true peak count (the chunks' separate maxima would overstate it).
    When chunks keep different bytes per micro-batch, use ``peak_activation_bytes`` for the exact byte peak.
    1f1b: stage i holds min(pp - i, m); gpipe: m everywhere.
    """
    counts = [0] * (pp * vpp)
    for rank, (_, held) in enumerate(_rank_peaks(schedule, pp, vpp, num_microbatches, None)):
        for chunk, n in enumerate(held):
            counts[chunk * pp + rank] = n
    return tuple(counts)


def peak_activation_bytes(schedule: Schedule, pp: int, vpp: int, num_microbatches: int,
                          stage_activation_bytes: Sequence[int]) -> tuple[int, ...]:
    """Per pipeline rank: the peak over its order of sum_j held[j] * stage_activation_bytes[j] (j its stages)."""
    if len(stage_activation_bytes) != pp * vpp:
        raise ValueError(f"{len(stage_activation_bytes)} stage sizes for pp({pp}) * vpp({vpp}) = {pp * vpp} stages")
    peaks = _rank_peaks(schedule, pp, vpp, num_microbatches, stage_activation_bytes)
    return tuple(best for best, _ in peaks)


@dataclass(frozen=True)
class SimResult:
    step_time_s: float
    """From the first forward's start (time 0) to the last backward's end."""
    bubble_fraction: float
    """Idle share of the pipeline ranks over the step: 1 - sum(rank_busy_s) / (pp * step_time_s). Idle covers
    warm-up/drain bubbles, waits on slower stages and exposed p2p. Narayanan et al. 2021 (section 2.2.1) instead
    divide bubble time by the ideal time (b = (p-1)/m for 1F1B); with uniform stages ours is b / (1 + b)."""
    rank_busy_s: tuple[float, ...]
    """Per pipeline rank: compute time of all its actions."""
    timeline: tuple[tuple[int, Action, float, float], ...] | None
    """(rank, action, start_s, end_s) for every action, ordered by rank then order; None unless asked for."""


def simulate(schedule: Schedule, pp: int, vpp: int, num_microbatches: int, fwd_s: Sequence[float],
             bwd_s: Sequence[float], p2p_s: float = 0.0, keep_timeline: bool = False) -> SimResult:
    """Replay rank_orders with fwd_s[j] / bwd_s[j] seconds per micro-batch on virtual stage j.

    An action starts at max(its rank is free, its inputs are ready): F(mb, j) needs F(mb, j-1) + p2p_s, B(mb, j)
    needs B(mb, j+1) + p2p_s and F(mb, j). Adjacent virtual stages always sit on different ranks when pp > 1, so
    every stage boundary pays p2p_s. Raises RuntimeError if the orders deadlock (none of the valid ones do).
    """
    m = num_microbatches
    stages = pp * vpp
    orders = _rank_codes(schedule, pp, vpp, m)
    if len(fwd_s) != stages or len(bwd_s) != stages:
        raise ValueError(f"need {stages} forward and backward times (pp {pp} * vpp {vpp}), "
                         f"got {len(fwd_s)} and {len(bwd_s)}")
    fwd, bwd, p2p = [float(t) for t in fwd_s], [float(t) for t in bwd_s], float(p2p_s)
    end: list[float | None] = [None] * (2 * stages * m)  # end time per action code
    waiter = [-1] * (2 * stages * m)  # rank parked until this action ends
    position, free_at, busy = [0] * pp, [0.0] * pp, [0.0] * pp
    starts: list[list[float]] | None = [[] for _ in range(pp)] if keep_timeline else None
    two_m, last_stage = 2 * m, stages - 1
    runnable = list(range(pp))
    while runnable:
        rank = runnable.pop()
        codes, i, t, work = orders[rank], position[rank], free_at[rank], busy[rank]
        n = len(codes)
        while i < n:
            code = codes[i]
            stage = (code >> 1) // m
            if code & 1:  # backward: gradient from stage + 1, own forward
                ready = end[code - 1]
                if ready is None:
                    waiter[code - 1] = rank
                    break
                if stage < last_stage:
                    grad = end[code + two_m]
                    if grad is None:
                        waiter[code + two_m] = rank
                        break
                    ready = max(ready, grad + p2p)
                duration = bwd[stage]
            else:  # forward: activation from stage - 1
                ready = 0.0
                if stage:
                    act = end[code - two_m]
                    if act is None:
                        waiter[code - two_m] = rank
                        break
                    ready = act + p2p
                duration = fwd[stage]
            start = t if t > ready else ready
            t = start + duration
            work += duration
            end[code] = t
            if starts is not None:
                starts[rank].append(start)
            if waiter[code] >= 0:
                runnable.append(waiter[code])
                waiter[code] = -1
            i += 1
        position[rank], free_at[rank], busy[rank] = i, t, work
    stuck = [r for r in range(pp) if position[r] < len(orders[r])]
    if stuck:
        r = stuck[0]
        raise RuntimeError(f"{schedule} pp {pp} vpp {vpp} m {m} deadlocks: rank {r} waits at "
                           f"{_decode(orders[r][position[r]], m)}")
    step = max(free_at)
    timeline = None
    if starts is not None:
        timeline = tuple((r, _decode(c, m), s, end[c]) for r in range(pp) for c, s in zip(orders[r], starts[r]))
    idle = 1.0 - sum(busy) / (pp * step) if step > 0 else 0.0
    return SimResult(step_time_s=step, bubble_fraction=idle, rank_busy_s=tuple(busy), timeline=timeline)


def closed_form_step_time_s(schedule: Schedule, pp: int, vpp: int, num_microbatches: int, fwd_s: Sequence[float],
                            bwd_s: Sequence[float], p2p_s: float = 0.0) -> float | None:
    """simulate(...).step_time_s in O(stages) where an exact closed form is known, else None.

    * gpipe, any stage times: sum_j (f_j + b_j) + (m - 1)(max f + max b) + 2 (pp - 1) p2p. The forwards form a
      flow shop of m identical jobs, whose makespan is the sum of the stages plus (m - 1) times the slowest one
      (every monotone path through the (micro-batch, stage) grid crosses pp - 1 links); the backwards are the
      same flow shop started when the last stage finishes its forwards.
    * 1f1b, uniform f, b: (m + pp - 1)(f + b) (Narayanan et al. 2021, section 2.2.1: pp - 1 bubble slots) plus
      2 (m + pp - 3 - floor((m - 2) / pp)) p2p. The p2p count is the number of links on the critical path of
      the 1F1B event graph; it was read off this module's simulation and holds for every f, b, p2p >= 0 tried
      (tests/unit/test_schedule.py checks pp <= 12, pp <= m <= 4 pp + 2 with random and extreme ratios).
    * interleaved, uniform f, b (per virtual stage), p2p = 0: (m vpp + pp - 1)(f + b) when m >= pp, i.e.
      (m + (pp - 1) / vpp) times one micro-batch's full pass through a rank, bubble fraction (pp - 1)/(vpp m)
      (Narayanan et al. 2021, section 2.2.2); this holds for torch's rounds of mpr micro-batches too, not only
      m % pp == 0. When m < pp the chunks cannot overlap and it is (m + pp vpp - 1)(f + b), a GPipe over all
      pp * vpp stages. With p2p > 0 the exposed latency depends on how it compares with a round's compute
      (latency hiding needs mpr * (f + b) to cover it), so there is no single formula: None.
    """
    schedule = _checked(schedule, pp, vpp, num_microbatches)
    m, stages = num_microbatches, pp * vpp
    if len(fwd_s) != stages or len(bwd_s) != stages:
        raise ValueError(f"need {stages} forward and backward times, got {len(fwd_s)} and {len(bwd_s)}")
    if schedule == Schedule.GPIPE:
        return sum(fwd_s) + sum(bwd_s) + (m - 1) * (max(fwd_s) + max(bwd_s)) + 2 * (pp - 1) * p2p_s
    f, b = fwd_s[0], bwd_s[0]
    if any(t != f for t in fwd_s) or any(t != b for t in bwd_s):
        return None
    if schedule == Schedule.ONE_F_ONE_B:
        return (m + pp - 1) * (f + b) + 2 * (m + pp - 3 - (m - 2) // pp) * p2p_s
    if p2p_s:
        return None
    return (m * vpp + pp - 1 + (vpp - 1) * max(0, pp - m)) * (f + b)


def step_time_s(schedule: Schedule, pp: int, vpp: int, num_microbatches: int, fwd_s: Sequence[float],
                bwd_s: Sequence[float], p2p_s: float = 0.0) -> float:
    """The simulated step time, from the closed form when one applies (O(stages)), else by simulation."""
    closed = closed_form_step_time_s(schedule, pp, vpp, num_microbatches, fwd_s, bwd_s, p2p_s)
    if closed is not None:
        return closed
    return simulate(schedule, pp, vpp, num_microbatches, fwd_s, bwd_s, p2p_s).step_time_s
