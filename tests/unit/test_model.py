"""The Llama model: published sizes on the meta device, deterministic init, RoPE and causality."""

import math

import pytest
import torch

from models.llama import ModelArgs, Transformer, apply_rope, full_init_value, num_params, rope_table
from orchestrator.build.model import init_weights
from tests.conftest import compose_as_shipped


@pytest.mark.parametrize(
    "name, published_billions, ffn_hidden",
    [
        ("llama3-8b", "8.03", 14336),
        ("llama3-70b", "70.6", 28672),
        ("llama3-405b", "405.9", 53248),
        ("llama3-1b", "1.24", 8192),
    ],
)
def test_llama3_sizes_match_published_parameter_counts_on_meta(name, published_billions, ffn_hidden):
    model = meta_model_full(name)
    assert model.args.ffn_hidden == ffn_hidden
    n = num_params(model)
    # Equal to the published figure at the precision it is published with.
    decimals = len(published_billions.split(".")[1])
    assert f"{n / 1e9:.{decimals}f}" == published_billions, n


def meta_model_full(name: str) -> Transformer:
    """The preset exactly as shipped (make_cfg's tiny overrides would shrink it)."""
    cfg = compose_as_shipped(f"model={name}")
    with torch.device("meta"):
        return Transformer(ModelArgs.from_config(cfg.model))


def test_llama_125m_is_125m_and_debug_fits_a_cpu():
    assert abs(num_params(meta_model_full("llama-125m")) - 125e6) / 125e6 < 0.01
    assert num_params(meta_model_full("llama-debug")) < 2e6


def test_initial_value_depends_only_on_seed_and_parameter_name():
    args = ModelArgs(dim=32, n_layers=2, n_heads=4, vocab_size=64)
    a = full_init_value("layers.0.attention.wq.weight", (32, 32), args, 7, "cpu")
    b = full_init_value("layers.0.attention.wq.weight", (32, 32), args, 7, "cpu")
    c = full_init_value("layers.1.attention.wq.weight", (32, 32), args, 7, "cpu")
    d = full_init_value("layers.0.attention.wq.weight", (32, 32), args, 8, "cpu")
    assert torch.equal(a, b)
    assert not torch.equal(a, c) and not torch.equal(a, d)
    assert a.std().item() == pytest.approx(0.02, rel=0.1)
    wo = full_init_value("layers.0.attention.wo.weight", (32, 32), args, 7, "cpu")
    assert wo.std().item() == pytest.approx(0.02 / math.sqrt(4), rel=0.1)
    assert torch.equal(full_init_value("norm.weight", (32,), args, 7, "cpu"), torch.ones(32))


def test_meta_built_model_initialises_like_a_cpu_built_one():
    args = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, multiple_of=16, max_seq_len=64)
    with torch.device("meta"):
        meta = Transformer(args)
    meta.to_empty(device="cpu")
    init_weights(meta, seed=3)
    cpu = Transformer(args)
    init_weights(cpu, seed=3)
    for (name, p), (_, q) in zip(meta.named_parameters(), cpu.named_parameters()):
        assert torch.equal(p, q), name
    assert torch.equal(meta.rope, cpu.rope)


def test_rope_scores_depend_only_on_relative_position():
    table = rope_table(head_dim=8, max_seq_len=16, theta=10000.0)
    q = torch.randn(1, 1, 1, 8).expand(1, 16, 1, 8)
    k = torch.randn(1, 1, 1, 8).expand(1, 16, 1, 8)
    rq, rk = apply_rope(q, table)[0, :, 0], apply_rope(k, table)[0, :, 0]
    assert torch.allclose(rq.norm(dim=-1), q[0, :, 0].norm(dim=-1), atol=1e-5)
    assert (rq[5] @ rk[3]).item() == pytest.approx((rq[9] @ rk[7]).item(), abs=1e-5)
    assert (rq[5] @ rk[3]).item() != pytest.approx((rq[5] @ rk[4]).item(), abs=1e-3)


def test_forward_is_causal_and_shaped():
    args = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, multiple_of=16, max_seq_len=64)
    model = Transformer(args)
    init_weights(model, seed=0)
    tokens = torch.randint(0, 64, (2, 12))
    logits = model(tokens)
    assert logits.shape == (2, 12, 64)
    changed = tokens.clone()
    changed[:, 8:] = (changed[:, 8:] + 1) % 64
    assert torch.allclose(model(changed)[:, :8], logits[:, :8], atol=1e-6)
    assert not torch.allclose(model(changed)[:, 8:], logits[:, 8:], atol=1e-3)


def test_tied_embeddings_share_one_tensor():
    args = ModelArgs(dim=32, n_layers=1, n_heads=4, vocab_size=64, multiple_of=16, tie_embeddings=True)
    model = Transformer(args)
    assert model.output.weight is model.tok_embeddings.weight
    assert num_params(model) == num_params(Transformer(ModelArgs(**{**args.__dict__, "tie_embeddings": False}))) - 64 * 32


@pytest.mark.parametrize("dp", [1, 2])
def test_a_tied_model_built_on_meta_stays_tied_once_materialized(dp, tmp_path):
    """`to_empty` gives each module a new tensor: without re-tying, the output projection became a second,
    separately initialised matrix (issue 11's llama3-1b run trained 1.50B parameters, not 1.24B)."""
    from orchestrator.build.model import build_model
    from parallel.mesh import ParallelDims, build_mesh, fake_world
    from tests.conftest import make_cfg

    cfg = make_cfg("model.tie_embeddings=true", f"parallel.dp={dp}", tmp=tmp_path)
    with fake_world(dp, 0):
        mesh = build_mesh(ParallelDims(1, 1, dp), "cpu")
        built = build_model(cfg.model, cfg.parallel, mesh, torch.device("cpu"), 0, train_cfg=cfg.train)
    model = built.modules[0]
    assert model.output.weight is model.tok_embeddings.weight
    assert sum(p.numel() for p in model.parameters()) * dp >= built.n_params  # counted once (FSDP: a shard)
    assert "output.weight" not in dict(model.named_parameters())
