"""The DeviceMesh of a plan: one 3-D mesh whose axis order is the plan's ``mesh_order`` (outermost first).

Ranks are laid out as ``arange(world).view(*sizes in mesh_order)``. With 8 ranks, pp=2, dp=2, tp=2 and the
default order (pp, dp, tp): the TP groups are [0,1] [2,3] [4,5] [6,7], the DP groups [0,2] [1,3] [4,6] [5,7],
the pipeline groups [0,4] [1,5] [2,6] [3,7]. Nothing here is global: the mesh is built from the plan and
passed down.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from planner.plan import MeshAxis, Plan


@dataclass(frozen=True)
class ParallelMesh:
    mesh: DeviceMesh
    """The whole 3-D mesh, axes named "pp", "dp", "tp" in the plan's order."""

    def axis(self, name: MeshAxis) -> DeviceMesh:
        """The 1-D sub-mesh of one axis through this rank."""
        return self.mesh[str(name)]

    def rank(self, name: MeshAxis) -> int:
        return self.mesh.get_local_rank(str(name))

    def size(self, name: MeshAxis) -> int:
        return self.mesh.size(self.mesh.mesh_dim_names.index(str(name)))

    def group(self, name: MeshAxis) -> dist.ProcessGroup:
        return self.mesh.get_group(str(name))

    @property
    def pp_rank(self) -> int:
        return self.rank(MeshAxis.PP)

    @property
    def dp_rank(self) -> int:
        return self.rank(MeshAxis.DP)

    @property
    def tp_rank(self) -> int:
        return self.rank(MeshAxis.TP)


def build_mesh(plan: Plan, device_type: str) -> ParallelMesh:
    """The plan's mesh over the already-initialised default process group."""
    sizes = {MeshAxis.PP: plan.parallel.pp, MeshAxis.DP: plan.parallel.dp, MeshAxis.TP: plan.parallel.tp}
    shape = tuple(sizes[a] for a in plan.mesh_order)
    names = tuple(str(a) for a in plan.mesh_order)
    return ParallelMesh(init_device_mesh(device_type, shape, mesh_dim_names=names))
