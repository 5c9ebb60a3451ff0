"""Peak activation memory per pipeline rank: 1F1B against GPipe.

    .venv/bin/python bench/pipeline_memory.py [--pp 4] [--m 16] [hydra overrides...]

Each rank counts the bytes autograd keeps for backward (saved-tensor hooks;
parameters excluded, shared storages counted once) while one training step
runs, and reports the peak. GPipe keeps all m micro-batches' activations
alive on every stage; 1F1B at most pp - rank. On a GPU the same figure shows
in the allocator; on CPU this count is the direct measure. Prints JSON.
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from launch.local import spawn  # noqa: E402
from orchestrator.config import CONF_DIR  # noqa: E402
from orchestrator.config import register  # noqa: E402
from orchestrator.data.dataset import prepare  # noqa: E402
from orchestrator.planner.meter import SavedTensorMeter  # noqa: E402
from orchestrator.train.trainer import Trainer  # noqa: E402


def worker(env, device, cfg_dict, corpus, out_dir):
    trainer = Trainer(OmegaConf.create(cfg_dict), env, device, out_dir, corpus)
    meter = SavedTensorMeter(trainer.modules)
    with meter.measuring():
        trainer.forward_backward(trainer.batches.step(1))
    Path(out_dir, f"rank{env.rank}.json").write_text(json.dumps({"peak_bytes": meter.peak}))


def measure(schedule: str, pp: int, m: int, overrides: list[str]) -> list[int]:
    register()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=[
            "parallel.tp=1", f"parallel.pp={pp}", "parallel.dp=1", f"parallel.schedule={schedule}",
            "train.micro_batch=1", f"train.global_batch={m}", f"model.n_layers={pp}",
            "logging.wandb.mode=disabled", "checkpoint.dir=/unused", *overrides])
    corpus = prepare(cfg.data)
    with tempfile.TemporaryDirectory() as tmp:
        spawn(worker, pp, OmegaConf.to_container(cfg, resolve=True), corpus, tmp, backend="gloo")
        return [json.loads(Path(tmp, f"rank{r}.json").read_text())["peak_bytes"] for r in range(pp)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pp", type=int, default=4)
    ap.add_argument("--m", type=int, default=16)
    args, overrides = ap.parse_known_args()
    result = {"pp": args.pp, "microbatches": args.m, "unit": "MiB of activations saved for backward, per rank"}
    peaks = {s: measure(s, args.pp, args.m, overrides) for s in ("gpipe", "1f1b")}
    for s, values in peaks.items():
        result[s] = [round(v / 2**20, 3) for v in values]
    result["gpipe_over_1f1b"] = [round(g / f, 3) for g, f in zip(peaks["gpipe"], peaks["1f1b"])]
    result["theory_gpipe_over_1f1b"] = [round(args.m / min(args.m, args.pp - r), 3) for r in range(args.pp)]
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
