"""The levers on one process: what activation checkpointing recomputes and saves, bf16 autocast, compile's fallback."""

import copy

import pytest
import torch
import torch.nn.functional as F

import orchestrator.build.levers as levers
from models.llama import ModelArgs, Transformer
from orchestrator.build.model import init_weights
from parallel.data_parallel import shard_owners

ARGS = ModelArgs(dim=32, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=64, multiple_of=16, max_seq_len=64)


@pytest.fixture(scope="module")
def model():
    m = Transformer(ARGS)
    init_weights(m, seed=0)
    return m


def _step(model, count_calls=False):
    """Forward and backward on a fixed batch: (loss, grads by name, attention calls per layer, bytes saved)."""
    calls = {key: 0 for key in model.layers}
    if count_calls:
        for key, block in model.layers.items():
            block.attention.register_forward_hook(lambda *_, key=key: calls.__setitem__(key, calls[key] + 1))
    saved = [0]

    def pack(t):
        saved[0] += t.numel() * t.element_size()
        return t

    tokens = torch.arange(4 * 16).reshape(4, 16) % ARGS.vocab_size
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = F.cross_entropy(model(tokens).flatten(0, 1).float(), tokens.roll(-1, 1).flatten())
    loss.backward()
    return loss.item(), {n: p.grad for n, p in model.named_parameters()}, calls, saved[0]


def test_activation_checkpointing_recomputes_the_chosen_blocks_with_same_names_and_gradients(model):
    _, ref_grads, _, ref_saved = _step(copy.deepcopy(model))
    saved = {}
    for mode, recomputed in [("full", {"0", "1", "2", "3"}), ("selective", {"0", "2"})]:
        m = levers.apply_ac(copy.deepcopy(model), mode)
        assert [n for n, _ in m.named_parameters()] == list(ref_grads)  # checkpoints stay compatible
        _, grads, calls, saved[mode] = _step(m, count_calls=True)
        assert calls == {k: 2 if k in recomputed else 1 for k in calls}, mode
        for name, g in grads.items():
            assert torch.equal(g, ref_grads[name]), (mode, name)
    # Only a recomputed block's input (and the head's activations) stay saved.
    assert saved["full"] < saved["selective"] < ref_saved


def test_bf16_autocast_computes_in_bf16_and_keeps_fp32_weights_and_gradients(model):
    ref_loss, ref_grads, _, _ = _step(copy.deepcopy(model))
    m = levers.apply_autocast(copy.deepcopy(model), torch.bfloat16, "cpu")
    assert m(torch.zeros(1, 4, dtype=torch.long)).dtype == torch.bfloat16
    loss, grads, _, _ = _step(m)
    assert all(p.dtype == torch.float32 for p in m.parameters())
    assert all(g.dtype == torch.float32 for g in grads.values())
    assert loss != ref_loss and abs(loss - ref_loss) < 2e-3 * ref_loss  # one bf16 rounding step of the loss


def test_compile_failure_prints_why_and_stays_eager(model, monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler here")

    monkeypatch.setattr(levers, "_COMPILE_WORKS", {})
    monkeypatch.setattr(torch, "compile", broken)
    m = copy.deepcopy(model)
    assert levers.apply_compile(m, "blocks") is False
    assert ("train.compile=true but torch.compile (backend inductor) does not work here (RuntimeError: no C++ "
            "compiler here); running eager") in capsys.readouterr().err
    assert "forward" not in vars(m.layers["0"])
    _step(m)


def test_zero1_owners_balance_whole_parameters_deterministically(model):
    params = list(model.parameters())
    owners = shard_owners(params, 2)
    assert owners == shard_owners(params, 2)
    load = [sum(p.numel() for p, o in zip(params, owners) if o == r) for r in range(2)]
    assert abs(load[0] - load[1]) <= max(p.numel() for p in params)


def test_compile_scope_is_the_whole_model_without_tp_or_per_block_dp_hooks():
    assert levers.compile_scope(tp=1, per_block_dp=False) == "model"
    assert levers.compile_scope(tp=1, per_block_dp=True) == "blocks"  # FSDP2 / DDP hooks stay between graphs
    assert levers.compile_scope(tp=2, per_block_dp=True) == "blocks"  # the vocab-parallel ends stay eager
    assert levers.compile_scope(tp=2, per_block_dp=False) == "blocks"


def _loss_and_grads(model, tokens):
    model.zero_grad(set_to_none=True)
    loss = model(tokens, tokens.roll(-1, 1))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_chunked_loss_is_the_whole_loss_up_to_float64_summation_order(model):
    """In float64 the only difference left is the order of the final sums (tokens per chunk, chunks):
    at most tokens x 2^-53 relatively, 1e-14 here; a wrong chunking would show at 1e-2."""
    m = copy.deepcopy(model).double()
    tokens = torch.arange(4 * 16).reshape(4, 16) % ARGS.vocab_size
    whole_loss, whole = _loss_and_grads(m, tokens)
    m.loss_chunks = 5  # uneven: 64 tokens in chunks of 13
    loss, grads = _loss_and_grads(m, tokens)
    bound = tokens.numel() * 2.0 ** -53
    assert abs(loss - whole_loss) <= bound * whole_loss
    for name, g in grads.items():
        assert (g - whole[name]).abs().max() <= 10 * bound * whole[name].abs().max(), name


def test_whole_model_compile_with_checkpointed_blocks_matches_eager_within_fp32_reduction_error(model):
    """The compiled model (its loss inside the graph, every block checkpointed) against eager, one step in fp32.

    Inductor fuses and reorders fp32 reductions; each value's rounding error is then bounded by the longest
    reduction it passes, K = 64 terms here (dim, tokens per sequence, vocabulary: all <= 64), times the unit
    roundoff 2^-24: the loss within K u, gradients within (layers + 1) K u of their largest entry.
    """
    tokens = torch.arange(4 * 16).reshape(4, 16) % ARGS.vocab_size
    ref_loss, ref = _loss_and_grads(copy.deepcopy(model), tokens)
    m = levers.apply_ac(copy.deepcopy(model), "full")
    assert levers.apply_compile(m, "model")
    loss, grads = _loss_and_grads(m, tokens)
    ku = 64 * 2.0 ** -24
    assert abs(loss - ref_loss) <= ku * ref_loss
    for name, g in grads.items():
        assert (g - ref[name]).abs().max() <= (ARGS.n_layers + 1) * ku * ref[name].abs().max(), name


def test_autocast_activation_formula_counts_each_linears_own_bf16_cast(tmp_path):
    """Under autocast every linear saves its own bf16 copy of its input (wq, wk, wv each): the formula's
    per-token bytes equal what autograd keeps saved, measured by the meter, to 0.1% (the rest: the loss's
    few scalars)."""
    from orchestrator.planner.memory import activation_peaks, probe_shards
    from orchestrator.planner.meter import SavedTensorMeter
    from tests.conftest import make_cfg

    cfg = make_cfg("model.dim=64", "model.n_heads=4", "model.n_kv_heads=2", "model.n_layers=2", "train.seq_len=64",
                   "train.micro_batch=2", "parallel.dp=1", "train.dtype=bf16", tmp=tmp_path)
    m = Transformer(ModelArgs.from_config(cfg.model))
    init_weights(m, seed=0)
    levers.apply_autocast(m, torch.bfloat16, "cpu")
    tokens = torch.arange(2 * 64).reshape(2, 64) % 256
    meter = SavedTensorMeter([m])
    with meter.measuring():
        m(tokens, tokens.roll(-1, 1)).backward()
    predicted = activation_peaks(cfg, probe_shards(cfg))[0]
    assert abs(predicted - meter.peak) <= 1e-3 * meter.peak
    # Without the per-op casts the formula would be short by 3 x 2 bytes x dim per token and block.
    assert meter.peak - (predicted - 2 * 3 * 2 * 64 * 2 * 64) > 0.015 * meter.peak
