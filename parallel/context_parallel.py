"""Context parallelism's building blocks: a sequence cut over the cp ranks, and attention over all of it.

Llama 3's scheme (issue 22): the sequence is cut into 2·cp chunks and rank r
of the cp group holds chunks r and 2cp-1-r, so every rank does the same
causal work (an early chunk attends to few keys, its partner late in the
sequence to many). In attention each rank all-gathers the keys and values of
its kv heads across the group and its own queries attend to them by their
absolute positions (and their documents), so any mask works, and under GQA
the gathered K/V are smaller than Q. The attention is blockwise
(`_ChunkedAttention`): a query chunk visits the key chunks up to its own, so
no mask of the queries against the whole sequence is ever made. In backward,
the gathered K/V gradients are reduce-scattered back: each rank keeps the sum
of every rank's gradient for its own keys and values.

`KVGather` is a cache for the model's attention (`Attention.forward` asks a
cache with `attend` for its output; `cache.rope` gives each token's rotary
angles), so the model code needs no knowledge of cp. `apply_cp` hangs it on a model (or pipeline stage) from
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

import functools
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


KEY_BLOCK = 512  # keys per block of the blockwise attention


def _spans(n: int, block: int) -> list[tuple[int, int]]:
    return [(a, min(a + block, n)) for a in range(0, n, block)]


def _block_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, q_docs, k_docs) -> Optional[torch.Tensor]:
    """(batch or 1, 1, 1, c_q, c_k) bool, True where a query may attend, or None where every query may
    attend every key (a key chunk wholly before the query chunk, no documents)."""
    mask = None
    if k_pos[-1] > q_pos[0]:  # the diagonal block: causal inside it
        mask = (k_pos[None, :] <= q_pos[:, None])[None, None, None]
    if q_docs is not None:
        same = (q_docs[:, :, None] == k_docs[:, None, :])[:, None, None]
        mask = same if mask is None else mask & same
    return mask


def _mask_of(docs, qs: slice, ks: slice, q_pos: torch.Tensor, k_pos: torch.Tensor) -> Optional[torch.Tensor]:
    """One block's mask: causal on the diagonal, and the documents of its queries and keys where given."""
    q_docs, k_docs = (None, None) if docs is None else (docs[0][:, qs], docs[1][:, ks])
    return _block_mask(q_pos, k_pos, q_docs, k_docs)


def _scores(q: torch.Tensor, k: torch.Tensor, scale: float, mask) -> torch.Tensor:
    """q (b, kvh, g, c_q, d) against k (b, kvh, c_k, d): (b, kvh, g, c_q, c_k) fp32, -inf where masked."""
    s = torch.matmul(q, k.unsqueeze(2).transpose(-1, -2)) * scale
    return s if mask is None else s.masked_fill(~mask, float("-inf"))


class _ChunkedAttention(torch.autograd.Function):
    """Causal (and document-masked) attention of this rank's query chunks to the gathered keys, one chunk of
    keys at a time: the attention of a query chunk at chunk index i runs over key chunks 0..i only, with an
    online softmax (flash attention's recurrence, in fp32) and no mask bigger than one chunk against one
    chunk. Backward recomputes each block's probabilities from the saved log-sum-exp. Saved for backward:
    q, the gathered K and V (at their kv heads: grouped-query attention without repeating them), the output
    and the log-sum-exp; the dense mask of the queries against every key is never made.

    q (b, s_local, h, d); k, v (b, s, kvh, d) in gathered order; plan: [(query slice, [(key slice, q
    positions, k positions)])]; docs: (this rank's (b, s_local), the gathered (b, s)) or None.
    """

    @staticmethod
    def forward(ctx, q, k, v, plan, docs):
        b, sq, h, d = q.shape
        kvh = k.shape[2]
        g, scale = h // kvh, d ** -0.5
        qf = q.float().permute(0, 2, 1, 3).reshape(b, kvh, g, sq, d)
        kf, vf = k.float().transpose(1, 2), v.float().transpose(1, 2)  # (b, kvh, s, d)
        out = torch.empty(b, kvh, g, sq, d, dtype=torch.float32, device=q.device)
        lse = torch.empty(b, kvh, g, sq, dtype=torch.float32, device=q.device)
        for qs, blocks in plan:
            qc = qf[:, :, :, qs]
            m = torch.full(qc.shape[:-1], float("-inf"), device=q.device)
            l = torch.zeros_like(m)
            acc = torch.zeros_like(qc)
            for ks, q_pos, k_pos in blocks:
                mask = _mask_of(docs, qs, ks, q_pos, k_pos)
                s = _scores(qc, kf[:, :, ks], scale, mask)
                m_new = torch.maximum(m, s.amax(-1))
                safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)  # rows with no key yet
                p = torch.exp(s - safe[..., None])
                shrink = torch.exp(m - safe)
                l = l * shrink + p.sum(-1)
                acc = acc * shrink[..., None] + torch.matmul(p, vf[:, :, ks].unsqueeze(2))
                m = m_new
            out[:, :, :, qs] = acc / l[..., None]
            lse[:, :, :, qs] = m + torch.log(l)
        result = out.reshape(b, h, sq, d).transpose(1, 2).to(q.dtype).contiguous()  # (b, s_local, h, d)
        ctx.save_for_backward(q, k, v, result, lse)
        ctx.plan, ctx.docs = plan, docs
        return result

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        plan, docs = ctx.plan, ctx.docs
        b, sq, h, d = q.shape
        kvh = k.shape[2]
        g, scale = h // kvh, d ** -0.5
        grouped = lambda t: t.float().permute(0, 2, 1, 3).reshape(b, kvh, g, sq, d)  # noqa: E731
        qf, of, dof = grouped(q), grouped(out), grouped(grad_out)
        kf, vf = k.float().transpose(1, 2), v.float().transpose(1, 2)
        dq, dk, dv = torch.zeros_like(qf), torch.zeros_like(kf), torch.zeros_like(vf)
        delta = (dof * of).sum(-1)  # rowsum(dO * O)
        for qs, blocks in plan:
            qc, doc_, lc, dc = qf[:, :, :, qs], dof[:, :, :, qs], lse[:, :, :, qs], delta[:, :, :, qs]
            for ks, q_pos, k_pos in blocks:
                mask = _mask_of(docs, qs, ks, q_pos, k_pos)
                p = torch.exp(_scores(qc, kf[:, :, ks], scale, mask) - lc[..., None])
                dv[:, :, ks] += torch.matmul(p.transpose(-1, -2), doc_).sum(2)
                ds = p * (torch.matmul(doc_, vf[:, :, ks].unsqueeze(2).transpose(-1, -2)) - dc[..., None])
                dq[:, :, :, qs] += torch.matmul(ds, kf[:, :, ks].unsqueeze(2)) * scale
                dk[:, :, ks] += torch.matmul(ds.transpose(-1, -2), qc).sum(2) * scale
        dq = dq.reshape(b, h, sq, d).transpose(1, 2).to(q.dtype)
        return dq, dk.transpose(1, 2).to(k.dtype), dv.transpose(1, 2).to(v.dtype), None, None


@functools.lru_cache(maxsize=64)
def attention_plan(seq: int, cp: int, cp_rank: int, device=None, block: int = KEY_BLOCK) -> tuple[torch.Tensor, list]:
    """This rank's tokens' positions, and which keys each of its query chunks attends to as _ChunkedAttention
    walks them: [(query slice, [(key slice in gathered order, query positions, key positions)])]. Key
    chunks 0..i for the query chunk at chunk index i, each in blocks of at most `block` keys: one block's
    scores (heads x chunk x block, fp32) are what attention holds at a time beyond what it saves. The same
    for every micro-batch: made once (read-only tensors, shared)."""
    size = seq // (2 * cp)
    gathered = gathered_positions(seq, cp)
    start = {int(gathered[i]) // size: i for i in range(0, seq, size)}  # where each chunk sits once gathered
    positions = local_positions(seq, cp, cp_rank, device)
    plan = []
    for piece, chunk in enumerate(chunk_ids(cp, cp_rank)):
        q_pos = positions[piece * size:(piece + 1) * size]
        blocks = [(slice(start[j] + a, start[j] + e), q_pos, torch.arange(j * size + a, j * size + e, device=device))
                  for j in range(chunk + 1) for a, e in _spans(size, block)]
        plan.append((slice(piece * size, (piece + 1) * size), blocks))
    return positions, plan


class KVGather:
    """One micro-batch's attention under cp, as a cache the model's attention already understands.

    doc_ids: (batch, seq_local) the documents of this rank's tokens, or None for plain causal
    attention. `attend(q, k, v)` gathers every rank's keys and values (one all-gather of both) and
    computes this rank's queries' attention blockwise (_ChunkedAttention): a query chunk attends to the
    key chunks before it and, causally, to its own. A dense (seq_local x seq) mask in SDPA would be
    saved for backward and grow with the square of the sequence (seq_len 8192 at cp=4: 64 MiB per
    micro-batch, more than a small model's whole activations).
    """

    def __init__(self, group, seq: int, cp_rank: int, doc_ids: Optional[torch.Tensor] = None, device=None):
        self.group = group
        self.positions, self.plan = attention_plan(seq, dist.get_world_size(group), cp_rank, device, KEY_BLOCK)
        # The documents of every key, in gathered order (no gradient flows through ids).
        self.docs = None if doc_ids is None else (doc_ids, gather_sequence(doc_ids, group))

    def rope(self, table: torch.Tensor) -> torch.Tensor:
        """The rotary angles of this rank's tokens, by their absolute positions: (1, seq_local, head_dim // 2, 2)."""
        return table[self.positions.to(table.device)].unsqueeze(0)

    def layer(self, key: int) -> "KVGather":
        return self

    def gather(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Every rank's keys and values, in gathered order (one all-gather of both; backward: reduce-scatter)."""
        both = gather_sequence(torch.cat([k, v], dim=2), self.group)
        k_all, v_all = both.split([k.shape[2], v.shape[2]], dim=2)
        return k_all, v_all

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """This rank's attention output (batch, seq_local, heads, head_dim) from its q, k and v (after RoPE)."""
        k_all, v_all = self.gather(k, v)
        if q.is_meta:  # a pipeline stage's shape inference
            return torch.empty_like(q)
        return _ChunkedAttention.apply(q, k_all, v_all, self.plan, self.docs)


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
