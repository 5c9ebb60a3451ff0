"""The (pp, dp, tp) device mesh: tp innermost, pp outermost.

Adjacent ranks share a tp group, so tensor parallelism (the most
communication-heavy dimension) stays inside a node, as in Megatron-LM and
torchtitan.
"""

import contextlib
from dataclasses import dataclass

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

MESH_DIMS = ("pp", "dp", "tp")


@dataclass(frozen=True)
class ParallelDims:
    tp: int
    pp: int
    dp: int

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    def coords(self, rank: int) -> dict[str, int]:
        """This rank's (pp, dp, tp) coordinates in the mesh."""
        return {
            "pp": rank // (self.dp * self.tp),
            "dp": (rank // self.tp) % self.dp,
            "tp": rank % self.tp,
        }


def build_mesh(dims: ParallelDims, device_type: str) -> DeviceMesh:
    """The world's DeviceMesh; slice it by name (`mesh["dp"]`) for each parallelism."""
    return init_device_mesh(device_type, (dims.pp, dims.dp, dims.tp), mesh_dim_names=MESH_DIMS)


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
