"""Serving: for each tensor-parallel degree, what one GPU holds and how fast the model decodes.

A decode step produces one token for each of `batch` sequences. It reads
every weight of the rank's shard and the rank's share of the KV cache once,
so at small batches it is bound by memory bandwidth, not by FLOPs:

  memory    weights / tp + KV cache / tp (generate.max_total_tokens x batch, the kv
            heads split over tp as trident-generate splits them), against the
            GPU's memory less its reserve
  read      (weights + KV cache at the full context) per GPU / (hbm_gbps x hbm_efficiency)
  compute   2 x (matmul parameters) + 4 x layers x dim x context FLOPs per sequence,
            over tp GPUs at peak x mfu
  comm      per step, Megatron's 2 all-reduces per layer (after attention, after
            the MLP) and 1 for the vocabulary-parallel embedding, each of
            batch x dim activations, and 1 all-gather of the last logits
            (batch x vocab, fp32): a ring of 2(tp-1) steps (all-gather tp-1) at
            the link's latency, plus its volume at the link's bandwidth;
            NVLink while the tp group fits in a node, InfiniBand across
  token     max(read, compute) + comm: one token's latency, for every sequence
  tokens/s  batch / token; per GPU: / tp

The latency is for the last token of a full context (the most KV cache to
read); shorter contexts are faster. Not modelled: prefill (time to first
token), kernel launch gaps (CUDA graphs remove most), activations and the
allocator (inside cluster.memory_reserve_gb).
"""

from dataclasses import dataclass

from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import InterpolationResolutionError

from models.llama import ModelArgs
from orchestrator.build.flops import cluster_peak
from orchestrator.generate.worker import check_layout
from orchestrator.validate import ConfigError, divisors
from parallel.tensor_parallel import padded_vocab

GiB = 2**30
DTYPE_BYTES = {"bf16": 2, "fp32": 4}


def serve_dtype(name: str) -> str:
    """generate.dtype on a GPU: auto is bf16."""
    return "bf16" if name == "auto" else name


def weight_bytes(args: ModelArgs, tp: int, nbytes: int) -> float:
    """Bytes of weights one tp rank holds: every matrix split over tp (the vocabulary padded to a multiple of
    tp where needed), norms replicated."""
    rows = padded_vocab(args.vocab_size, tp) if args.vocab_size % tp else args.vocab_size
    hd, dim = args.head_dim, args.dim
    block = dim * hd * (2 * args.n_heads + 2 * args.kv_heads) + 3 * dim * args.ffn_hidden
    matrices = args.n_layers * block + rows * dim * (1 if args.tie_embeddings else 2)
    norms = (2 * args.n_layers + 1) * dim
    return (matrices / tp + norms) * nbytes


def kv_cache_bytes(args: ModelArgs, tp: int, tokens: int, batch: int, nbytes: int) -> float:
    """Keys and values of every layer for batch x tokens, this rank's kv heads only."""
    return 2 * args.n_layers * tokens * batch * (args.kv_heads // tp) * args.head_dim * nbytes


def collectives_per_step(args: ModelArgs, tp: int) -> dict:
    """What one decode step communicates under TP: all-reduces (2 per layer + the embedding's) and the logits'
    all-gather. (A dist test counts the real step's collectives against this.)"""
    if tp == 1:
        return {"all_reduce": 0, "all_gather": 0}
    return {"all_reduce": 2 * args.n_layers + 1, "all_gather": 1}


def ring_s(nbytes: float, tp: int, steps: int, volume: float, gbps: float, latency_us: float) -> float:
    """A ring collective: `steps` hops at the link's latency, and volume x nbytes over its bandwidth."""
    return steps * latency_us * 1e-6 + volume * nbytes / (gbps * 1e9)


def decode_step(args: ModelArgs, tp: int, batch: int, context: int, cluster, dtype: str) -> dict:
    """The time of one decode step (one token for each of `batch` sequences at `context` tokens), by part."""
    nbytes = DTYPE_BYTES[dtype]
    weights = weight_bytes(args, tp, nbytes)
    kv = kv_cache_bytes(args, tp, context, batch, nbytes)
    read_s = (weights + kv) / (cluster.hbm_gbps * 1e9 * cluster.hbm_efficiency)
    # Every matrix but the embedding (a lookup; the output projection is the same matrix when tied).
    n_matmul = weight_bytes(args, 1, 1) - (2 * args.n_layers + 1) * args.dim
    n_matmul -= 0 if args.tie_embeddings else args.vocab_size * args.dim
    flops = batch * (2 * n_matmul + 4 * args.n_layers * args.dim * context)
    compute_s = flops / (tp * cluster_peak(cluster.device, dtype, cluster.gpus_per_node) * cluster.mfu)
    inside = tp <= cluster.gpus_per_node
    gbps = cluster.intra_node_gbps if inside else cluster.inter_node_gbps
    latency = cluster.intra_node_latency_us if inside else cluster.inter_node_latency_us
    n = collectives_per_step(args, tp)
    comm_s = 0.0
    if tp > 1:
        comm_s += n["all_reduce"] * ring_s(batch * args.dim * nbytes, tp, 2 * (tp - 1), 2 * (tp - 1) / tp, gbps,
                                           latency)
        comm_s += n["all_gather"] * ring_s(batch * args.vocab_size * 4, tp, tp - 1, (tp - 1) / tp, gbps, latency)
    token_s = max(read_s, compute_s) + comm_s
    return {"weights": weights, "kv_cache": kv, "read_s": read_s, "compute_s": compute_s, "comm_s": comm_s,
            "token_s": token_s, "collectives": sum(n.values()), "bound": "memory" if read_s >= compute_s else "compute",
            "link": ("NVLink" if inside else "InfiniBand") if tp > 1 else "-"}


@dataclass
class ServeRow:
    tp: int
    weights: float  # bytes per GPU
    kv_cache: float  # bytes per GPU, at generate.max_total_tokens x batch
    fits: bool
    read_s: float
    compute_s: float
    comm_s: float
    token_s: float  # one decode step: every sequence's next token
    collectives: int  # per decode step
    bound: str  # memory | compute
    link: str  # what the tp group's collectives cross
    tokens_per_s: float  # batch / token_s
    tokens_per_s_per_gpu: float

    @property
    def total(self) -> float:
        return self.weights + self.kv_cache


def serve_plan(cfg: DictConfig) -> tuple[list[ServeRow], dict]:
    """One row per tp degree trident-generate accepts for this model on cluster.gpus, smallest tp first."""
    cl, g = cfg.cluster, cfg.generate
    if cfg.parallel.get("cp", 1) != 1:
        raise ConfigError(f"parallel.cp={cfg.parallel.cp}: serving decodes at parallel.cp=1 (context parallelism "
                          "splits a training sequence; valid: parallel.cp=1)")
    dtype = serve_dtype(g.dtype)
    try:  # resolved once (${hydra:...} resolves only inside the Hydra app)
        work = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    except InterpolationResolutionError:
        work = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    args = ModelArgs.from_config(cfg.model)
    context = g.max_total_tokens or cfg.model.max_seq_len
    budget = (cl.gpu_memory_gb - cl.memory_reserve_gb) * GiB
    rows, rejected = [], {}
    for tp in divisors(cl.gpus):
        with open_dict(work):
            work.parallel.tp, work.parallel.pp, work.parallel.dp, work.parallel.cp = tp, 1, 1, 1
            work.parallel.sequence_parallel = False
            work.launcher.nprocs = None
        try:
            check_layout(work)
        except ConfigError as e:
            rejected[tp] = str(e)
            continue
        step = decode_step(args, tp, g.batch_size, context, cl, dtype)
        rows.append(ServeRow(tp, step["weights"], step["kv_cache"], step["weights"] + step["kv_cache"] <= budget,
                             step["read_s"], step["compute_s"], step["comm_s"], step["token_s"], step["collectives"],
                             step["bound"], step["link"], g.batch_size / step["token_s"],
                             g.batch_size / step["token_s"] / tp))
    info = {"dtype": dtype, "batch": g.batch_size, "context": context, "budget_bytes": budget,
            "rejected": rejected, "n_params": weight_bytes(args, 1, 1)}
    return rows, info
