"""Generation latency and throughput per tensor-parallel degree.

    .venv/bin/python bench/generate_latency.py [--tp 1,2,4] [--prompt-len 64] [--new 32] [hydra overrides...]

For each tp, spawns tp gloo CPU processes (and, where a GPU is present,
runs tp=1 on it too), builds the model (random weights: speed does not
depend on them) and decodes at batch 1 and batch 16: a warm-up batch, then
a timed one. Prints one JSON line per (device, tp): time to first token
(the prefill of the batch), per-token decode latency p50/p90 (one decode
step: a token for every sequence), and tokens/s (batch x tokens over the
decode time). The default model is llama-debug with 4 kv heads, so that
tp=4 divides them; any model or generate override applies
(`model=llama-125m generate.compile=true`).
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from launch.env import RankEnv  # noqa: E402
from launch.local import spawn  # noqa: E402
from orchestrator.config import CONF_DIR, register  # noqa: E402
from orchestrator.generate.decode import Generator, Sampling, build_model, resolve_dtype  # noqa: E402
from parallel.mesh import ParallelDims, build_mesh  # noqa: E402

BATCHES = (1, 16)


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def measure(cfg, tp_mesh, device, prompt_len: int, new: int) -> dict:
    g = cfg.generate
    model = build_model(cfg.model, tp_mesh, device, seed=0)
    dtype = resolve_dtype(g.dtype, device)
    out = {"dtype": str(dtype).removeprefix("torch.")}
    for batch in BATCHES:
        gen = Generator(model, tp_mesh, device, dtype, batch=batch, max_len=prompt_len + new, compile=g.compile,
                        cuda_graphs=g.cuda_graphs, rank0=False)
        prompts = [[(7 * r + 3 * i) % 256 for i in range(prompt_len)] for r in range(batch)]
        s = Sampling(new)
        gen.generate(prompts, list(range(batch)), s)  # warm-up
        gen.step_times.clear()
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        outs = gen.generate(prompts, list(range(batch)), s)
        wall = time.perf_counter() - start
        steps = gen.step_times
        decode_s = max(o.decode_s for o in outs)
        out[f"batch{batch}"] = {
            "ttft_ms": 1e3 * outs[0].ttft_s,
            "decode_ms_p50": 1e3 * statistics.median(steps),
            "decode_ms_p90": 1e3 * percentile(steps, 0.9),
            "tokens_per_s": batch * (new - 1) / decode_s,
            "wall_s": wall,
        }
        out["compiled"], out["cuda_graphs"] = gen.compiled, gen.graphed
    return out


def _worker(env: RankEnv, device, cfg_dict, prompt_len, new, out_path):
    cfg = OmegaConf.create(cfg_dict)
    tp_mesh = build_mesh(ParallelDims(cfg.parallel.tp, 1, 1), device.type)["tp"]
    result = measure(cfg, tp_mesh, device, prompt_len, new)
    if env.rank == 0:
        Path(out_path).write_text(json.dumps(result))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tp", default="1,2,4", help="tp degrees on CPU processes, comma-separated")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new", type=int, default=32, help="tokens generated per sequence")
    ns, overrides = ap.parse_known_args()
    register()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        base = compose(config_name="generate", overrides=["model.n_kv_heads=4", "checkpoint.dir=/tmp/unused",
                                                          *overrides])
    name = base.model.name
    for tp in (int(t) for t in ns.tp.split(",")):
        cfg = OmegaConf.merge(base, {"parallel": {"tp": tp}})
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "result.json"
            spawn(_worker, tp, OmegaConf.to_container(cfg, resolve=True), ns.prompt_len, ns.new, str(path),
                  backend="gloo", timeout_s=600)
            result = json.loads(path.read_text())
        print(json.dumps({"device": "cpu (gloo processes)", "model": name, "tp": tp, "threads_per_rank":
                          max(1, (os.cpu_count() or 1) // tp), "prompt_len": ns.prompt_len, "new": ns.new,
                          **result}), flush=True)
    if torch.cuda.is_available():
        device = torch.device("cuda")
        result = measure(base, None, device, ns.prompt_len, ns.new)
        print(json.dumps({"device": torch.cuda.get_device_name(device), "model": name, "tp": 1,
                          "prompt_len": ns.prompt_len, "new": ns.new, **result}), flush=True)


if __name__ == "__main__":
    main()
