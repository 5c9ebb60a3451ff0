"""`trident-plan --calibrate`: measure a cluster's ranks and write the cluster file the step-time model reads.

Every rank of the allocation takes part (launcher=local: this machine's
ranks; launcher=slurm: the tasks of one job on the cluster's nodes), with
the run's backend, and every measurement runs on all ranks at once, as a
training step does: a group of g ranks is timed while every other group of
g does the same, so ranks that share cores or links share them here too.

  collectives  all-reduce, all-gather, reduce-scatter (each group of g
               consecutive ranks, g = 2..N dividing N) and send/recv
               (rank pairs), at message sizes from 4 KiB to 64 MiB; per
               (collective, link, g) the least-squares fit of
               time = alpha + bytes / beta. `bytes` is the collective's
               whole buffer, as nccl-tests' "size": the all-reduced tensor,
               the all-gathered output, the reduce-scattered input, the
               sent tensor. Links: `intra` (ranks of one node), and
               `inter` (one rank per node) where the job has several.
  compute      the model itself as trident-train builds it (up to 4 of its
               blocks, embedding, output projection and loss; its TP plan at
               each tp degree that divides the node and the heads), forward
               and backward of one micro-batch of 1, 2, 4, ... sequences up
               to the global batch, in the run's dtype: achieved FLOP/s by
               tokens per micro-batch, an efficiency curve per tp degree,
               with the TP collectives (costed by the fits) taken out, so
               DTensor's dispatch stays in; every rank computing at once,
               and (one micro-batch size) with only one tp group or half
               the node busy: the speed-up a rank gets when others idle,
               which tells ranks sharing a node's cores (a CPU) from ranks
               with a device each (GPUs).
  loop         AdamW's step and the gradient-norm clipping over the model's
               parameters: seconds per parameter a step costs.
  overheads    a real training step of two reference layouts (FSDP2 over
               every rank; a 2-stage 1F1B pipeline), against what the
               figures above predict for it: the rest, per FSDP2 collective
               and per pipeline stage and micro-batch.

The fitting and the writing happen here, in the process that started the
ranks; the ranks only measure (`measure_rank`).
"""

import datetime
import json
import math
import os
import platform
import socket
import statistics
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import yaml
from omegaconf import DictConfig, OmegaConf

from launch.local import RankFailed, spawn
from launch.rank import pick_backend
from models.llama import ModelArgs
from orchestrator.build.flops import block_flops_parts, device_key, head_flops
from orchestrator.build.model import build_model
from orchestrator.config import CONF_DIR
from orchestrator.planner.auto import rank_memory_gb
from orchestrator.planner.cluster import CalibrationError, Links, check_cluster
from orchestrator.planner.cost import bubble_of, step_time, tp_comm_times
from orchestrator.planner.layouts import n_params_of
from orchestrator.search.calibrate_slurm import calibrate_in_job, slurm_shape
from orchestrator.train.trainer import Trainer
from orchestrator.validate import ConfigError, validate
from parallel.grad import clip_grads_
from parallel.mesh import ParallelDims, build_mesh
from parallel.tensor_parallel import loss_context

COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter", "send_recv")
LINKS = ("intra", "inter")
KiB = 2**10


# --- the fit ------------------------------------------------------------------------------------

@dataclass
class Fit:
    alpha_s: float  # latency: the time of an empty message
    beta_bps: float  # bandwidth: bytes per second of the buffer
    residual: float  # root-mean-square relative residual of the fit

    def time(self, nbytes: float) -> float:
        return self.alpha_s + nbytes / self.beta_bps


def fit_alpha_beta(nbytes: list[float], seconds: list[float]) -> Fit:
    """Least squares of time = alpha + bytes / beta, each point weighted by 1 / its time.

    The sizes span four orders of magnitude: unweighted, the largest message
    alone would set both figures and alpha would be noise. Weighted, every
    point's *relative* error counts alike. Alpha and 1/beta are kept positive
    (a fit that wants a negative one is refitted with it at a floor).
    """
    if len(nbytes) != len(seconds) or len(nbytes) < 2:
        raise ValueError("fit_alpha_beta needs two or more (bytes, seconds) points")
    w = [1.0 / t for t in seconds]
    # Normal equations of min sum (w_i (a + c b_i - t_i))^2.
    s00 = sum(wi * wi for wi in w)
    s01 = sum(wi * wi * b for wi, b in zip(w, nbytes))
    s11 = sum(wi * wi * b * b for wi, b in zip(w, nbytes))
    r0 = sum(wi * wi * t for wi, t in zip(w, seconds))
    r1 = sum(wi * wi * b * t for wi, b, t in zip(w, nbytes, seconds))
    det = s00 * s11 - s01 * s01
    a, c = ((r0 * s11 - r1 * s01) / det, (s00 * r1 - s01 * r0) / det) if det > 0 else (0.0, 0.0)
    floor_a, floor_c = min(seconds) * 1e-3, 1e-15
    if c <= floor_c:  # no measurable bandwidth term: the latency is the (weighted) mean time
        c = floor_c
        a = (r0 - c * s01) / s00
    if a <= floor_a:  # no measurable latency: the bandwidth alone
        a = floor_a
        c = max(floor_c, (r1 - a * s01) / s11)
    res = math.sqrt(statistics.fmean(((a + c * b) - t) ** 2 / t ** 2 for b, t in zip(nbytes, seconds)))
    return Fit(a, 1.0 / c, res)


# --- what the ranks run --------------------------------------------------------------------------

def _agree_max(x: float) -> float:
    t = torch.tensor([x], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def _timed(op, budget_s: float, max_reps: int) -> float:
    """Seconds of one call of op: one untimed call, then as many timed as fit the budget (3 at least; every
    rank runs the same count, agreed from the slowest warm-up); the median call on the slowest rank."""
    dist.barrier()
    t0 = time.perf_counter()
    op()
    first = _agree_max(time.perf_counter() - t0)
    reps = max(3, min(max_reps, int(budget_s / max(first, 1e-6))))
    dist.barrier()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        op()
        times.append(time.perf_counter() - t0)
    return _agree_max(statistics.median(times))


def _groups(world: int, local: int, g: int, link: str) -> Optional[list[list[int]]]:
    """Every rank in exactly one group of g: consecutive ranks (intra), or one per node, stride `local` (inter)."""
    if world % g:
        return None
    if link == "intra":
        return [list(range(s, s + g)) for s in range(0, world, g)] if local % g == 0 else None
    nodes = world // local
    if nodes < 2 or nodes % g:
        return None
    out = []
    for first_node in range(0, nodes, g):
        for lr in range(local):
            out.append([(first_node + i) * local + lr for i in range(g)])
    return out


def _collective(kind: str, group, g: int, nbytes: int, dtype: torch.dtype, device, me: int, members: list[int]):
    n = max(g, nbytes // torch.tensor([], dtype=dtype).element_size() // g * g)
    if kind == "all_reduce":
        buf = torch.ones(n, dtype=dtype, device=device)
        return lambda: dist.all_reduce(buf, group=group)
    if kind == "all_gather":
        out, inp = torch.empty(n, dtype=dtype, device=device), torch.ones(n // g, dtype=dtype, device=device)
        return lambda: dist.all_gather_into_tensor(out, inp, group=group)
    if kind == "reduce_scatter":
        inp, out = torch.ones(n, dtype=dtype, device=device), torch.empty(n // g, dtype=dtype, device=device)
        return lambda: dist.reduce_scatter_tensor(out, inp, group=group)
    # send_recv: the first of each pair sends, the second receives (a pipeline boundary's one way)
    buf = torch.ones(n, dtype=dtype, device=device)
    i = members.index(me)
    peer = members[i ^ 1]
    return (lambda: dist.send(buf, peer)) if i % 2 == 0 else (lambda: dist.recv(buf, peer))


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _real_model(spec: dict, tp: int, device, world: int):
    """The model itself (its TP plan at `tp`, spec["layers"] blocks) as trident-train builds it, once per tp
    degree: step(mb, seq) makes one micro-batch's forward+backward, DTensor's dispatch and TP's collectives
    included."""
    model_cfg = OmegaConf.create({**spec["model_cfg"], "n_layers": spec["layers"], "init_from": None})
    par = OmegaConf.create({**spec["parallel_cfg"], "tp": tp, "pp": 1, "dp": world // tp, "cp": 1,
                            "dp_shard": "optimizer"})
    mesh = build_mesh(ParallelDims(tp, 1, world // tp), device.type)
    train_cfg = OmegaConf.create({**spec["train_cfg"], "compile": False, "activation_checkpointing": "none"})
    model = build_model(model_cfg, par, mesh, device, 0, train_cfg).parts[0]

    def step(mb: int, seq: int):
        gen = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, model_cfg.vocab_size, (mb, seq), generator=gen).to(device)
        targets = torch.randint(0, model_cfg.vocab_size, (mb, seq), generator=gen).to(device)

        def run():
            with loss_context(tp):
                model(tokens, targets).backward()
            _sync(device)

        return run

    return step


def busy_counts(local: int, tp: int) -> list[int]:
    """Busy ranks per node to time besides all of them: one tp group, and half the node (whole tp groups)."""
    return sorted({n for n in (tp, local // 2) if tp <= n < local and n % tp == 0})


def _compute_point(run, spec: dict, busy: int, rank: int) -> float:
    """Seconds of one call of `run` on the first `busy` ranks at once, the others waiting."""
    return _timed(run if rank < busy else (lambda: None), spec["budget_s"], spec["max_reps"])


def _loop_point(n_params: int, device, budget_s: float) -> float:
    """Seconds per parameter of AdamW's step (fused on CUDA, else foreach: optim.implementation=auto) and the
    norm clipping."""
    sizes = [min(n_params, 2**20)] * max(1, n_params // 2**20)
    params = [torch.zeros(s, device=device, requires_grad=True) for s in sizes]
    for p in params:
        p.grad = torch.full_like(p, 1e-3)
    opt = torch.optim.AdamW(params, lr=1e-4, **({"fused": True} if device.type == "cuda" else {"foreach": True}))

    def step():
        clip_grads_(params, 1.0)
        opt.step()
        _sync(device)

    return _timed(step, budget_s, 20) / sum(sizes)


def _trainer_step(env, device, cfg_dict: dict, corpus, budget_s: float) -> float:
    """Median seconds of a real training step (orchestrator/train/trainer.py) of a reference layout, after two."""
    with tempfile.TemporaryDirectory() as run_dir:
        cfg = OmegaConf.create(cfg_dict)
        cfg.checkpoint.dir = f"{run_dir}/checkpoints"  # never written (checkpoint.every=0), but named
        trainer = Trainer(cfg, env, device, run_dir, corpus)
        trainer.train_step()
        return _timed(trainer.train_step, budget_s, 5)


def measure_rank(env, device, spec: dict, corpus=None) -> None:
    """One rank's part of the calibration; rank 0 writes every figure to spec["out"] as JSON."""
    # torch 2.13 deprecates the *_tensor collectives (FSDP2 and DTensor still run them; *_single is newer than 2.11).
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    world, local, rank = env.world_size, env.local_world_size, env.rank
    dtype = getattr(torch, spec["dtype"])
    budget = spec["budget_s"]
    result = {"collectives": [], "compute": [], "busy": [], "loop": None, "errors": []}
    for link in LINKS:
        for g in spec["group_sizes"]:
            groups = _groups(world, local, g, link)
            if groups is None:
                continue
            mine, _ = dist.new_subgroups_by_enumeration(groups)
            members = next(m for m in groups if rank in m)
            for kind in COLLECTIVES:
                if kind == "send_recv" and g != 2:
                    continue
                for size in spec["sizes"]:
                    try:
                        op = _collective(kind, mine, g, size, dtype, device, rank, members)
                        seconds = _timed(op, budget, spec["max_reps"])
                    except RuntimeError as e:  # the backend lacks it: every rank fails alike
                        result["errors"].append(f"{kind} on {spec['backend']}: {str(e).splitlines()[0]}")
                        break
                    result["collectives"].append({"link": link, "kind": kind, "g": g, "bytes": size, "s": seconds})
    args = ModelArgs(**spec["model"])
    seq = spec["seq_len"]
    # The micro-batches at the run's sequence length, and one of a 4x longer sequence (where the model's rotary
    # table reaches), whose attention share differs: the two rates, matmuls' and attention's, are told apart.
    shapes = [(mb, seq) for mb in spec["microbatches"]]
    if 4 * seq <= args.max_seq_len:
        shapes.append((1, 4 * seq))
    for tp in spec["tps"]:
        model_step = _real_model(spec, tp, device, world)
        for mb, s in shapes:
            tokens = mb * s
            seconds = _compute_point(model_step(mb, s), spec, world, rank)
            mm, attn = block_flops_parts(args, tp, tokens, s)
            L = spec["layers"]
            result["compute"].append({"tp": tp, "tokens": tokens, "seq": s, "s": seconds,
                                      "mm": L * mm + head_flops(args, tp, tokens), "attn": L * attn,
                                      "flops": L * (mm + attn) + head_flops(args, tp, tokens)})
        # The same micro-batch with only the first n ranks of the node busy, the others waiting (as a pipeline's
        # idle ranks do): how much faster a busy rank then runs (ranks sharing cores get theirs back).
        mb = spec["microbatches"][len(spec["microbatches"]) // 2]
        for n in busy_counts(local, tp):
            seconds = _compute_point(model_step(mb, seq), spec, n, rank)
            result["busy"].append({"tp": tp, "n": n, "tokens": mb * seq, "s": seconds})
    result["loop"] = _loop_point(spec["n_params"], device, budget)
    src = torch.ones(16 * 2**20 // 4, device=device)
    dst = torch.empty_like(src)
    result["memory_gbps"] = 2 * src.numel() * 4 / _timed(lambda: (dst.copy_(src), _sync(device)), budget, 20) / 1e9
    result["reference"] = {name: _trainer_step(env, device, cfg_dict, corpus, budget)
                           for name, cfg_dict in spec["reference"].items()} if corpus is not None else {}
    result["device"] = _device_key(spec["backend"])
    result["memory_gb"] = rank_memory_gb(local, on_gpu=spec["backend"] == "nccl" and torch.cuda.is_available())
    result["host"] = socket.gethostname()
    if rank == 0:
        Path(spec["out"]).write_text(json.dumps(result))


# --- the cluster file ----------------------------------------------------------------------------

def powers_of_two_upto(n: int) -> list[int]:
    out, x = [], 1
    while x <= n:
        out.append(x)
        x *= 2
    return out


def spec_of(cfg: DictConfig, world: int, local: int, backend: str, n_params: int, out: str) -> dict:
    c, t = cfg.calibrate, cfg.train
    args = ModelArgs.from_config(cfg.model)
    heads = [d for d in range(1, local + 1) if local % d == 0 and args.n_heads % d == 0 and args.kv_heads % d == 0]
    return {
        "dtype": {"fp32": "float32", "bf16": "bfloat16"}[t.dtype],
        "backend": backend, "budget_s": float(c.seconds_per_point), "max_reps": int(c.max_reps),
        "group_sizes": [g for g in range(2, world + 1) if world % g == 0],
        "sizes": [int(k * KiB) for k in c.sizes_kib],
        "model": {f: getattr(args, f) for f in args.__dataclass_fields__},
        "seq_len": int(t.seq_len),
        "microbatches": list(c.microbatches) if c.microbatches else powers_of_two_upto(int(t.global_batch)),
        "tps": heads, "n_params": n_params, "out": out,
        "layers": min(args.n_layers, 4),  # enough blocks that the embedding and output are a small part
        "reference": reference_layouts(cfg, world),
        "model_cfg": OmegaConf.to_container(cfg.model, resolve=True),
        "parallel_cfg": OmegaConf.to_container(cfg.parallel, resolve=True),
        "train_cfg": OmegaConf.to_container(cfg.train, resolve=True),
    }


REFERENCE = {  # real training steps the model's terms leave something of: FSDP2's own work, a pipeline's
    "fsdp": {"parallel": {"tp": 1, "pp": 1, "dp_shard": "full"}},
    "pipeline": {"parallel": {"tp": 1, "pp": 2, "dp_shard": "optimizer", "schedule": "1f1b"}},
}


def reference_layouts(cfg: DictConfig, world: int) -> dict:
    """The reference layouts at this world size as whole training configs, those trident-train accepts."""
    def unhydra(node):  # ${hydra:...} resolves only inside the Hydra app; no reference step reads those keys
        if isinstance(node, dict):
            return {k: unhydra(v) for k, v in node.items()}
        return None if isinstance(node, str) and "${hydra:" in node else node

    plain = OmegaConf.to_container(OmegaConf.create(unhydra(OmegaConf.to_container(cfg, resolve=False))),
                                   resolve=True)
    for key in ("cluster", "calibrate", "generate"):
        plain.pop(key, None)
    out = {}
    for name, change in REFERENCE.items():
        c = OmegaConf.create(plain)
        pp = change["parallel"]["pp"]
        c.merge_with(change)
        c.merge_with({"parallel": {"dp": world // pp, "cp": 1, "microbatches": None, "cut_points": None,
                                   "layout": "manual"},
                      "train": {"micro_batch": 1, "compile": False, "activation_checkpointing": "none",
                                "eval_every": 0, "steps": 1000},
                      "checkpoint": {"every": 0, "at_end": False}, "logging": {"wandb": {"mode": "disabled"}},
                      "launcher": {"nprocs": None}})
        try:
            validate(c)
        except ConfigError:
            continue
        out[name] = OmegaConf.to_container(c)
    return out


def _predicted(cl_doc: dict, cfg_dict: dict, overheads: dict) -> float:
    """The step-time model's step for a training config on a cluster file (with these overheads)."""
    work = OmegaConf.create({**cfg_dict, "cluster": {**cl_doc, "overheads": overheads}})
    par, t = work.parallel, work.train
    m = t.global_batch // (t.micro_batch * par.dp)
    bubble = bubble_of(par.schedule, par.pp, m, par.stages_per_rank)
    return step_time(work, None, n_params_of(work), bubble, ModelArgs.from_config(work.model))["step_s"]


def overhead_lines(cl_doc: dict, raw: dict, spec: dict) -> list[str]:
    """What the model's terms leave of each reference step: FSDP2's collectives as a multiple of the bare ones'
    time, the pipeline's per stage and micro-batch (at least 1x and 0.001 ms)."""
    base = {"fsdp_comm_factor": 1.0, "pipeline_ms_per_stage_microbatch": 0.0}
    unit = {"fsdp": ("fsdp_comm_factor", 1.0, 1.0), "pipeline": ("pipeline_ms_per_stage_microbatch", 1.0, 1e-3)}
    found = {"fsdp_comm_factor": 1.0, "pipeline_ms_per_stage_microbatch": 1e-3}
    notes = []
    for name, measured in raw.get("reference", {}).items():
        cfg_dict, (key, step, floor) = spec["reference"][name], unit[name]
        zero = _predicted(cl_doc, cfg_dict, base)
        slope = _predicted(cl_doc, cfg_dict, {**base, key: base[key] + step}) - zero
        if slope > 0:
            found[key] = max(floor, base[key] + (measured - zero) / slope * step)
        par = cfg_dict["parallel"]
        notes.append(f"#   {name}: tp={par['tp']} pp={par['pp']} dp={par['dp']} {par['dp_shard']} micro-batch 1: "
                     f"measured {measured:.4g} s, the terms above {zero:.4g} s")
    return ["# A real training step (orchestrator/train/trainer.py) of each reference layout, against what the figures",
            "# above predict for it: FSDP2's gathers and reduce-scatters take fsdp_comm_factor times the bare",
            "# collectives' time (its copies and hooks, on the cores the collectives share), and a pipeline adds",
            "# pipeline_ms_per_stage_microbatch (the schedule's own work).",
            *notes, "overheads:", *(f"  {k}: {_num(v)}" for k, v in found.items())]


def fit_compute(points: list[dict]) -> tuple[float, float, float, float]:
    """(overhead s, matmul FLOP/s, attention FLOP/s, rms relative residual): time = c + mm / R + attn / A, least
    squares weighted by 1/time, every term non-negative (the best fit over the subsets of free terms; a term
    held at zero has an infinite rate, written as 1e6 TFLOP/s)."""
    rows = [(1.0, p["mm"], p["attn"], p["s"]) for p in points]
    best = None
    for free in ((0, 1, 2), (1, 2), (0, 1), (1,), (0, 2), (2,)):
        a = [[r[j] / r[3] for j in free] for r in rows]  # weighted: each row divided by its time
        n = len(free)
        ata = [[sum(row[i] * row[j] for row in a) for j in range(n)] for i in range(n)]
        atb = [sum(row[i] for row in a) for i in range(n)]  # b = t / t = 1
        try:
            x = _solve(ata, atb)
        except ZeroDivisionError:
            continue
        if any(v < 0 for v in x):
            continue
        coef = [0.0, 0.0, 0.0]
        for j, v in zip(free, x):
            coef[j] = v
        res = math.sqrt(statistics.fmean((sum(c * r[j] for j, c in enumerate(coef)) - r[3]) ** 2 / r[3] ** 2
                                         for r in rows))
        if best is None or res < best[1]:
            best = (coef, res)
    (c, inv_mm, inv_attn), res = best
    c = max(c, 1e-3 * min(r[3] for r in rows))  # a figure of the file is positive: none is a thousandth of the least
    return c, 1 / inv_mm if inv_mm else 1e18, 1 / inv_attn if inv_attn else 1e18, res


def _solve(a: list[list[float]], b: list[float]) -> list[float]:
    """Gaussian elimination with partial pivoting (ZeroDivisionError if singular)."""
    n = len(b)
    m = [row[:] + [v] for row, v in zip(a, b)]
    for i in range(n):
        p = max(range(i, n), key=lambda r: abs(m[r][i]))
        if abs(m[p][i]) < 1e-300:
            raise ZeroDivisionError
        m[i], m[p] = m[p], m[i]
        for r in range(n):
            if r != i:
                f = m[r][i] / m[i][i]
                m[r] = [x - f * y for x, y in zip(m[r], m[i])]
    return [m[i][n] / m[i][i] for i in range(n)]


def fit_all(raw: dict) -> dict:
    """{link: {kind: {g: Fit}}} from the raw timings."""
    points: dict = {}
    for r in raw["collectives"]:
        points.setdefault((r["link"], r["kind"], r["g"]), []).append((r["bytes"], r["s"]))
    fits: dict = {}
    for (link, kind, g), pts in sorted(points.items()):
        if len(pts) >= 2:
            fits.setdefault(link, {}).setdefault(kind, {})[g] = fit_alpha_beta(*map(list, zip(*pts)))
    return fits


def without_tp_comm(point: dict, fits: dict, spec: dict, cfg: DictConfig) -> dict:
    """A tp > 1 point with its TP collectives taken out (the step-time model adds them from the fits above),
    leaving compute and DTensor's dispatch; at most 70% is taken, so a poor fit cannot leave nothing."""
    if point["tp"] == 1:
        return point
    links = Links({"intra": {kind: {g: (f.alpha_s, f.beta_bps) for g, f in by.items()}
                             for kind, by in fits.get("intra", {}).items()}})
    block_c, head_c = tp_comm_times(links, ModelArgs(**spec["model"]), point["tp"], point["tokens"], point["seq"],
                                    bool(cfg.parallel.sequence_parallel), 2 if spec["dtype"] == "bfloat16" else 4)
    comm = spec["layers"] * block_c + head_c
    return {**point, "s": max(point["s"] - comm, 0.3 * point["s"]), "tp_comm_s": comm}


def _num(x: float) -> str:
    """4 significant digits, as a number YAML 1.1 readers (PyYAML, OmegaConf) take: "1e+06" would be a string."""
    text = f"{x:.4g}"
    mantissa, e, exponent = text.partition("e")
    return f"{mantissa}.0e{exponent}" if e and "." not in mantissa else text


def cluster_yaml(cfg: DictConfig, raw: dict, spec: dict, world: int, local: int, backend: str,
                 device_key: str, name: str, memory_gb: float, seconds: float) -> str:
    """The cluster file: what was measured, each figure commented with how."""
    fits = fit_all(raw)
    cl = cfg.cluster
    host = raw.get("host", socket.gethostname())
    today = datetime.date.today().isoformat()
    ar = fits.get("intra", {}).get("all_reduce", {})
    g_max = max(ar) if ar else 2
    # Bus bandwidth (nccl-tests' busbw) of the widest all-reduce, for the fields older code reads.
    busbw = (ar[g_max].beta_bps * 2 * (g_max - 1) / g_max / 1e9) if ar else cl.intra_node_gbps
    inter = fits.get("inter", {}).get("all_reduce", {})
    inter_bw = (inter[max(inter)].beta_bps * 2 * (max(inter) - 1) / max(inter) / 1e9) if inter else busbw
    lat = ar[min(ar)].alpha_s * 1e6 if ar else cl.intra_node_latency_us
    inter_lat = inter[min(inter)].alpha_s * 1e6 if inter else lat
    shared = [without_tp_comm(r, fits, spec, cfg) for r in raw["compute"]]
    best = max((r["flops"] / r["s"] for r in shared), default=0.0)
    lines = [
        f"# Calibrated by `trident-plan --calibrate` on {today}: {world} {backend} ranks, {local} per node,",
        f"# host {host}, device {device_key}, torch {torch.__version__}, python {platform.python_version()},",
        f"# {spec['model'].get('dim')}-wide model shapes of model={cfg.model.name} at seq_len={spec['seq_len']},"
        f" dtype {spec['dtype']}; {seconds:.0f} s.",
        "# Every rank measured at once, as in a training step. Regenerate rather than edit.",
        f"name: {name}",
        f"gpus: {world}                 # ranks measured (every layout planned here uses this many)",
        f"gpus_per_node: {local}        # ranks per node",
        f"gpu_memory_gb: {_num(memory_gb)}  # memory per rank (GiB): the device's, or a CPU rank's share of RAM",
        f"memory_reserve_gb: {_num(cl.memory_reserve_gb)}  # not measured: kept from cluster={cl.name}",
        f"device: {device_key}               # peak FLOP/s per dtype: orchestrator/build/flops.py (MFU is reported against it)",
        f"mfu: {_num(cl.mfu)}                # not used where `compute` below is given (kept from cluster={cl.name})",
        f"intra_node_gbps: {_num(busbw)}  # bus bandwidth (nccl-tests busbw) of the {g_max}-rank all-reduce fit below",
        f"inter_node_gbps: {_num(inter_bw)}  # the same across nodes ({'measured' if inter else 'one node: the intra figure'})",
        f"hbm_gbps: {_num(raw['memory_gbps'])}  # one rank's copy of 16 MiB (read + write), every rank at once",
        "hbm_efficiency: 1.0     # hbm_gbps above is what a copy reached",
        f"intra_node_latency_us: {_num(lat)}  # alpha of the 2-rank all-reduce fit below",
        f"inter_node_latency_us: {_num(inter_lat)}",
        "comm_overlap: " + ("false  # gloo runs collectives on the compute thread: nothing overlaps"
                            if backend == "gloo" else "true   # NCCL collectives run on their own streams"),
        "# time = alpha + bytes / beta per (link, collective, ranks in the group): least squares over",
        f"# {len(spec['sizes'])} message sizes ({spec['sizes'][0] // KiB} KiB .. {spec['sizes'][-1] // KiB} KiB), "
        "each weighted by 1/time;",
        "# bytes = the whole buffer (all-gather: the output; reduce-scatter: the input); residual = rms relative.",
        "collectives:",
    ]
    for link, kinds in fits.items():
        lines.append(f"  {link}:")
        for kind, by_g in kinds.items():
            lines.append(f"    {kind}:")
            for g, fit in sorted(by_g.items()):
                lines.append(f"      {g}: {{alpha_us: {_num(fit.alpha_s * 1e6)}, beta_gbps: {_num(fit.beta_bps / 1e9)}, "
                             f"residual: {fit.residual:.3f}}}")
    lines += [
        f"# The model itself ({spec['layers']} blocks, embedding, output projection, loss; its TP plan at tp > 1, whose",
        "# collectives, as the fits above cost them, are taken out), forward+backward of one micro-batch at each",
        "# size: achieved TFLOP/s of its model FLOPs (6 per weight and token + attention's 12 x dim x seq).",
        "# Every rank at once.",
        "compute:",
        f"  seq_len: {spec['seq_len']}",
        f"  layers: {spec['layers']}",
        f"  peak_shared_tflops: {_num(best / 1e12)}",
        "  # A micro-batch's time = blocks x overhead_ms_per_block + its matmul FLOPs / tflops + its attention FLOPs /",
        "  # attention_tflops: non-negative least squares over the points below (each weighted by 1/time). The",
        "  # overhead is work that does not grow with the tokens (Python, DTensor's dispatch, kernel launches): it is",
        "  # what makes small micro-batches slow.",
        "  fits:",
    ]
    for tp in sorted({r["tp"] for r in shared}):
        pts = [r for r in shared if r["tp"] == tp]
        if len(pts) < 2:
            continue
        over, mm_rate, attn_rate, res = fit_compute(pts)
        lines.append(f"    - {{tp: {tp}, overhead_ms_per_block: {_num(over * 1e3 / spec['layers'])}, "
                     f"tflops: {_num(mm_rate / 1e12)}, attention_tflops: {_num(attn_rate / 1e12)}, residual: {res:.3f}}}")
    lines += ["  # The measurements: achieved TFLOP/s at each micro-batch's tokens (and sequence length).", "  points:"]
    for r in shared:
        lines.append(f"    - {{tp: {r['tp']}, tokens: {r['tokens']}, seq: {r['seq']}, "
                     f"tflops: {_num(r['flops'] / r['s'] / 1e12)}}}")
    whole = {(r["tp"], r["tokens"], r["seq"]): r["s"] for r in raw["compute"]}
    lines += ["  # How many times faster a rank runs the same micro-batch (TP collectives included) when only `busy`",
              "  # ranks of its node compute and the rest wait, as in a pipeline's bubble: ranks sharing cores (CPU",
              "  # processes) get the idle ones' share; ranks with a device each stay at 1.",
              "  speedup:"]
    for r in raw.get("busy", []):
        full = whole.get((r["tp"], r["tokens"], spec["seq_len"]))
        if full:
            lines.append(f"    - {{tp: {r['tp']}, busy: {r['n']}, speedup: {_num(max(1.0, full / r['s']))}}}")
    lines += [
        "# AdamW's step and the clipping of the gradient norm, every rank at once: seconds per parameter.",
        "loop:",
        f"  ns_per_param: {_num(raw['loop'] * 1e9)}",
        "",
    ]
    return "\n".join(lines)


def run_calibration(cfg: DictConfig, out_path: Optional[str], print_=print) -> Path:
    """Measure the ranks `cfg` describes and write the cluster file; CalibrationError (nothing written) if it
    cannot run."""
    launcher = cfg.launcher
    if launcher.name == "slurm":
        world, local = slurm_shape(cfg)
    elif launcher.name == "local":
        world = launcher.nprocs or cfg.cluster.gpus
        local = world
    else:
        raise CalibrationError(f"launcher={launcher.name}: --calibrate starts its own ranks; use launcher=local "
                               "(this machine) or launcher=slurm (a job on the cluster)")
    if world < 2:
        raise CalibrationError(f"--calibrate needs 2 or more ranks to time collectives between (it has {world}: "
                               "set cluster.gpus or launcher.nprocs)")
    if launcher.name == "local":
        backend = pick_backend(launcher.backend, local)
    else:  # the job's tasks choose for themselves; this names what they will choose
        backend = launcher.backend if launcher.backend != "auto" else "nccl" if launcher.gpus_per_node else "gloo"
    name = cfg.calibrate.name or f"{socket.gethostname().split('.')[0]}-{backend}"
    target = Path(out_path) if out_path else Path(CONF_DIR) / "cluster" / f"{name}.yaml"
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        raw_path = str(Path(tmp) / "raw.json")
        spec = spec_of(cfg, world, local, backend, n_params_of(cfg), raw_path)
        corpus = None
        if spec["reference"]:
            from orchestrator.data.dataset import prepare  # the reference steps train on the run's own data

            corpus = prepare(cfg.data, cfg.model.get("init_from"), progress=False)
        print_(f"trident-plan: calibrating {world} {backend} ranks ({local} per node): "
               f"{len(COLLECTIVES)} collectives x groups {spec['group_sizes']} x {len(spec['sizes'])} sizes, "
               f"compute at micro-batches {spec['microbatches']} x tp {spec['tps']}")
        try:
            if launcher.name == "slurm":
                calibrate_in_job(measure_rank, cfg, spec, tmp, corpus)
            else:
                spawn(measure_rank, world, spec, corpus, backend=backend, timeout_s=float(cfg.parallel.timeout_s))
        except RankFailed as e:
            raise CalibrationError(f"a rank failed: {str(e).strip().splitlines()[-1]}") from None
        raw = json.loads(Path(raw_path).read_text())
    if raw["errors"]:
        raise CalibrationError(f"backend {backend} cannot run a collective the layouts need: {raw['errors'][0]}")
    text = cluster_yaml(cfg, raw, spec, world, local, backend, raw["device"], name, raw["memory_gb"],
                        time.perf_counter() - started)
    text += "\n".join(overhead_lines(yaml.safe_load(text), raw, spec)) + "\n"
    check_cluster(OmegaConf.create(yaml.safe_load(text)), str(target))
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp_target = target.with_suffix(".yaml.tmp")
    tmp_target.write_text(text)
    os.replace(tmp_target, target)
    for line in fit_lines(fit_all(raw)):
        print_(line)
    home = target.parent.resolve() == Path(CONF_DIR) / "cluster"
    print_(f"trident-plan: wrote {target} in {time.perf_counter() - started:.0f} s; "
           + (f"plan with it as cluster={target.stem}" if home else
              f"copy it to conf/cluster/ to plan with it as cluster={target.stem}"))
    return target


def fit_lines(fits: dict) -> list[str]:
    """The fits, one line each, with their residuals."""
    out = []
    for link, kinds in fits.items():
        for kind, by_g in kinds.items():
            for g, f in sorted(by_g.items()):
                out.append(f"  {link:5} {kind:14} g={g:<3} alpha {f.alpha_s * 1e6:9.1f} us  beta "
                           f"{f.beta_bps / 1e9:8.3f} GB/s  residual {100 * f.residual:5.1f}%")
    return out


def _device_key(backend: str) -> str:
    if backend == "nccl" and torch.cuda.is_available():
        return device_key(torch.cuda.get_device_name()) or "cpu"
    return "cpu"

