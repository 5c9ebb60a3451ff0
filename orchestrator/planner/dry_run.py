"""`trident-train dry_run=true`: every pp rank's stages of one layout built whole on the meta device.

Nothing is spawned and no data is read: the real build code runs in a fake
process group at the layout's full world size, and each pp rank's memory is
reported next to the planner's prediction, which it must equal.
"""

import time

import torch
from omegaconf import DictConfig

from orchestrator.planner.memory import build_meta, layout_memory, measured_params, probe_shards, replicas, state_memory
from orchestrator.planner.render import memory_unit
from parallel.mesh import ParallelDims


def target_device(cfg: DictConfig) -> str:
    """Where the ranks of this run will compute: "cuda" for GPU ranks, else "cpu" (as launch/rank.py decides)."""
    la = cfg.launcher
    if la.name == "slurm":
        return "cuda" if la.get("gpus_per_node") else "cpu"
    if la.backend == "nccl":
        return "cuda"
    return "cuda" if la.backend == "auto" and torch.cuda.is_available() else "cpu"


def dry_run(cfg: DictConfig, device: str = None) -> str:
    """Build every pp rank's stages of this layout at its full world size on the meta device; report memory.

    device: "cuda" reports the CUDA allocator's peak, "cpu" the CPU accounting; None: where the run would go.
    """
    par, t = cfg.parallel, cfg.train
    started = time.perf_counter()
    device = device or target_device(cfg)
    shards = probe_shards(cfg)
    ranks = layout_memory(cfg, shards, device=device)
    unit, size = memory_unit(r.total for r in ranks)
    dims = ParallelDims.of(par)
    lines = [f"trident: dry run of {cfg.model.name} at tp={par.tp} pp={par.pp} dp={par.dp}"
             + (f" cp={dims.cp}" if dims.cp > 1 else "") + f" ({dims.world_size} ranks, dp_shard={par.dp_shard}, dtype={t.dtype}, "
             f"micro_batch={t.micro_batch}, schedule={par.schedule if par.pp > 1 else '-'}, {device}): {unit} per rank"]
    lines.append(f"  {'pp rank':>7}  {'params':>8}  {'grads':>8}  {'optim':>8}  {'act':>8}  {'other':>8}  {'total':>8}")
    for r in ranks:
        # The whole stage, built as a rank would build it (dp rank 0, tp rank 0: the largest shards).
        built = build_meta(cfg, r.pp_rank * replicas(par) * par.tp)
        st = state_memory(measured_params(cfg, built), par.dp_shard, replicas(par))
        assert (st.params, st.grads, st.optim) == (r.params, r.grads, r.optim), "probe and full build disagree"
        lines.append(f"  {r.pp_rank:>7}  " + "  ".join(f"{x / size:>8.1f}" for x in r.shown()))
    if device == "cuda":
        c, r = ranks[-1].cuda, ranks[-1]
        moment = "the loss's backward" if r.loss_moment >= r.step_moment else "the optimizer step"
        lines.append(f"  CUDA allocator peak (the last pp rank, at {moment}): other includes cross-entropy's "
                     f"backward {c.loss_backward / size:.1f}, cuBLAS workspaces {c.workspace / size:.2f}, "
                     f"allocator slack {c.slack / size:.2f}; gradients alive then "
                     f"{c.grads_at_loss / size:.1f}, optimizer temporaries {c.optimizer_temp / size:.1f} "
                     "(orchestrator/planner/memory.py cuda_terms)")
    lines.append(f"  built {par.pp} pp rank(s)' stages in {time.perf_counter() - started:.1f} s; the config passed "
                 "every check made before launch (the data is not read in a dry run). "
                 "`trident-plan` compares every layout against a GPU's memory.")
    return "\n".join(lines)
