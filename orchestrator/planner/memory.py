"""Per-rank memory of a layout, without a cluster: model state measured, activations from a formula.

Model state (weights, gradients, AdamW state) is measured, not guessed: the
real `build_model` runs on the meta device inside torch's fake process group
at the layout's full world size, applying the real pipeline cut, TP plan and
FSDP2 sharding, and we count each rank's local shards. FSDP2 and DTensor shard
every parameter on its own (dim 0, torch.chunk sizes), so one transformer
block's shards stand for all of them: a *probe* model with one layer per
pipeline stage gives the embedding's, a block's and the head's shards at
every rank, and a stage's bytes are those times its layer count. (`dry_run`
builds the whole of every pp rank's stages instead; tests check the two
agree, and that both equal what a real gloo run allocates, to the byte.)

Activations are analytic: the bytes autograd saves for backward per token
and layer, counted op by op for our Llama block (the analogue of Korthikanti
et al.'s sbh(34 + 5as/h) for GPT), times the micro-batches a pipeline rank
holds at once under its schedule.

That is the CPU accounting: what the saved-tensor meter sees, summed. On a
GPU (`device="cuda"`: the planner's clusters, and a dry run whose ranks will
get GPUs) the number to predict is the CUDA caching allocator's peak
(`torch.cuda.max_memory_allocated`), which also holds what is alive only for
a moment and what the libraries allocate; `cuda_peak` adds those terms and
takes the larger of the step's two fullest moments (see there).
"""

from dataclasses import dataclass
from functools import lru_cache
from types import SimpleNamespace
from typing import Optional

import torch
from omegaconf import OmegaConf
from torch.distributed.device_mesh import DeviceMesh

from models.llama import ModelArgs
from orchestrator.build.levers import ac_layers, dtype_bytes
from orchestrator.build.model import build_model, stage_plan
from orchestrator.planner.bubble import ops_of, pipeline_orders
from parallel.data_parallel import BUCKET, shard_owners
from parallel.mesh import MESH_DIMS, ParallelDims, build_mesh, fake_world
from parallel.pipeline_parallel import SINGLE_STAGE, stage_ids, stages_per_rank

GiB = 2**30
ADAM_MOMENTS = 2  # exp_avg and exp_avg_sq, each the dtype and shape of its parameter
ADAM_STEP_BYTES = 4  # AdamW's per-tensor step count: a float32 scalar


@dataclass(frozen=True)
class ParamShard:
    """One parameter as one rank holds it."""

    numel: int  # of the whole parameter (what ZeRO-1 balances by)
    local: int  # elements this rank stores
    itemsize: int
    grad: int  # elements of its gradient on this rank


@dataclass
class ModelShards:
    """The parameters of the embedding, of one block and of the head (final norm + output), at one rank."""

    embed: list[ParamShard]
    block: list[ParamShard]
    head: list[ParamShard]


def replicas(par) -> int:
    """The ranks that hold the same weights, over which data parallelism reduces and shards: dp x cp."""
    return par.dp * par.get("cp", 1)


def whole_embedding_grad(cfg) -> bool:
    """DTensor's vocab-parallel embedding backward gives a replicated gradient of the whole table (torch
    2.13, measured): unless FSDP2 reduce-scatters it into a shard, every tp rank keeps all of it."""
    par = cfg.parallel
    return par.tp > 1 and not (replicas(par) > 1 and par.dp_shard == "full")


def _shard(p, whole_grad: bool = False) -> ParamShard:
    local = p.to_local() if hasattr(p, "to_local") else p
    return ParamShard(p.numel(), local.numel(), local.element_size(), p.numel() if whole_grad else local.numel())


def build_meta(cfg, rank: int):
    """This rank's whole model parts on the meta device, sharded by the real build code, in a fake world."""
    par = cfg.parallel
    dims = ParallelDims.of(par)
    with fake_world(dims.world_size, rank):
        mesh = build_mesh(dims, "cpu")
        train = OmegaConf.merge(cfg.train, {"compile": False})  # nothing runs: compiling would only cost time
        return build_model(cfg.model, par, mesh, torch.device("meta"), 0, train_cfg=train, materialize=False)


def probe_shards(cfg, dp_rank: int = 0, tp_rank: int = 0, cp_rank: int = 0) -> ModelShards:
    """Measure the embedding's, a block's and the head's shards at (pp rank 0, dp_rank, cp_rank, tp_rank).

    The probe is a one-layer model built by `build_model` in the layout's full
    fake world, on the mesh of pp rank 0's dp x cp x tp ranks: exactly the
    groups, rank order and sharding of the real layout (ranks are ordered
    (pp, dp, cp, tp), so pp rank 0 holds ranks 0 .. dp*cp*tp-1), without
    building pp stages. Rank 0 of each dp x cp and tp group holds the largest
    shards (torch.chunk gives any remainder to the last ranks).
    """
    par = cfg.parallel
    model = OmegaConf.merge(cfg.model, {"n_layers": 1})
    one_stage = OmegaConf.merge(par, {"pp": 1, "schedule": "1f1b", "stages_per_rank": None, "cut_points": None})
    train = OmegaConf.merge(cfg.train, {"compile": False})  # nothing runs: compiling would only cost time
    dims = ParallelDims.of(par)
    with fake_world(dims.world_size, (dp_rank * dims.cp + cp_rank) * dims.tp + tp_rank):
        ranks = torch.arange(dims.dp * dims.cp * dims.tp).view(1, dims.dp, dims.cp, dims.tp)
        mesh = DeviceMesh("cpu", ranks, mesh_dim_names=MESH_DIMS)
        built = build_model(model, one_stage, mesh, torch.device("meta"), 0, train_cfg=train, materialize=False)
    found = {"embed": [], "block": [], "head": []}
    for name, p in built.modules[0].named_parameters():
        kind = "block" if name.startswith("layers.") else "embed" if name.startswith("tok_embeddings") else "head"
        found[kind].append(_shard(p, kind == "embed" and whole_embedding_grad(cfg)))
    return ModelShards(**found)


def rank_params(cfg, shards: ModelShards, pp_rank: int, stages=None) -> list[ParamShard]:
    """This pp rank's parameters in the order its modules list them."""
    ids_per_rank, layers, n_stages = stages or rank_stages(cfg)
    ids = ids_per_rank[pp_rank]
    out = []
    for stage in ids:
        out += shards.embed if stage == 0 else []
        out += shards.block * len(layers[stage])
        out += shards.head if stage == n_stages - 1 else []
    return out


def measured_params(cfg, built) -> list[ParamShard]:
    """The same list from a full (dry-run) build."""
    whole = whole_embedding_grad(cfg)
    return [_shard(p, whole and name.startswith("tok_embeddings")) for m in built.modules
            for name, p in m.named_parameters()]


@dataclass
class StateMemory:
    params: int
    grads: int
    optim: int
    stepped: int = 0  # bytes of the parameters this rank's optimizer steps (ZeRO-1: the ones it owns)

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optim


def state_memory(params: list[ParamShard], dp_shard: str, dp: int, dp_rank: int = 0) -> StateMemory:
    """Bytes of weights, gradients and AdamW state this rank allocates."""
    local = sum(s.local * s.itemsize for s in params)
    grads = sum(s.grad * s.itemsize for s in params)
    owned = params
    if dp_shard == "optimizer" and dp > 1:
        owners = shard_owners([SimpleNamespace(numel=lambda s=s: s.numel) for s in params], dp)
        owned = [s for s, r in zip(params, owners) if r == dp_rank]
    optim = sum(ADAM_MOMENTS * s.local * s.itemsize + ADAM_STEP_BYTES for s in owned)
    return StateMemory(local, grads, optim, sum(s.local * s.itemsize for s in owned))


# ---- activations ----

@dataclass(frozen=True)
class ActivationModel:
    """Bytes autograd saves per token: per block, and for the first and last stage's extras."""

    block: float  # a block without activation checkpointing
    block_input: float  # a checkpointed block: only its input
    first: float  # the token ids
    last: float  # final norm, output projection input, fp32 log-softmax
    per_microbatch: float = 0.0  # bytes each stage's forward saves once for all its blocks (cp's rotary rows)


def activation_model(cfg, args: ModelArgs = None) -> ActivationModel:
    """Per-token saved bytes of our Llama block, op by op (checked against autograd on CPU).

    Each RMSNorm saves its fp32 input (x.float()), its normalised output in the
    stream's dtype, and a 4-byte rsqrt; the linears save their (gathered)
    input; attention saves q, the repeated k and v, its output (in `act`
    bytes) and a 4-byte log-sum-exp per head; the SwiGLU MLP saves w1's and
    w3's outputs, silu's output and their product. With sequence parallelism norms and the residual
    stream hold s/tp tokens, the linears' inputs all s; everything inside
    attention and the MLP is split over tp.

    "Per token" is per token a rank holds: under context parallelism s/cp of
    each sequence. Its blockwise attention (parallel/context_parallel.py) then
    saves q, the K and V gathered from the whole sequence at their kv heads
    (cp times its own, not repeated), its output and the log-sum-exp; each
    stage's forward also saves its tokens' rotary angles once (fp32).
    """
    args = args or ModelArgs.from_config(cfg.model)
    par, t = cfg.parallel, cfg.train
    tp, cp = par.tp, par.get("cp", 1)
    sp = tp if (tp > 1 and par.sequence_parallel) else 1
    h, f, heads = args.dim, args.ffn_hidden, args.n_heads
    bf16 = t.dtype == "bf16"
    fsdp_mp = bf16 and replicas(par) > 1 and par.dp_shard == "full"
    act = dtype_bytes(t.dtype)  # what matmuls output
    stream = act if fsdp_mp else 4  # the residual stream: bf16 only when the weights themselves are gathered as bf16
    normed = stream if not bf16 else (act if fsdp_mp else 4)
    norm = (4 * h + normed * h + 4) / sp + act * h  # + the linears' input, gathered to the whole sequence
    # Autocast casts an activation per op, not per tensor: wq, wk and wv each save their own bf16 copy of
    # the (fp32) normed input, w1 and w3 theirs; `norm` counts one per sub-block: 2 + 1 more per block.
    autocast_casts = 3 * act * h if bf16 and not fsdp_mp else 0
    kv_saved = args.kv_heads * args.head_dim * cp if cp > 1 else h  # SDPA's repeated K and V at cp=1
    block = 2 * norm + autocast_casts + (2 * act * h + 2 * act * kv_saved + 4 * heads + 4 * act * f) / tp
    vocab = -(-args.vocab_size // tp) * tp
    # The fp32 log-probabilities cross-entropy saves; chunked (train.loss_chunks), nothing stays saved.
    log_probs = 4 * vocab / tp if t.get("loss_chunks", 1) <= 1 else 0
    rotary = 4 * args.head_dim * t.seq_len // cp if cp > 1 else 0.0  # the rotary table's rows of its positions
    return ActivationModel(
        block=block,
        block_input=stream * h / sp,
        first=8,
        last=norm + log_probs,
        per_microbatch=rotary,
    )


def stage_activation_bytes(am: ActivationModel, layer_ids, first: bool, last: bool, tokens: int,
                           ac: str) -> tuple[float, float]:
    """(bytes one micro-batch leaves saved on a stage, extra transient bytes while one block recomputes).

    Backward runs the blocks last to first: recomputing a block raises the
    peak only if it is the stage's last block; any earlier one recomputes
    after a later block's activations were freed.
    """
    recomputed = set(ac_layers(list(layer_ids), ac))
    per_token = sum(am.block_input if i in recomputed else am.block for i in layer_ids)
    per_token += (am.first if first else 0) + (am.last if last else 0)
    extra = am.block - am.block_input if layer_ids and layer_ids[-1] in recomputed else 0.0
    return per_token * tokens, extra * tokens


@lru_cache(maxsize=512)
def schedule_orders(schedule: str, pp: int, m: int, per_rank) -> tuple[dict, int]:
    """Each rank's compute actions (F, B, I, W per stage and micro-batch), from the schedule itself."""
    return pipeline_orders(schedule, pp, m, per_rank)


# What each action does to the activations of its stage's micro-batch: a split backward frees
# half at its input-gradient step (I) and the rest at its weight-gradient step (W), which still
# needs the linears' inputs.
_LIVE = {"F": 1.0, "B": -1.0, "I": -0.5, "W": -0.5}


@lru_cache(maxsize=512)
def _live_steps(schedule: str, pp: int, m: int, per_rank) -> dict[int, list[tuple[int, float]]]:
    orders, _ = schedule_orders(schedule, pp, m, per_rank)
    return {r: [(op.stage, _LIVE[op.kind]) for a in actions for op in ops_of(a)] for r, actions in orders.items()}


def peak_in_flight(steps: list[tuple[int, float]], stage_bytes: dict[int, float]) -> float:
    """Walk one rank's actions: a forward adds its stage's activations, backward frees them."""
    live = peak = 0.0
    for stage, sign in steps:
        live += sign * stage_bytes[stage]
        peak = max(peak, live)
    return peak


def other_bytes(cfg, shards: ModelShards) -> float:
    """Transient buffers beside state and activations, for the worst rank.

    full (FSDP2, dp>1): the root unit (embedding, head) stays gathered all
    step, plus two blocks gathered at a time (the one computing and the one
    prefetched), in the compute dtype, and one block's unsharded fp32
    gradients before their reduce-scatter. The levels that reduce in flat
    buckets hold one fp32 bucket.
    """
    par, t = cfg.parallel, cfg.train
    if replicas(par) == 1:
        return 0.0
    act = dtype_bytes(t.dtype)
    tp_local = lambda shards_: sum(s.numel for s in shards_) / par.tp  # noqa: E731
    if par.dp_shard == "full":
        root = tp_local(shards.embed) + tp_local(shards.head)
        block = tp_local(shards.block)
        return root * (act + 4) + block * (2 * act + 4)
    return BUCKET * 4


def autocast_copy_bytes(cfg, shards: ModelShards) -> tuple[float, float]:
    """(bytes per block, bytes of the head): bf16 without FSDP2 runs under autocast, which casts each
    matmul's weight per micro-batch and keeps the copy until that micro-batch's backward (2 bytes per
    TP-local matrix element)."""
    par, t = cfg.parallel, cfg.train
    if t.dtype != "bf16" or (replicas(par) > 1 and par.dp_shard == "full"):
        return 0.0, 0.0
    dim = cfg.model.dim
    matrices = lambda shards_: 2 * sum(s.numel for s in shards_ if s.numel > dim) / par.tp  # noqa: E731 (not norms)
    # A tied output projection is the embedding's tensor (listed there, not in the head): its matmul casts it too.
    head = matrices(shards.head) + (matrices(shards.embed) if cfg.model.tie_embeddings else 0.0)
    return matrices(shards.block), head


def orders_microbatches(schedule: str, pp: int, m: int) -> int:
    """Micro-batches to replay a multi-stage schedule with: its peak memory and idle time stop growing by 2 pp."""
    return m if schedule in SINGLE_STAGE else min(m, 2 * pp)


def rank_stages(cfg) -> tuple[list[list[int]], list[range], int]:
    """(each pp rank's stage ids, every stage's layers, number of stages): build.stage_plan for every rank."""
    par = cfg.parallel
    ids0, layers, n_stages = stage_plan(cfg.model, par, par.pp, 0)
    if par.pp == 1:
        return [ids0], layers, n_stages
    v = stages_per_rank(par.schedule, par.stages_per_rank)
    return [stage_ids(par.schedule, r, par.pp, v) for r in range(par.pp)], layers, n_stages


def activation_peaks(cfg, shards: ModelShards, stages=None, args: ModelArgs = None) -> list[float]:
    """Peak saved-activation bytes on each pp rank during one step."""
    par, t = cfg.parallel, cfg.train
    ids_per_rank, layers, n_stages = stages or rank_stages(cfg)
    am = activation_model(cfg, args)
    tokens = t.micro_batch * t.seq_len // par.get("cp", 1)  # this rank's
    ac = t.activation_checkpointing
    copy_block, copy_head = autocast_copy_bytes(cfg, shards)
    stage_bytes, recompute = {}, {}
    for stage, ids in enumerate(layers):
        first, last = stage == 0, stage == n_stages - 1
        saved, recompute[stage] = stage_activation_bytes(am, ids, first, last, tokens, ac)
        # A checkpointed block keeps no weight copies: only its input survives its forward.
        kept = len(ids) - len(ac_layers(list(ids), ac))
        stage_bytes[stage] = saved + copy_block * kept + (copy_head if last else 0.0) + am.per_microbatch
    if par.pp == 1:  # micro-batches run one after another (gradient accumulation)
        return [stage_bytes[0] + recompute[0]]
    m = t.global_batch // (t.micro_batch * par.dp)
    peaks = []
    for r, ids in enumerate(ids_per_rank):
        if par.schedule == "gpipe":  # every micro-batch's forward before any backward
            held = m * stage_bytes[r]
        elif par.schedule == "1f1b":  # rank r warms up with pp - r forwards
            held = min(par.pp - r, m) * stage_bytes[r]
        else:
            steps = _live_steps(par.schedule, par.pp, orders_microbatches(par.schedule, par.pp, m),
                                par.stages_per_rank)
            held = peak_in_flight(steps[r], stage_bytes)
        peaks.append(held + max(recompute[s] for s in ids))
    return peaks


# ---- what a CUDA step holds beyond the CPU accounting ----

MiB = 2**20
# cuBLAS takes its workspace from the caching allocator, one per handle, and torch makes one handle per
# (thread, device): the forward runs on the Python thread and backward on autograd's device thread. On
# Hopper torch's default CUBLAS_WORKSPACE_CONFIG is 8 chunks of 4 MiB; cuBLASLt gets a workspace of its
# own, at most as large: 2 threads x 2 x 32 MiB, an upper bound.
CUBLAS_WORKSPACE = 4 * 32 * MiB
# The caching allocator rounds each request up to 512 bytes and hands out a cached block whole when what
# would remain after splitting it is under 1 MiB: at most 1 MiB more per live large tensor.
ALLOCATOR_SLACK_PER_TENSOR = 1 * MiB
# Live large tensors per transformer block in flight at the peak: the ~17 saved activations the block
# formula counts (norm inputs and outputs, casts, q, k, v, attention output and log-sum-exp, the MLP's
# four) and the 7 bf16 weight copies under autocast.
TENSORS_PER_BLOCK = 24


@dataclass(frozen=True)
class CudaTerms:
    """A rank's CUDA-only bytes (`cuda_terms`), each derived in its docstring."""

    loss_backward: float  # cross-entropy's backward, beside the saved log-probabilities
    workspace: float  # cuBLAS / cuBLASLt workspaces
    slack: float  # caching-allocator rounding, an upper bound
    optimizer_temp: float  # the optimizer step's temporaries
    grads_at_loss: float  # gradient bytes that exist when the last micro-batch's backward starts
    other_at_loss: float  # gathered (FSDP2) buffers then


def cuda_terms(cfg, ranks: list[tuple[list[ParamShard], "StateMemory"]], stages, other: float) -> list[CudaTerms]:
    """What a CUDA step holds at its fullest moments that the CPU accounting (saved tensors + state) does not,
    on each pp rank: ranks, each one's parameters and state; other, other_bytes of the layout.

    loss_backward  The last micro-batch's backward starts with cross-entropy: nll_loss's backward
                   makes the gradient of the fp32 log-probabilities, dense (tokens, vocab/tp), and
                   log_softmax's backward the gradient of the logits, the same size, while the saved
                   log-probabilities (counted in the activations) are still alive: 2 x 4 bytes x
                   vocab/tp per token of the micro-batch. With train.loss_chunks=c only one chunk
                   is ever alive, recomputed in backward: its log-probabilities and both gradients,
                   3 x 4 x vocab/tp per token of a chunk. Only on the last stage.
    workspace      CUBLAS_WORKSPACE above.
    slack          ALLOCATOR_SLACK_PER_TENSOR x the large tensors alive at the peak
                   (TENSORS_PER_BLOCK per block in flight, plus 8 for the head and the loss).
    optimizer_temp foreach AdamW computes sqrt(exp_avg_sq) for a whole parameter group into a new
                   list of tensors: at most the bytes of the parameters this rank steps. The fused
                   kernel updates in place: nothing.
    grads_at_loss  The trainer sets gradients to None after each step, so with one micro-batch per
                   step none exists yet when backward starts. With more, the earlier micro-batches'
                   have accumulated (sharded under FSDP2, which reduce-scatters every micro-batch at
                   pp=1). Under a pipeline schedule torch's stages keep an FSDP2 stage's gradients
                   unsharded until the step's last backward: 4 bytes per parameter of the stage,
                   TP-local.
    other_at_loss  The gathered buffers then: other_bytes, except that torch's pipeline stages also
                   keep an FSDP2 stage's parameters gathered, in the compute dtype, from its first
                   backward to its last (set_reshard_after_backward(False)).
    """
    par, t = cfg.parallel, cfg.train
    # The layout's own figures, read from the config once (a 256-GPU plan asks for thousands of layouts).
    ids_per_rank, layers, n_stages = stages
    tokens = t.micro_batch * t.seq_len // par.get("cp", 1)
    vocab_local = -(-cfg.model.vocab_size // par.tp)
    chunks = t.get("loss_chunks", 1)
    m = t.global_batch // (t.micro_batch * par.dp)
    in_flight = m if par.pp > 1 and par.schedule == "gpipe" else min(m, par.pp) if par.pp > 1 else 1
    fused = cfg.optim.get("implementation", "auto") in ("auto", "fused")  # auto: fused on CUDA
    pipelined_fsdp = par.pp > 1 and replicas(par) > 1 and par.dp_shard == "full"
    tp, act = par.tp, dtype_bytes(t.dtype)
    out = []
    for ids, (params, st) in zip(ids_per_rank, ranks):
        if n_stages - 1 not in ids:
            loss_backward = 0.0
        elif chunks <= 1:
            loss_backward = 2 * 4 * vocab_local * tokens
        else:
            loss_backward = 3 * 4 * vocab_local * -(-tokens // chunks)
        blocks = sum(len(layers[s]) for s in ids) * in_flight
        slack = ALLOCATOR_SLACK_PER_TENSOR * (TENSORS_PER_BLOCK * blocks + 8)
        optimizer_temp = 0.0 if fused else float(st.stepped)
        stage_numel = sum(s.numel for s in params) / tp
        if m == 1:
            grads_at_loss = 0.0
        elif pipelined_fsdp:
            grads_at_loss = 4 * stage_numel
        else:
            grads_at_loss = float(st.grads)
        other_at_loss = max(other, act * stage_numel) if pipelined_fsdp else other
        out.append(CudaTerms(loss_backward, CUBLAS_WORKSPACE, slack, optimizer_temp, grads_at_loss, other_at_loss))
    return out


@dataclass
class RankMemory:
    """What one rank holds at its peak, in bytes.

    CPU accounting (cuda is None): the sum of weights, gradients, optimizer state,
    saved activations and transient buffers. CUDA accounting: the larger of the
    step's two fullest moments, as the caching allocator sees them:
      loss     weights + optimizer state + the gradients that exist then
               + activations + the gathered buffers then + loss_backward + workspace + slack
      step     weights + gradients + optimizer state + optimizer_temp + workspace
    (activations and gathered buffers are gone when the optimizer steps).
    """

    pp_rank: int
    params: int
    grads: int
    optim: int
    activations: float
    other: float
    cuda: Optional[CudaTerms] = None

    @property
    def loss_moment(self) -> float:
        c = self.cuda
        return (self.params + self.optim + c.grads_at_loss + self.activations + c.other_at_loss
                + c.loss_backward + c.workspace + c.slack)

    @property
    def step_moment(self) -> float:
        c = self.cuda
        return self.params + self.grads + self.optim + c.optimizer_temp + c.workspace

    def shown(self) -> tuple[float, float, float, float, float, float]:
        """(params, grads, optim, activations, other, total) as the tables show them: under CUDA
        accounting, what is alive at the fuller moment (gradients that exist then; the CUDA-only
        terms in other), so that the columns add up to the total."""
        if self.cuda is None:
            return self.params, self.grads, self.optim, self.activations, self.other, self.total
        c = self.cuda
        if self.loss_moment >= self.step_moment:
            return (self.params, c.grads_at_loss, self.optim, self.activations,
                    c.other_at_loss + c.loss_backward + c.workspace + c.slack, self.total)
        return self.params, self.grads, self.optim, 0.0, c.optimizer_temp + c.workspace, self.total

    @property
    def total(self) -> float:
        if self.cuda is None:
            return self.params + self.grads + self.optim + self.activations + self.other
        return max(self.loss_moment, self.step_moment)


def layout_memory(cfg, shards: ModelShards, args: ModelArgs = None, device: str = "cpu") -> list[RankMemory]:
    """Every pp rank's memory at its fullest dp rank (tp rank 0, whose shards are the largest).

    device="cuda": the CUDA allocator's peak (RankMemory), else the CPU accounting.
    """
    par = cfg.parallel
    stages = rank_stages(cfg)
    acts = activation_peaks(cfg, shards, stages, args)
    other = other_bytes(cfg, shards)
    n = replicas(par)
    dp_ranks = range(n) if par.dp_shard == "optimizer" else [0]  # ZeRO-1 owners differ by dp (x cp) rank
    ranks = []
    for r in range(par.pp):
        params = rank_params(cfg, shards, r, stages)
        ranks.append((params, max((state_memory(params, par.dp_shard, n, d) for d in dp_ranks),
                                  key=lambda m: m.total)))
    cuda = cuda_terms(cfg, ranks, stages, other) if device == "cuda" else [None] * par.pp
    return [RankMemory(r, st.params, st.grads, st.optim, acts[r], other, c)
            for r, ((_, st), c) in enumerate(zip(ranks, cuda))]
