"""Activation checkpointing: memory saved against time spent, for none / full / selective.

    .venv/bin/python bench/activation_checkpointing.py [--steps 20] [--threads N] [hydra overrides...]

One process, the default model (llama-debug) and micro-batch (train.micro_batch
sequences of train.seq_len tokens). Per mode: the peak of memory allocated
during one forward+backward beyond the weights already there (activations,
recomputed activations, temporaries and gradients), and the median time of a
forward+backward step (the modes' steps interleaved). On a GPU the peak comes from the CUDA allocator; on
CPU a dispatch mode counts the bytes of every live storage that an operator
created (freed when its storage dies), which is what an allocator would hold.
Prints JSON.
"""

import argparse
import json
import statistics
import sys
import time
import weakref
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_leaves  # noqa: E402

from models.llama import ModelArgs, Transformer  # noqa: E402
from orchestrator.build.levers import AC_MODES, apply_ac  # noqa: E402
from orchestrator.build.model import init_weights  # noqa: E402
from orchestrator.config import CONF_DIR  # noqa: E402
from orchestrator.config import register  # noqa: E402


class StorageMeter(TorchDispatchMode):
    """Live bytes of the storages operators create while it is active, and their peak."""

    def __init__(self):
        super().__init__()
        self.live: set[int] = set()
        self.now = self.peak = 0

    def _release(self, key: int, nbytes: int) -> None:
        self.live.discard(key)
        self.now -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self.live:
                    self.live.add(key)
                    self.now += storage.nbytes()
                    self.peak = max(self.peak, self.now)
                    weakref.finalize(storage, self._release, key, storage.nbytes())
        return out


def step(model, tokens):
    loss = F.cross_entropy(model(tokens).flatten(0, 1).float(), tokens.roll(-1, 1).flatten())
    loss.backward()
    model.zero_grad(set_to_none=True)


def peak_bytes(model, tokens, device: torch.device) -> int:
    step(model, tokens)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step(model, tokens)
        return torch.cuda.max_memory_allocated(device) - base
    with StorageMeter() as meter:
        step(model, tokens)
    return meter.peak


def timed(model, tokens, device: torch.device) -> float:
    t0 = time.perf_counter()
    step(model, tokens)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def measure(cfg, steps: int, device: torch.device) -> dict:
    """Per mode: peak bytes and median step time, the modes' steps interleaved so a busy machine slows all alike."""
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.model.vocab_size, (cfg.train.micro_batch, cfg.train.seq_len), generator=gen).to(device)
    models = {}
    for mode in AC_MODES:
        models[mode] = Transformer(ModelArgs.from_config(cfg.model)).to(device)
        init_weights(models[mode], cfg.train.seed)
        apply_ac(models[mode], mode)
    peaks = {mode: peak_bytes(m, tokens, device) for mode, m in models.items()}
    times = {mode: [] for mode in AC_MODES}
    for _ in range(steps):
        for mode, m in models.items():
            times[mode].append(timed(m, tokens, device))
    return {
        mode: {"peak_mib": round(peaks[mode] / 2**20, 2), "step_s": round(statistics.median(times[mode]), 4)}
        for mode in AC_MODES
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args, overrides = ap.parse_known_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    register()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    result = {
        "model": cfg.model.name, "micro_batch": cfg.train.micro_batch, "seq_len": cfg.train.seq_len,
        "device": device.type, "torch_threads": torch.get_num_threads(),
        "unit": "peak MiB allocated in one forward+backward beyond the weights; median seconds per step",
    }
    result.update(measure(cfg, args.steps, device))
    none = result["none"]
    for mode in ("full", "selective"):
        r = result[mode]
        r["memory_saved"] = round(1 - r["peak_mib"] / none["peak_mib"], 3)
        r["time_spent"] = round(r["step_s"] / none["step_s"] - 1, 3)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
