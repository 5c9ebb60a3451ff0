"""Checkpoint save and load time and size, and how long an async save blocks the loop against a sync one.

    .venv/bin/python bench/checkpoint_io.py [hydra overrides...]   (e.g. model=llama-125m parallel.tp=1 parallel.pp=1)

Trains one step (so AdamW state exists), then saves synchronously, saves
asynchronously (timing only what the loop waits for, then the whole write),
and loads the checkpoint back, all at the configured layout. Prints JSON.
"""

import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch.distributed as dist  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from launch.local import spawn  # noqa: E402
from orchestrator.config import CONF_DIR  # noqa: E402
from orchestrator.config import register  # noqa: E402
from orchestrator.data.dataset import prepare  # noqa: E402
from orchestrator.runs import checkpoint  # noqa: E402
from orchestrator.train.trainer import Trainer  # noqa: E402


def timed(fn):
    dist.barrier()
    t0 = time.perf_counter()
    out = fn()
    dist.barrier()
    return time.perf_counter() - t0, out


def worker(env, device, cfg_dict, corpus, out_dir):
    cfg = OmegaConf.create(cfg_dict)
    trainer = Trainer(cfg, env, device, out_dir, corpus)
    trainer.train_step()
    meta = {"config": cfg_dict}
    sync_s, path = timed(lambda: checkpoint.Saver(f"{out_dir}/sync").save(trainer.modules, trainer.optimizers, 1, meta))
    saver = checkpoint.Saver(f"{out_dir}/async", async_save=True)
    blocked_s, _ = timed(lambda: saver.save(trainer.modules, trainer.optimizers, 1, meta))
    total_s, _ = timed(saver.wait)
    load_s, _ = timed(lambda: checkpoint.load(trainer.modules, trainer.optimizers, Path(path)))
    if env.rank == 0:
        size = sum(f.stat().st_size for f in Path(path).iterdir())
        Path(out_dir, "result.json").write_text(json.dumps({
            "model": cfg.model.name, "parameters": trainer.n_params,
            "layout": {"tp": cfg.parallel.tp, "pp": cfg.parallel.pp, "dp": cfg.parallel.dp},
            "size_mb": round(size / 1e6, 2), "save_s": round(sync_s, 3), "load_s": round(load_s, 3),
            "async_blocked_s": round(blocked_s, 3), "async_total_s": round(blocked_s + total_s, 3),
        }))


def main():
    register()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=["logging.wandb.mode=disabled", "checkpoint.dir=/unused",
                                                      *sys.argv[1:]])
    with tempfile.TemporaryDirectory() as tmp:
        world = cfg.parallel.tp * cfg.parallel.pp * cfg.parallel.dp
        spawn(worker, world, OmegaConf.to_container(cfg, resolve=True), prepare(cfg.data), tmp, backend="gloo")
        print(Path(tmp, "result.json").read_text())


if __name__ == "__main__":
    main()
