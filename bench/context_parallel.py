"""Context parallelism on CPU processes: memory, speed and the bytes it moves, per sequence length and cp.

    .venv/bin/python bench/context_parallel.py [--seqs 2048 4096 8192] [--cps 1 2 4] [--steps 3]
                                               [--budget-mib 256] [hydra overrides...]

llama-debug (4 blocks, dim 128, 4 heads, 2 kv heads) with model.max_seq_len raised to the longest sequence,
one sequence per step, tp=pp=dp=1, gloo. For each (seq_len, cp) one launch of cp ranks runs a warm-up step,
then `--steps` timed steps, one of them under the saved-tensor meter and a count of every K/V all-gather and
reduce-scatter's buffer. One JSON line each:

  act_measured_mib   peak bytes autograd saved for backward on rank 0 (orchestrator/planner/meter.py)
  act_predicted_mib  what trident-plan's memory model says for the same rank
  peak_rss_mib       the largest rank's peak resident set (torch and Python included: ~300 MiB of it is the
                     process itself)
  tokens_per_s       the whole sequence's tokens over the mean step time (every rank shares 2 cores here)
  cp_bytes           per rank and step, what crossed the wire for CP: (cp-1)/cp of every K/V all-gather's
                     output and reduce-scatter's input, as the collectives were called
  cp_bytes_formula   2 x layers x micro-batches x (cp-1)/cp x 2 x seq x kv_heads x head_dim x bytes
                     (docs/context-parallelism.md)

Then a summary line: the activation ratio cp=4 / cp=1 at the longest sequence (target <= 0.35), the worst
relative error of cp_bytes against the formula (target 5%), and, from the planner's activation formula
(held to the meter above), the longest seq_len whose activations fit --budget-mib per rank at each cp.
"""

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

import parallel.context_parallel as context_parallel  # noqa: E402
from launch.local import spawn  # noqa: E402
from models.llama import ModelArgs  # noqa: E402
from orchestrator.config import CONF_DIR, register  # noqa: E402
from orchestrator.data.dataset import prepare  # noqa: E402
from orchestrator.planner.memory import activation_peaks, probe_shards  # noqa: E402
from orchestrator.planner.meter import SavedTensorMeter  # noqa: E402
from orchestrator.train.trainer import Trainer  # noqa: E402

MiB = 2**20


class WireCount:
    """Bytes CP's collectives move per rank: (cp-1)/cp of each all-gather's output, reduce-scatter's input."""

    def __init__(self, cp: int):
        self.cp, self.bytes = cp, 0
        self.gather, self.scatter = context_parallel._all_gather, context_parallel._reduce_scatter

    def __enter__(self):
        def gather(out, inp, **kw):
            self.bytes += out.numel() * out.element_size() * (self.cp - 1) / self.cp
            return self.gather(out, inp, **kw)

        def scatter(out, inp, **kw):
            self.bytes += inp.numel() * inp.element_size() * (self.cp - 1) / self.cp
            return self.scatter(out, inp, **kw)

        # The module's own collective names, swapped for the duration of one step of this benchmark only.
        context_parallel._all_gather, context_parallel._reduce_scatter = gather, scatter
        return self

    def __exit__(self, *exc):
        context_parallel._all_gather, context_parallel._reduce_scatter = self.gather, self.scatter


def worker(env, device, cfg_dict, corpus, out_dir, steps):
    torch.set_num_threads(1)
    trainer = Trainer(OmegaConf.create(cfg_dict), env, device, out_dir, corpus)
    trainer.train_step()  # warm-up
    times = []
    meter = SavedTensorMeter(trainer.modules)
    with WireCount(trainer.dims.cp) as wire, meter.measuring():
        start = time.perf_counter()
        trainer.train_step()
        times.append(time.perf_counter() - start)
    for _ in range(steps - 1):
        start = time.perf_counter()
        trainer.train_step()
        times.append(time.perf_counter() - start)
    Path(out_dir, f"rank{env.rank}.json").write_text(json.dumps({
        "act": meter.peak, "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "step_s": sum(times) / len(times), "cp_bytes": wire.bytes}))


def config(seq: int, cp: int, max_seq: int, overrides: list[str]):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="train", overrides=[
            "model=llama-debug", f"model.max_seq_len={max_seq}", "parallel.tp=1", "parallel.pp=1", "parallel.dp=1",
            f"parallel.cp={cp}", f"train.seq_len={seq}", "train.global_batch=1", "train.micro_batch=1",
            "train.eval_every=0", "logging.wandb.mode=disabled", "checkpoint.at_end=false",
            "checkpoint.dir=/unused", *overrides])


def predicted_activations(cfg) -> float:
    return activation_peaks(cfg, probe_shards(cfg))[0]


def cp_formula(cfg) -> float:
    """Per rank and step: forward's all-gather and backward's reduce-scatter of K and V, in every layer."""
    args, t, cp = ModelArgs.from_config(cfg.model), cfg.train, cfg.parallel.cp
    m = t.global_batch // t.micro_batch
    kv = 2 * t.micro_batch * t.seq_len * args.kv_heads * args.head_dim * 4  # fp32
    return 2 * args.n_layers * m * kv * (cp - 1) / cp


def longest_fitting(cp: int, budget: float, max_seq: int, overrides: list[str]) -> int:
    """The longest seq_len (a multiple of 2 cp x 64) whose predicted activations fit `budget` bytes per rank
    (they grow with seq_len: bisection)."""
    step = 2 * cp * 64
    shards = probe_shards(config(step, cp, max_seq, overrides))  # the model state does not depend on seq_len
    lo, hi = 0, max_seq // step  # multiples of step: lo fits (0: none), hi + 1 does not
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if activation_peaks(config(mid * step, cp, max_seq, overrides), shards)[0] <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo * step


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqs", type=int, nargs="+", default=[2048, 4096, 8192])
    ap.add_argument("--cps", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--budget-mib", type=float, default=256.0)
    args, overrides = ap.parse_known_args()
    register()
    max_seq = max(args.seqs)
    rows = []
    for seq in args.seqs:
        for cp in args.cps:
            cfg = config(seq, cp, max_seq, overrides)
            with tempfile.TemporaryDirectory() as tmp:
                spawn(worker, cp, OmegaConf.to_container(cfg, resolve=True), prepare(cfg.data), tmp, args.steps,
                      backend="gloo", timeout_s=600)
                ranks = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(cp)]
            row = {"seq_len": seq, "cp": cp,
                   "act_measured_mib": round(ranks[0]["act"] / MiB, 2),
                   "act_predicted_mib": round(predicted_activations(cfg) / MiB, 2),
                   "peak_rss_mib": round(max(r["rss"] for r in ranks) / MiB, 1),
                   "tokens_per_s": round(seq / max(r["step_s"] for r in ranks), 1),
                   "cp_bytes": ranks[0]["cp_bytes"], "cp_bytes_formula": cp_formula(cfg)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    act = {(r["seq_len"], r["cp"]): r["act_measured_mib"] for r in rows}
    summary = {"budget_mib": args.budget_mib}
    if (max_seq, 1) in act and (max_seq, 4) in act:
        summary["act_ratio_cp4_cp1_at_longest"] = round(act[max_seq, 4] / act[max_seq, 1], 3)
        summary["act_ratio_target"] = 0.35
    errors = [abs(r["cp_bytes"] - r["cp_bytes_formula"]) / r["cp_bytes_formula"] for r in rows if r["cp"] > 1]
    summary["cp_bytes_worst_rel_error"] = max(errors, default=0.0)
    fits = {cp: longest_fitting(cp, args.budget_mib * MiB, 8 * max_seq, overrides) for cp in args.cps}
    summary["longest_seq_fitting_budget"] = fits
    summary["growth_over_cp1"] = {cp: round(n / fits[args.cps[0]], 2) if fits[args.cps[0]] else None
                                  for cp, n in fits.items()}
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
