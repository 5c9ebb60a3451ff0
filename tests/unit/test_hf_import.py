"""A Hugging Face Llama read through the finetune-llama preset, in one process, against transformers."""

import json
from dataclasses import replace

import pytest
import torch

from models.hf import export, load_hf
from models.llama import ModelArgs, Transformer
from orchestrator.build.model import init_weights
from orchestrator.validate import ConfigError, validate
from tests.conftest import compose_as_shipped
from tests.textdata import hf_llama

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}


@pytest.fixture(scope="module")
def scaled_llama(tmp_path_factory, bpe_json):
    """A tiny HF Llama whose rotary embeddings use Llama 3.1's scaling (short original context, so it matters)."""
    folder = hf_llama(tmp_path_factory.mktemp("llama3-rope"), bpe_json, layers=2)
    config = json.loads((folder / "config.json").read_text())
    config["rope_parameters"] = {"rope_theta": 10000.0, **LLAMA3}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _preset(folder, tmp_path, *extra):
    return compose_as_shipped("+experiment=finetune-llama", f"model.init_from={folder}", "train.seq_len=64",
                              "parallel.tp=1", "parallel.pp=1", "parallel.dp=1", "logging.wandb.mode=disabled",
                              f"checkpoint.dir={tmp_path / 'ck'}", f"data.cache_dir={tmp_path / 'cache'}", *extra)


def test_the_preset_takes_the_shape_and_llama3_rope_scaling_from_the_folder_and_matches_transformers(scaled_llama, tmp_path):
    import transformers

    cfg = _preset(scaled_llama, tmp_path)
    validate(cfg)
    args = ModelArgs.from_config(cfg.model)
    assert (args.dim, args.n_layers, args.n_heads, args.kv_heads, args.vocab_size, args.ffn_hidden) == (32, 2, 4, 2, 2048, 96)
    assert args.rope_scaling == {k: v for k, v in LLAMA3.items() if k != "rope_type"}
    ours = Transformer(args)
    init_weights(ours, seed=0, source=load_hf(str(scaled_llama), args))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(scaled_llama), dtype=torch.float32)
    tokens = torch.randint(0, 2048, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = theirs(tokens).logits
        assert (ours(tokens) - want).abs().max() < 1e-5 * want.abs().max()
        # Without the scaling the same weights give other logits: the scaling is what matched.
        plain = Transformer(replace(args, rope_scaling=None))
        init_weights(plain, seed=0, source=load_hf(str(scaled_llama), args))
        assert (plain(tokens) - want).abs().max() > 1e-3 * want.abs().max()
    # Exported back, transformers reads the scaling again and gives the same logits.
    export({k: v for k, v in ours.state_dict().items() if k != "rope"}, args, str(tmp_path / "out"))
    again = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), dtype=torch.float32)
    with torch.no_grad():
        assert (again(tokens).logits - want).abs().max() < 1e-5 * want.abs().max()


def test_an_unsupported_rotary_scaling_or_a_different_model_is_refused_before_launch(scaled_llama, tmp_path):
    config = json.loads((scaled_llama / "config.json").read_text())
    other = tmp_path / "yarn"
    other.mkdir()
    (other / "model.safetensors").write_bytes((scaled_llama / "model.safetensors").read_bytes())
    (other / "config.json").write_text(json.dumps({**config, "rope_parameters": {"rope_type": "yarn", "factor": 4.0}}))
    with pytest.raises(ConfigError, match="rope_type='yarn'.*valid: plain RoPE"):
        validate(_preset(other, tmp_path))
    with pytest.raises(ConfigError, match="holds a different model: n_layers=2 there, 3 here"):
        validate(_preset(scaled_llama, tmp_path, "model.n_layers=3"))
