"""Data parallelism over the dp mesh: FSDP2 (`fully_shard`) or plain replication (DDP).

full      parameters, gradients and optimizer state sharded over dp (FSDP2 / ZeRO-3);
          applied on the meta device, before the weights exist.
replicate every rank holds the whole model and gradients are all-reduced (DDP);
          applied to materialized weights.
"""

import contextlib

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.nn.parallel import DistributedDataParallel

DP_SHARD_CHOICES = ("full", "replicate")


def apply_fsdp(model: nn.Module, dp_mesh: DeviceMesh, per_block: bool = True) -> nn.Module:
    """Shard each transformer block as its own unit, then the rest (embedding, norm, head) at the root.

    per_block=False makes the whole module one unit: the zero-bubble pipeline
    schedules compute weight gradients after the stage's last backward, which
    per-block units would already have reduced (their gradients come out None).
    """
    if per_block:
        for layer in model.layers.values():
            fully_shard(layer, mesh=dp_mesh)
    # The root's parameters are needed again right away by backward: keep them gathered.
    fully_shard(model, mesh=dp_mesh, reshard_after_forward=False)
    return model


def apply_replicate(model: nn.Module, dp_mesh: DeviceMesh) -> nn.Module:
    device_ids = None if model.rope.device.type == "cpu" else [model.rope.device]
    return DistributedDataParallel(model, process_group=dp_mesh.get_group(), device_ids=device_ids)


@contextlib.contextmanager
def grad_sync(model: nn.Module, enabled: bool):
    """Skip the dp gradient reduction for all but the last micro-batch of a step."""
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(enabled)
        yield
    elif isinstance(model, DistributedDataParallel) and not enabled:
        with model.no_sync():
            yield
    else:
        yield
