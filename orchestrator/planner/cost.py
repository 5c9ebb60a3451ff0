"""The step-time model: how long one optimizer step of a layout takes, predicted.

  compute   model FLOPs (orchestrator/flops.py; + one forward of the
            recomputed blocks) / (gpus x peak x mfu)
  tp        per block and micro-batch, 2 all-reduces forward and 2 backward
            (or their all-gather / reduce-scatter halves under sequence
            parallelism, the same volume) of micro_batch x seq x dim
            activations, ring volume 2(tp-1)/tp, over NVLink while the tp
            group fits in a node
  pp        each micro-batch's activations sent across every stage boundary,
            forward and backward
  bubble    (compute + tp + pp) / (1 - bubble), the idle fraction of the
            schedule (orchestrator/planner/bubble.py: analytic, or replayed from
            torch's own action lists)
  dp        FSDP2: two all-gathers per micro-batch (forward, backward) and one
            reduce-scatter per micro-batch (per step under a pipeline) of the rank's parameters, overlapped with
            compute (only the excess shows); ZeRO-1 and tp>1 replicate: an
            all-reduce (+ ZeRO-1's broadcast) after backward, not overlapped;
            DDP: an all-reduce overlapped with backward

The times are for ranking layouts against each other.
"""

from functools import lru_cache

from omegaconf import DictConfig

from models.llama import ModelArgs
from orchestrator.flops import cluster_peak, flops_per_token, mfu
from orchestrator.levers import dtype_bytes
from orchestrator.planner.bubble import analytic_bubble, simulate
from orchestrator.planner.memory import RankMemory, orders_microbatches, schedule_orders
from parallel.pipeline_parallel import stages_per_rank

# Forward passes recomputed in backward, per block, by train.activation_checkpointing (levers.ac_layers).
RECOMPUTED = {"none": 0.0, "selective": 0.5, "full": 1.0}


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


def step_time(cfg: DictConfig, mem: RankMemory, n_params: int, bubble: float, args: ModelArgs) -> dict:
    cl, par, t, m_cfg = cfg.cluster, cfg.parallel, cfg.train, cfg.model
    gpus = par.tp * par.pp * par.dp
    m = t.global_batch // (t.micro_batch * par.dp)
    act = dtype_bytes(t.dtype)
    dtype_peak = cluster_peak(cl.device, t.dtype, cl.gpus_per_node)
    peak = dtype_peak * cl.mfu
    flops = flops_per_token(args, n_params, t.seq_len) * t.global_batch * t.seq_len
    recompute = RECOMPUTED[t.activation_checkpointing]
    block_flops = 1 - args.vocab_size * args.dim * 6 / max(1.0, flops_per_token(args, n_params, t.seq_len))
    compute_s = flops * (1 + recompute * block_flops / 3) / (gpus * peak)
    gb = 1e9
    intra, inter = cl.intra_node_gbps * gb, cl.inter_node_gbps * gb
    tokens = t.micro_batch * t.seq_len
    layers = m_cfg.n_layers / par.pp
    # 4 collectives per block (2 forward, 2 backward); a recomputed forward repeats its 2.
    tp_bytes = m * layers * (4 + 2 * recompute) * 2 * (par.tp - 1) / par.tp * tokens * args.dim * act
    tp_s = tp_bytes / (intra if par.tp <= cl.gpus_per_node else inter)
    sp = par.tp if par.tp > 1 and par.sequence_parallel else 1
    v = stages_per_rank(par.schedule, par.stages_per_rank) if par.pp > 1 else 1
    # Activations cross stage boundaries in fp32 (parallel/pipeline_parallel.py), each way.
    pp_bytes = 0 if par.pp == 1 else m * v * 2 * tokens * args.dim / sp * 4
    pp_s = pp_bytes / (inter if par.tp * par.dp >= cl.gpus_per_node else intra)
    dp_bw = intra if par.tp * par.dp <= cl.gpus_per_node else inter
    frac = (par.dp - 1) / par.dp
    # The parameters of this rank's stages, whole over dp (weights are stored fp32: 4 bytes each).
    stage_params = mem.params / 4 * (par.dp if par.dp_shard == "full" else 1)
    if par.dp_shard == "full":  # all-gathers in the compute dtype, reduce-scatters in fp32
        # pp=1: every micro-batch gathers twice and reduce-scatters once (data_parallel.DataParallel.micro_batch);
        # a pipeline stage reduce-scatters once per step (torch's stages defer it to the last backward).
        scatters = m if par.pp == 1 else 1
        dp_s = max(0.0, frac * stage_params * (2 * m * act + 4 * scatters) / dp_bw - compute_s)
    elif par.dp_shard == "optimizer":  # all-reduce (2 frac) + broadcast (frac), fp32
        dp_s = 3 * frac * stage_params * 4 / dp_bw
    else:  # DDP overlaps its all-reduce with backward; with tp > 1 the loop reduces after it
        dp_s = 2 * frac * stage_params * 4 / dp_bw
        dp_s = dp_s if par.tp > 1 else max(0.0, dp_s - compute_s * 2 / 3)
    if par.dp == 1:
        dp_s = 0.0
    step = (compute_s + tp_s + pp_s) / (1 - bubble) + dp_s
    return {"compute_s": compute_s, "tp_s": tp_s, "pp_s": pp_s, "dp_s": dp_s, "step_s": step,
            "mfu": mfu(flops / (t.global_batch * t.seq_len), t.global_batch * t.seq_len / step, dtype_peak, gpus)}
