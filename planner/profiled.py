"""Layer costs measured by `mpplan profile` (planner/profile.py), in the same LayerCost records as the analytic
roofline, so the search cannot tell them apart. Collectives measured there replace the α-β numbers of the
topology (planner/topology.py, fitted_costs)."""
from __future__ import annotations

import statistics
from dataclasses import replace
from functools import lru_cache

from planner.costmodel import LayerCost
from planner.profile import LayerProfile, Profile, whole_model_sum
from planner.specs import GPUSpec, Recompute


class ProfiledCosts:
    source = "profile"

    def __init__(self, profile: Profile, gpu: GPUSpec):
        self.profile, self.model, self.gpu = profile, profile.model, gpu
        self.elem_bytes = 4 if profile.precision == "fp32" else 2
        # What the runtime adds to the layers, from the profile's single-rank calibration runs
        # (runtime/profile_runtime.py); neutral when the profile has none. planner/estimate.py reads these.
        rt = profile.runtime
        self.step_overhead_s = rt.step_overhead_s if rt else 0.0
        self.optimizer_s_per_param = rt.optimizer_s_per_param if rt else 0.0
        self.runtime_fixed_bytes = rt.fixed_bytes if rt else 0
        self.activation_peak_factor = rt.activation_peak_factor if rt else 1.0
        # A whole-model micro-batch took this much longer than its layers timed one by one (a fixed cost of the
        # loop, runtime/profile_runtime.py): each pipeline stage pays its share of it, in proportion to its own
        # forward and backward (charging the whole model's figure to every virtual stage priced an interleaved
        # plan with 4 stages per rank at twice what it ran)
        self.microbatch_overhead_s = rt.microbatch_overhead_s if rt else 0.0
        self.microbatch_overhead_by_mbs = dict(sorted(rt.microbatch_overhead_by_mbs.items())) if rt else {}
        # a gradient reduction meets ranks that were computing: what that adds to a collective (0 if not measured)
        self.collective_after_compute_s = profile.collective_after_compute_s or 0.0
        self.ddp_bucket_after_compute_s = self._ddp_bucket_after_compute_s()
        self.block = lru_cache(maxsize=None)(self._block)
        self.embedding = lru_cache(maxsize=None)(self._embedding)
        self.head = lru_cache(maxsize=None)(self._head)
        self.layer_overhead_fraction = lru_cache(maxsize=None)(self._layer_overhead_fraction)

    def microbatch_overhead_at(self, mbs: int) -> float:
        """The per-micro-batch overhead at ``mbs``: linear between the calibrated sizes, the nearest one's outside
        them; the one figure where a single size was calibrated. It grows with the micro-batch: tiny-gpt's
        whole-model micro-batch ran 0.4-0.8 ms over its layers at mbs 1 and 0.6-2.7 ms (mean 1.8) at mbs 4 (six
        calibrations of one profile, 2026-12-03), and its single-rank steps at mbs 4 x 2 took 32-34 ms where a
        fixed 0.4-0.9 ms priced 29-30 ms."""
        points = self.microbatch_overhead_by_mbs
        if len(points) < 2:
            return self.microbatch_overhead_s
        sizes = list(points)
        if mbs <= sizes[0] or mbs >= sizes[-1]:
            return points[sizes[0] if mbs <= sizes[0] else sizes[-1]]
        hi = next(i for i, m in enumerate(sizes) if m >= mbs)
        lo_m, hi_m = sizes[hi - 1], sizes[hi]
        return points[lo_m] + (points[hi_m] - points[lo_m]) * (mbs - lo_m) / (hi_m - lo_m)

    def _layer_overhead_fraction(self, mbs: int) -> float:
        """The per-micro-batch overhead at ``mbs`` as a share of the whole model's layers there, so that each
        pipeline stage pays in proportion to its work. (Held at the calibration's micro-batch size instead of
        re-taken at ``mbs``, it once priced 2-rank DP plans at mbs 2 and 4 12-19 % over what they ran.)"""
        overhead = self.microbatch_overhead_at(mbs)
        if overhead <= 0:
            return 0.0
        layers_s = whole_model_sum(self.profile.layers, self.profile.model, mbs, "time")
        return overhead / layers_s if layers_s else 0.0

    def available(self, tp: int, sp: bool, mbs: int) -> str | None:
        """Why this (tp, sp, mbs) cannot be priced from the profile, or None."""
        if sp:
            return "sequence parallel was not profiled (the profile measures TP shards without SP)"
        for kind in ("block", "embedding", "head"):
            if self.profile.layer(kind, tp, mbs) is None:
                tps = sorted({lp.tp for lp in self.profile.layers})
                mbss = sorted({lp.micro_batch_size for lp in self.profile.layers})
                return f"{kind} at tp {tp} x mbs {mbs} was not profiled (profiled tp {tps}, mbs {mbss})"
        missing = set(Recompute) - set(self.profile.layer("block", tp, mbs).activation_bytes)
        if missing:
            return f"the profiled block at tp {tp} x mbs {mbs} has no activation bytes for {sorted(missing)}"
        return None

    def fsdp_block_extra_s(self, zero: int, dp: int, mbs: int) -> float | None:
        """What FSDP2 adds to one block's forward + backward in a non-reducing micro-batch: its parameter gathers
        and hooks, measured (runtime/profile_tp.py) less the plain block; None when not measured. They move
        parameters, not activations, so ``mbs`` does not change them: the mean over every profiled micro-batch size
        (measured here: 5.6-6.1 ms a block at mbs 1, 2 and 4 over 45 samples each; 3.3-7.7 ms from 9) is a
        steadier price than the one size's."""
        extras = [real.fwd_s + real.bwd_s - plain.fwd_s - plain.bwd_s
                  for real in self.profile.fsdp_blocks if (real.zero, real.dp) == (zero, dp)
                  if (plain := self.profile.layer("block", 1, real.micro_batch_size)) is not None]
        return max(0.0, statistics.fmean(extras)) if extras else None

    def _ddp_bucket_after_compute_s(self) -> float | None:
        """What each DDP bucket's all-reduce costs beyond its fit's mean call (expected_s), from the timed DDP step
        (runtime/profile_ddp.py): the step's excess less its buckets' calls, shared evenly, floored at 0; None
        when the profile has no DDP timing or no all-reduce fit over its ranks."""
        ddp = self.profile.ddp_sync
        fit = self.profile.collective("all_reduce", ddp.dp) if ddp else None
        if ddp is None or fit is None:
            return None
        calls = sum(fit.expected_s(b) for b in ddp.bucket_bytes)
        return max(0.0, (ddp.excess_s - calls) / len(ddp.bucket_bytes))

    def pipeline_transfer_s(self, nbytes: float, schedule: str) -> float | None:
        """One pipeline hand-off of ``nbytes`` as the pipelining runtime pays it under ``schedule``: the
        profile's measured hand-off (runtime/profile_pipeline.py) moved along the send_recv fit to this size (never
        below the fit itself); None when the profile did not time hand-offs."""
        cal, fit = self.profile.pipeline, self.profile.collective("send_recv", 2)
        if cal is None:
            return None
        measured = cal.receive_s(schedule)
        if fit is None:
            return measured
        return max(fit.time_s(nbytes), measured + fit.time_s(nbytes) - fit.time_s(cal.message_bytes))

    def memory_time_s(self, nbytes: float) -> float:
        return nbytes / (self.gpu.hbm_GBps * 1e9)

    def _tp_comm_bytes(self, mbs: int) -> float:
        """Bytes of one TP collective: a micro-batch's activations (tokens x hidden)."""
        return self.elem_bytes * mbs * self.model.seq_len * self.model.hidden_size

    def _cost(self, lp: LayerProfile, collectives: int) -> LayerCost:
        return LayerCost(fwd_s=lp.fwd_s, bwd_s=lp.bwd_s, recompute_extra_s=dict(lp.recompute_extra_s),
                         params=lp.params,
                         act_bytes={Recompute(k): float(v) * self.activation_peak_factor
                                    for k, v in lp.activation_bytes.items()},
                         tp_comm_bytes=self._tp_comm_bytes(lp.micro_batch_size),
                         tp_collectives=collectives if lp.tp > 1 else 0)

    def _layer(self, kind: str, tp: int, mbs: int) -> LayerProfile:
        lp = self.profile.layer(kind, tp, mbs)
        if lp is None:
            raise KeyError(f"{kind} tp={tp} mbs={mbs} not in the profile")
        return lp

    def tp_wrapper_extra_s(self, tp: int, mbs: int) -> tuple[float, float] | None:
        """What DTensor adds to a TP block's forward and backward at micro-batch size ``mbs`` beyond its shard and
        its collectives (Python dispatch of every sharded op, redistributes): the measured block
        (runtime/profile_tp.py) less the shard and the all-reduces as the estimator prices them (fit + mean stall;
        two in forward, two in backward, Megatron-LM's f / g, Shoeybi et al. 2019 section 3), as a line in the
        micro-batch size fitted over every profiled size that never falls (rising_line); None when no TP block
        was timed. The dispatch is a fixed cost per op and the redistributes move activations, so the extra should
        not fall as the micro-batch grows: wide-gpt's grew 3.1 / 4.6 / 6.1 ms (forward) at mbs 1 / 2 / 4, and one
        mean for all sizes priced its TP plans at mbs 1 27-49 % over what they ran. tiny-gpt's is dispatch
        alone, and one size's timing is noisy (14.0 / 23.6 / 24.0 ms at mbs 1 / 2 / 4 in one profile, cv 0.2-0.5,
        where the runs paid ~13-16 ms a block at every size): fitted over the sizes, each price leans on all of
        them, and a falling fit is their mean."""
        fit = self.profile.collective("all_reduce", tp)
        fwd, bwd = [], []
        for real in self.profile.tp_blocks:
            shard = self.profile.layer("block", tp, real.micro_batch_size)
            if real.tp != tp or shard is None:
                continue
            reduce_s = fit.expected_s(self._tp_comm_bytes(real.micro_batch_size)) if fit else 0.0
            fwd.append((real.micro_batch_size, real.fwd_s - shard.fwd_s - 2 * reduce_s))
            bwd.append((real.micro_batch_size, real.bwd_s - shard.bwd_s - 2 * reduce_s))
        if not fwd:
            return None
        return tuple(max(0.0, a + b * mbs) for a, b in (rising_line(fwd), rising_line(bwd)))

    def _block(self, tp: int, sp: bool, mbs: int) -> LayerCost:
        shard = self._layer("block", tp, mbs)
        cost = self._cost(shard, 2)
        if Recompute.NONE not in cost.recompute_extra_s:
            cost.recompute_extra_s[Recompute.NONE] = 0.0
        wrapper = self.tp_wrapper_extra_s(tp, mbs) if tp > 1 else None
        if wrapper is not None:
            # Timed as the runtime runs it (DTensor over tp ranks): the shard + fitted collectives missed DTensor's
            # dispatch, which the measurement adds. Full recompute repeats the forward's dispatch too (and the
            # estimator its all-reduces). Without an all-reduce fit the measurement holds the collectives.
            fwd_extra, bwd_extra = wrapper
            extra = dict(cost.recompute_extra_s)
            if Recompute.FULL in extra:
                extra[Recompute.FULL] += fwd_extra
            collectives = 2 if self.profile.collective("all_reduce", tp) else 0
            cost = replace(cost, fwd_s=shard.fwd_s + fwd_extra, bwd_s=shard.bwd_s + bwd_extra,
                           tp_collectives=collectives, recompute_extra_s=extra)
        return cost

    def _embedding(self, tp: int, sp: bool, mbs: int) -> LayerCost:
        return self._cost(self._layer("embedding", tp, mbs), 1)

    def _head(self, tp: int, sp: bool, mbs: int) -> LayerCost:
        return self._cost(self._layer("head", tp, mbs), 1)


def rising_line(points: list[tuple[float, float]]) -> tuple[float, float]:
    """(a, b) of the least-squares line y = a + b x through ``points`` (x, y) with b >= 0: where the best line
    falls (or all x are equal) b = 0 and a is the mean of y, the best line that does not fall."""
    xs, ys = [x for x, _ in points], [y for _, y in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in points) / sxx if sxx > 0 else 0.0
    slope = max(0.0, slope)
    return my - slope * mx, slope
