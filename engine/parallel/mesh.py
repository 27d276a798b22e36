"""The job's one DeviceMesh, (pp, dp_replicate, dp_shard, cp, tp), and the sub-meshes and ranks
that collectives and the data loader use. A single process has no mesh: every parallel step is
then a no-op and collectives are skipped."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from engine.parallel.layout import DIMS, Layout


@dataclass(frozen=True)
class Mesh:
    """The layout and, with more than one rank, its DeviceMesh and the process groups of plain
    collectives: "dp" (the ranks that average gradients and sum loss tokens: data parallel,
    replicate and shard, and context parallel, flattened), "cp", "tp", "pp"."""

    layout: Layout
    mesh: DeviceMesh | None
    groups: dict[str, dist.ProcessGroup | None]

    def sub(self, *dims: str) -> DeviceMesh | None:
        """The sub-mesh over `dims` (e.g. "tp"), or None when those dimensions hold one rank."""
        if self.mesh is None or all(getattr(self.layout, d) == 1 for d in dims):
            return None
        return self.mesh[dims if len(dims) > 1 else dims[0]]

    def coordinate(self, dim: str) -> int:
        return 0 if self.mesh is None else self.mesh.get_local_rank(dim)

    @property
    def dp_rank(self) -> int:
        """Which share of a global batch this rank reads (the same on a TP group and across
        the pipeline stages of one model replica)."""
        return self.coordinate("dp_replicate") * self.layout.dp_shard + self.coordinate("dp_shard")


def build_mesh(layout: Layout, device: torch.device) -> Mesh:
    """The mesh over the initialised process group (whose size must be the layout's)."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world != layout.world_size:
        raise ValueError(f"the layout {layout.describe()} needs {layout.world_size} ranks; the "
                         f"job has {world}")
    if world == 1:
        return Mesh(layout, None, {"dp": None, "cp": None, "tp": None, "pp": None})
    mesh = init_device_mesh(device.type, layout.shape(), mesh_dim_names=DIMS)
    # every rank creates the same groups in the same order (group creation is collective)
    dp = mesh["dp_replicate", "dp_shard", "cp"]._flatten("dp")
    mesh["dp_shard", "cp"]._flatten("dp_shard_cp")  # FSDP shards over both (mesh["dp_shard_cp"])
    groups = {"dp": dp.get_group(), "cp": mesh["cp"].get_group(), "tp": mesh["tp"].get_group(),
              "pp": mesh["pp"].get_group()}
    sizes = {"dp": layout.dp_cp, "cp": layout.cp, "tp": layout.tp, "pp": layout.pp}
    return Mesh(layout, mesh, {k: g if sizes[k] > 1 else None for k, g in groups.items()})


def all_reduce_sum(t: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    if group is not None:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t
