"""Turn `mpplan solve` arguments into specs and an estimator (defaults said out loud), then search."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from planner.costmodel import RuntimeTraits
from planner.estimate import Estimator
from planner.profile import Profile, check_profile_matches, load_profile
from planner.profiled import ProfiledCosts
from planner.search import Pins, SolveResult, solve
from planner.specs import (ClusterSpec, ModelSpec, Precision, SpecError, TrainSpec, load_cluster, load_model,
                           with_seq_len)
from planner.topology import Topology

DEFAULT_MODEL, DEFAULT_CLUSTER, DEFAULT_BATCH = "gpt3-13b", "dgx-a100", 512
LOCAL_MODEL, LOCAL_CLUSTER, LOCAL_BATCH = "tiny-gpt", "local", 16


@dataclass
class SolveRequest:
    model: ModelSpec
    cluster: ClusterSpec
    train: TrainSpec
    profile: Profile | None = None
    notes: list[str] = field(default_factory=list)

    @classmethod
    def build(cls, gpus: int, model: str | None = None, cluster: str | None = None, global_batch: int | None = None,
              seq_len: int | None = None, profile: Path | str | None = None,
              memory_limit: int | None = None) -> "SolveRequest":
        notes: list[str] = []
        prof = load_profile(profile) if profile else None
        if cluster is None:
            cluster = LOCAL_CLUSTER if prof else DEFAULT_CLUSTER
            notes.append(f"cluster: {cluster} (default)")
        local = cluster == LOCAL_CLUSTER
        if local and prof is None:
            raise SpecError("--cluster local takes its costs from a profile: run `mpplan profile --out profile.json` "
                            "and pass --profile profile.json")
        if model is None:
            spec = prof.model if prof else load_model(LOCAL_MODEL if local else DEFAULT_MODEL)
            notes.append(f"model: {spec.name} ({'from the profile' if prof else 'default'})")
            spec = with_seq_len(spec, seq_len)
        else:
            spec = load_model(model, seq_len)
        if prof:
            check_profile_matches(prof, spec, str(profile))
        if global_batch is None:
            global_batch = LOCAL_BATCH if local else DEFAULT_BATCH
            notes.append(f"global batch: {global_batch} sequences (default)")
        if global_batch <= 0:
            raise SpecError(f"--global-batch {global_batch}: must be positive")
        cl = load_cluster(cluster, gpus)
        if memory_limit is not None:
            if memory_limit <= 0:
                raise SpecError(f"--memory-limit {memory_limit}: must be positive")
            cl = ClusterSpec.model_validate({**cl.model_dump(), "gpu": {**cl.gpu.model_dump(), "memory_gb": memory_limit / 1e9}})
        if prof and prof.device.matmul_tflops > 0:  # MFU against what this device was measured to do
            cl = ClusterSpec.model_validate({**cl.model_dump(), "gpu": {**cl.gpu.model_dump(),
                                                                       "peak_tflops": prof.device.matmul_tflops}})
        precision = prof.precision if prof else Precision.BF16
        return cls(model=spec, cluster=cl, train=TrainSpec(global_batch=global_batch, precision=precision),
                   profile=prof, notes=notes)

    def estimator(self, traits: RuntimeTraits = RuntimeTraits()) -> Estimator:
        if self.profile is None:
            return Estimator(self.model, self.cluster, self.train, traits=traits)
        fitted = {(c.op, c.group_size): (c.alpha_s, c.beta_s_per_byte) for c in self.profile.collectives}
        return Estimator(self.model, self.cluster, self.train, costs=ProfiledCosts(self.profile, self.cluster.gpu),
                         traits=traits,
                         topology=Topology(self.cluster, fitted_costs=fitted,
                                           fitted_time={(c.op, c.group_size): c.expected_s
                                                       for c in self.profile.collectives}),
                         device=self.profile.device.device)


def run_solve(req: SolveRequest, pins: Pins = Pins(), top_k: int | None = 5,
              traits: RuntimeTraits = RuntimeTraits(), exhaustive: bool = False) -> SolveResult:
    result = solve(req.estimator(traits), pins, top_k=top_k, exhaustive=exhaustive)
    result.notes = [f"defaults used: {', '.join(req.notes)}"] if req.notes else []
    return result
