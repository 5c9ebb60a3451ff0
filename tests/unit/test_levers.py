"""The levers on one process: what activation checkpointing recomputes and saves, bf16 autocast, compile's fallback."""

import copy

import pytest
import torch
import torch.nn.functional as F

import orchestrator.levers as levers
from models.llama import ModelArgs, Transformer
from orchestrator.build import init_weights
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

    monkeypatch.setattr(levers, "_COMPILE_WORKS", None)
    monkeypatch.setattr(torch, "compile", broken)
    m = copy.deepcopy(model)
    assert levers.apply_compile(m) is False
    assert "train.compile=true but torch.compile does not work here" in capsys.readouterr().err
    assert "forward" not in vars(m.layers["0"].attention)
    _step(m)


def test_zero1_owners_balance_whole_parameters_deterministically(model):
    params = list(model.parameters())
    owners = shard_owners(params, 2)
    assert owners == shard_owners(params, 2)
    load = [sum(p.numel() for p, o in zip(params, owners) if o == r) for r in range(2)]
    assert abs(load[0] - load[1]) <= max(p.numel() for p in params)
