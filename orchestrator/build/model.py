"""From config and mesh to this rank's parallelized model parts with their initial weights.

The whole model is built on the meta device and cut into pipeline stages;
each of this rank's stages is split by TP, given context parallelism's
attention hooks (cp > 1), sharded by FSDP2 over dp x cp while it holds no
memory, materialized, and only then initialised: each parameter's full value
is a function of (seed, parameter name) alone, and each rank keeps its own
shard of it. Every layout therefore starts from identical weights.
"""

from dataclasses import dataclass, replace
from typing import Optional

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, distribute_tensor

from models.hf import load_hf
from models.llama import ModelArgs, Transformer, full_init_value, num_params
from models.plans import TP_PLANS, pipeline_cuts, stage_layers
from orchestrator.build.levers import DTYPES, apply_levers, compile_scope, compile_works
from parallel.context_parallel import apply_cp
from parallel.data_parallel import DataParallel, apply_dp, uses_ddp, uses_fsdp
from parallel.mesh import model_meshes
from parallel.pipeline_parallel import SPLIT_BACKWARD, stage_ids, stage_module, stages_per_rank
from parallel.tensor_parallel import apply_tp, padded_vocab


@dataclass
class ModelParts:
    parts: list[nn.Module]  # what to call (wrapped by DDP where replicated), one per local stage
    modules: list[Transformer]  # the plain modules inside, whose parameter names are the whole model's
    stage_ids: list[int]
    n_stages: int
    n_params: int  # of the whole model
    args: ModelArgs
    dp: Optional[DataParallel]  # the loop's data-parallel hooks (None when not materialized)
    compiled: Optional[str] = None  # what train.compile compiled (levers.compile_scope), None: nothing


@torch.no_grad()
def init_weights(module: Transformer, seed: int, source: Optional[dict] = None) -> None:
    """Random init from (seed, name), or the weights in `source` (a full state dict) where given."""
    for name, p in module.named_parameters():
        if source is None:
            full = full_init_value(name, p.shape, module.args, seed, p.device)
        else:
            full = torch.zeros(p.shape, device=p.device)  # vocabulary padding rows stay zero
            value = source[name]
            full[: value.shape[0]] = value.to(p.device)
        if isinstance(p, DTensor):
            # src_data_rank=None: every rank made the same full value; each keeps its shard, no communication.
            full = distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None).to_local()
            p.to_local().copy_(full)
        else:
            p.copy_(full)
    module.reset_buffers()


def stage_plan(model_cfg, parallel_cfg, pp: int, pp_rank: int) -> tuple[list[int], list[range], int]:
    """(this rank's stage ids, every stage's layers, number of stages)."""
    if pp == 1:
        return [0], [range(model_cfg.n_layers)], 1
    per_rank = stages_per_rank(parallel_cfg.schedule, parallel_cfg.stages_per_rank)
    n_stages = pp * per_rank
    cuts = list(parallel_cfg.cut_points) if parallel_cfg.cut_points else pipeline_cuts(model_cfg.n_layers, n_stages)
    return stage_ids(parallel_cfg.schedule, pp_rank, pp, per_rank), stage_layers(model_cfg.n_layers, cuts), n_stages


def build_model(model_cfg, parallel_cfg, mesh: DeviceMesh, device: torch.device, seed: int,
                train_cfg=None, materialize: bool = True) -> ModelParts:
    """train_cfg (the `train:` group) brings the levers (dtype, activation checkpointing, compile); None: none.

    materialize=False stops before any memory is allocated: the parts stay on the
    meta device, TP'd and FSDP-sharded, with no weights (the planner and dry runs
    count their shards).
    """
    args = ModelArgs.from_config(model_cfg)
    # The data-parallel mesh spans dp x cp: the cp ranks hold the same weights (parallel/mesh.py).
    tp_mesh, dp_mesh = model_meshes(mesh)
    tp, cp = tp_mesh.size(), mesh["cp"].size()
    if cp > 1 and train_cfg is None:
        raise ValueError("parallel.cp > 1 needs train_cfg: context parallelism cuts train.seq_len")
    if tp > 1 and args.vocab_size % tp:
        args = replace(args, padded_vocab_size=padded_vocab(args.vocab_size, tp))
    with torch.device("meta"):
        whole = Transformer(args)
    ids, layers, n_stages = stage_plan(model_cfg, parallel_cfg, mesh["pp"].size(), mesh["pp"].get_local_rank())
    source = load_hf(model_cfg.init_from, args) if materialize and model_cfg.get("init_from") else None
    fsdp = uses_fsdp(parallel_cfg.dp_shard, dp_mesh.size())
    pp = mesh["pp"].size()
    scope = compile_scope(tp, fsdp or uses_ddp(parallel_cfg.dp_shard, dp_mesh.size(), tp, pp))
    modules = []
    for stage in ids:
        module = whole if n_stages == 1 else stage_module(whole, stage, n_stages, layers[stage])
        if tp > 1:
            apply_tp(module, tp_mesh, TP_PLANS["llama"], parallel_cfg.sequence_parallel)
        if cp > 1:
            apply_cp(module, mesh["cp"], train_cfg.seq_len)
        if train_cfg is not None:
            apply_levers(module, train_cfg, device, fsdp_mixed_precision=fsdp, scope=scope)
        modules.append(module)

    def materialize_(module: Transformer) -> None:
        module.to_empty(device=device)
        module.tie_weights()  # to_empty unties them
        init_weights(module, seed, source)

    parts, dp = apply_dp(
        modules, dp_mesh, parallel_cfg.dp_shard, tp=tp, pp=pp,
        per_block=n_stages == 1 or parallel_cfg.schedule not in SPLIT_BACKWARD,
        param_dtype=DTYPES[train_cfg.dtype] if train_cfg is not None else torch.float32,
        materialize=materialize_ if materialize else None,
    )
    compiled = (scope if train_cfg is not None and train_cfg.compile and compile_works(train_cfg.compile_backend)
                else None)
    return ModelParts(parts, modules, ids, n_stages, num_params(whole), args, dp, compiled)
