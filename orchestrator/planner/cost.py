"""The step-time model: how long one optimizer step of a layout takes, predicted from a cluster's figures.

Every pp rank's step is summed from what its code runs
(orchestrator/planner/comms.py counts the collectives) and the cluster
file's measured or published figures (orchestrator/planner/cluster.py):

  compute   per micro-batch, each block's forward+backward and (last
            stage) the output projection and loss: a fixed overhead per
            block and the model FLOPs at the rate the cluster's fit gives
            for the layout's tp degree (so small micro-batches pay the
            overhead more often: the efficiency curve); + one forward of
            each recomputed block
  tp, cp,   every collective and stage transfer as alpha + bytes / beta on
  pp        its link, on the compute path (cp: each block's K/V all-gather
            and its gradient's reduce-scatter; a rank computes its s/cp
            tokens, 1/cp of the causal attention)
  bubble    compute and transfers stretched by 1 / (1 - bubble), the idle
            share of the schedule (orchestrator/planner/bubble.py), and sped
            up by what the cluster measured a rank gains while only
            (1 - bubble) of its node's ranks are busy: 1 for ranks with a
            device each; on a CPU, whose ranks share cores, the idle ranks'
            share (gloo's collectives run on those cores too)
  dp        FSDP2's gathers and reduce-scatters, ZeRO-1's and replicate's
            reductions: overlapped with compute where the backend runs
            collectives beside it (`comm_overlap`: NCCL), only the excess
            counts; on the compute thread (gloo) all of it counts
  loop      clipping's and the agreement's all-reduces, and AdamW's step and
            the clipping per local parameter (`loop.ns_per_param`)
  overheads what a calibration found real steps spend beyond these terms:
            FSDP2's collectives as a multiple of the bare ones (its copies
            and hooks), per pipeline stage and micro-batch (the schedule's
            own work)

The slowest pp rank sets the step.
"""

from dataclasses import replace
from functools import lru_cache
from typing import Optional

from omegaconf import DictConfig

from models.llama import ModelArgs
from orchestrator.build.flops import (
    block_flops_parts,
    block_matmul_weights,
    cluster_peak,
    flops_per_token,
    head_flops,
    mfu,
)
from orchestrator.planner.bubble import analytic_bubble, simulate
from orchestrator.planner.cluster import Compute, Links
from orchestrator.planner.comms import RECOMPUTED, Shape, at_rank, layout_shape, step_comms
from orchestrator.planner.memory import RankMemory, orders_microbatches, replicas, schedule_orders
from parallel.pipeline_parallel import stages_per_rank


def bubble_of(schedule: str, pp: int, m: int, per_rank) -> float:
    if pp == 1:
        return 0.0
    v = stages_per_rank(schedule, per_rank)
    exact = analytic_bubble(schedule, pp, m, v)
    if exact is not None:
        return exact
    # Replayed with at most 2 pp micro-batches: the idle time stops growing there, the busy time grows 3v per one.
    idle = _idle_units(schedule, pp, orders_microbatches(schedule, pp, m), per_rank)
    return idle / (idle + pp * 3 * v * m)


@lru_cache(maxsize=512)
def _idle_units(schedule: str, pp: int, m: int, per_rank) -> float:
    """Idle time summed over the ranks, in units of one forward of one stage (orchestrator/planner/bubble.py's costs)."""
    orders, n_stages = schedule_orders(schedule, pp, m, per_rank)
    sim = simulate(orders, n_stages)
    return sim["bubble"] * sim["makespan"] * pp


def rank_params(args: ModelArgs, tp: int) -> tuple[int, int, int]:
    """(one block's parameters on a tp rank, the embedding's, the final norm's and output projection's)."""
    block = block_matmul_weights(args) // tp + 2 * args.dim  # + its two norms' weights
    vocab = -(-args.vocab_size // tp) * args.dim
    return block, vocab, vocab + args.dim


def tp_comm_times(links: Links, args: ModelArgs, tp: int, tokens: int, seq: int, sp: bool, dtype_bytes_: int,
                  link: str = "intra") -> tuple[float, float]:
    """(seconds of one block's TP collectives, forward and backward; of the embedding's, output projection's and
    loss's) for one micro-batch of `tokens`: what a calibration takes out of the real model's times."""
    def total(layers, first, last):
        shape = Shape(tp=tp, pp=1, dp=1, micro_batch=tokens // seq, microbatches=1, seq_len=seq, stages_per_rank=1,
                      sequence_parallel=sp and tp > 1, dp_shard="full", dtype_bytes=dtype_bytes_, recompute=0.0,
                      layers=layers, first=first, last=last, p2p_ends=0, block_params=0, root_params=0,
                      fsdp_units_per_block=True)
        return sum(c.count * links.time(c.kind, c.group, c.nbytes, link) for c in step_comms(shape, args)
                   if c.dim == "tp")
    return total(1, False, False), total(0, True, True)


def step_time(cfg: DictConfig, mem: Optional[RankMemory], n_params: int, bubble: float, args: ModelArgs,
              links: Optional[Links] = None, compute: Optional[Compute] = None) -> dict:
    cl, par, t = cfg.cluster, cfg.parallel, cfg.train
    links = links or Links.of(cl)
    compute = compute or Compute.of(cl, t.dtype)
    cp = par.get("cp", 1)
    gpus = par.tp * par.pp * par.dp * cp
    dtype_peak = cluster_peak(cl.device, t.dtype, cl.gpus_per_node)
    flops = flops_per_token(args, n_params, t.seq_len) * t.global_batch * t.seq_len
    tokens = t.micro_batch * t.seq_len // cp  # a rank's: the attention FLOPs below are then 1/cp of the causal whole
    recompute = RECOMPUTED[t.activation_checkpointing]
    block_p, embed_p, head_p = rank_params(args, par.tp)
    overlap = bool(cl.get("comm_overlap")) if cl.get("comm_overlap") is not None else True
    ov = cl.get("overheads") or {}
    fsdp_factor = float(ov.get("fsdp_comm_factor", 1.0)) if par.dp_shard == "full" else 1.0
    # The same on every pp rank: one block's forward+backward (a recomputed one's forward again), the head's.
    blk = compute.seconds(*block_flops_parts(args, par.tp, tokens, t.seq_len), 1, par.tp) * (1 + recompute / 3)
    blk_overhead = compute.overhead(1 + recompute / 3, par.tp)
    head = compute.seconds(head_flops(args, par.tp, tokens), 0.0, 0, par.tp)
    # A rank works (1 - bubble) of the schedule; meanwhile about that share of its node's ranks work too.
    speedup = compute.speedup(cl.gpus_per_node * (1.0 - bubble), par.tp) if bubble > 0 else 1.0
    link_of = group_links(cl, par)  # read once: a config lookup per collective is most of a 256-GPU plan's time
    worst = None
    base = layout_shape(cfg, args, block_p, 0)
    for pp_rank in range(par.pp):
        shape = at_rank(base, pp_rank, args.n_layers)
        root = (embed_p if shape.first else 0) + (head_p if shape.last else 0)
        shape = replace(shape, root_params=root)
        m = shape.microbatches
        compute_s = m * (shape.layers * blk + (head if shape.last else 0.0))
        overhead_s = m * shape.layers * blk_overhead
        by_dim = {"tp": 0.0, "cp": 0.0, "pp": 0.0, "dp": 0.0, "loop": 0.0}
        dp_beside = 0.0  # the part of dp's time its code issues beside compute (FSDP2's prefetch, DDP's buckets)
        by_kind: dict = {}
        for c in step_comms(shape, args):
            link = link_of[c.dim]
            kind = "all_reduce" if c.kind == "broadcast" else c.kind  # a broadcast costs an all-reduce's half
            secs = c.count * links.time(kind, c.group, c.nbytes * (0.5 if c.kind == "broadcast" else 1), link)
            by_dim[c.dim] += secs
            dp_beside += secs if c.dim == "dp" and c.overlapped else 0.0
            by_kind[(c.dim, c.kind)] = by_kind.get((c.dim, c.kind), 0.0) + secs
        by_dim["dp"] *= fsdp_factor
        dp_beside *= fsdp_factor
        stage_mbs = m * shape.stages_per_rank if par.pp > 1 else 0
        compute_s += stage_mbs * float(ov.get("pipeline_ms_per_stage_microbatch", 0.0)) * 1e-3
        # Overlapped where the backend runs collectives beside compute: only their excess shows. ZeRO-1's and
        # replicate's reductions after backward never overlap.
        exposed_dp = by_dim["dp"] - dp_beside + (max(0.0, dp_beside - compute_s) if overlap else dp_beside)
        local = shape.layers * block_p + root
        if replicas(par) > 1 and par.dp_shard in ("full", "optimizer"):
            local /= replicas(par)
        loop_s = by_dim["loop"] + local * float((cl.get("loop") or {}).get("ns_per_param", 0.0)) * 1e-9
        busy = (compute_s + by_dim["tp"] + by_dim["cp"] + by_dim["pp"]) / (speedup * (1.0 - bubble))
        step = busy + exposed_dp + loop_s
        row = {"compute_s": compute_s, "overhead_s": overhead_s, "tp_s": by_dim["tp"], "cp_s": by_dim["cp"],
               "pp_s": by_dim["pp"], "dp_s": exposed_dp,
               "loop_s": loop_s, "step_s": step, "by_kind": by_kind}
        if worst is None or step > worst["step_s"]:
            worst = row
    comm = worst["tp_s"] + worst["cp_s"] + worst["pp_s"] + worst["dp_s"] + worst["loop_s"]
    worst["comm_share"] = min(1.0, comm / worst["step_s"])
    worst["mfu"] = mfu(flops / (t.global_batch * t.seq_len), t.global_batch * t.seq_len / worst["step_s"],
                       dtype_peak, gpus)
    return worst


def group_links(cl, par) -> dict[str, str]:
    """Each parallelism's link: intra while its group's ranks share a node (ranks are ordered (pp, dp, cp,
    tp): tp innermost)."""
    tp_cp, per_node = par.tp * par.get("cp", 1), cl.gpus_per_node
    spans = {"tp": par.tp, "cp": tp_cp, "dp": tp_cp * par.dp, "loop": tp_cp * par.dp * par.pp,
             "pp": tp_cp * par.dp * par.pp}
    return {dim: "intra" if span <= per_node else "inter" for dim, span in spans.items()}
