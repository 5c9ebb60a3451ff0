"""Tensor parallelism (and sequence parallelism) from a model's TP plan, with DTensor.

`apply_tp` turns each role of the plan (`models/plans.py`) into a DTensor
parallel style and applies it with `parallelize_module`. Between blocks the
residual stream is a plain local tensor: replicated without sequence
parallelism, this rank's slice of the sequence with it. The logits stay
sharded over the vocabulary; `loss_context()` computes the cross-entropy on
the shards (loss parallel).

Per transformer block this costs Megatron-LM's minimum: without SP one
all-reduce after attention and one after the MLP in forward, and one per
sub-block input in backward; with SP each all-reduce becomes an all-gather /
reduce-scatter pair of the same volume.
"""

import contextlib
import inspect
import re

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    loss_parallel,
    parallelize_module,
)


def _style(role: str, module: nn.Module, sp: bool):
    # The layout of the residual stream between blocks.
    stream = Shard(1) if sp else Replicate()
    if role == "colwise":
        return ColwiseParallel()
    if role == "rowwise":
        return RowwiseParallel(output_layouts=stream)
    if role == "vocab_embedding":
        return RowwiseParallel(input_layouts=Replicate(), output_layouts=stream)
    if role == "vocab_output":
        return ColwiseParallel(input_layouts=stream, output_layouts=Shard(-1), use_local_output=False)
    if role == "norm":
        return SequenceParallel() if sp else None
    if role == "gather_input":
        # Inputs after the first (the rotary table) are left alone.
        n_args = len(inspect.signature(module.forward).parameters)
        return PrepareModuleInput(
            input_layouts=(stream,) + (None,) * (n_args - 1),
            desired_input_layouts=(Replicate(),) + (None,) * (n_args - 1),
        )
    raise ValueError(f"unknown tensor-parallel role {role!r}")


def expand_plan(plan: dict[str, str], model: nn.Module) -> dict[str, str]:
    """Resolve "layers.*." keys against the model's module names.

    A key may match nothing: a pipeline stage holds only some of the modules.
    """
    out = {}
    for key, role in plan.items():
        pattern = re.compile("^" + re.escape(key).replace(r"\*", r"[^.]+") + "$")
        out.update({name: role for name, _ in model.named_modules() if pattern.match(name)})
    return out


def apply_tp(model: nn.Module, tp_mesh: DeviceMesh, plan: dict[str, str], sequence_parallel: bool) -> nn.Module:
    modules = dict(model.named_modules())
    styles = {}
    for name, role in expand_plan(plan, model).items():
        style = _style(role, modules[name], sequence_parallel)
        if style is not None:
            styles[name] = style
    parallelize_module(model, tp_mesh, styles)
    args = model.args
    if args.vocab_rows > args.vocab_size and model.output is not None:  # a pipeline's last stage has the output
        model.output.register_forward_hook(_mask_vocab_padding(args.vocab_size))
    return model


def _mask_vocab_padding(vocab_size: int):
    """Give the padding rows' logits -inf, so they take no probability: the loss is unchanged."""

    def hook(module, inputs, out: DTensor) -> DTensor:
        local = out.to_local()
        width = local.shape[-1]
        start = out.device_mesh.get_local_rank() * width
        ids = torch.arange(start, start + width, device=local.device)
        local = local.masked_fill(ids >= vocab_size, float("-inf"))
        return DTensor.from_local(local, out.device_mesh, out.placements, run_check=False)

    return hook


def loss_context(tp: int):
    """Where forward's loss and backward must run: loss parallel when the logits are vocab-sharded."""
    return loss_parallel() if tp > 1 else contextlib.nullcontext()


def padded_vocab(vocab_size: int, tp: int) -> int:
    return -(-vocab_size // tp) * tp
