"""The stage-partition ILP: identical transformer blocks -> contiguous pipeline stages, recompute chosen per stage.

The model is embedding, ``num_blocks`` identical blocks, then the head (final norm + projection + loss). Because
the blocks are identical, a partition is an integer count of blocks per virtual stage, and a stage's recompute
choice is how many of its blocks use each mode (Megatron's ``--recompute-num-layers``, chosen per stage): stages
that hold many micro-batches in flight (early 1F1B stages) recompute more than late ones.

Variables (tiny: S x M integers and one continuous):
    n[j, m] >= 0 integer   blocks of virtual stage j that use recompute mode m
    T       >= 0           the bottleneck rank time per micro-batch
Objective (a linear proxy for the step time; the schedule simulator scores the result afterwards):
    minimise (m_b - 1) * T + sum_j stage_time_j / vpp
which for vpp = 1 is the 1F1B step time with uneven stages: the fill/drain pass through every stage once plus
(m_b - 1) steady-state steps at the bottleneck (Narayanan et al. 2021, arXiv 2104.04473, section 2.2; with
vpp chunks per rank the fill/drain pass shrinks by vpp, their section 2.2.2).
    sum_{j,m} n[j,m] = num_blocks;  sum_m n[j,m] >= min_blocks_per_stage
    T >= sum_{j on rank r} stage_time_j                                     for every pipeline rank r
    sum_{j on r} [ sum_m n[j,m] (static + inflight_j act_m) + fixed_mem_j ] <= memory_cap   for every rank r

pulp solves it with HiGHS (highspy) where available, CBC otherwise. Measured on this project's machine: pulp's
HiGHS wrapper reports a time-out as status "Optimal" (only ``sol_status`` tells), and a CBC time-out without an
integer solution leaves LP-relaxation values in the variables; so the status is taken from ``sol_status``, every
value is checked to be integral, and the gap comes from the solver's best bound (HiGHS) or the LP relaxation.
Two exact quantities come from planner/partition_bounds.py without a solver: memory feasibility
(:func:`min_rank_memory_bytes`), so ``None`` means "no partition fits" and nothing else, and the least possible
bottleneck (:func:`min_bottleneck_s`), added as the cut T >= it: the plain ILP's LP relaxation spreads blocks
fractionally and HiGHS could not close a 17.6 % gap in 30 s at 128 blocks x 64 stages with a binding memory cap;
with the cut it proves that instance optimal in about 1 s. When a solver gives up without an integer solution the
min-memory partition is returned with status ``"fallback"`` and its gap from the LP relaxation.
For vpp > 1 the objective cannot tell how a rank's blocks sit among its chunks; :func:`_balance_chunks` spreads
them evenly within the memory cap afterwards (same objective, better pipelining).
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass

import pulp

from planner.partition_bounds import min_bottleneck_s, min_memory_partition, min_rank_memory_bytes
from planner.quiet import fd_to_devnull
from planner.specs import Recompute

__all__ = ["BlockOption", "PartitionProblem", "PartitionResult", "Evaluation", "evaluate", "solve_partition",
           "solver_status", "min_rank_memory_bytes", "min_bottleneck_s", "HIGHS", "CBC"]

HIGHS = "HiGHS"
CBC = "PULP_CBC_CMD"
INTEGRALITY_TOL = 1e-6  # a solver value further than this from an integer is not a solution
GAP_NOISE = 1e-9  # HiGHS closes a MIP with its bound ~1e-9 relative short (5.9e-10 measured); below this is round-off
MEMORY_TOL = 1e-6  # relative; HiGHS/CBC accept rows violated by ~1e-7 (primal feasibility tolerance), rows are scaled to cap = 1
LP_TIME_LIMIT_S = 1.0  # floor for the LP relaxation that bounds a fallback: an LP this size solves in milliseconds


@dataclass(frozen=True)
class BlockOption:
    """One recompute mode of a block, as the cost model prices it."""

    mode: Recompute
    time_s: float
    """Forward + backward (+ recompute, + TP communication) of one block for one micro-batch."""
    act_bytes: float
    """Saved activation bytes of one block for one micro-batch in flight."""


@dataclass(frozen=True)
class PartitionProblem:
    """One parallel configuration's partition problem (planner/search.py builds it)."""

    num_blocks: int
    options: tuple[BlockOption, ...]
    """1 to 3 allowed recompute modes, each at most once."""
    block_static_bytes: float
    """Params + grads + optimizer state of one block on one rank."""
    num_stages: int
    stage_rank: tuple[int, ...]
    """Pipeline rank of each virtual stage: j for GPipe/1F1B, j % pp for interleaved."""
    inflight: tuple[float, ...]
    """Micro-batches whose activations a stage holds at its peak, per stage."""
    num_microbatches: int
    first_time_s: float = 0.0
    """Embedding, on stage 0."""
    first_static_bytes: float = 0.0
    first_act_bytes: float = 0.0
    last_time_s: float = 0.0
    """Final norm + head + loss, on the last stage."""
    last_static_bytes: float = 0.0
    last_act_bytes: float = 0.0
    boundary_time_s: float = 0.0
    """p2p send + recv per micro-batch, added to a stage once per neighbouring stage."""
    memory_cap_bytes: float = math.inf
    """Per pipeline rank: device memory minus the reserve."""
    min_blocks_per_stage: int = 0
    stage_extra_bytes: tuple[float, ...] = ()
    """Per stage, memory beside weights and activations that its blocks do not change (the pipeline library's
    buffers, the loss's backward; planner/memory.py); empty for none."""

    def __post_init__(self) -> None:
        S = self.num_stages
        modes = [o.mode for o in self.options]
        checks = [
            (self.num_blocks >= 1, f"num_blocks must be >= 1, got {self.num_blocks}"),
            (1 <= len(modes) <= len(Recompute) and len(set(modes)) == len(modes),
             f"options must name 1 to {len(Recompute)} distinct recompute modes, got {modes}"),
            (S >= 1 and len(self.stage_rank) == S and len(self.inflight) == S,
             f"num_stages {S} needs one stage_rank and one inflight per stage, got {len(self.stage_rank)} and "
             f"{len(self.inflight)}"),
            (set(self.stage_rank) == set(range(max(self.stage_rank, default=0) + 1)),
             f"stage_rank {self.stage_rank} must use every rank 0..R-1"),
            (self.num_microbatches >= 1, f"num_microbatches must be >= 1, got {self.num_microbatches}"),
            (self.min_blocks_per_stage >= 0, f"min_blocks_per_stage must be >= 0, got {self.min_blocks_per_stage}"),
            (len(self.stage_extra_bytes) in (0, S),
             f"stage_extra_bytes needs one value per stage or none, got {len(self.stage_extra_bytes)}"),
            (self.num_blocks >= S * self.min_blocks_per_stage,
             f"{self.num_blocks} blocks cannot give each of {S} stages {self.min_blocks_per_stage} blocks"),
        ]
        numbers = [self.block_static_bytes, *self.inflight, self.first_time_s, self.first_static_bytes,
                   self.first_act_bytes, self.last_time_s, self.last_static_bytes, self.last_act_bytes,
                   self.boundary_time_s, *self.stage_extra_bytes,
                   *(x for o in self.options for x in (o.time_s, o.act_bytes))]
        checks.append((all(x >= 0 and math.isfinite(x) for x in numbers), "times, bytes and inflight must be finite, >= 0"))
        checks.append((self.memory_cap_bytes > 0, f"memory_cap_bytes must be > 0, got {self.memory_cap_bytes}"))
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def num_ranks(self) -> int:
        return max(self.stage_rank) + 1

    @property
    def vpp(self) -> float:
        """Virtual stages per rank (num_stages / num_ranks)."""
        return self.num_stages / self.num_ranks

    def stage_fixed_time_s(self, j: int) -> float:
        """Stage j's time that does not depend on its blocks: embedding, head, p2p to each neighbour."""
        last = self.num_stages - 1
        neighbours = (j > 0) + (j < last)
        return (self.first_time_s if j == 0 else 0.0) + (self.last_time_s if j == last else 0.0) \
            + self.boundary_time_s * neighbours

    def stage_fixed_bytes(self, j: int) -> float:
        """Stage j's memory that does not depend on its blocks: embedding and head (static + in-flight
        activations) and its extra bytes."""
        first = self.first_static_bytes + self.inflight[j] * self.first_act_bytes if j == 0 else 0.0
        last = self.last_static_bytes + self.inflight[j] * self.last_act_bytes if j == self.num_stages - 1 else 0.0
        return first + last + (self.stage_extra_bytes[j] if self.stage_extra_bytes else 0.0)

    def block_bytes(self, j: int, option: BlockOption) -> float:
        """One block's memory on stage j in the given mode."""
        return self.block_static_bytes + self.inflight[j] * option.act_bytes


@dataclass(frozen=True)
class PartitionResult:
    counts: tuple[dict[Recompute, int], ...]
    """Per stage: blocks per recompute mode (every allowed mode present; sum over stages == num_blocks)."""
    stage_time_s: tuple[float, ...]
    """Per stage, per micro-batch: blocks + embedding/head + p2p boundaries."""
    rank_time_s: tuple[float, ...]
    rank_memory_bytes: tuple[float, ...]
    objective_s: float
    solver: str
    status: str
    """"optimal" (proven), "feasible" (solver stopped with an unproven incumbent) or "fallback"."""
    gap: float
    """Relative optimality gap (objective - best lower bound) / objective; 0 when proven optimal."""
    time_s: float

    def block_ranges(self) -> tuple[tuple[int, int], ...]:
        """Half-open block range [first, last) of each virtual stage, as plan.StagePlan.layers stores it."""
        ranges, first = [], 0
        for stage in self.counts:
            last = first + sum(stage.values())
            ranges.append((first, last))
            first = last
        return tuple(ranges)


@dataclass(frozen=True)
class Evaluation:
    """Times, memory and objective of one concrete partition (the same arithmetic the ILP encodes)."""

    stage_time_s: tuple[float, ...]
    rank_time_s: tuple[float, ...]
    rank_memory_bytes: tuple[float, ...]
    objective_s: float


def evaluate(problem: PartitionProblem, counts: tuple[dict[Recompute, int], ...]) -> Evaluation:
    """Price a partition given as blocks per mode per stage."""
    by_mode = {o.mode: o for o in problem.options}
    stage_time = [problem.stage_fixed_time_s(j) + sum(n * by_mode[m].time_s for m, n in counts[j].items())
                  for j in range(problem.num_stages)]
    stage_bytes = [problem.stage_fixed_bytes(j) + sum(n * problem.block_bytes(j, by_mode[m]) for m, n in counts[j].items())
                   for j in range(problem.num_stages)]
    rank_time, rank_bytes = [0.0] * problem.num_ranks, [0.0] * problem.num_ranks
    for j, r in enumerate(problem.stage_rank):
        rank_time[r] += stage_time[j]
        rank_bytes[r] += stage_bytes[j]
    objective = (problem.num_microbatches - 1) * max(rank_time) + sum(stage_time) / problem.vpp
    return Evaluation(tuple(stage_time), tuple(rank_time), tuple(rank_bytes), objective)


def solver_status(status: int, sol_status: int) -> str:
    """mpplan's status from pulp's (prob.status, prob.sol_status).

    pulp's HiGHS wrapper maps a time-out with an incumbent to status Optimal with sol_status IntegerFeasible,
    and CBC's "Stopped on time - objective value" likewise, so only sol_status proves optimality."""
    if status == pulp.LpStatusOptimal and sol_status == pulp.LpSolutionOptimal:
        return "optimal"
    if sol_status == pulp.LpSolutionIntegerFeasible:
        return "feasible"
    if pulp.LpStatusInfeasible in (status, sol_status):
        return "infeasible"
    if pulp.LpStatusUnbounded in (status, sol_status):
        return "unbounded"
    return "no_solution"


def _make_solver(name: str, time_limit_s: float) -> pulp.LpSolver:
    # gap tolerances 0: "optimal" must mean optimal, the tests compare with exhaustive search to 1e-6
    if name == HIGHS:
        return pulp.HiGHS(msg=False, timeLimit=time_limit_s, gapRel=0.0, gapAbs=0.0)
    if name == CBC:
        with warnings.catch_warnings():  # pulp 3.3 flags PULP_CBC_CMD for pulp 4; it is the CBC that ships with pulp
            warnings.simplefilter("ignore", DeprecationWarning)
            return pulp.PULP_CBC_CMD(msg=False, timeLimit=time_limit_s, gapRel=0.0, gapAbs=0.0, keepFiles=False)
    raise ValueError(f"unknown solver {name!r}; use {HIGHS!r} or {CBC!r}")


def _variable(prob: pulp.LpProblem, name: str, low: float, up: float | None, cat: str) -> pulp.LpVariable:
    """pulp >= 3.3 creates variables through the problem (LpVariable(...) is deprecated for pulp 4); older ones
    only have the constructor."""
    if hasattr(prob, "add_variable"):
        return prob.add_variable(name, lowBound=low, upBound=up, cat=cat)
    return pulp.LpVariable(name, lowBound=low, upBound=up, cat=cat)


def _build(problem: PartitionProblem, integer: bool, bottleneck_floor_s: float) -> tuple[pulp.LpProblem, dict, float]:
    """The ILP in scaled units (time / t_unit, memory / cap) so HiGHS's absolute tolerances mean the same thing
    for a 10 ms CPU block and a 1 s H100 stage, with the cut T >= bottleneck_floor_s. Returns the problem,
    n[j, mode] and t_unit."""
    S, opts = problem.num_stages, problem.options
    t_unit = max([o.time_s for o in opts] + [problem.first_time_s, problem.last_time_s, problem.boundary_time_s]) or 1.0
    prob = pulp.LpProblem("stage_partition", pulp.LpMinimize)
    cat = pulp.LpInteger if integer else pulp.LpContinuous
    n = {(j, o.mode): _variable(prob, f"n_{j}_{o.mode.value}", 0, problem.num_blocks, cat) for j in range(S) for o in opts}
    # the cut is valid (min_bottleneck_s); 1e-9 keeps round-off in its summation order from cutting the optimum
    bottleneck = _variable(prob, "T", bottleneck_floor_s / t_unit * (1 - 1e-9), None, pulp.LpContinuous)
    stage_time = [pulp.lpSum(o.time_s / t_unit * n[j, o.mode] for o in opts) for j in range(S)]
    # the stage's fixed time is a constant: left out of the objective (pulp's HiGHS drops constants anyway)
    prob += (problem.num_microbatches - 1) * bottleneck + pulp.lpSum(stage_time) / problem.vpp
    prob += pulp.lpSum(n.values()) == problem.num_blocks, "all_blocks"
    for j in range(S):
        if problem.min_blocks_per_stage:
            prob += pulp.lpSum(n[j, o.mode] for o in opts) >= problem.min_blocks_per_stage, f"min_blocks_{j}"
    for r in range(problem.num_ranks):
        stages = [j for j in range(S) if problem.stage_rank[j] == r]
        fixed_time = sum(problem.stage_fixed_time_s(j) for j in stages) / t_unit
        prob += bottleneck >= pulp.lpSum(stage_time[j] for j in stages) + fixed_time, f"bottleneck_{r}"
        if math.isfinite(problem.memory_cap_bytes):
            cap = problem.memory_cap_bytes
            fixed_bytes = sum(problem.stage_fixed_bytes(j) for j in stages) / cap
            prob += pulp.lpSum(problem.block_bytes(j, o) / cap * n[j, o.mode] for j in stages for o in opts) \
                + fixed_bytes <= 1.0, f"memory_{r}"
    return prob, n, t_unit


def _integral_counts(problem: PartitionProblem, n: dict) -> tuple[dict[Recompute, int], ...] | None:
    """Rounded counts, or None when any value is not integral or they are not a partition (a CBC time-out leaves
    LP-relaxation values behind)."""
    counts = []
    for j in range(problem.num_stages):
        stage = {}
        for o in problem.options:
            value = n[j, o.mode].varValue
            if value is None or abs(value - round(value)) > INTEGRALITY_TOL or round(value) < 0:
                return None
            stage[o.mode] = int(round(value))
        if sum(stage.values()) < problem.min_blocks_per_stage:
            return None
        counts.append(stage)
    return tuple(counts) if sum(sum(s.values()) for s in counts) == problem.num_blocks else None


def _lower_bound_s(problem: PartitionProblem, name: str, time_limit_s: float, bottleneck_floor_s: float) -> float:
    """Objective lower bound from the LP relaxation with the bottleneck cut (0 when it cannot be solved)."""
    relaxed, _, t_unit = _build(problem, integer=False, bottleneck_floor_s=bottleneck_floor_s)
    relaxed.solve(_make_solver(name, max(time_limit_s, LP_TIME_LIMIT_S)))
    if solver_status(relaxed.status, relaxed.sol_status) != "optimal":
        return 0.0
    fixed = sum(problem.stage_fixed_time_s(j) for j in range(problem.num_stages)) / problem.vpp
    return t_unit * pulp.value(relaxed.objective) + fixed


def _balance_chunks(problem: PartitionProblem, counts: tuple[dict[Recompute, int], ...]) -> tuple[dict[Recompute, int], ...]:
    """Spread each rank's blocks evenly over its virtual stages, as far as memory allows.

    The objective only sees rank times and the sum of stage times, both unchanged by moving blocks between the
    stages of one rank, while memory favours the stage with the fewest micro-batches in flight; so for vpp > 1 the
    ILP piles a rank's blocks on one chunk (1/1/1/13 was seen), which planner/schedule.simulate prices 30-37 %
    slower than even chunks. This keeps each rank's block count and modes (so the objective is identical) and
    moves from an even split towards the memory-minimal one (all extra blocks on the least-in-flight stage, which
    fits because the solver's placement fits) until the rank fits. Modes go largest activations to the stage
    with the fewest in flight (rearrangement inequality), the placement of least memory for given counts."""
    by_mode = {o.mode: o for o in problem.options}
    balanced = [dict(stage) for stage in counts]
    for r in range(problem.num_ranks):
        stages = sorted((j for j in range(problem.num_stages) if problem.stage_rank[j] == r), key=lambda j: problem.inflight[j])
        if len(stages) < 2:
            continue
        modes = sorted((m for j in stages for m, n in counts[j].items() for _ in range(n)), key=lambda m: -by_mode[m].act_bytes)
        blocks = [len(modes) // len(stages) + (i < len(modes) % len(stages)) for i in range(len(stages))]
        while True:
            slots = [j for j, k in zip(stages, blocks) for _ in range(k)]  # least in flight first
            placed = {j: {o.mode: 0 for o in problem.options} for j in stages}
            for j, m in zip(slots, modes):
                placed[j][m] += 1
            rank_bytes = sum(problem.stage_fixed_bytes(j) + sum(n * problem.block_bytes(j, by_mode[m]) for m, n in placed[j].items())
                             for j in stages)
            donors = [i for i in range(1, len(stages)) if blocks[i] > problem.min_blocks_per_stage]
            if rank_bytes <= problem.memory_cap_bytes or not donors:
                break
            blocks[donors[-1]] -= 1  # from the most-in-flight stage that can give one, to the least
            blocks[0] += 1
        for j in stages:
            balanced[j] = placed[j]
    return tuple(balanced)


def solve_partition(problem: PartitionProblem, time_limit_s: float = 10.0, solver: str | None = None) -> PartitionResult | None:
    """Best contiguous partition and per-stage recompute counts, or None when no partition fits in memory.

    ``solver``: "HiGHS" or "PULP_CBC_CMD"; by default HiGHS when highspy is installed.

    Example: 8 blocks on a 1F1B pipeline of 2 ranks, 4 micro-batches; stage 0 holds 2 in flight, stage 1 one:
        PartitionProblem(num_blocks=8, options=(BlockOption(Recompute.NONE, 1e-3, 2e8),
                         BlockOption(Recompute.FULL, 1.3e-3, 1e7)), block_static_bytes=1e8, num_stages=2,
                         stage_rank=(0, 1), inflight=(2, 1), num_microbatches=4, memory_cap_bytes=2.5e9)
    """
    start = time.perf_counter()
    name = solver or (HIGHS if pulp.HiGHS().available() else CBC)
    fallback_counts, fallback_peak = min_memory_partition(problem)
    if fallback_peak > problem.memory_cap_bytes:
        return None
    floor_s = min_bottleneck_s(problem, upper_s=max(evaluate(problem, fallback_counts).rank_time_s))
    prob, n, t_unit = _build(problem, integer=True, bottleneck_floor_s=floor_s)
    # highspy 1.16 prints a banner to the C-level stdout the first time a Highs() is built, ignoring
    # output_flag; stdout is data (`--json`)
    with fd_to_devnull(1):
        prob.solve(_make_solver(name, time_limit_s))
        status = solver_status(prob.status, prob.sol_status)
        counts = _integral_counts(problem, n) if status in ("optimal", "feasible") else None
        if counts is not None and max(evaluate(problem, counts).rank_memory_bytes) > problem.memory_cap_bytes * (1 + MEMORY_TOL):
            counts = None  # over the cap beyond the solver's feasibility tolerance: not a solution
        if counts is None:
            status, counts = "fallback", fallback_counts
        if problem.vpp > 1:
            counts = _balance_chunks(problem, counts)
        result = evaluate(problem, counts)
        if name == HIGHS and status in ("optimal", "feasible"):
            # HiGHS's incumbent and proven bound, both in its scaled units, so its feasibility tolerance on T
            # (~1e-7) does not read as a gap against our exact re-pricing
            info = prob.solverModel.getInfo()
            gap_s = t_unit * (info.objective_function_value - info.mip_dual_bound)
        elif status == "optimal":
            gap_s = 0.0  # CBC proved it with gap tolerances 0; pulp exposes no CBC bound
        else:
            gap_s = result.objective_s - _lower_bound_s(problem, name, time_limit_s, floor_s)
    gap = gap_s / result.objective_s if result.objective_s > 0 else 0.0
    gap = 0.0 if gap < GAP_NOISE else gap  # float round-off, or a bound a hair above the incumbent
    return PartitionResult(counts=counts, stage_time_s=result.stage_time_s, rank_time_s=result.rank_time_s,
                           rank_memory_bytes=result.rank_memory_bytes, objective_s=result.objective_s, solver=name,
                           status=status, gap=gap, time_s=time.perf_counter() - start)
