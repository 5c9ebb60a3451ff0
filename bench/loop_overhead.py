"""The cost of trident's loop against a plain hand-written PyTorch loop: same model, same data, one process.

    .venv/bin/python bench/loop_overhead.py [hydra overrides...]

Prints JSON: median seconds per optimizer step of each loop and their ratio
(trident / plain; 1.0 = no overhead). Both loops alternate in rounds inside
one process, so they see the same machine load.
"""

import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from launch.local import spawn  # noqa: E402
from models.llama import ModelArgs, Transformer  # noqa: E402
from orchestrator.build.model import init_weights  # noqa: E402
from orchestrator.config import CONF_DIR  # noqa: E402
from orchestrator.config import register  # noqa: E402
from orchestrator.data.dataset import Batches, prepare  # noqa: E402
from orchestrator.train.trainer import Trainer, lr_at  # noqa: E402

ROUNDS, STEPS_PER_ROUND = 4, 15


def plain_loop(cfg, corpus, steps, start_step):
    """What a user would write by hand: no meshes, no wrappers, no metrics."""
    t, o = cfg.train, cfg.optim
    model = Transformer(ModelArgs.from_config(cfg.model))
    init_weights(model, t.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay)
    batches = Batches(corpus.train, t.seq_len, t.global_batch, t.micro_batch, t.seed, 0, 1)
    times = []
    for step in range(start_step, start_step + steps):
        t0 = time.perf_counter()
        micro = batches.step(step)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, o, t.steps)
        for x, y in micro:
            loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
            (loss / len(micro)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
        times.append(time.perf_counter() - t0)
    return times


def bench(env, device, cfg_dict, corpus, out_path):
    cfg = OmegaConf.create(cfg_dict)
    trainer = Trainer(cfg, env, device, str(Path(out_path).parent), corpus)
    torch.manual_seed(0)
    trident, plain = [], []
    for _ in range(ROUNDS):
        for _ in range(STEPS_PER_ROUND):
            t0 = time.perf_counter()
            trainer.train_step()
            trident.append(time.perf_counter() - t0)
        plain += plain_loop(cfg, corpus, STEPS_PER_ROUND, trainer.step - STEPS_PER_ROUND + 1)
    skip = STEPS_PER_ROUND // 3  # each round's first steps warm caches and allocators
    trident_s = statistics.median(trident[skip:])
    plain_s = statistics.median(plain[skip:])
    tokens = cfg.train.global_batch * cfg.train.seq_len
    result = {
        "model": cfg.model.name,
        "threads": torch.get_num_threads(),
        "tokens_per_step": tokens,
        "trident_step_s": round(trident_s, 5),
        "plain_step_s": round(plain_s, 5),
        "trident_tokens_per_s": round(tokens / trident_s, 1),
        "plain_tokens_per_s": round(tokens / plain_s, 1),
        "overhead_ratio": round(trident_s / plain_s, 4),
    }
    Path(out_path).write_text(json.dumps(result))


def main():
    import tempfile

    register()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=[
            "parallel.tp=1", "parallel.pp=1", "parallel.dp=1", "logging.wandb.mode=disabled", "checkpoint.dir=/unused", *sys.argv[1:]])
    corpus = prepare(cfg.data)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        spawn(bench, 1, OmegaConf.to_container(cfg, resolve=True), corpus, str(out), backend="gloo")
        print(out.read_text())


if __name__ == "__main__":
    main()
