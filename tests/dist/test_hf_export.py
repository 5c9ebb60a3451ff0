"""Hugging Face Llama export and import, checked against transformers itself (a test-only dependency)."""

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from launch.local import spawn
from models.hf import load_hf
from orchestrator.cli.export import load_full_model
from orchestrator.cli.export import main as export_main
from orchestrator.data.dataset import prepare
from orchestrator.runs import checkpoint
from orchestrator.train.trainer import Trainer
from tests.conftest import make_cfg
from tests.dist.harness import run_layout

pytestmark = pytest.mark.dist

TOKENS = torch.tensor([list(b"def add(a, b):\n    return a + b\n")])


def _train_save_and_logits(env, device, cfg_dict, corpus, out_dir):
    cfg = OmegaConf.create(cfg_dict)
    trainer = Trainer(cfg, env, device, out_dir, corpus)
    for _ in range(3):
        trainer.train_step()
    checkpoint.Saver(cfg.checkpoint.dir).save(trainer.modules, trainer.optimizers, trainer.step, {"config": cfg_dict})
    seq = TOKENS.shape[1]
    logits = trainer.pipeline.forward_only(TOKENS, (1, seq // cfg.parallel.tp, cfg.model.dim), torch.float32)
    if logits is not None:
        full = logits.full_tensor()
        if trainer.mesh["tp"].get_local_rank() == 0:
            torch.save(full, Path(out_dir, "logits.pt"))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hf")
    # seq_len must split over tp for sequence parallelism: the probe is 32 bytes.
    cfg = make_cfg("parallel.tp=2", "parallel.pp=2", "parallel.dp=1", "train.steps=3", tmp=tmp)
    assert TOKENS.shape[1] % 2 == 0
    spawn(_train_save_and_logits, 4, OmegaConf.to_container(cfg, resolve=True), prepare(cfg.data), str(tmp),
          timeout_s=120)
    ckpt = checkpoint.find_resume("auto", str(tmp / "checkpoints"))
    assert export_main([str(ckpt), str(tmp / "hf")]) == 0
    return tmp, ckpt


def test_transformers_loads_the_export_and_gives_the_parallel_models_logits(exported):
    import transformers  # the test extra installs it
    tmp, _ = exported
    model = transformers.LlamaForCausalLM.from_pretrained(str(tmp / "hf"), torch_dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        theirs = model(TOKENS).logits
    ours = torch.load(tmp / "logits.pt")
    assert theirs.shape == ours.shape == (1, TOKENS.shape[1], 256)
    assert (theirs - ours).abs().max().item() < 1e-4


def test_importing_the_export_gives_identical_weights_at_any_layout(exported):
    tmp, ckpt = exported
    state, args = load_full_model(ckpt)
    imported = load_hf(str(tmp / "hf"), args)
    assert set(imported) == set(state) - {"rope"}
    for name, value in imported.items():
        assert torch.equal(value, state[name]), name
    # A fine-tuning run starting from it, at another layout, starts from exactly these weights.
    run = run_layout(tmp, "init-from", 1, 2, f"model.init_from={tmp / 'hf'}", steps=2)
    for name, value in run.init.items():
        assert torch.equal(value, state[name]), name
