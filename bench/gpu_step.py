"""One training step on one GPU: trident's loop against a hand-written loop and Hugging Face, per lever.

    python3 bench/gpu_step.py [--steps N] [--variants eager,compile,ac,chunked] [--loops trident,plain,hf]
                              [--out FILE] [hydra overrides...]

In one process on one device, for each variant (levers) and loop, one after
another (each loop alone on the device, so its peak memory is its own):

  trident  orchestrator.train.trainer.Trainer.train_step, built from the config (the real loop:
           clipping, the LR schedule, metrics, one host sync)
  plain    the same models.llama.Transformer in a hand-written loop: autocast, fp32 loss,
           clip_grad_norm_, AdamW(fused=True) on CUDA (../shared/gpu/reference_loop.py)
  hf       transformers.LlamaForCausalLM of the same shape, in the same hand-written loop
           (skipped when transformers is not importable)

variants   eager; compile (trident: train.compile=true; the others torch.compile(model));
           ac (full activation checkpointing); chunked (train.loss_chunks=8: trident only)

Prints one JSON document: per (variant, loop) the median tokens/s of the steps
after the warm-up, MFU against the device's dense peak in the compute dtype
(orchestrator/build/flops.py), the allocator's peak GiB, and the planner's prediction
for trident's config (orchestrator/planner/memory.py, CUDA accounting; it models
eager steps); and trident/plain ratios per variant.

On a GPU the defaults are the issue-11 shape: llama3-1b, seq 2048, micro-batch 4,
bf16, 15 steps (5 warm-up). On a CPU (no GPU here) a tiny model in fp32, a few
steps, no hf: the same code paths, to keep the script working; its numbers mean
little. Needs torch, hydra-core and omegaconf (not wandb, not submitit):
`../shared/gpu/README.md` says how to carry them as plain folders.
"""

import argparse
import contextlib
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import OmegaConf, open_dict  # noqa: E402

from launch.env import RankEnv  # noqa: E402
from launch.local import free_port  # noqa: E402
from models.hf import hf_config  # noqa: E402
from models.llama import ModelArgs, Transformer, num_params  # noqa: E402
from orchestrator.build.flops import flops_per_token, mfu, peak_flops  # noqa: E402
from orchestrator.build.levers import DTYPES, apply_ac  # noqa: E402
from orchestrator.build.model import init_weights  # noqa: E402
from orchestrator.config import CONF_DIR, register  # noqa: E402
from orchestrator.data.dataset import Batches, prepare  # noqa: E402
from orchestrator.planner.memory import GiB, layout_memory, probe_shards  # noqa: E402
from orchestrator.train.trainer import Trainer  # noqa: E402
from orchestrator.validate import validate  # noqa: E402

GPU_DEFAULTS = ["model=llama3-1b", "train.seq_len=2048", "train.global_batch=4", "train.micro_batch=4",
                "train.dtype=bf16"]
CPU_DEFAULTS = ["model=llama-debug", "model.n_layers=2", "train.seq_len=64", "train.global_batch=2",
                "train.micro_batch=2", "train.dtype=fp32"]
VARIANTS = {
    "eager": {},
    "compile": {"compile": True},
    "ac": {"activation_checkpointing": "full"},
    "chunked": {"loss_chunks": 8},
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device):
    return round(torch.cuda.max_memory_allocated(device) / GiB, 2) if device.type == "cuda" else None


def timed(step, steps: int, device: torch.device) -> list[float]:
    times = []
    for _ in range(steps):
        sync(device)
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def variant_cfg(base, variant: str):
    cfg = OmegaConf.create(OmegaConf.to_container(base, resolve=True))
    with open_dict(cfg):
        for key, value in VARIANTS[variant].items():
            cfg.train[key] = value
    return cfg


def trident_loop(cfg, env, device, corpus, run_dir):
    trainer = Trainer(cfg, env, device, run_dir, corpus)
    return trainer.train_step, trainer


def plain_loop(cfg, device, corpus, variant: str, which: str):
    """A hand-written loop over the same batches: the yardstick (../shared/gpu/reference_loop.py)."""
    t, o = cfg.train, cfg.optim
    args = ModelArgs.from_config(cfg.model)
    if which == "hf":
        from transformers import LlamaConfig, LlamaForCausalLM  # optional: only this loop needs it

        hf = hf_config(args, torch.float32)
        hf = {k: v for k, v in hf.items() if k not in ("architectures", "model_type", "torch_dtype")}
        with torch.device(device):
            model = LlamaForCausalLM(LlamaConfig(**hf, attn_implementation="sdpa"))
        if variant == "ac":
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        forward = lambda x: model(input_ids=x).logits  # noqa: E731
    else:
        with torch.device(device):
            model = Transformer(args)
        init_weights(model, t.seed)
        if variant == "ac":
            apply_ac(model, "full")
        forward = model
    if variant == "compile":
        forward = torch.compile(forward)
    opt = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                            weight_decay=o.weight_decay, **({"fused": True} if device.type == "cuda" else {}))
    batches = Batches(corpus.train, t.seq_len, t.global_batch, t.micro_batch, t.seed, 0, 1)
    dtype = DTYPES[t.dtype]
    autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype != torch.float32 else contextlib.nullcontext
    state = {"step": 0}

    def step():
        state["step"] += 1
        micro = batches.step(state["step"])
        for x, y in micro:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with autocast():
                logits = forward(x)
            loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
            (loss / len(micro)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()

    return step, (model, opt)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=None, help="steps per loop (default 15 on a GPU, 4 on a CPU)")
    ap.add_argument("--warmup", type=int, default=None, help="steps left out of the median (default 5, CPU 1)")
    ap.add_argument("--variants", default="eager,compile,ac", help=f"comma-separated, of {','.join(VARIANTS)}")
    ap.add_argument("--loops", default="trident,plain,hf", help="comma-separated, of trident,plain,hf")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    opts, overrides = ap.parse_known_args()

    cuda = torch.cuda.is_available()
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    steps = opts.steps or (15 if cuda else 4)
    warmup = opts.warmup if opts.warmup is not None else (5 if cuda else 1)
    loops = [x for x in opts.loops.split(",") if x]
    if "hf" in loops:
        try:
            import transformers  # noqa: F401  (optional: the hf loop is skipped without it)
        except ImportError:
            loops.remove("hf")
    if not cuda and "hf" in loops:
        loops.remove("hf")  # a CPU run only keeps the script's own paths working

    tmp = tempfile.mkdtemp(prefix="trident-gpu-step-")
    register()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        base = compose(config_name="train", overrides=[
            *(GPU_DEFAULTS if cuda else CPU_DEFAULTS), "parallel.tp=1", "parallel.pp=1", "parallel.dp=1",
            "logging.wandb.mode=disabled", "logging.console_every=100000", "checkpoint.at_end=false",
            "checkpoint.every=0", f"checkpoint.dir={tmp}/checkpoints", f"train.steps={10 * steps}", *overrides])
    validate(base)
    corpus = prepare(base.data)
    variants = [v for v in opts.variants.split(",") if v]
    cfgs = {v: variant_cfg(base, v) for v in variants}
    # The planner builds in a fake process group of its own: before the real one exists.
    planned = {v: layout_memory(c, probe_shards(c), device=device.type)[0].total / GiB for v, c in cfgs.items()}

    if cuda:
        torch.cuda.set_device(device)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    backend = "nccl" if cuda else "gloo"
    dist.init_process_group(backend, rank=0, world_size=1, device_id=device if cuda else None)
    env = RankEnv(0, 1, 0, 1, "127.0.0.1", int(os.environ["MASTER_PORT"]), "local")

    t = base.train
    args = ModelArgs.from_config(base.model)
    with torch.device("meta"):
        n_params = num_params(Transformer(args))
    fpt = flops_per_token(args, n_params, t.seq_len)
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    peak, peak_note = peak_flops(device.type, t.dtype, 1, name if cuda else None)
    tokens_per_step = t.global_batch * t.seq_len

    results = []
    for variant in variants:
        cfg = cfgs[variant]
        for loop in loops:
            if loop != "trident" and variant == "chunked":
                continue  # a trident lever
            reset_memory(device)
            started = time.perf_counter()
            if loop == "trident":
                step, keep = trident_loop(cfg, env, device, corpus, f"{tmp}/{variant}")
            else:
                step, keep = plain_loop(cfg, device, corpus, variant, loop)
            times = timed(step, steps, device)
            median = statistics.median(times[warmup:] or times)
            tps = tokens_per_step / median
            results.append({
                "variant": variant, "loop": loop, "step_s": round(median, 4), "tokens_per_s": round(tps, 1),
                "mfu": round(mfu(fpt, tps, peak, 1), 4), "peak_gib": peak_gib(device),
                "planned_gib": round(planned[variant], 2), "first_step_s": round(times[0], 2),
                "wall_s": round(time.perf_counter() - started, 1),
            })
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)
            del step, keep
    reset_memory(device)

    ratios = {}
    for variant in {r["variant"] for r in results}:
        by = {r["loop"]: r["tokens_per_s"] for r in results if r["variant"] == variant}
        if "trident" in by and "plain" in by:
            ratios[variant] = round(by["trident"] / by["plain"], 4)
    doc = {
        "device": name, "torch": torch.__version__, "python": sys.version.split()[0],
        "model": base.model.name, "params": n_params, "seq_len": t.seq_len, "micro_batch": t.micro_batch,
        "dtype": t.dtype, "flops_per_token": fpt, "peak_flops": peak, "peak_note": peak_note,
        "steps": steps, "warmup": warmup, "results": results, "trident_over_plain": ratios,
        "notes": "planned_gib: the planner's CUDA peak for trident's config (eager model; compile is not "
                 "modelled); peak_gib: torch.cuda.max_memory_allocated of that loop alone",
    }
    text = json.dumps(doc, indent=1)
    print(text)
    if opts.out:
        Path(opts.out).write_text(text + "\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
