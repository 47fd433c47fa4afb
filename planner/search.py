"""The search: enumerate (tp, pp, dp, vpp, micro-batch, recompute, sp, ZeRO, schedule, mesh order), prune with
cheap bounds, partition the survivors with the ILP, simulate them, and rank. Every configuration that is not
chosen is kept with the reason why (indivisible batch, unsupported by the runtime, out of memory by how much, or
provably slower than the plans kept)."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from functools import lru_cache

from planner.estimate import Config, Estimator
from planner.partition import PartitionProblem, PartitionResult, min_rank_memory_bytes, solve_partition
from planner.partition_bounds import min_bottleneck_s, rank_time_floor_s
from planner.plan import MeshAxis, Parallel, Plan, Schedule, SolverInfo, StagePlan
from planner.schedule import validate_schedule
from planner.specs import Recompute
from planner.support import unsupported_reason

GiB = 2**30
MAX_MICRO_BATCH = 32
MAX_VPP = 8
ALL_MODES = (Recompute.NONE, Recompute.SELECTIVE, Recompute.FULL)


@dataclass(frozen=True)
class Pins:
    """Dimensions fixed from the command line; None leaves them to the search."""

    tp: int | None = None
    pp: int | None = None
    dp: int | None = None
    vpp: int | None = None
    mbs: int | None = None
    recompute: Recompute | None = None
    sp: bool | None = None
    zero: int | None = None
    schedule: Schedule | None = None


@dataclass(frozen=True)
class Rejected:
    config: dict
    kind: str  # "indivisible" | "unsupported" | "oom" | "dominated" | "screened" | "slower"
    reason: str
    shortfall_bytes: float = 0.0


@dataclass
class SolveResult:
    plans: list[Plan]
    rejected: list[Rejected]
    solve_time_s: float
    ilp_calls: int = 0
    considered: int = 0
    notes: list[str] = field(default_factory=list)

    def no_fit_message(self) -> str:
        """Why nothing fits, naming the binding constraint and the nearest fix."""
        ooms = [r for r in self.rejected if r.kind == "oom"]
        if ooms:
            near = min(ooms, key=lambda r: r.shortfall_bytes)
            c = near.config
            return (f"no plan fits in memory: the closest (tp={c['tp']} pp={c['pp']} dp={c['dp']} mbs={c['mbs']} "
                    f"recompute={c['recompute']} zero={c['zero']}) needs {near.shortfall_bytes / GiB:.2f} GiB more per "
                    f"GPU; use more GPUs, --recompute full, a smaller --mbs, or a higher --zero")
        kinds = sorted({r.kind for r in self.rejected})
        first = self.rejected[0].reason if self.rejected else "no configuration to try"
        return f"no plan fits: every configuration was rejected ({', '.join(kinds) or 'none'}), e.g. {first}"


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def enumerate_configs(est: Estimator, pins: Pins) -> tuple[list[Config], list[Rejected]]:
    model, cluster, train = est.model, est.cluster, est.train
    n, per_node = cluster.num_gpus, cluster.gpus_per_node
    configs: list[Config] = []
    rejected: list[Rejected] = []

    def reject(kind: str, reason: str, **cfg) -> None:
        rejected.append(Rejected(config=cfg, kind=kind, reason=reason))

    tps = [pins.tp] if pins.tp else [t for t in divisors(min(per_node, n)) if n % t == 0]
    for tp in tps:
        if model.num_heads % tp or model.kv_heads % tp or model.ffn % tp:
            reject("indivisible", f"tp {tp} does not divide the heads ({model.num_heads}, kv {model.kv_heads}) or ffn", tp=tp)
            continue
        if n % tp:
            reject("indivisible", f"tp {tp} does not divide {n} GPUs", tp=tp)
            continue
        pps = [pins.pp] if pins.pp else [p for p in divisors(n // tp) if p <= model.num_layers]
        for pp in pps:
            if (n // tp) % pp:
                reject("indivisible", f"tp({tp}) * pp({pp}) does not divide {n} GPUs", tp=tp, pp=pp)
                continue
            dp = n // (tp * pp)
            if pins.dp and pins.dp != dp:
                reject("indivisible", f"pp({pp}) * dp({pins.dp}) * tp({tp}) != {n} GPUs", tp=tp, pp=pp, dp=pins.dp)
                continue
            if train.global_batch % dp:
                reject("indivisible", f"global batch {train.global_batch} is not divisible by dp {dp}", tp=tp, pp=pp, dp=dp)
                continue
            local = train.global_batch // dp
            mbss = [pins.mbs] if pins.mbs else [d for d in divisors(local) if d <= MAX_MICRO_BATCH]
            for mbs in mbss:
                if local % mbs:
                    reject("indivisible", f"batch per replica {local} is not divisible by micro-batch {mbs}",
                           tp=tp, pp=pp, dp=dp, mbs=mbs)
                    continue
                m = local // mbs
                _expand(est, pins, configs, rejected, tp, pp, dp, mbs, m)
    return configs, rejected


def _expand(est: Estimator, pins: Pins, configs: list, rejected: list, tp: int, pp: int, dp: int, mbs: int, m: int) -> None:
    model, per_node = est.model, est.cluster.gpus_per_node
    schedules = [pins.schedule] if pins.schedule else (
        [Schedule.ONE_F_ONE_B] if pp == 1 else [Schedule.ONE_F_ONE_B, Schedule.GPIPE, Schedule.INTERLEAVED])
    sps = [pins.sp] if pins.sp is not None else ([False, True] if tp > 1 else [False])
    zeros = [pins.zero] if pins.zero is not None else ([0, 1, 2, 3] if dp > 1 else [0])
    if dp == 1 and zeros != [0]:  # ZeRO shards over the data-parallel ranks: with one there is nothing to shard
        rejected.append(Rejected(config=dict(tp=tp, pp=pp, dp=dp, mbs=mbs, zero=zeros[0]), kind="unsupported",
                                 reason=f"zero {zeros[0]} shards over data-parallel ranks, but dp is 1"))
        return
    modes = (pins.recompute,) if pins.recompute else ALL_MODES
    orders = [(MeshAxis.PP, MeshAxis.DP, MeshAxis.TP)]
    if pp > 1 and dp > 1 and tp < per_node:  # whether pipeline or data-parallel neighbours share a node matters
        orders.append((MeshAxis.DP, MeshAxis.PP, MeshAxis.TP))
    for schedule in schedules:
        if schedule == Schedule.INTERLEAVED:
            vpps = [pins.vpp] if pins.vpp else [v for v in range(2, MAX_VPP + 1) if pp * v <= model.num_layers]
        else:
            vpps = [pins.vpp or 1]
        for vpp in vpps:
            base = dict(tp=tp, pp=pp, dp=dp, mbs=mbs, microbatches=m, vpp=vpp, schedule=str(schedule))
            why = _schedule_reason(schedule, pp, vpp, m, model.num_layers)
            if why:
                rejected.append(Rejected(config=base, kind="unsupported", reason=why))
                continue
            for sp in sps:
                why = est.unavailable(tp, sp, mbs)
                if why:
                    rejected.append(Rejected(config={**base, "sp": sp}, kind="unsupported", reason=why))
                    continue
                for zero in zeros:
                    par = Parallel(tp=tp, pp=pp, dp=dp, vpp=vpp, sp=sp)
                    why = unsupported_reason(par, zero, schedule, m, model)
                    if why:
                        rejected.append(Rejected(config={**base, "sp": sp, "zero": zero}, kind="unsupported", reason=why))
                        continue
                    for order in orders:
                        configs.append(Config(tp=tp, pp=pp, dp=dp, vpp=vpp, sp=sp, micro_batch_size=mbs,
                                              num_microbatches=m, zero=zero, schedule=schedule,
                                              recompute=modes, mesh_order=order))


@lru_cache(maxsize=4096)
def _schedule_reason(schedule: Schedule, pp: int, vpp: int, m: int, layers: int) -> str | None:
    if pp * vpp > layers:
        return f"pp({pp}) * vpp({vpp}) stages exceed the model's {layers} blocks"
    return validate_schedule(schedule, pp, vpp, m)


def uniform_pipeline_s(est: Estimator, c: Config, rank_time_s: float) -> float:
    """(m + (p - 1)/v) micro-batch steps of one rank's time (Narayanan et al. 2021, section 2.2: the bubble of
    uniform stages) plus the optimizer step of an even share of the model."""
    return ((c.num_microbatches + (c.pp - 1) / c.vpp) * rank_time_s
            + est.optimizer_step_s(est.model.total_params / (c.tp * c.pp), c))


def static_memory_floor_bytes(est: Estimator, c: Config) -> float:
    """Weights, gradients and optimizer state of an even share of the model on one GPU: no partition holds less
    on its fullest rank."""
    w, g, o = est.held_bytes_per_param(c)
    return est.model.total_params / (c.tp * c.pp) * (w + g + o)


def time_lower_bound_s(est: Estimator, c: Config, problem: PartitionProblem, bottleneck_s: float = 0.0) -> float:
    """A step can be no faster than the pipeline over perfectly even stages run in the fastest mode: (m + (p-1)/v)
    micro-batch steps of the mean rank's work (the uniform-stage bubble, Narayanan et al. 2021 section 2.2; uneven
    stages only lengthen it), nor than m steps of the least achievable bottleneck rank (bottleneck_s, from
    partition_bounds.min_bottleneck_s under the memory cap), plus the optimizer step of an even share."""
    fastest = min(o.time_s for o in problem.options)
    work = problem.num_blocks * fastest + problem.first_time_s + problem.last_time_s
    return max(uniform_pipeline_s(est, c, work / c.pp),
               c.num_microbatches * bottleneck_s + uniform_pipeline_s(est, c, 0.0))


SHORTLIST_FACTOR, SHORTLIST_MIN = 4, 16  # partition + simulate at most max(4 k, 16) candidates
REFINE = 200  # candidates whose quick estimate is sharpened before the shortlist is cut


def _screen(est: Estimator, scored: list, rejected: list[Rejected], keep: int) -> list:
    """Keep the `keep` candidates with the best even-split estimate: each rank holds an even share of the
    blocks in the fastest recompute mix that fits its memory (partition_bounds.rank_time_floor_s), priced as
    (m + (p - 1)/v) steps of the slowest rank plus the optimizer step. Only the REFINE best quick estimates are
    sharpened; the rest are out with their quick estimate as the reason. Screening is a heuristic, not a
    proof: `mpplan solve --exhaustive` partitions every candidate the bounds do not exclude."""
    refined = []
    for i, (quick, bound, c, comm, problem) in enumerate(scored):
        if i >= REFINE:
            rejected.append(Rejected(config=c.summary(), kind="screened",
                                     reason=f"estimated {quick:.3g} s/step, not among the {REFINE} best estimates"))
            continue
        base, extra = divmod(problem.num_blocks, c.pp)
        slowest = max(rank_time_floor_s(problem, [j for j in range(problem.num_stages) if problem.stage_rank[j] == r],
                                        base + (r < extra)) for r in range(c.pp))
        guess = uniform_pipeline_s(est, c, slowest)
        refined.append((guess, bound, c, comm, problem))
    refined.sort(key=lambda x: x[0])
    for guess, _, c, _, _ in refined[keep:]:
        rejected.append(Rejected(config=c.summary(), kind="screened",
                                 reason=f"estimated {guess:.3g} s/step with even stages, not among the {keep} best"))
    return refined[:keep]


def _best_mesh_orders(est: Estimator, configs: list[Config], rejected: list[Rejected]) -> list[Config]:
    """Configurations that differ only in mesh order move the same bytes; keep the order whose pipeline and
    data-parallel traffic is cheapest on this topology (per step: 2 p2p per micro-batch and the DP reduction)."""
    best: dict[tuple, tuple[float, Config]] = {}
    for c in configs:
        key = replace(c, mesh_order=(MeshAxis.PP, MeshAxis.DP, MeshAxis.TP))
        comm = est.comm(c)
        cost = 2 * c.num_microbatches * comm.p2p_s + comm.dp_step_s
        if key not in best or cost < best[key][0] - 1e-12:
            if key in best:
                _dominated(rejected, best[key][1], c, "its mesh order moves the same data over slower links")
            best[key] = (cost, c)
        else:
            _dominated(rejected, c, best[key][1], "its mesh order moves the same data over slower links")
    return [c for _, c in best.values()]


def _drop_needless_zero(candidates: list, rejected: list[Rejected]) -> list:
    """ZeRO stages that the cost model can never prefer. ZeRO 1 (all-reduce, then an all-gather of the updated
    shards) moves more data than ZeRO 2 (reduce-scatter + all-gather), shards the optimizer the same way and holds
    more: it goes wherever ZeRO 2 is a candidate. ZeRO 3 adds per-micro-batch weight gathers to ZeRO 2 with the
    same optimizer sharding: it goes where ZeRO 2 already fits with every block in the fastest mode.
    (ZeRO 0 is not dominated: it moves as much as ZeRO 2 but runs the whole optimizer step on every rank.)"""
    zero2: dict[Config, bool] = {}
    for c, _, problem in candidates:
        if c.zero == 2:
            zero2[replace(c, zero=0)] = fits_in_one_mode(problem, min(problem.options, key=lambda o: o.time_s))
    kept = []
    for item in candidates:
        c = item[0]
        key = replace(c, zero=0)
        if c.zero == 1 and key in zero2:
            _dominated(rejected, c, replace(c, zero=2), "zero 2 shards the optimizer alike, holds less and moves less")
        elif c.zero == 3 and zero2.get(key):
            _dominated(rejected, c, replace(c, zero=2), "zero 2 already fits without recompute; zero 3 only adds "
                       "weight gathers")
        else:
            kept.append(item)
    return kept


def _dominated(rejected: list[Rejected], loser: Config, winner: Config, why: str) -> None:
    rejected.append(Rejected(config=loser.summary(), kind="dominated", reason=why))


@lru_cache(maxsize=65536)
def fits_in_one_mode(problem: PartitionProblem, option) -> bool:
    """Whether some partition fits with every block in this one recompute mode (cached: asked by the ZeRO
    dominance check and again by the quick estimate)."""
    return min_rank_memory_bytes(replace(problem, options=(option,))) <= problem.memory_cap_bytes


def quick_estimate_s(c: Config, problem: PartitionProblem) -> float:
    """A cheap guess of the step time, used to order the candidates (and to cut those past REFINE): an even
    split in the fastest single recompute mode that fits, priced with the uniform-stage bubble
    (Narayanan et al. 2021 eq. for interleaved: (m + (p - 1) / v) micro-batch steps)."""
    t = max(o.time_s for o in problem.options)
    for option in sorted(problem.options, key=lambda o: o.time_s):
        if fits_in_one_mode(problem, option):
            t = option.time_s
            break
    work = problem.num_blocks * t + problem.first_time_s + problem.last_time_s
    return (c.num_microbatches + (c.pp - 1) / c.vpp) * work / c.pp


def solve(est: Estimator, pins: Pins = Pins(), top_k: int | None = 5, time_limit_s: float = 10.0,
          exhaustive: bool = False) -> SolveResult:
    """Rank the configurations; top_k=None keeps every feasible plan (no pruning by bound).

    Candidates are ordered by a quick estimate and, unless exhaustive, screened to a shortlist by a sharper
    estimate (even stages, the fastest recompute mix that fits each rank; see _screen). The shortlist is then
    branch-and-bound: a candidate is skipped, with its bound as the reason, once a lower bound on its step time
    (the fastest-mode work per rank with the bubble, then the exact least bottleneck under the memory cap)
    reaches the k-th best plan found so far; the rest get the ILP partition and the simulated schedule."""
    start = time.perf_counter()
    configs, rejected = enumerate_configs(est, pins)
    candidates = []
    cap = est.memory_cap_bytes()
    for c in _best_mesh_orders(est, configs, rejected):
        static = static_memory_floor_bytes(est, c)
        if static > cap:  # cheaper than building the partition problem, and never wrong: the weights alone
            rejected.append(Rejected(config=c.summary(), kind="oom", shortfall_bytes=static - cap,
                                     reason=f"out of memory by at least {(static - cap) / GiB:.2f} GiB per GPU "
                                            f"(weights, gradients and optimizer state alone)"))
            continue
        comm = est.comm(c)
        problem = est.partition_problem(c, comm)
        need = min_rank_memory_bytes(problem)
        if need > problem.memory_cap_bytes:
            short = need - problem.memory_cap_bytes
            rejected.append(Rejected(config=c.summary(), kind="oom", shortfall_bytes=short,
                                     reason=f"out of memory by {short / GiB:.2f} GiB per GPU at best"))
            continue
        candidates.append((c, comm, problem))
    scored = [(quick_estimate_s(c, p), time_lower_bound_s(est, c, p), c, comm, p)
              for c, comm, p in _drop_needless_zero(candidates, rejected)]
    scored.sort(key=lambda x: x[0])
    if top_k and not exhaustive:
        scored = _screen(est, scored, rejected, max(SHORTLIST_FACTOR * top_k, SHORTLIST_MIN))
    plans: list[Plan] = []
    kth = math.inf
    ilp_calls = 0
    for _, bound, c, comm, problem in scored:
        if top_k and len(plans) >= top_k:
            if bound < kth:  # the cheap bound does not decide: add the exact least bottleneck under the memory cap
                # (without the stage hand-offs, which the simulator overlaps rather than adds: a bound must not
                # count them)
                floor = min_bottleneck_s(replace(problem, boundary_time_s=0.0), kth / c.num_microbatches)
                bound = time_lower_bound_s(est, c, problem, floor)
            if bound >= kth:
                rejected.append(Rejected(config=c.summary(), kind="slower",
                                         reason=f"at least {bound:.3g} s/step, slower than the top {top_k} ({kth:.3g} s)"))
                continue
        ilp_calls += 1
        part = solve_partition(problem, time_limit_s=time_limit_s)
        if part is None:  # cannot happen after the exact memory check above; kept as a guard
            rejected.append(Rejected(config=c.summary(), kind="oom", reason="no stage partition fits in memory"))
            continue
        plan = build_plan(est, c, part, comm)
        if len(c.recompute) > 1 and plan.recompute != "none":
            # The mixed problem reserves the transient of a recomputing block's backward; without any recompute
            # nothing is reserved, so "none everywhere" may fit where the mixed problem said it would not.
            plain = replace(c, recompute=(Recompute.NONE,))
            plain_problem = est.partition_problem(plain, comm)
            if min_rank_memory_bytes(plain_problem) <= plain_problem.memory_cap_bytes:
                ilp_calls += 1
                plain_part = solve_partition(plain_problem, time_limit_s=time_limit_s)
                if plain_part is not None:
                    other = build_plan(est, plain, plain_part, comm)
                    if other.predicted.step_time_s < plan.predicted.step_time_s:
                        plan = other
        plans.append(plan)
        if top_k and len(plans) >= top_k:
            plans.sort(key=lambda p: p.predicted.step_time_s)
            kth = plans[top_k - 1].predicted.step_time_s
    plans.sort(key=lambda p: (p.predicted.step_time_s, p.predicted.peak_memory_bytes))
    if top_k:
        for p in plans[top_k:]:
            rejected.append(Rejected(config=plan_summary(p), kind="slower",
                                     reason=f"{p.predicted.step_time_s:.3g} s/step, below the top {top_k}"))
        plans = plans[:top_k]
    return SolveResult(plans=plans, rejected=rejected, solve_time_s=time.perf_counter() - start,
                       ilp_calls=ilp_calls, considered=len(configs))


def build_plan(est: Estimator, c: Config, part: PartitionResult, comm) -> Plan:
    stages = [StagePlan(layers=layers, recompute={m: k for m, k in counts.items() if k})
              for layers, counts in zip(part.block_ranges(), part.counts)]
    used = {m for counts in part.counts for m, k in counts.items() if k}
    summary = str(next(iter(used))) if len(used) == 1 else ("none" if not used else "mixed")
    return Plan(model=est.model, cluster=est.cluster, train=est.train,
                parallel=Parallel(tp=c.tp, pp=c.pp, dp=c.dp, vpp=c.vpp, sp=c.sp),
                micro_batch_size=c.micro_batch_size, num_microbatches=c.num_microbatches, recompute=summary,
                zero=c.zero, schedule=c.schedule, mesh_order=c.mesh_order, stages=stages,
                predicted=est.predict(c, part, comm),
                solver=SolverInfo(solver=part.solver, status=part.status, gap=part.gap, time_s=part.time_s),
                cost_source=est.costs.source)


def plan_summary(p: Plan) -> dict:
    par = p.parallel
    return {"tp": par.tp, "pp": par.pp, "dp": par.dp, "vpp": par.vpp, "sp": par.sp, "mbs": p.micro_batch_size,
            "microbatches": p.num_microbatches, "zero": p.zero, "schedule": str(p.schedule), "recompute": p.recompute,
            "mesh_order": "-".join(p.mesh_order)}
