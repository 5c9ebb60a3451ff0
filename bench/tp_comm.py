"""Tensor-parallel communication per transformer layer against Megatron-LM's analytic minimum.

    .venv/bin/python bench/tp_comm.py [tp] [hydra overrides...]

Runs one forward and one backward of the TP'd model on real gloo processes
and records every collective (op and bytes) with a TorchDispatchMode. The
per-layer figure is the difference between a 2-layer and a 1-layer model,
so the embedding, head and loss-parallel collectives drop out. Prints JSON:
for SP off and on, forward and backward: measured counts and bytes against
the minimum (without SP 2 all-reduces of the b*s*h activation per direction;
with SP 2 all-gathers + 2 reduce-scatters of the same volume), and the ring
algorithm's bytes sent per rank, equal for the two schemes.
"""

import json
import sys
import tempfile
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from launch.local import spawn  # noqa: E402
from orchestrator.build.model import build_model  # noqa: E402
from orchestrator.config import CONF_DIR  # noqa: E402
from orchestrator.config import register  # noqa: E402
from parallel.mesh import ParallelDims, build_mesh  # noqa: E402
from parallel.tensor_parallel import loss_context  # noqa: E402

COLLECTIVES = ("all_reduce", "all_gather_into_tensor", "reduce_scatter_tensor")


class CollectiveRecorder(TorchDispatchMode):
    """Counts collectives and the bytes of the full (unsharded) tensor each one moves."""

    def __init__(self):
        super().__init__()
        self.counts, self.bytes = Counter(), Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.__name__.split(".")[0]
        if func.namespace == "_c10d_functional" and name in COLLECTIVES:
            full = max(args[0].numel(), out.numel()) * args[0].element_size()
            self.counts[name] += 1
            self.bytes[name] += full
        return out


def measure(model, tokens, tp):
    fwd, bwd = CollectiveRecorder(), CollectiveRecorder()
    with loss_context(tp):
        with fwd:
            loss = F.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten())
        with bwd:
            loss.backward()
    return {"forward": fwd, "backward": bwd}


def per_layer(cfg, mesh, device, tp, sp):
    cfg.parallel.sequence_parallel = sp
    runs = {}
    for n_layers in (1, 2):
        cfg.model.n_layers = n_layers
        model = build_model(cfg.model, cfg.parallel, mesh, device, seed=0).parts[0]
        tokens = torch.randint(0, cfg.model.vocab_size, (cfg.train.micro_batch, cfg.train.seq_len))
        runs[n_layers] = measure(model, tokens, tp)
    out = {}
    for phase in ("forward", "backward"):
        counts = runs[2][phase].counts - runs[1][phase].counts
        nbytes = runs[2][phase].bytes - runs[1][phase].bytes
        out[phase] = {"counts": dict(counts), "bytes": dict(nbytes)}
    return out


def worker(env, device, cfg_dict, out_path):
    cfg = OmegaConf.create(cfg_dict)
    tp = cfg.parallel.tp
    mesh = build_mesh(ParallelDims(tp=tp, pp=1, dp=1), device.type)
    t, m = cfg.train, cfg.model
    activation = t.micro_batch * t.seq_len * m.dim * 4  # fp32 bytes of one b*s*h tensor
    ring = 2 * (tp - 1) / tp * activation  # bytes one rank sends for an all-reduce (= AG + RS)
    result = {"tp": tp, "micro_batch": t.micro_batch, "seq_len": t.seq_len, "dim": m.dim, "activation_bytes": activation}
    for sp in (False, True):
        measured = per_layer(cfg, mesh, device, tp, sp)
        minimum = (
            {"all_gather_into_tensor": 2, "reduce_scatter_tensor": 2} if sp else {"all_reduce": 2}
        )
        for phase in ("forward", "backward"):
            measured[phase]["minimum_counts"] = minimum
            measured[phase]["minimum_bytes"] = {op: n * activation for op, n in minimum.items()}
            measured[phase]["ring_bytes_sent_per_rank"] = 2 * ring
            measured[phase]["at_minimum"] = (
                measured[phase]["counts"] == minimum and measured[phase]["bytes"] == measured[phase]["minimum_bytes"]
            )
        result[f"sequence_parallel={sp}"] = measured
    if env.rank == 0:
        Path(out_path).write_text(json.dumps(result, indent=1))


def main():
    tp = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    register()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=[
            f"parallel.tp={tp}", "parallel.pp=1", "parallel.dp=1", "logging.wandb.mode=disabled", "checkpoint.dir=/unused", *sys.argv[2:]])
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "comm.json"
        spawn(worker, tp, OmegaConf.to_container(cfg, resolve=True), str(out), backend="gloo")
        print(out.read_text())


if __name__ == "__main__":
    main()
