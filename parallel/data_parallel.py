"""Data parallelism over the dp mesh, at one of three levels (`parallel.dp_shard`).

What each rank stores, for a model part of P parameters (P counts this rank's
TP shard and pipeline stages only; dp = parallel.dp; optimizer = AdamW, two
moments per parameter):

  level      weights              gradients            AdamW state        how
  full       P/dp fp32            P/dp fp32            2P/dp fp32         FSDP2 `fully_shard` (ZeRO-3): each block's
                                                                          weights are all-gathered for its forward and
                                                                          again for its backward (plus one block's worth
                                                                          gathered at a time), gradients reduce-scattered
  optimizer  P fp32               P fp32               2P/dp fp32         ZeRO-1: gradients all-reduced after backward;
                                                                          each dp rank steps only the whole parameters
                                                                          it owns (balanced by size) and broadcasts them
  replicate  P fp32               P fp32               2P fp32            DDP at tp=pp=1 (reduction overlapped with
                                                                          backward); with tp>1 or pp>1 the same
                                                                          all-reduce as `optimizer`, after backward
                                                                          (DDP cannot hold DTensors, nor follow a
                                                                          pipeline schedule's backward)

With dp=1 nothing is applied and every level stores P, P and 2P fp32.

train.dtype=bf16 never changes what is stored above: the weights the
optimizer steps, their gradients and the AdamW state all stay fp32. Under
`full` (dp>1) FSDP2's MixedPrecisionPolicy gathers each unit's weights as
bf16 (the transient all-gathered copy: 2 bytes per parameter of the units
being computed, rather than 4), computes in bf16 and reduce-scatters
gradients in fp32. Elsewhere forward runs under bf16 autocast: every matmul
makes a transient bf16 copy of its weight, activations saved for backward
are mostly bf16 (half of fp32), and gradients come out fp32, reduced in fp32.
The `optimizer` level and `replicate` without DDP also hold one flat fp32 bucket
of up to BUCKET elements while reducing or broadcasting.
"""

import contextlib
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

DP_SHARD_CHOICES = ("full", "optimizer", "replicate")
BUCKET = 2**24  # elements per flat all-reduce / broadcast: bounds the extra memory


def uses_fsdp(level: str, dp: int) -> bool:
    return dp > 1 and level == "full"


def uses_ddp(level: str, dp: int, tp: int, pp: int) -> bool:
    """DDP only for a plain model: it cannot hold DTensors (tp>1), and its reducer loses track of a
    pipeline stage's parameters under the schedules' micro-batched backward (pp>1)."""
    return dp > 1 and level == "replicate" and tp == 1 and pp == 1


def apply_fsdp(model: nn.Module, dp_mesh: DeviceMesh, per_block: bool = True,
               param_dtype: torch.dtype = torch.float32) -> nn.Module:
    """Shard each transformer block as its own unit, then the rest (embedding, norm, head) at the root.

    per_block=False makes the whole module one unit: the zero-bubble pipeline
    schedules compute weight gradients after the stage's last backward, which
    per-block units would already have reduced (their gradients come out None).
    A param_dtype below fp32 computes in it, with gradients reduced in fp32.
    """
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    if per_block:
        for layer in model.layers.values():
            fully_shard(layer, mesh=dp_mesh, mp_policy=mp)
    # The root's parameters are needed again right away by backward: keep them gathered.
    fully_shard(model, mesh=dp_mesh, reshard_after_forward=False, mp_policy=mp)
    return model


def apply_ddp(model: nn.Module, dp_mesh: DeviceMesh) -> nn.Module:
    device_ids = None if model.rope.device.type == "cpu" else [model.rope.device]
    return DistributedDataParallel(model, process_group=dp_mesh.get_group(), device_ids=device_ids)


class DataParallel:
    """The loop's side of data parallelism: what FSDP2 or DDP does not do by itself.

    micro_batch(part, last)  DDP: skip the all-reduce on all but a step's last micro-batch. FSDP2
                             reduce-scatters every micro-batch (as torchtitan does): skipping it
                             would keep every parameter's gradient unsharded, in fp32, until the
                             last one (4 bytes x the rank's whole TP-local stage: 33 GiB per GPU
                             for llama3-70b at tp=8), which sharding exists to avoid
    after_backward()         average gradients over dp (ZeRO-1, and replicate without DDP)
    owns(p)                  whether this rank's optimizer steps p (ZeRO-1: the params it owns)
    after_step()             ZeRO-1: every rank gets the new values of the params others own
    """

    def __init__(self, params: list[nn.Parameter], dp_mesh: DeviceMesh, level: str, ddp: bool):
        dp = dp_mesh.size()
        self.params, self.dp_mesh = params, dp_mesh
        self.reduce_after_backward = dp > 1 and (level == "optimizer" or (level == "replicate" and not ddp))
        self.owners = shard_owners(params, dp) if level == "optimizer" and dp > 1 else None
        rank = dp_mesh.get_local_rank()
        self._owned = {id(p) for p, r in zip(params, self.owners or []) if r == rank}

    def owns(self, p: nn.Parameter) -> bool:
        return self.owners is None or id(p) in self._owned

    @staticmethod
    @contextlib.contextmanager
    def micro_batch(part: nn.Module, last: bool):
        if isinstance(part, DistributedDataParallel) and not last:
            with part.no_sync():
                yield
        else:
            yield

    def after_backward(self) -> None:
        if self.reduce_after_backward:
            reduce_grads(self.params, self.dp_mesh.get_group())

    def after_step(self) -> None:
        if self.owners is not None:
            broadcast_params(self.params, self.owners, self.dp_mesh)


def apply_dp(modules: list[nn.Module], dp_mesh: DeviceMesh, level: str, *, tp: int, pp: int, per_block: bool,
             param_dtype: torch.dtype, materialize: Optional[Callable[[nn.Module], None]] = None,
             ) -> tuple[list[nn.Module], Optional[DataParallel]]:
    """Data parallelism at `level` for this rank's model parts, built on the meta device.

    FSDP2 shards each part while it holds no memory; then `materialize`
    allocates and initialises it (None: the parts stay on the meta device, as
    the planner counts them, and no hooks are made); then DDP wraps it where
    DDP applies. Returns the parts to call and the loop's hooks.
    """
    dp = dp_mesh.size()
    if uses_fsdp(level, dp):
        for m in modules:
            apply_fsdp(m, dp_mesh, per_block=per_block, param_dtype=param_dtype)
    if materialize is None:
        return list(modules), None
    for m in modules:
        materialize(m)
    ddp = uses_ddp(level, dp, tp, pp)
    parts = [apply_ddp(m, dp_mesh) if ddp else m for m in modules]
    params = [p for m in modules for p in m.parameters()]
    return parts, DataParallel(params, dp_mesh, level, ddp)


def _local(t: torch.Tensor) -> torch.Tensor:
    """The tensor this rank holds: a DTensor's local shard (a view; writing it writes the DTensor)."""
    return t.to_local() if isinstance(t, DTensor) else t


def _buckets(tensors: list[torch.Tensor]):
    """Consecutive runs of same-dtype tensors of at most BUCKET elements (a larger tensor alone)."""
    run, size = [], 0
    for t in tensors:
        if run and (size + t.numel() > BUCKET or t.dtype != run[0].dtype):
            yield run
            run, size = [], 0
        run.append(t)
        size += t.numel()
    if run:
        yield run


def _flat_collective(tensors: list[torch.Tensor], op) -> None:
    for run in _buckets(tensors):
        flat = torch.cat([t.reshape(-1) for t in run])
        op(flat)
        for t, part in zip(run, flat.split([t.numel() for t in run])):
            t.copy_(part.view_as(t))


@torch.no_grad()
def reduce_grads(params: list[nn.Parameter], dp_group: dist.ProcessGroup) -> None:
    """Average every gradient over the dp ranks, in place (flat buckets; Partial tp sums commute)."""
    n = dist.get_world_size(dp_group)

    def average(flat):
        dist.all_reduce(flat, group=dp_group)
        flat.div_(n)

    _flat_collective([_local(p.grad) for p in params if p.grad is not None], average)


def shard_owners(params: list[nn.Parameter], dp: int) -> list[int]:
    """ZeRO-1: the dp rank that keeps each parameter's optimizer state, balancing whole sizes.

    Largest first onto the least loaded rank, ties by position: every rank of a
    dp group computes the same answer from the same (global) shapes.
    """
    load, owners = [0] * dp, [0] * len(params)
    for i in sorted(range(len(params)), key=lambda i: (-params[i].numel(), i)):
        owner = min(range(dp), key=lambda r: (load[r], r))
        owners[i] = owner
        load[owner] += params[i].numel()
    return owners


@torch.no_grad()
def broadcast_params(params: list[nn.Parameter], owners: list[int], dp_mesh: DeviceMesh) -> None:
    """ZeRO-1: after each rank stepped its own parameters, every rank gets everyone's new values."""
    group = dp_mesh.get_group()
    for owner in range(dp_mesh.size()):
        mine = [_local(p) for p, o in zip(params, owners) if o == owner]
        _flat_collective(mine, lambda flat: dist.broadcast(flat, group=group, group_src=owner))
