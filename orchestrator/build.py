"""From config and mesh to a parallelized model with its initial weights.

The model is built on the meta device, split (FSDP2 shards it while it holds
no memory), materialized, and only then initialised: each parameter's full
value is a function of (seed, parameter name) alone, and each rank keeps its
own shard of it. Every layout therefore starts from identical weights.
"""

from dataclasses import replace

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, distribute_tensor

from models.llama import ModelArgs, Transformer, full_init_value
from models.plans import TP_PLANS
from parallel.data import apply_fsdp, apply_replicate
from parallel.tensor import apply_tp, padded_vocab


@torch.no_grad()
def init_weights(module: Transformer, seed: int) -> None:
    for name, p in module.named_parameters():
        full = full_init_value(name, p.shape, module.args, seed, p.device)
        if isinstance(p, DTensor):
            # src_data_rank=None: every rank made the same full value; each keeps its shard, no communication.
            full = distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None).to_local()
            p.to_local().copy_(full)
        else:
            p.copy_(full)
    module.reset_buffers()


def build_model(model_cfg, parallel_cfg, mesh: DeviceMesh, device: torch.device, seed: int) -> tuple[nn.Module, Transformer]:
    """Return (the module to call, the plain Transformer inside it)."""
    args = ModelArgs.from_config(model_cfg)
    tp = mesh["tp"].size()
    if tp > 1 and args.vocab_size % tp:
        args = replace(args, padded_vocab_size=padded_vocab(args.vocab_size, tp))
    with torch.device("meta"):
        module = Transformer(args)
    if tp > 1:
        apply_tp(module, mesh["tp"], TP_PLANS["llama"], parallel_cfg.sequence_parallel)
    dp_mesh = mesh["dp"]
    shard = dp_mesh.size() > 1 and parallel_cfg.dp_shard == "full"
    if shard:
        apply_fsdp(module, dp_mesh)
    module.to_empty(device=device)
    init_weights(module, seed)
    if dp_mesh.size() > 1 and parallel_cfg.dp_shard == "replicate":
        return apply_replicate(module, dp_mesh), module
    return module, module
