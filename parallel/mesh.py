"""The (pp, dp, cp, tp) device mesh: tp innermost, then cp, pp outermost.

Adjacent ranks share a tp group, so tensor parallelism (the most
communication-heavy dimension) stays inside a node, as in Megatron-LM and
torchtitan; context parallelism's K/V all-gathers come next. The dp and cp
ranks of one (pp, tp) position hold the same weights: data parallelism
reduces gradients (and FSDP2 shards parameters) over dp x cp, which
`model_meshes` gives as one dimension.
"""

import contextlib
from dataclasses import dataclass

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

MESH_DIMS = ("pp", "dp", "cp", "tp")


@dataclass(frozen=True)
class ParallelDims:
    tp: int
    pp: int
    dp: int
    cp: int = 1

    @classmethod
    def of(cls, par) -> "ParallelDims":
        """From the `parallel:` config group (a config without `cp` has cp=1)."""
        return cls(par.tp, par.pp, par.dp, getattr(par, "cp", 1))

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp * self.cp

    def coords(self, rank: int) -> dict[str, int]:
        """This rank's (pp, dp, cp, tp) coordinates in the mesh."""
        return {
            "pp": rank // (self.dp * self.cp * self.tp),
            "dp": (rank // (self.cp * self.tp)) % self.dp,
            "cp": (rank // self.tp) % self.cp,
            "tp": rank % self.tp,
        }


def build_mesh(dims: ParallelDims, device_type: str) -> DeviceMesh:
    """The world's DeviceMesh; slice it by name (`mesh["dp"]`) for each parallelism."""
    return init_device_mesh(device_type, (dims.pp, dims.dp, dims.cp, dims.tp), mesh_dim_names=MESH_DIMS)


def model_meshes(mesh: DeviceMesh) -> tuple[DeviceMesh, DeviceMesh]:
    """(the tp mesh, the data-parallel mesh over dp x cp) that the model's weights live on.

    FSDP2 under TP needs both from one root mesh. With cp or dp of 1 they are
    slices of the world's mesh; with both above 1 a second world mesh
    (pp, dp x cp, tp) is built, whose middle dimension is the dp and cp ranks
    of one (pp, tp) position in the world mesh's order (torch's public API
    has no flattening of two dimensions). Built from the world mesh's own rank
    tensor, it also serves the planner's partial meshes in a fake world.
    """
    dp, cp = mesh["dp"].size(), mesh["cp"].size()
    if cp == 1:
        return mesh["tp"], mesh["dp"]
    if dp == 1:
        return mesh["tp"], mesh["cp"]
    ranks = mesh.mesh.reshape(mesh["pp"].size(), dp * cp, mesh["tp"].size())
    flat = DeviceMesh(mesh.device_type, ranks, mesh_dim_names=("pp", "dp_cp", "tp"))
    return flat["tp"], flat["dp_cp"]


@contextlib.contextmanager
def fake_world(world_size: int, rank: int = 0):
    """A default process group of `world_size` ranks that never communicates, as `rank`, for the block.

    torch's fake backend: meshes, DTensor sharding and pipeline schedules
    construct as at full scale, on one machine (the planner, dry runs, the
    bubble simulator). It must not run inside a real process group: the
    default group is the process's own. Nor before one in the same process:
    DTensor keeps sharding decisions made here, meshes and rank 0's
    coordinates included, and a real world built afterwards computes wrong
    shard offsets (torch 2.13); plan such a process in a child process.
    """
    if dist.is_initialized():
        raise RuntimeError("fake_world inside an initialised process group")
    if "fake" not in dist.Backend.backend_list:
        # torch < 2.12 registers the fake backend only when its testing module is imported.
        import torch.testing._internal.distributed.fake_pg  # noqa: F401
    dist.init_process_group("fake", store=dist.HashStore(), rank=rank, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()
