"""Run a layout on real gloo processes and bring back what tests compare.

Each launch records, in one go: the initial weights gathered from their
shards, the gradients of the first step's batch gathered and compared with a
plain single-device model's in the same process, and the loss curve of a
short training run (metrics.jsonl).
"""

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from launch.local import spawn
from models.llama import ModelArgs, Transformer
from orchestrator.build import init_weights
from orchestrator.data import Batches, prepare
from orchestrator.trainer import Trainer
from orchestrator.validate import validate
from tests.conftest import make_cfg


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t.detach().clone()


def reference_grads(cfg, corpus) -> dict[str, torch.Tensor]:
    """The first step's gradient of a plain single-device model over the whole global batch."""
    model = Transformer(ModelArgs.from_config(cfg.model))
    init_weights(model, cfg.train.seed)
    t = cfg.train
    (inputs, targets), = Batches(corpus.train, t.seq_len, t.global_batch, t.global_batch, t.seed, 0, 1).step(1)
    F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten()).backward()
    return {name: p.grad for name, p in model.named_parameters()}


def _worker(env, device, cfg_dict, run_dir, corpus):
    cfg = OmegaConf.create(cfg_dict)
    trainer = Trainer(cfg, env, device, run_dir, corpus)
    vocab = cfg.model.vocab_size  # padding rows (tp not dividing the vocabulary) are not compared
    init = {name: _full(p)[:vocab] if "tok_emb" in name or name.startswith("output") else _full(p)
            for name, p in trainer.module.named_parameters()}
    trainer.forward_backward(trainer.batches.step(1))
    grads = {name: _full(p.grad) for name, p in trainer.module.named_parameters()}
    trainer.optimizer.zero_grad(set_to_none=True)
    if env.rank == 0:
        ref = reference_grads(cfg, corpus)
        errors = {}
        for name, g in grads.items():
            g = g[:vocab] if g.shape[0] > ref[name].shape[0] else g
            errors[name] = ((g - ref[name]).abs().max() / ref[name].abs().max().clamp_min(1e-12)).item()
        torch.save(init, f"{run_dir}/init.pt")
        Path(run_dir, "grad_errors.json").write_text(json.dumps(errors))
    trainer.fit()


class Result:
    def __init__(self, run_dir: Path):
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        self.rows = {r["step"]: r for r in rows}
        self.init = torch.load(run_dir / "init.pt")
        self.grad_errors = json.loads((run_dir / "grad_errors.json").read_text())

    def losses(self) -> dict[int, float]:
        return {s: r["loss"] for s, r in self.rows.items() if "loss" in r}


def run_layout(tmp_path: Path, name: str, tp: int = 1, dp: int = 1, *overrides: str, steps: int = 10) -> Result:
    cfg = make_cfg(f"parallel.tp={tp}", f"parallel.dp={dp}", f"train.steps={steps}", "checkpoint.at_end=false",
                   *overrides, tmp=tmp_path)
    validate(cfg)
    run_dir = tmp_path / name
    run_dir.mkdir()
    spawn(_worker, tp * dp, OmegaConf.to_container(cfg, resolve=True), str(run_dir), prepare(cfg.data), timeout_s=120)
    return Result(run_dir)


def assert_same_run(got: Result, ref: Result, rel: float = 1e-5) -> None:
    """Identical initial weights, loss and grad-norm curves within rel, and first-step gradients within rel."""
    assert set(got.init) == set(ref.init)
    for name in ref.init:
        assert torch.equal(got.init[name], ref.init[name]), name
    assert sorted(got.losses()) == sorted(ref.losses()) and len(ref.losses()) >= 3
    for s in ref.losses():
        for key in ("loss", "grad_norm"):
            assert abs(got.rows[s][key] - ref.rows[s][key]) <= rel * abs(ref.rows[s][key]), (s, key)
    for s, r in ref.rows.items():
        if "eval_loss" in r:
            assert abs(got.rows[s]["eval_loss"] - r["eval_loss"]) <= rel * r["eval_loss"], s
    worst = max(got.grad_errors.values())
    assert worst < rel, {k: v for k, v in got.grad_errors.items() if v >= rel}
