"""The (pp, dp, tp) device mesh: tp innermost, pp outermost.

Adjacent ranks share a tp group, so tensor parallelism (the most
communication-heavy dimension) stays inside a node, as in Megatron-LM and
torchtitan.
"""

from dataclasses import dataclass

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
