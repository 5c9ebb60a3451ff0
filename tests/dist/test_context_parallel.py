"""Context parallelism's attention (parallel/context_parallel.py) on real gloo ranks against one process.

One launch of 4 ranks: cp=2 (two groups of 2) and cp=4, plain causal and with document masks, grouped-query
attention with fewer kv heads than cp ranks. Each rank attends with its head-tail chunks of the queries to the
keys and values gathered over its cp group, one chunk of keys at a time; its output and the gradients of its
own q, k and v must equal those slices of a one-process SDPA attention over the whole sequence, in fp32 within
1e-5 (the same terms summed in another order: each query's softmax runs over the same keys, blockwise).
"""

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from launch.local import spawn
from parallel import context_parallel
from parallel.context_parallel import KVGather, gathered_positions, local_positions, shard_sequence

pytestmark = pytest.mark.dist

BATCH, SEQ, HEADS, KV_HEADS, HEAD_DIM = 2, 48, 4, 2, 8


def inputs():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(BATCH, SEQ, HEADS, HEAD_DIM, generator=gen)
    k = torch.randn(BATCH, SEQ, KV_HEADS, HEAD_DIM, generator=gen)
    v = torch.randn(BATCH, SEQ, KV_HEADS, HEAD_DIM, generator=gen)
    upstream = torch.randn(BATCH, SEQ, HEADS, HEAD_DIM, generator=gen)
    # Documents of uneven lengths, different per sequence.
    doc_ids = torch.stack([torch.repeat_interleave(torch.arange(4), torch.tensor(lengths))
                           for lengths in ([5, 19, 11, 13], [30, 2, 8, 8])])
    return q, k, v, upstream, doc_ids


def attend(q, k, v, mask):
    """The model's attention (models/llama.py Attention): kv heads repeated, then SDPA over (batch, heads, ...)."""
    repeat = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(repeat, dim=2), v.repeat_interleave(repeat, dim=2)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=mask, is_causal=mask is None)
    return out.transpose(1, 2)


def reference(docs: bool):
    q, k, v, upstream, doc_ids = inputs()
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    mask = None
    if docs:
        causal = torch.ones(SEQ, SEQ, dtype=torch.bool).tril()
        mask = (doc_ids[:, :, None] == doc_ids[:, None, :]).unsqueeze(1) & causal
    out = attend(q, k, v, mask)
    out.backward(upstream)
    return out.detach(), q.grad, k.grad, v.grad


def _worker(env, device, out_dir):
    rank = env.rank
    _, groups2 = dist.new_subgroups_by_enumeration([[0, 1], [2, 3]])
    results = {}
    for cp, group in ((2, groups2[rank // 2]), (4, dist.group.WORLD)):
        cp_rank = rank % cp
        for docs, block in ((False, context_parallel.KEY_BLOCK), (True, context_parallel.KEY_BLOCK), (True, 5)):
            # block 5: key blocks smaller than a chunk (6 or 12 tokens), some of them across the diagonal.
            context_parallel.KEY_BLOCK, default = block, context_parallel.KEY_BLOCK
            q, k, v, upstream, doc_ids = inputs()
            mine = [shard_sequence(t, cp, cp_rank).clone().requires_grad_() for t in (q, k, v)]
            gather = KVGather(group, SEQ, cp_rank, shard_sequence(doc_ids, cp, cp_rank) if docs else None)
            context_parallel.KEY_BLOCK = default
            out = gather.layer(0).attend(*mine)
            out.backward(shard_sequence(upstream, cp, cp_rank))
            ref = [shard_sequence(t, cp, cp_rank) for t in reference(docs)]
            got = [out.detach(), *(t.grad for t in mine)]
            name = f"cp{cp}-{'docs' if docs else 'causal'}" + ("-block5" if block == 5 else "")
            results[name] = [((g - r).abs().max() / r.abs().max()).item() for g, r in zip(got, ref)]
    Path(out_dir, f"rank-{rank}.json").write_text(json.dumps(results))


@pytest.fixture(scope="module")
def errors(tmp_path_factory):
    out = tmp_path_factory.mktemp("cp")
    spawn(_worker, 4, str(out), backend="gloo", timeout_s=60)
    return {int(p.stem.split("-")[1]): json.loads(p.read_text()) for p in out.glob("rank-*.json")}


@pytest.mark.parametrize("case", ["cp2-causal", "cp2-docs", "cp2-docs-block5", "cp4-causal", "cp4-docs",
                                  "cp4-docs-block5"])
def test_each_rank_attends_to_the_gathered_keys_and_gets_one_process_output_and_gradients(errors, case):
    assert sorted(errors) == [0, 1, 2, 3]
    for rank, by_case in errors.items():
        out, dq, dk, dv = by_case[case]
        assert max(out, dq, dk, dv) < 1e-5, (rank, case, by_case[case])


def test_head_tail_chunks_balance_the_causal_work_and_cover_the_sequence_once():
    for cp in (1, 2, 4):
        held = [local_positions(64, cp, r) for r in range(cp)]
        assert torch.equal(torch.sort(torch.cat(held)).values, torch.arange(64))
        assert torch.equal(gathered_positions(64, cp), torch.cat(held))
        # A query at position p attends to p + 1 keys: every rank the same total.
        assert len({int((pos + 1).sum()) for pos in held}) == 1
    assert local_positions(16, 2, 0).tolist() == [0, 1, 2, 3, 12, 13, 14, 15]
    with pytest.raises(ValueError, match="2 x cp = 8"):
        local_positions(12, 4, 0)
