"""Every layout of a model on a cluster that trident-train would accept, ranked.

The same conf/ tree as trident-train plus a `cluster`; parallel.tp/pp/dp/cp,
train.micro_batch and parallel.schedule vary, and exactly the layouts that
trident-train's own validation accepts are kept. For each: the worst rank's
memory (orchestrator/planner/memory.py) and a predicted step time
(orchestrator/planner/cost.py). `rel` is a layout's step time over the best
fitting one's.
"""

import re
import time
from dataclasses import dataclass
from typing import Optional

import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import InterpolationResolutionError

from models.llama import ModelArgs, Transformer, num_params
from orchestrator.build.flops import CLUSTER_DEVICES
from orchestrator.planner.cluster import Compute, Links, check_cluster
from orchestrator.planner.cost import bubble_of, step_time
from orchestrator.planner.memory import GiB, RankMemory, layout_memory, probe_shards
from orchestrator.validate import ConfigError, divisors, validate
from parallel.pipeline_parallel import SCHEDULES


@dataclass
class Layout:
    tp: int
    pp: int
    dp: int
    micro_batch: int
    schedule: str  # "-" without pipeline parallelism
    microbatches: int  # per dp rank and step
    worst: RankMemory  # the pp rank with the most memory
    fits: bool
    bubble: float
    compute_s: float
    overhead_s: float  # the part of compute_s that does not grow with the tokens (per-block dispatch)
    tp_s: float
    pp_s: float
    dp_s: float  # the exposed part
    loop_s: float  # clipping, agreement, optimizer step
    step_s: float
    mfu: float
    comm_share: float  # of the step: tp + pp + exposed dp + the loop's collectives and step
    why: str = ""  # the largest communication cost, in words
    rel: float = 0.0
    cp: int = 1
    cp_s: float = 0.0  # context parallelism's K/V gathers and their gradients' reduce-scatters

    def overrides(self) -> dict:
        sched = {} if self.pp == 1 else {"schedule": self.schedule}
        return {"parallel": {"tp": self.tp, "pp": self.pp, "dp": self.dp, "cp": self.cp, **sched},
                "train": {"micro_batch": self.micro_batch}}


def candidates(cfg: DictConfig):
    """Every (tp, pp, dp, micro_batch, schedule, cp) on cluster.gpus, before validation; cp only where the
    sequence cuts into its 2 x cp chunks."""
    gpus, t = cfg.cluster.gpus, cfg.train
    for tp in divisors(gpus):
        for cp in (c for c in divisors(gpus // tp) if t.seq_len % (2 * c) == 0 or c == 1):
            for pp in divisors(gpus // (tp * cp)):
                dp = gpus // (tp * cp * pp)
                if t.global_batch % dp:
                    continue
                for mb in divisors(t.global_batch // dp):
                    for schedule in (SCHEDULES if pp > 1 else [cfg.parallel.schedule]):
                        yield tp, pp, dp, mb, schedule, cp


def set_layout(c: DictConfig, tp, pp, dp, mb, schedule, cp: int = 1) -> None:
    with open_dict(c):
        c.parallel.tp, c.parallel.pp, c.parallel.dp, c.parallel.schedule = tp, pp, dp, schedule
        c.parallel.cp = cp
        c.parallel.microbatches = None
        c.parallel.cut_points = None
        c.train.micro_batch = mb
        c.launcher.nprocs = None


def n_params_of(cfg: DictConfig) -> int:
    with torch.device("meta"):
        return num_params(Transformer(ModelArgs.from_config(cfg.model)))


NAMES = {"all_reduce": "all-reduce", "all_gather": "all-gather", "reduce_scatter": "reduce-scatter",
         "send_recv": "stage transfers", "broadcast": "broadcast"}


def why(by_kind: dict, step_s: float, mb: int) -> str:
    """The layout's largest communication cost in words: "tp all-reduce 38% of the step"."""
    if not by_kind:
        return "no communication"
    (dim, kind), secs = max(by_kind.items(), key=lambda kv: kv[1])
    return f"{dim} {NAMES[kind]} {100 * secs / step_s:.0f}% of the step at micro-batch {mb}"


def plan(cfg: DictConfig, only: Optional[tuple] = None) -> tuple[list[Layout], dict]:
    """Every valid layout, best first (fitting ones first, then by predicted step time). only: just this
    candidate, (tp, pp, dp, micro_batch, schedule, cp) as `candidates` yields it."""
    started = time.perf_counter()
    cl = cfg.cluster
    check_cluster(cl)
    if cl.device not in CLUSTER_DEVICES:
        raise ConfigError(f"cluster.device={cl.device!r} is not one of: {', '.join(CLUSTER_DEVICES)} "
                          "(orchestrator/build/flops.py DEVICE_PEAKS: each one's peak FLOP/s per dtype; cpu: this "
                          "machine's estimate)")
    try:  # resolved once, not per layout (${hydra:...} resolves only inside the Hydra app)
        work = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    except InterpolationResolutionError:
        work = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    rejected: dict[str, int] = {}
    valid = []
    for layout in candidates(cfg):
        if only is not None and layout != only:
            continue
        set_layout(work, *layout)
        try:
            validate(work)
        except ConfigError as e:
            reason = re.match(r"[\w.]+", str(e)).group(0)  # the setting it names
            rejected[reason] = rejected.get(reason, 0) + 1
            continue
        valid.append(layout)
    n_params = n_params_of(cfg)
    args = ModelArgs.from_config(cfg.model)
    shards = {}
    for tp, pp, dp, _, _, cp in valid:
        if (tp, pp, dp, cp) not in shards:
            set_layout(work, tp, pp, dp, 1, "1f1b", cp)
            shards[tp, pp, dp, cp] = probe_shards(work)
    rows = []
    links, compute = Links.of(cl), Compute.of(cl, cfg.train.dtype)
    budget = (cl.gpu_memory_gb - cl.memory_reserve_gb) * GiB
    for tp, pp, dp, mb, schedule, cp in valid:
        set_layout(work, tp, pp, dp, mb, schedule, cp)
        ranks = layout_memory(work, shards[tp, pp, dp, cp], args, device="cuda")  # a cluster of GPUs
        worst = max(ranks, key=lambda r: r.total)
        m = cfg.train.global_batch // (mb * dp)
        bubble = bubble_of(schedule, pp, m, cfg.parallel.stages_per_rank)
        times = step_time(work, worst, n_params, bubble, args, links, compute)
        by_kind = times.pop("by_kind")
        rows.append(Layout(tp, pp, dp, mb, schedule if pp > 1 else "-", m, worst, worst.total <= budget, bubble,
                           **times, why=why(by_kind, times["step_s"], mb), cp=cp))
    rows.sort(key=lambda r: (not r.fits, r.step_s))
    best = next((r.step_s for r in rows if r.fits), rows[0].step_s if rows else 1.0)
    for r in rows:
        r.rel = r.step_s / best
    info = {"candidates": len(valid) + sum(rejected.values()), "valid": len(valid),
            "fit": sum(r.fits for r in rows), "rejected": rejected, "n_params": n_params,
            "seconds": time.perf_counter() - started}
    return rows, info
