"""Gradient clipping by the true global norm, whatever meshes the parameters sit on.

`torch.nn.utils.clip_grad_norm_` fails when parameters live on different
meshes, and sees only its own pipeline stage. Here each gradient contributes
the squared norm of its local shard; the partial sums are all-reduced over
exactly the mesh dims the gradient is sharded on (a replicated dim already
holds the whole value), and finally over the pipeline group, whose stages
hold disjoint parameters.
"""

from collections import defaultdict
from typing import Iterable, Optional

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate
from torch.nn.utils import get_total_norm


def reduce_partial_grads(params: Iterable[torch.nn.Parameter]) -> None:
    """Finish the reduction DTensor leaves pending on some gradients.

    A replicated parameter used on sharded activations (a sequence-parallel
    norm's weight without FSDP) gets a Partial gradient: each tp rank's
    contribution, summed only when someone asks. Ask now, once, so the norm
    and the optimizer both see the whole gradient.
    """
    for p in params:
        g = p.grad
        if isinstance(g, DTensor) and any(pl.is_partial() for pl in g.placements):
            placements = [Replicate() if pl.is_partial() else pl for pl in g.placements]
            p.grad = g.redistribute(g.device_mesh, placements)


def global_grad_norm(params: Iterable[torch.nn.Parameter], pp_group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    buckets: dict[tuple, list[torch.Tensor]] = defaultdict(list)
    groups: dict[tuple, list[dist.ProcessGroup]] = {}
    device = None
    for p in params:
        g = p.grad
        if g is None:
            continue
        if isinstance(g, DTensor):
            mesh = g.device_mesh
            # Any non-replicated dim splits the tensor (Shard, and FSDP's strided shard
            # over TP, which is not a Shard subclass in every torch version).
            assert not any(pl.is_partial() for pl in g.placements), "unreduced gradient"
            sharded = tuple(i for i, pl in enumerate(g.placements) if not pl.is_replicate())
            key = (id(mesh), sharded)
            groups[key] = [mesh.get_group(i) for i in sharded]
            g = g.to_local()
        else:
            key = ("local",)
            groups[key] = []
        buckets[key].append(g)
        device = g.device
    if device is None:
        raise ValueError("global_grad_norm: no parameter has a gradient")
    total = torch.zeros((), device=device, dtype=torch.float32)
    for key, grads in buckets.items():
        sq = get_total_norm(grads, norm_type=2.0).float().pow(2)
        for group in groups[key]:
            dist.all_reduce(sq, group=group)
        total += sq
    if pp_group is not None and dist.get_world_size(pp_group) > 1:
        dist.all_reduce(total, group=pp_group)
    return total.sqrt()


def clip_grads_(params: list[torch.nn.Parameter], max_norm: float, pp_group=None) -> torch.Tensor:
    """Scale every gradient so the global norm is at most max_norm; return the norm before clipping."""
    reduce_partial_grads(params)
    norm = global_grad_norm(params, pp_group)
    if max_norm > 0:
        coef = min(1.0, max_norm / (norm.item() + 1e-6))
        if coef < 1.0:
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(coef)
    return norm
