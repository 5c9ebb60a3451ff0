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


def gathered(t: torch.Tensor) -> torch.Tensor:
    """The full value of a possibly sharded tensor (a collective for DTensors), on the CPU."""
    return (t.full_tensor() if hasattr(t, "full_tensor") else t.detach().clone()).cpu()


def reference_grads(cfg, corpus, device=torch.device("cpu")) -> dict[str, torch.Tensor]:
    """The first step's gradient of a plain single-device model over the whole global batch, on `device`
    (whose random generator makes the initial weights: a GPU run is compared with a GPU-made reference)."""
    with torch.device(device):
        model = Transformer(ModelArgs.from_config(cfg.model))
    init_weights(model, cfg.train.seed)
    t = cfg.train
    (inputs, targets), = Batches(corpus.train, t.seq_len, t.global_batch, t.global_batch, t.seed, 0, 1).step(1)
    F.cross_entropy(model(inputs.to(device)).flatten(0, 1), targets.to(device).flatten()).backward()
    return {name: p.grad.cpu() for name, p in model.named_parameters()}


def _worker(env, device, cfg_dict, run_dir, corpus):
    cfg = OmegaConf.create(cfg_dict)
    trainer = Trainer(cfg, env, device, run_dir, corpus)
    vocab = cfg.model.vocab_size  # padding rows (tp not dividing the vocabulary) are not compared
    named = [(name, p) for m in trainer.modules for name, p in m.named_parameters()]
    vocab_rows = ("tok_embeddings.weight", "output.weight")
    init = {name: gathered(p) for name, p in named}
    init = {name: t[:vocab] if name in vocab_rows else t for name, t in init.items()}
    trainer.forward_backward(trainer.batches.step(1))
    grads = {name: gathered(p.grad) for name, p in named}
    trainer.zero_grad()
    # One writer per pipeline stage: the rank at dp=0, tp=0 of each pp rank.
    if trainer.mesh["dp"].get_local_rank() == 0 and trainer.mesh["tp"].get_local_rank() == 0:
        ref = reference_grads(cfg, corpus, device)
        errors = {}
        for name, g in grads.items():
            g = g[:vocab] if g.shape[0] > ref[name].shape[0] else g
            errors[name] = ((g - ref[name]).abs().max() / ref[name].abs().max().clamp_min(1e-12)).item()
        torch.save(init, f"{run_dir}/init-{env.rank}.pt")
        Path(run_dir, f"grad_errors-{env.rank}.json").write_text(json.dumps(errors))
    trainer.fit()


class Result:
    def __init__(self, run_dir: Path):
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        self.rows = {r["step"]: r for r in rows}
        self.init, self.grad_errors = {}, {}
        for path in sorted(run_dir.glob("init-*.pt")):
            self.init.update(torch.load(path))
        for path in sorted(run_dir.glob("grad_errors-*.json")):
            self.grad_errors.update(json.loads(path.read_text()))

    def losses(self) -> dict[int, float]:
        return {s: r["loss"] for s, r in self.rows.items() if "loss" in r}


def run_layout(tmp_path: Path, name: str, tp: int = 1, dp: int = 1, *overrides: str, pp: int = 1,
               steps: int = 10) -> Result:
    cfg = make_cfg(f"parallel.tp={tp}", f"parallel.pp={pp}", f"parallel.dp={dp}", f"train.steps={steps}",
                   "checkpoint.at_end=false", *overrides, tmp=tmp_path)
    validate(cfg)
    run_dir = tmp_path / name
    run_dir.mkdir()
    # The backend the config names (tests/conftest.py TINY: gloo), so the dist tier runs on CPU processes on
    # every machine, GPUs or not; the gpu tier names nccl.
    spawn(_worker, tp * pp * dp, OmegaConf.to_container(cfg, resolve=True), str(run_dir), prepare(cfg.data),
          backend=cfg.launcher.backend, timeout_s=120)
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
