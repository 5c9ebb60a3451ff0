"""Every collective one optimizer step of a layout issues on a rank, counted from the code it runs.

Per micro-batch (m per step and dp rank, T = micro_batch x seq_len / cp
tokens on a rank, d = dim, a = bytes of train.dtype):

  tp   per block (parallel/tensor_parallel.py, torchtitan's plan): with
       sequence parallelism 2 all-gathers + 2 reduce-scatters of T x d x a
       forward and the same backward; without, 2 all-reduces each way. A
       recomputed block (activation checkpointing) repeats its forward's.
       The vocab-parallel embedding (first stage) reduce-scatters (SP) or
       all-reduces its output, gathering the gradient back under SP; the
       output projection (last stage) gathers its input (SP) and
       reduce-scatters the gradient, or all-reduces the input's gradient;
       loss parallel all-reduces 3 per-token statistics (fp32).
  cp   per block one all-gather of the rank's K and V (its kv heads: 2 x
       kv_heads x head_dim / tp wide) into the whole sequence's, and one
       reduce-scatter of their gradient back; a recomputed block gathers
       again. With document masking each stage's forward gathers the
       document ids (int64) once per micro-batch (parallel/context_parallel.py).
  pp   each stage sends its output forward and its input's gradient
       backward, fp32 on the wire (parallel/pipeline_parallel.py), sharded
       over tp under SP.
  dp   over the dp x cp ranks that hold the same weights.
       FSDP2 (full): each block is a unit, the rest of the stage the root.
       Without a pipeline, every micro-batch all-gathers each unit's
       weights for forward and each block's again for backward (the root
       keeps its own), and reduce-scatters each unit's gradient (fp32);
       a pipeline stage gathers once per step and reduce-scatters once,
       after the last backward. ZeRO-1 (optimizer): one all-reduce of the
       gradients after backward, in flat fp32 buckets of 2^24 elements,
       and each rank's owned parameters broadcast after the step.
       replicate: DDP's bucketed all-reduce on the last micro-batch and its
       buffer broadcasts (tp=pp=1), else the ZeRO-1 all-reduce without the
       broadcast.
  loop clipping: the squared norm all-reduced over each mesh dim its
       gradients are sharded on, and over pp; sequence-parallel norms'
       partial gradients all-reduced over tp (without FSDP2); the agreement
       vector all-reduced over the world once per step; with document
       masking, the count of targets that count over dp x cp.

`tests/dist/test_plan_comms.py` holds these counts to what a dispatch mode
records in a real step, per layout.
"""

from dataclasses import dataclass, replace

from models.llama import ModelArgs
from orchestrator.build.levers import dtype_bytes
from parallel.data_parallel import BUCKET
from parallel.pipeline_parallel import SPLIT_BACKWARD, stage_ids, stage_owner, stages_per_rank

# Forward passes recomputed in backward, per block, by train.activation_checkpointing (levers.ac_layers).
RECOMPUTED = {"none": 0.0, "selective": 0.5, "full": 1.0}
DDP_BUCKET_BYTES = 25 * 2**20  # torch DDP's default bucket_cap_mb
FP32 = 4


@dataclass(frozen=True)
class Comm:
    dim: str  # tp | cp | pp | dp | loop: which parallelism issues it
    kind: str  # all_reduce | all_gather | reduce_scatter | send_recv | broadcast
    group: int  # ranks in the group
    nbytes: float  # the whole buffer (all-gather: output; reduce-scatter: input)
    count: float  # per step on this rank
    overlapped: bool = False  # runs beside compute where the backend allows it (FSDP2's prefetch, DDP's buckets)


@dataclass(frozen=True)
class Shape:
    """What the counts depend on, from a layout and the model."""

    tp: int
    pp: int
    dp: int
    micro_batch: int
    microbatches: int  # per dp rank and step
    seq_len: int
    stages_per_rank: int
    sequence_parallel: bool
    dp_shard: str
    dtype_bytes: int
    recompute: float  # forwards recomputed per block: 0, 0.5 (selective), 1 (full)
    layers: int  # blocks on this rank (all its stages)
    first: bool  # holds the embedding
    last: bool  # holds the output projection and loss
    p2p_ends: int  # its stages' boundaries with a stage on another pp rank
    block_params: int  # one block's parameters, this tp rank's part
    root_params: int  # the rest of this rank's stages (embedding, norm, output), this tp rank's part
    fsdp_units_per_block: bool
    cp: int = 1
    docs: bool = False  # document masking: each stage gathers the document ids under cp
    schedule: str = ""


def shape_of(cfg, args: ModelArgs, pp_rank: int, block_params: int, root_params: int) -> Shape:
    return at_rank(layout_shape(cfg, args, block_params, root_params), pp_rank, args.n_layers)


def layout_shape(cfg, args: ModelArgs, block_params: int, root_params: int) -> Shape:
    """The layout's shape as pp rank 0 sees it: `at_rank` gives any other rank's, without reading the config
    again (a 256-GPU plan asks for thousands)."""
    par, t = cfg.parallel, cfg.train
    v = stages_per_rank(par.schedule, par.stages_per_rank) if par.pp > 1 else 1
    m = t.global_batch // (t.micro_batch * par.dp)
    base = Shape(par.tp, par.pp, par.dp, t.micro_batch, m, t.seq_len, v,
                 bool(par.sequence_parallel) and par.tp > 1, par.dp_shard, dtype_bytes(t.dtype),
                 RECOMPUTED[t.activation_checkpointing], args.n_layers, True, True, 0,
                 block_params, root_params, par.pp == 1 or par.schedule not in SPLIT_BACKWARD, par.get("cp", 1),
                 bool(cfg.data.get("mask_across_documents")), par.schedule)
    return at_rank(base, 0, args.n_layers)


def at_rank(s: Shape, pp_rank: int, n_layers: int) -> Shape:
    """The same layout's shape on pp rank `pp_rank`: its stages' layers, ends and boundaries."""
    if s.pp == 1:
        return s
    ids = stage_ids(s.schedule, pp_rank, s.pp, s.stages_per_rank)
    n_stages = s.pp * s.stages_per_rank
    ends = sum(int(0 <= nb < n_stages and stage_owner(s.schedule, nb, s.pp) != pp_rank)
               for i in ids for nb in (i - 1, i + 1))
    return replace(s, layers=-(-n_layers // n_stages) * len(ids), first=0 in ids, last=n_stages - 1 in ids,
                   p2p_ends=ends)


def step_comms(s: Shape, args: ModelArgs) -> list[Comm]:
    out: list[Comm] = []
    T, d, a, m = s.micro_batch * s.seq_len // s.cp, args.dim, s.dtype_bytes, s.microbatches
    act = T * d * a
    replicas = s.dp * s.cp
    # --- tensor parallelism
    if s.tp > 1:
        # A recomputed forward stops once it has remade what backward saved (torch's non-reentrant checkpoint):
        # the block's last collective, the MLP output's reduction, is not run again.
        rc = s.recompute
        if s.sequence_parallel:
            per_block = {"all_gather": 4 + 2 * rc, "reduce_scatter": 4 + rc}
        else:
            per_block = {"all_reduce": 4 + rc}
        for kind, n in per_block.items():
            out.append(Comm("tp", kind, s.tp, act, m * s.layers * n))
        if s.first:
            kinds = ("reduce_scatter", "all_gather") if s.sequence_parallel else ("all_reduce",)
            for kind in kinds:
                out.append(Comm("tp", kind, s.tp, act, m))
        if s.last:
            if s.sequence_parallel:
                out += [Comm("tp", "all_gather", s.tp, act, m), Comm("tp", "reduce_scatter", s.tp, act, m)]
            else:
                out.append(Comm("tp", "all_reduce", s.tp, act, m))
            out.append(Comm("tp", "all_reduce", s.tp, T * FP32, 3 * m))  # loss parallel's statistics
    # --- context parallelism: K and V gathered whole in each block's forward, their gradients scattered back
    if s.cp > 1:
        kv = s.micro_batch * s.seq_len * 2 * args.kv_heads * args.head_dim // s.tp * a
        out += [Comm("cp", "all_gather", s.cp, kv, m * s.layers * (1 + s.recompute)),
                Comm("cp", "reduce_scatter", s.cp, kv, m * s.layers)]
        if s.docs:
            out.append(Comm("cp", "all_gather", s.cp, s.micro_batch * s.seq_len * 8, m * s.stages_per_rank))
    # --- pipeline parallelism: one transfer forward and one backward per micro-batch and stage boundary
    if s.pp > 1:
        wire = T * d * FP32 / (s.tp if s.sequence_parallel else 1)
        # Each boundary carries the activation one way and its gradient back: two transfers per micro-batch.
        out.append(Comm("pp", "send_recv", 2, wire, 2 * m * s.p2p_ends))
    # --- data parallelism (over dp x cp)
    if replicas > 1:
        blocks, gathered = s.layers * s.block_params, s.layers * s.block_params + s.root_params
        if s.dp_shard == "full":
            pa = a  # FSDP2 gathers in the compute dtype
            # Units with parameters: each block, and each stage's root where it holds the embedding or the output
            # (a middle stage's root has none); a split-backward schedule's stage is one unit.
            roots = 1 if s.pp == 1 else int(s.first) + int(s.last)
            units = s.layers + roots if s.fsdp_units_per_block else s.stages_per_rank
            block = blocks * pa / max(1, s.layers)
            if s.pp == 1:
                # Each micro-batch: every unit gathered for forward, each block again for backward (resharded
                # after forward; the root keeps its own), every unit's gradient reduce-scattered.
                out += [Comm("dp", "all_gather", replicas, gathered * pa / units, m * units, overlapped=True),
                        Comm("dp", "all_gather", replicas, block, m * s.layers, overlapped=True),
                        Comm("dp", "reduce_scatter", replicas, gathered * FP32 / units, m * units, overlapped=True)]
            else:
                # A stage keeps its gradients unsharded until the step's last backward: each unit gathered once
                # and reduce-scattered once, and each block gathered again for each micro-batch's backward.
                out += [Comm("dp", "all_gather", replicas, gathered * pa / units, units, overlapped=True),
                        Comm("dp", "reduce_scatter", replicas, gathered * FP32 / units, units, overlapped=True)]
                if s.fsdp_units_per_block:
                    out.append(Comm("dp", "all_gather", replicas, block, m * s.layers, overlapped=True))
        else:
            total = gathered * FP32
            if s.dp_shard == "replicate" and s.tp == 1 and s.pp == 1:
                n = max(1, -(-total // DDP_BUCKET_BYTES))
                out.append(Comm("dp", "all_reduce", replicas, total / n, n, overlapped=True))
                # DDP syncs the module's buffers (the rotary table) from rank 0 in the synced forward: the
                # buffers' count and sizes, then their values.
                rope = args.max_seq_len * args.head_dim * FP32
                out += [Comm("dp", "broadcast", replicas, 8, 2), Comm("dp", "broadcast", replicas, rope, 1)]
            else:
                n = max(1, -(-gathered // BUCKET))
                out.append(Comm("dp", "all_reduce", replicas, total / n, n))
                if s.dp_shard == "optimizer":
                    out.append(Comm("dp", "broadcast", replicas, total / replicas, replicas))
    # --- the loop: clipping's norms and the agreement
    fsdp = replicas > 1 and s.dp_shard == "full"
    if s.sequence_parallel:
        # A sequence-parallel norm's weight gets a partial gradient, all-reduced over tp: under FSDP2 without a
        # pipeline in each micro-batch's backward, else once per step (a stage's deferred reduction, or clipping).
        norms = 2 * s.layers + int(s.last)
        out.append(Comm("tp", "all_reduce", s.tp, args.dim * FP32, norms * (m if fsdp and s.pp == 1 else 1)))
    # The squared norm is summed over each group its gradients are sharded on (parallel/grad.py): tp and dp for
    # FSDP2 x TP's matrices, dp again for the parameters FSDP2 shards but TP replicates.
    norm_groups = ([s.tp, replicas, replicas] if fsdp and s.tp > 1
                   else [g for g in (s.tp, replicas if fsdp else 1) if g > 1])
    for g in norm_groups:
        out.append(Comm("loop", "all_reduce", g, 8, 1))
    if s.pp > 1:
        out.append(Comm("loop", "all_reduce", s.pp, 8, 1))
    if s.docs and replicas > 1:  # the global batch's targets that count (the trainer's _weigh_tokens)
        out.append(Comm("loop", "all_reduce", replicas, 8, 1))
    world = s.tp * s.pp * s.dp * s.cp
    out.append(Comm("loop", "all_reduce", world, 8 * (8 + 2 * world), 1))
    return out
