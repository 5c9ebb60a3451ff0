"""FSDP2 data parallelism against one process on CPU: does dp=2 give more global tokens/s than one process?

    .venv/bin/python bench/fsdp_scaling.py [--pairs 3] [--steps 20] [--variants full,full-keep,replicate]

torchtitan's debug model (6 layers, dim 256, 16 heads, vocabulary 2048, SwiGLU
to a multiple of 256: 6.16M parameters), seq 256, 8 sequences per dp rank per
step (one micro-batch), fp32, the training loop's own train_step. Each pair
runs one process (8 sequences a step) and each dp=2 variant (16 a step, 8 per
rank) back to back, in alternating order, so they see the same machine load;
the ratio is dp=2's global tokens/s over the one process's, per pair, from the
median step time of steps 4..steps.

variants  full       dp_shard=full: FSDP2 per block, each block's weights
                     gathered for forward and again for backward (the default)
          full-keep  the same with reshard_after_forward=False for the blocks
                     (gathered once per step; ZeRO-2's memory for ZeRO-3's code)
          replicate  DDP (dp_shard=replicate)

Ranks share the machine's cores (launch/rank.py gives each cpu_count / ranks
threads), so on a 2-core machine dp=2 has 1 thread per rank where the one
process has 2: the ratio measures how well two half-machines beat one whole.
Prints JSON; the target of issue 11 is a ratio >= 1.0 for `full`.
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from launch.local import spawn  # noqa: E402
from orchestrator.config import CONF_DIR, register  # noqa: E402
from orchestrator.data.dataset import prepare  # noqa: E402

DEBUG_MODEL = ["model.dim=256", "model.n_layers=6", "model.n_heads=16", "model.n_kv_heads=16",
               "model.vocab_size=2048", "model.multiple_of=256", "model.ffn_dim_multiplier=null",
               "model.rope_theta=500000", "train.seq_len=256", "train.dtype=fp32"]
VARIANTS = {"full": ["parallel.dp_shard=full"], "full-keep": ["parallel.dp_shard=full"],
            "replicate": ["parallel.dp_shard=replicate"]}


def worker(env, device, cfg_dict, corpus, out: str, steps: int, keep_gathered: bool):
    import functools

    import torch.distributed as dist

    import parallel.data_parallel as data_parallel
    from orchestrator.train.trainer import Trainer

    if keep_gathered:  # every unit keeps its weights gathered from forward to backward
        data_parallel.fully_shard = functools.partial(data_parallel.fully_shard, reshard_after_forward=False)
    cfg = OmegaConf.create(cfg_dict)
    trainer = Trainer(cfg, env, device, str(Path(out).parent), corpus)
    times = []
    for _ in range(steps):
        dist.barrier()
        t0 = time.perf_counter()
        trainer.train_step()
        times.append(time.perf_counter() - t0)
    if env.rank == 0:
        Path(out).write_text(json.dumps(times))


def run(base: list[str], extra: list[str], world: int, steps: int, keep: bool, tmp: str) -> float:
    """Global tokens/s of one launch: median step time of steps 4.. (the first ones warm up)."""
    register()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=[*base, *extra])
    out = Path(tempfile.mkdtemp(dir=tmp)) / "times.json"
    spawn(worker, world, OmegaConf.to_container(cfg, resolve=True), prepare(cfg.data), str(out), steps, keep,
          backend="gloo")
    step_s = statistics.median(json.loads(out.read_text())[3:])
    return cfg.train.global_batch * cfg.train.seq_len / step_s


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--variants", default="full,full-keep,replicate")
    opts, overrides = ap.parse_known_args()
    variants = [v for v in opts.variants.split(",") if v]
    with tempfile.TemporaryDirectory() as tmp:
        base = [*DEBUG_MODEL, "parallel.tp=1", "parallel.pp=1", "logging.wandb.mode=disabled",
                "checkpoint.at_end=false", f"checkpoint.dir={tmp}/ck", "train.micro_batch=8",
                "train.steps=1000", *overrides]
        single_args = [*base, "parallel.dp=1", "train.global_batch=8"]
        pairs = []
        for i in range(opts.pairs):
            pair = {}
            order = ["single", *variants] if i % 2 == 0 else [*variants, "single"]
            for name in order:
                if name == "single":
                    pair[name] = run(single_args, [], 1, opts.steps, False, tmp)
                else:
                    pair[name] = run([*base, "parallel.dp=2", "train.global_batch=16"], VARIANTS[name], 2,
                                     opts.steps, name == "full-keep", tmp)
            pairs.append(pair)
            print(json.dumps({k: round(v, 1) for k, v in pair.items()}), file=sys.stderr, flush=True)
    result = {
        "model": "torchtitan debug model (6.16M parameters), seq 256, 8 sequences per rank, fp32",
        "tokens_per_s": pairs,
        "ratio_dp2_over_one": {v: [round(p[v] / p["single"], 3) for p in pairs] for v in variants},
        "median_ratio": {v: round(statistics.median(p[v] / p["single"] for p in pairs), 3) for v in variants},
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
