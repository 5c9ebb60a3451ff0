"""parallel=auto: the planner's best layout for the world size a run actually got.

The ranking is `trident-plan`'s (orchestrator/planner/layouts.py: every
layout trident-train accepts, fitting ones first, by predicted step time),
for a cluster that is either a conf/cluster preset (`parallel.auto_cluster`)
or this machine as it is: its GPUs' memory and data-sheet peaks, or for CPU
ranks the host's memory shared among them. Only tp, pp, dp, the schedule and
train.micro_batch change; global_batch stays, so the loss curve does not, and
a checkpoint of any layout resumes at the new one.

It runs before any process group exists (the planner builds models in a
fake one): in the launching process for launcher=local, and in every rank
for launcher=external and inside a SLURM job (the same deterministic answer
everywhere), where a requeued job may have got fewer tasks. In a rank it
runs in a child process of its own (`isolated`): DTensor caches what it
computed in the fake world (meshes inside cached sharding decisions, with
rank 0's coordinates), and a real world built afterwards in the same
process would compute wrong shard offsets (seen with torch 2.13: every rank
saving shard 0).
"""

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Optional

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from orchestrator.build.flops import device_key
from orchestrator.config import CONF_DIR
from orchestrator.planner.layouts import Layout, candidates, plan, set_layout
from orchestrator.validate import ConfigError, validate

# World sizes tried when none fits, to say which would: every size up to 64, then these.
_PROBE_WORLDS = (96, 128, 192, 256, 384, 512, 768, 1024, 2048, 4096, 8192, 16384)


def rank_memory_gb(local_world: int, on_gpu: bool) -> float:
    """A rank's memory in GiB: its GPU's, or its share of this host's RAM."""
    if on_gpu:
        return torch.cuda.get_device_properties(0).total_memory / 2**30
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30 / local_world


def machine_cluster(world: int, local_world: int) -> dict:
    """This machine as a `cluster` (conf/cluster/*.yaml's fields) for `world` ranks, `local_world` per node."""
    if torch.cuda.is_available() and torch.cuda.device_count() >= local_world:
        props = torch.cuda.get_device_properties(0)
        return {"name": f"this machine ({props.name})", "gpus": world, "gpus_per_node": local_world,
                "gpu_memory_gb": rank_memory_gb(local_world, on_gpu=True), "memory_reserve_gb": 6,
                "device": device_key(props.name) or "h100-sxm",
                "mfu": 0.45, "intra_node_gbps": 450, "inter_node_gbps": 50, "hbm_gbps": 3350, "hbm_efficiency": 0.7,
                "intra_node_latency_us": 1.5, "inter_node_latency_us": 5}
    return {"name": "this machine (CPU ranks)", "gpus": world, "gpus_per_node": local_world,
            "gpu_memory_gb": rank_memory_gb(local_world, on_gpu=False), "memory_reserve_gb": 0.5, "device": "cpu",
            "mfu": 0.5, "intra_node_gbps": 5, "inter_node_gbps": 1, "hbm_gbps": 10, "hbm_efficiency": 1.0,
            # gloo between processes of one host: a ring step costs ~100 us (conf/cluster/cpu.yaml measures more)
            "intra_node_latency_us": 100, "inter_node_latency_us": 100}


def _plan_cfg(cfg: DictConfig, world: int, local_world: int) -> DictConfig:
    par = cfg.parallel
    if par.auto_cluster is not None:
        cluster = OmegaConf.to_container(OmegaConf.load(Path(CONF_DIR) / "cluster" / f"{par.auto_cluster}.yaml"))
        cluster.update(gpus=world, gpus_per_node=min(cluster["gpus_per_node"], world))
    else:
        cluster = machine_cluster(world, local_world)
    plain = OmegaConf.to_container(cfg, resolve=False)
    plain["cluster"] = cluster
    plain["parallel"]["layout"] = "manual"  # each candidate is validated as a manual layout
    plain["launcher"]["nprocs"] = None
    return OmegaConf.create(plain)


def best_layout(cfg: DictConfig, world: int, local_world: int) -> tuple[Optional[Layout], dict]:
    rows, info = plan(_plan_cfg(cfg, world, local_world))
    fitting = [r for r in rows if r.fits]
    return (fitting[0] if fitting else None), info


def predict(plain: dict, world: int, local_world: int) -> Optional[dict]:
    """The planner's prediction for the config's own layout on this machine (as parallel=auto plans), or None
    where the planner does not take that layout. Run it in a process of its own (it builds models in a fake
    world), as the dashboard does (orchestrator/runs/dashboard.py)."""
    cfg = OmegaConf.create(plain)
    par = cfg.parallel
    layout = (par.tp, par.pp, par.dp, cfg.train.micro_batch, par.schedule, par.cp)
    rows, _ = plan(_plan_cfg(cfg, world, min(local_world, world)), only=layout)
    if not rows:
        return None
    r = rows[0]
    return {"tp": r.tp, "pp": r.pp, "dp": r.dp, "cp": r.cp, "micro_batch": r.micro_batch, "schedule": r.schedule,
            "mem_gb": r.worst.total / 2**30, "fits": r.fits, "step_s": r.step_s, "mfu": r.mfu, "bubble": r.bubble,
            "comm_share": r.comm_share, "why": r.why}


def choose(cfg: DictConfig, world: int, local_world: Optional[int] = None,
           isolated: bool = False) -> tuple[DictConfig, str]:
    """cfg with the best layout for `world` ranks applied, and a line saying what was chosen.

    Raises ConfigError when no layout fits, naming the world sizes that would. isolated: plan in a
    child process (a process that will build a real process group afterwards must not plan itself).
    """
    if isolated:
        plain = OmegaConf.to_container(cfg, resolve=True)
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            chosen, line = pool.submit(_choose_plain, plain, world, local_world).result()
        return OmegaConf.create(chosen), line
    local_world = min(local_world or world, world)
    best, info = best_layout(cfg, world, local_world)
    if best is None:
        reasons = "; ".join(f"{n} rejected by {k}" for k, n in info["rejected"].items()) or "none fits in memory"
        raise ConfigError(f"parallel=auto: no layout of {cfg.model.name} fits {world} rank(s) ({reasons}): "
                          + fitting_worlds(cfg, world, local_world))
    out = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    with open_dict(out):
        out.parallel.tp, out.parallel.pp, out.parallel.dp, out.parallel.cp = best.tp, best.pp, best.dp, best.cp
        if best.pp > 1:
            out.parallel.schedule = best.schedule
        out.parallel.microbatches = None
        out.parallel.cut_points = None
        out.train.micro_batch = best.micro_batch
    line = (f"parallel=auto: {world} rank(s) -> tp={best.tp} pp={best.pp} dp={best.dp}"
            + (f" cp={best.cp}" if best.cp > 1 else "") + f" micro_batch={best.micro_batch}"
            + (f" schedule={best.schedule}" if best.pp > 1 else "")
            + f" (the best of {info['fit']} fitting layouts; global_batch={cfg.train.global_batch} unchanged)")
    return out, line


def _any_valid(cfg: DictConfig, world: int) -> bool:
    """Whether trident-train's validation accepts any layout of `world` ranks (cheap: no memory model)."""
    work = _plan_cfg(cfg, world, world)
    try:
        work = OmegaConf.create(OmegaConf.to_container(work, resolve=True))
    except Exception:  # ${hydra:...} outside the app: the layout checks do not need it
        pass
    for layout in candidates(work):
        set_layout(work, *layout)
        try:
            validate(work)
            return True
        except ConfigError:
            continue
    return False


def fitting_worlds(cfg: DictConfig, world: int, local_world: int) -> str:
    """'the smallest world size that fits is N (the largest below W is M)': what to run with instead."""
    m, t = cfg.model, cfg.train
    bound = t.global_batch * m.n_heads * m.n_layers  # dp, tp and pp can be no larger
    sizes = [w for w in sorted(set(range(1, 65)) | set(_PROBE_WORLDS)) if w <= bound and w != world]

    def fits(w: int) -> bool:
        return _any_valid(cfg, w) and best_layout(cfg, w, min(local_world, w))[0] is not None

    smallest = next((w for w in sizes if fits(w)), None)
    if smallest is None:
        return f"no world size up to {sizes[-1] if sizes else 1} fits either"
    text = f"the smallest world size that fits is {smallest}"
    if smallest < world:
        below = next((w for w in reversed(sizes) if smallest < w < world and fits(w)), smallest)
        if below != smallest:
            text += f", the largest below {world} is {below}"
    return text


def _choose_plain(plain: dict, world: int, local_world: Optional[int]) -> tuple[dict, str]:
    cfg, line = choose(OmegaConf.create(plain), world, local_world)
    return OmegaConf.to_container(cfg), line


def relayout(cfg_dict: dict, world: int, local_world: int) -> tuple[dict, Optional[str]]:
    """Inside a started job (a rank, before its process group): the plain config re-planned, in a child
    process, if the job got another world size (else as it is)."""
    par, launcher = cfg_dict["parallel"], cfg_dict.get("launcher", {})
    if launcher.get("name") == "slurm" and local_world:
        # The nodes this job got (a requeued elastic job may have fewer than launcher.nodes).
        launcher = {**launcher, "nodes": max(1, world // local_world), "tasks_per_node": local_world}
        cfg_dict = {**cfg_dict, "launcher": launcher}
    if par.get("layout") != "auto" or par["tp"] * par["pp"] * par["dp"] * par.get("cp", 1) == world:
        return cfg_dict, None
    cfg, line = choose(OmegaConf.create(cfg_dict), world, local_world, isolated=True)
    return OmegaConf.to_container(cfg), line
