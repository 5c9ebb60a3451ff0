"""Gradient clipping by the true global norm, whatever meshes the parameters sit on.

`torch.nn.utils.clip_grad_norm_` fails when parameters live on different
meshes, and sees only its own pipeline stage. Here each gradient contributes
the squared norm of its local shard; the partial sums are all-reduced over
exactly the mesh dims the gradient is sharded on (a replicated dim already
holds the whole value), and finally over the pipeline group, whose stages
hold disjoint parameters.

Why float64, and why it matters (tests/dist/test_pipeline_parallel.py,
explicit cut points, failed at step 7 on every machine): the norm is the
sum of the same per-parameter squares whatever the layout, but in fp32 the
sum's rounding depends on how it is split. One process took one fp32
`vector_norm` over all 75 per-tensor norms; pp=4 with cuts [1,3,6] took one
per stage, squared them and summed the four in an fp32 all-reduce: the two
norms differed in the last bit (step 1: 6e-8 relative). Clipping is active
at every step there (norm > 1), so that bit became the clip coefficient's,
every gradient was scaled by a different fp32 number, AdamW's updates
rounded differently, and the weights drifted apart by ulps. At step 7, a
loss spike (grad norm 4.48 against 1.5-2.2 elsewhere) made the gradient
sensitive enough to turn those ulps into 4.6e-5 of relative difference in
every block's gradient (measured in float64 on the saved gradients: the
norm itself was reported faithfully; the gradients really differed). The
losses still agreed to 1e-7, since AdamW is nearly blind to a gradient's
scale.

The fix is at the cause: each per-tensor norm is accumulated in float64
(`dtype=torch.float64`: the result no longer depends on how a CPU kernel
splits the tensor between threads), squared and summed in float64, and
all-reduced in float64. Every partial sum then carries ~1e-16 relative
error, 2^29 times below fp32's resolution, so the fp32 clip coefficient
(and from there the whole run) is the same bit for bit for any pipeline
split, unless the exact norm lies within ~1e-16 of an fp32 rounding
boundary (a chance of about 1e-9 per step). With that, pp=4 with any cut
points reproduces the one-process run exactly on CPU.

No host synchronisation: the norm stays a device tensor, and the clip
coefficient min(1, max_norm / (norm + 1e-6)) is applied unconditionally (a
multiplication by exactly 1.0 changes nothing), as
`torch.nn.utils.clip_grads_with_norm_` does.
"""

from collections import defaultdict
from typing import Iterable, Optional

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate


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


def _norms64(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each tensor's 2-norm, accumulated in float64.

    torch._foreach_norm is private, but it is what torch.nn.utils.get_total_norm
    runs inside, and no public API returns per-tensor norms without a Python
    loop per parameter (get_total_norm only gives their fp32 total, whose
    rounding is exactly what must not depend on the layout).
    """
    return list(torch._foreach_norm(tensors, 2.0, dtype=torch.float64))


def _local_grad_buckets(params: Iterable[torch.nn.Parameter]):
    """Local gradient shards grouped by the process groups their squared norms must be summed over."""
    buckets: dict[tuple, list[torch.Tensor]] = defaultdict(list)
    groups: dict[tuple, list[dist.ProcessGroup]] = {}
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
            # Keyed by the groups themselves, not the mesh object: FSDP2 gives each unit's DTensors a mesh of
            # its own over the same groups, and one all-reduce per group serves them all (13 -> 3 per step
            # at tp=2 x dp=4 under FSDP2; orchestrator/planner/comms.py counts them).
            found = [mesh.get_group(i) for i in sharded]
            key = tuple(pg.group_name for pg in found)
            groups[key] = found
            g = g.to_local()
        else:
            key = ("local",)
            groups[key] = []
        buckets[key].append(g)
    return buckets, groups


def global_grad_norm(params: Iterable[torch.nn.Parameter], pp_group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """The 2-norm of all gradients of the model (every stage and shard), a float64 device tensor."""
    buckets, groups = _local_grad_buckets(params)
    if not buckets:
        raise ValueError("global_grad_norm: no parameter has a gradient")
    total = None
    for key, grads in buckets.items():
        sq = torch.stack(_norms64(grads)).square().sum()
        for group in groups[key]:
            dist.all_reduce(sq, group=group)
        total = sq if total is None else total + sq
    if pp_group is not None and dist.get_world_size(pp_group) > 1:
        dist.all_reduce(total, group=pp_group)
    return total.sqrt()


@torch.no_grad()
def clip_grads_(params: list[torch.nn.Parameter], max_norm: float, pp_group=None) -> torch.Tensor:
    """Scale every gradient so the global norm is at most max_norm; return the norm before clipping.

    Returns a float64 device tensor and never waits for the device.
    """
    reduce_partial_grads(params)
    norm = global_grad_norm(params, pp_group)
    if max_norm > 0:
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0).to(torch.float32)
        buckets, _ = _local_grad_buckets(params)
        for grads in buckets.values():
            # The local shards are plain tensors: one foreach kernel scales them all. The public
            # torch.nn.utils.clip_grads_with_norm_ takes the parameters instead, and on DTensors it
            # dispatches through DTensor tensor by tensor (Python per parameter) and cannot mix meshes.
            torch._foreach_mul_(grads, coef)
    return norm
