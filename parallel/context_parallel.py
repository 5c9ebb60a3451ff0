"""Context parallelism's building blocks: a sequence cut over the cp ranks, and attention over all of it.

Llama 3's scheme (issue 22): the sequence is cut into 2·cp chunks and rank r
of the cp group holds chunks r and 2cp-1-r, so every rank does the same
causal work (an early chunk attends to few keys, its partner late in the
sequence to many). In attention each rank all-gathers the keys and values of
its kv heads across the group and its own queries attend with the mask of
their absolute positions (and of their documents), so any mask works, and
under GQA the gathered K/V are smaller than Q. In backward, the gathered K/V
gradients are reduce-scattered back: each rank keeps the sum of every rank's
gradient for its own keys and values.

`KVGather` speaks the model's KV-cache protocol (`Attention.forward` calls
`cache.update(k, v)` and attends with the keys, values and mask it returns;
`cache.rope` gives each token's rotary angles), so the model code needs no
knowledge of cp. `apply_cp` hangs it on a model (or pipeline stage) from
outside, as `apply_tp` does TP: each forward gets one KVGather for its
micro-batch, built from the document ids it was given. Each cp rank's loss
is the mean over its own tokens; data parallelism averages gradients over
dp x cp, which makes them the whole sequence's (the trainer weighs by
token counts where some targets are ignored).

What moves, per layer and micro-batch: forward all-gathers the rank's K and
V together, (cp-1)/cp of 2 x batch x seq x kv_heads x head_dim elements
received per rank; backward reduce-scatters their gradients, as many. Under
TP each rank gathers its own kv heads only.
"""

from typing import Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

# torch 2.13 renamed the tensor-in, tensor-out collectives (the old names warn); torch 2.11 has only those.
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def chunk_ids(cp: int, cp_rank: int) -> tuple[int, int]:
    """The two of the 2·cp chunks rank cp_rank holds: head-tail balanced."""
    return cp_rank, 2 * cp - 1 - cp_rank


def local_positions(seq: int, cp: int, cp_rank: int, device=None) -> torch.Tensor:
    """Absolute positions (0..seq-1) of the tokens rank cp_rank holds, in the order it holds them."""
    if seq % (2 * cp):
        raise ValueError(f"a sequence of {seq} tokens does not cut into 2 x cp = {2 * cp} equal chunks")
    size = seq // (2 * cp)
    return torch.cat([torch.arange(c * size, (c + 1) * size, device=device) for c in chunk_ids(cp, cp_rank)])


def shard_sequence(x: torch.Tensor, cp: int, cp_rank: int, dim: int = 1) -> torch.Tensor:
    """This rank's part of a whole sequence (its two chunks along `dim`)."""
    return x.index_select(dim, local_positions(x.shape[dim], cp, cp_rank, x.device))


def gathered_positions(seq: int, cp: int, device=None) -> torch.Tensor:
    """Absolute positions of the keys after an all-gather over the cp group (rank 0's tokens first)."""
    return torch.cat([local_positions(seq, cp, r, device) for r in range(cp)])


class _GatherSequence(torch.autograd.Function):
    """All-gather along dim 1 (batch, seq, heads, dim) over the group; backward: reduce-scatter (sum)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        n = dist.get_world_size(group)
        front = x.transpose(0, 1).contiguous()  # (seq, batch, ...): the collectives concatenate along dim 0
        out = front.new_empty((n * front.shape[0], *front.shape[1:]))
        if not x.is_meta:  # a pipeline stage's shape inference runs forward on the meta device
            _all_gather(out, front, group=group)
        return out.transpose(0, 1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        n = dist.get_world_size(ctx.group)
        front = grad.transpose(0, 1).contiguous()
        out = front.new_empty((front.shape[0] // n, *front.shape[1:]))
        _reduce_scatter(out, front, group=ctx.group)
        return out.transpose(0, 1), None


def gather_sequence(x: torch.Tensor, group) -> torch.Tensor:
    return _GatherSequence.apply(x, group)


class KVGather:
    """One micro-batch's attention under cp, as a KV cache the model's attention already understands.

    doc_ids: (batch, seq_local) the documents of this rank's tokens, or None for plain causal
    attention. The mask, (batch or 1, 1, seq_local, seq), is built once and serves every layer: as an
    additive float mask (0 or -inf) in the attention's dtype, which SDPA keeps for backward by reference;
    given a bool mask, SDPA on CPU converts it to a new float tensor in every layer and saves each one
    (4 x seq_local x seq bytes per layer, measured with torch 2.13).
    """

    def __init__(self, group, seq: int, cp_rank: int, doc_ids: Optional[torch.Tensor] = None, device=None):
        cp = dist.get_world_size(group)
        self.group = group
        self.positions = local_positions(seq, cp, cp_rank, device)
        k_pos = gathered_positions(seq, cp, device)
        mask = (k_pos[None, :] <= self.positions[:, None])[None, None]
        if doc_ids is not None:
            all_docs = torch.empty((cp * doc_ids.shape[1], doc_ids.shape[0]), dtype=doc_ids.dtype,
                                   device=doc_ids.device)
            if not doc_ids.is_meta:
                _all_gather(all_docs, doc_ids.t().contiguous(), group=group)
            mask = mask & (doc_ids[:, :, None] == all_docs.t()[:, None, :]).unsqueeze(1)
        self.allowed = mask
        self._masks: dict[torch.dtype, torch.Tensor] = {}

    def mask(self, dtype: torch.dtype) -> torch.Tensor:
        if dtype not in self._masks:
            zeros = torch.zeros(self.allowed.shape, dtype=dtype, device=self.allowed.device)
            self._masks[dtype] = zeros.masked_fill(~self.allowed, float("-inf"))
        return self._masks[dtype]

    def rope(self, table: torch.Tensor) -> torch.Tensor:
        """The rotary angles of this rank's tokens, by their absolute positions: (1, seq_local, head_dim // 2, 2)."""
        return table[self.positions.to(table.device)].unsqueeze(0)

    def layer(self, key: int) -> "KVGather":
        return self

    def update(self, k: torch.Tensor, v: torch.Tensor):
        """Every rank's keys and values (one all-gather of both), and the mask of this rank's queries."""
        both = gather_sequence(torch.cat([k, v], dim=2), self.group)
        k_all, v_all = both.split([k.shape[2], v.shape[2]], dim=2)
        return k_all, v_all, self.mask(k.dtype)


class ContextParallel:
    """The hook `apply_cp` hangs on a model part: a KVGather per forward."""

    def __init__(self, group, seq_len: int):
        self.group, self.seq_len = group, seq_len
        self.cp_rank = dist.get_rank(group)

    def before(self, module, args: tuple, kwargs: dict):
        if kwargs.get("cache") is not None:
            raise RuntimeError("a KV cache (decoding) under context parallelism: generation runs at parallel.cp=1")
        doc_ids = kwargs.pop("doc_ids", None)
        kwargs["cache"] = KVGather(self.group, self.seq_len, self.cp_rank, doc_ids, device=args[0].device)
        return args, kwargs


def apply_cp(module: nn.Module, cp_mesh: DeviceMesh, seq_len: int) -> nn.Module:
    """Context parallelism for a model (or pipeline stage) whose forward takes this rank's part of each
    sequence (`shard_sequence`) and, with document masking, its `doc_ids`; seq_len: the whole sequence's."""
    local_positions(seq_len, cp_mesh.size(), 0)  # a seq_len the chunks do not divide fails here, not in forward
    hooks = ContextParallel(cp_mesh.get_group(), seq_len)
    module.register_forward_pre_hook(hooks.before, with_kwargs=True)
    return module
