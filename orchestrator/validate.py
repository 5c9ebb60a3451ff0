"""Every check that can be made before a process is spawned or a job submitted.

Each failure is a ConfigError whose message names the setting, its value and
what would be valid: a user's mistake is one clear line, never a hang or a
traceback from deep inside torch.
"""

import functools
import json
import math
import os
from pathlib import Path

from omegaconf import DictConfig

from launch.slurm import time_minutes
from models.hf import args_from_hf, rope_type
from models.llama import ModelArgs
from models.plans import pipeline_cuts
from orchestrator.build.levers import AC_MODES, COMPILE_BACKENDS, DTYPES
from orchestrator.build.optim import IMPLEMENTATIONS
from orchestrator.config import CONF_DIR
from orchestrator.data.chat import ChatError, check_messages
from orchestrator.data.corpus import CorpusError, check_source, file_kind, first_chat_records
from orchestrator.data.dataset import BIN_DTYPES, FORMATS, TRAIN_ON, resolve_format, text_files
from orchestrator.data.tokenizer import TokenizerError, load_tokenizer
from parallel.data_parallel import DP_SHARD_CHOICES
from parallel.pipeline_parallel import SCHEDULES, SINGLE_STAGE, V_SHAPED, stages_per_rank

LAUNCHERS = ("local", "external", "slurm")
BACKENDS = ("auto", "gloo", "nccl")
LR_SCHEDULES = ("cosine", "linear", "constant")
OPTIMIZERS = ("adamw",)
WANDB_MODES = ("offline", "online", "disabled")
NONFINITE = ("skip", "stop")
LAYOUTS = ("manual", "auto")


class ConfigError(ValueError):
    """A setting that cannot work, found before launch."""


def _choice(key: str, value, choices) -> None:
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is not one of: {', '.join(map(str, choices))}")


def _at_least(key: str, value, low) -> None:
    if value < low:
        raise ConfigError(f"{key}={value} must be >= {low}")


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def validate(cfg: DictConfig, env=None) -> list[str]:
    """Check the composed config; env is the rank environment of launcher=external (None: local).

    Returns warnings: settings that work but are probably not what the user wants.
    """
    warnings = validate_model(cfg, env)
    if cfg.train.seq_len > cfg.model.max_seq_len:
        raise ConfigError(f"train.seq_len={cfg.train.seq_len} exceeds model.max_seq_len={cfg.model.max_seq_len}")
    _check_batch(cfg)
    _check_pp(cfg)
    check_data(cfg)
    _check_optim_logging(cfg)
    _check_levers(cfg)
    return warnings + _check_faults(cfg)


def validate_model(cfg: DictConfig, env=None) -> list[str]:
    """The model, where its weights come from, and its split over the ranks: all that a program that only
    runs the model (trident-generate, trident-plan --serve) needs checked. Returns warnings."""
    _check_model(cfg)
    return _check_parallel(cfg, env)


def _check_parallel(cfg: DictConfig, env) -> list[str]:
    par = cfg.parallel
    for dim in ("tp", "pp", "dp", "cp"):
        _at_least(f"parallel.{dim}", par[dim], 1)
    _choice("parallel.dp_shard", par.dp_shard, DP_SHARD_CHOICES)
    if par.timeout_s <= 0:
        raise ConfigError(f"parallel.timeout_s={par.timeout_s} must be positive")
    _choice("launcher.name", cfg.launcher.name, LAUNCHERS)
    _choice("launcher.backend", cfg.launcher.backend, BACKENDS)
    product = par.tp * par.pp * par.dp * par.cp
    world_size = env.world_size if env is not None else None
    for key, size in (("launcher.nprocs", cfg.launcher.nprocs), ("world size", world_size)):
        if size is not None and size != product:
            raise ConfigError(
                f"{key}={size} != parallel.tp*pp*dp*cp = {par.tp}*{par.pp}*{par.dp}*{par.cp} = {product}: the "
                f"layout must use every rank exactly once (e.g. parallel.dp={size // (par.tp * par.pp * par.cp) or 1})"
            )
    warnings = _check_slurm(cfg) if cfg.launcher.name == "slurm" else []
    if par.cp > 1:
        _check_cp(cfg)
    if par.tp > 1:
        _check_tp(cfg)
        if env is not None and env.nodes > 1:
            warnings += _tp_in_a_node(par, env.local_world_size, f"{env.local_world_size} ranks per node")
    return warnings


def _tp_in_a_node(par, tasks: int, where: str) -> list[str]:
    """Ranks go to nodes in blocks of `tasks` and tp is the innermost dimension: a tp group stays inside a
    node exactly when tp divides the tasks per node. Otherwise refused, unless parallel.allow_cross_node_tp."""
    if tasks % par.tp == 0:
        return []
    why = (f"parallel.tp={par.tp} would put tensor-parallel groups across nodes ({where}; tp must divide it): "
           "its all-reduces would cross the network in every layer")
    if not par.get("allow_cross_node_tp", False):
        fits = [t for t in divisors(tasks) if t <= par.tp] or [1]
        raise ConfigError(f"{why} (valid: parallel.tp in {', '.join(map(str, fits))}, more tasks per node, or "
                          "parallel.allow_cross_node_tp=true)")
    return [why]


def _check_slurm(cfg: DictConfig) -> list[str]:
    la, par = cfg.launcher, cfg.parallel
    world = par.tp * par.pp * par.dp * par.cp
    _at_least("launcher.nodes", la.nodes, 1)
    _at_least("launcher.cpus_per_task", la.cpus_per_task, 1)
    if la.get("min_nodes") is not None:
        if not 1 <= la.min_nodes <= la.nodes:
            raise ConfigError(f"launcher.min_nodes={la.min_nodes} must be within 1..launcher.nodes={la.nodes}")
        if la.min_nodes < la.nodes and (par.layout != "auto" or not la.max_restarts):
            raise ConfigError(
                f"launcher.min_nodes={la.min_nodes} < launcher.nodes={la.nodes} needs parallel=auto and "
                "launcher.max_restarts >= 1: only a layout planned at start-up fits fewer nodes, and only the "
                f"restart requeues the job onto them (valid: min_nodes={la.nodes}, or parallel=auto with max_restarts)")
    _at_least("launcher.array_parallelism", la.array_parallelism, 1)
    if la.tasks_per_node is None and world % la.nodes:
        raise ConfigError(
            f"launcher.nodes={la.nodes} does not divide the world size tp*pp*dp*cp={world} "
            f"(valid nodes: {', '.join(map(str, divisors(world)))}, or set launcher.tasks_per_node)"
        )
    tasks = la.tasks_per_node or world // la.nodes
    if la.nodes * tasks != world:
        raise ConfigError(
            f"launcher.nodes * launcher.tasks_per_node = {la.nodes}*{tasks} = {la.nodes * tasks} != "
            f"parallel.tp*pp*dp*cp = {world}: every task is one rank"
        )
    if la.gpus_per_node and la.gpus_per_node < tasks:
        raise ConfigError(
            f"launcher.gpus_per_node={la.gpus_per_node} < {tasks} tasks per node: each rank needs its own GPU "
            f"(valid: gpus_per_node >= {tasks}, or more nodes)"
        )
    try:
        time_minutes(la.time)
    except ValueError as e:
        raise ConfigError(f"launcher.time: {e}") from None
    return _tp_in_a_node(par, tasks, f"launcher.tasks_per_node={tasks}") if la.nodes > 1 else []


def _check_cp(cfg: DictConfig) -> None:
    """Context parallelism: the sequence cuts into 2*cp equal chunks (and, under SP, each rank's part by tp)."""
    par, t = cfg.parallel, cfg.train
    chunks = 2 * par.cp
    if t.seq_len % chunks:
        raise ConfigError(
            f"train.seq_len={t.seq_len} is not divisible by 2 x parallel.cp = {chunks}: context parallelism cuts "
            f"each sequence into {chunks} equal chunks (valid: a multiple of {chunks}, e.g. "
            f"{t.seq_len - t.seq_len % chunks or chunks}, or a cp that halves it evenly)"
        )
    local = t.seq_len // par.cp
    if par.tp > 1 and par.sequence_parallel and local % par.tp:
        step = chunks * par.tp // math.gcd(2, par.tp)
        raise ConfigError(
            f"train.seq_len={t.seq_len} / parallel.cp={par.cp} = {local} tokens per rank is not divisible by "
            f"parallel.tp={par.tp}, which parallel.sequence_parallel=true splits them by (valid: seq_len a "
            f"multiple of {step}, or sequence_parallel=false)"
        )
    if t.compile:
        raise ConfigError(
            f"train.compile=true with parallel.cp={par.cp}: compiling the K/V all-gather of context parallelism "
            "is not supported (valid: train.compile=false, or parallel.cp=1)"
        )


def _check_tp(cfg: DictConfig) -> None:
    tp, m, par = cfg.parallel.tp, cfg.model, cfg.parallel
    args = ModelArgs.from_config(m)
    split = [
        ("model.n_heads", m.n_heads, "attention heads are split whole"),
        ("model.n_kv_heads", args.kv_heads,
         "grouped-query attention splits whole kv heads (replicating kv heads is not implemented)"),
        ("model.dim", m.dim, "the hidden size is split evenly"),
        ("the SwiGLU hidden size", args.ffn_hidden, "the MLP's hidden size is split evenly"),
    ]
    for key, value, why in split:
        if value % tp:
            valid = [d for d in divisors(value) if all(v % d == 0 for _, v, _ in split)]
            raise ConfigError(
                f"parallel.tp={tp} does not divide {key}={value}: {why} (valid tp: {', '.join(map(str, valid))})"
            )
    if m.tie_embeddings:
        raise ConfigError(
            f"model.tie_embeddings=true with parallel.tp={tp}: tied embeddings are not supported under "
            "tensor parallelism yet (valid: model.tie_embeddings=false, or parallel.tp=1)"
        )
    if par.sequence_parallel and cfg.train.seq_len % tp:
        raise ConfigError(
            f"train.seq_len={cfg.train.seq_len} is not divisible by parallel.tp={tp}, which "
            "parallel.sequence_parallel=true splits it by (valid: a multiple of tp, or sequence_parallel=false)"
        )


def _check_model(cfg: DictConfig) -> None:
    m = cfg.model
    for key in ("dim", "n_layers", "n_heads", "vocab_size", "multiple_of", "max_seq_len"):
        _at_least(f"model.{key}", m[key], 1)
    if m.dim % m.n_heads:
        raise ConfigError(f"model.dim={m.dim} is not divisible by model.n_heads={m.n_heads}")
    if (m.dim // m.n_heads) % 2:
        raise ConfigError(f"model.dim / model.n_heads = {m.dim // m.n_heads} must be even (rotary embeddings rotate pairs)")
    if m.n_kv_heads is not None and (m.n_kv_heads < 1 or m.n_heads % m.n_kv_heads):
        raise ConfigError(
            f"model.n_kv_heads={m.n_kv_heads} must divide model.n_heads={m.n_heads} "
            f"(valid: {', '.join(map(str, divisors(m.n_heads)))})"
        )
    if m.init_from is not None:
        _check_init_from(m)


def _check_init_from(m) -> None:
    folder = Path(m.init_from).expanduser()
    if not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file():
        raise ConfigError(
            f"model.init_from={m.init_from!r} is not a Hugging Face Llama folder (config.json + model.safetensors)"
        )
    config = json.loads((folder / "config.json").read_text())
    if rope_type(config) not in ("default", "llama3"):
        raise ConfigError(
            f"model.init_from={m.init_from!r} scales its rotary embeddings with rope_type={rope_type(config)!r}, "
            "which trident's model does not implement (valid: plain RoPE, rope_type 'default', or Llama 3.1's 'llama3')"
        )
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    if head_dim * config["num_attention_heads"] != config["hidden_size"]:
        raise ConfigError(f"model.init_from={m.init_from!r} has head_dim={head_dim} x {config['num_attention_heads']} "
                          f"heads != hidden_size={config['hidden_size']}, which trident's model requires")
    theirs = args_from_hf(config)
    args = ModelArgs.from_config(m)
    ours = {**{k: m[k] for k in theirs if k in m}, "n_kv_heads": args.kv_heads, "ffn_hidden": args.ffn_hidden,
            "rope_scaling": args.rope_scaling}
    diffs = [f"{k}={theirs[k]!r} there, {ours[k]!r} here" for k in theirs if theirs[k] != ours[k]]
    if diffs:
        raise ConfigError(f"model.init_from={m.init_from!r} holds a different model: " + "; ".join(diffs))


def _check_batch(cfg: DictConfig) -> None:
    t, dp = cfg.train, cfg.parallel.dp
    for key in ("seq_len", "global_batch", "micro_batch", "steps", "eval_sequences"):
        _at_least(f"train.{key}", t[key], 1)
    _at_least("train.eval_every", t.eval_every, 0)
    _at_least("checkpoint.every", cfg.checkpoint.every, 0)
    _at_least("checkpoint.keep", cfg.checkpoint.keep, 0)
    _check_checkpoint_dir(cfg)
    if t.global_batch % (t.micro_batch * dp):
        valid = [d for d in divisors(t.global_batch) if (t.global_batch // d) % t.micro_batch == 0]
        raise ConfigError(
            f"parallel.dp={dp} with train.micro_batch={t.micro_batch} does not divide "
            f"train.global_batch={t.global_batch}: global_batch must be a multiple of micro_batch * dp "
            f"(valid dp here: {', '.join(map(str, valid)) or 'none; change micro_batch'})"
        )


def _check_checkpoint_dir(cfg: DictConfig) -> None:
    ckpt = cfg.checkpoint
    if ckpt.resume not in ("auto", "never") and not Path(ckpt.resume).exists():
        raise ConfigError(
            f"checkpoint.resume={ckpt.resume!r} does not exist (valid: auto, never, or the path of a checkpoint)"
        )
    if not (ckpt.every or ckpt.at_end):
        return
    # The nearest existing ancestor must let us create the folder and write in it.
    probe = Path(ckpt.dir)
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"checkpoint.dir={ckpt.dir!r} is not writable ({probe} does not let us write)")


def _check_pp(cfg: DictConfig) -> None:
    par, t, m = cfg.parallel, cfg.train, cfg.model
    _choice("parallel.schedule", par.schedule, tuple(SCHEDULES))
    n_micro = t.global_batch // (t.micro_batch * par.dp)
    if par.microbatches is not None and par.microbatches != n_micro:
        raise ConfigError(
            f"train.global_batch={t.global_batch} != train.micro_batch * parallel.microbatches * parallel.dp = "
            f"{t.micro_batch}*{par.microbatches}*{par.dp} = {t.micro_batch * par.microbatches * par.dp} "
            f"(valid here: parallel.microbatches={n_micro}, or null to derive it)"
        )
    if par.pp == 1:
        return
    if par.stages_per_rank is not None:
        _at_least("parallel.stages_per_rank", par.stages_per_rank, 1)
    if par.schedule in V_SHAPED and par.stages_per_rank not in (None, 2):
        raise ConfigError(
            f"parallel.stages_per_rank={par.stages_per_rank} with parallel.schedule={par.schedule}: "
            "a V-shaped schedule holds exactly 2 stages per rank (valid: 2 or null)"
        )
    if par.schedule not in SINGLE_STAGE and par.stages_per_rank == 1:
        raise ConfigError(
            f"parallel.stages_per_rank=1 with parallel.schedule={par.schedule}: interleaving needs at least "
            "2 stages per rank (valid: >= 2, or null; for one stage per rank use gpipe or 1f1b)"
        )
    n_stages = par.pp * stages_per_rank(par.schedule, par.stages_per_rank)
    if m.n_layers < n_stages:
        raise ConfigError(
            f"model.n_layers={m.n_layers} is fewer than the {n_stages} pipeline stages "
            f"(parallel.pp={par.pp} x stages per rank): every stage needs a layer"
        )
    if par.cut_points is not None:
        cuts = list(par.cut_points)
        if len(cuts) != n_stages - 1 or cuts != sorted(set(cuts)) or not all(0 < c < m.n_layers for c in cuts):
            raise ConfigError(
                f"parallel.cut_points={cuts} must be {n_stages - 1} increasing layer indices between 1 and "
                f"{m.n_layers - 1} (the first layer of each stage after the first), e.g. "
                f"{pipeline_cuts(m.n_layers, n_stages)}"
            )
    needs = {
        "1f1b": (n_micro >= par.pp, f"at least parallel.pp={par.pp}"),
        "interleaved-1f1b": (n_micro % par.pp == 0, f"a multiple of parallel.pp={par.pp}"),
        "zero-bubble": (n_micro % par.pp == 0, f"a multiple of parallel.pp={par.pp}"),
        "dualpipev": (n_micro >= n_stages, f"at least the {n_stages} stages"),
    }
    ok, what = needs.get(par.schedule, (True, ""))
    if not ok:
        raise ConfigError(
            f"parallel.schedule={par.schedule} needs micro-batches {what}, but there are {n_micro} "
            f"(train.global_batch={t.global_batch} / (train.micro_batch={t.micro_batch} * parallel.dp={par.dp})); "
            "lower train.micro_batch or raise train.global_batch"
        )
    if m.tie_embeddings:
        raise ConfigError(
            f"model.tie_embeddings=true with parallel.pp={par.pp}: the embedding and the output projection "
            "live on different stages (valid: model.tie_embeddings=false, or parallel.pp=1)"
        )


def check_data(cfg: DictConfig, against_model: bool = True) -> None:
    """The data settings, the tokenizer (and, against_model, its vocabulary against the model's), the sources."""
    d = cfg.data
    _choice("data.format", d.format, FORMATS)
    _choice("data.bin_dtype", d.bin_dtype, tuple(BIN_DTYPES))
    if not 0 < d.eval_fraction < 1:
        raise ConfigError(f"data.eval_fraction={d.eval_fraction} must be between 0 and 1")
    if d.tokenize_workers is not None:
        _at_least("data.tokenize_workers", d.tokenize_workers, 1)
    if d.path is not None:
        path = Path(d.path).expanduser()
        if not path.exists():
            raise ConfigError(f"data.path={d.path!r} does not exist (give a text file, a folder of text files, "
                              "a .jsonl / .jsonl.gz / .parquet file, or a .bin of tokens)")
        if not os.access(path, os.R_OK):
            raise ConfigError(f"data.path={d.path!r} is not readable")
    _check_tokenizer(cfg, against_model)
    root = Path(d.path).expanduser() if d.path is not None else None
    if root is not None and resolve_format(root, d.format) == "bin":
        if d.mask_across_documents:
            raise ConfigError(f"data.mask_across_documents=true with data.path={d.path!r}: a pre-tokenized .bin "
                              "holds no document boundaries (valid: false, or a text, JSONL or Parquet corpus)")
        return
    if root is not None and d.format == "chat":
        _check_chat_records(root, d)
        return
    if root is not None:
        try:
            _check_sources(str(root), d.pattern, d.format, d.text_key, root.stat().st_mtime_ns)
        except CorpusError as e:
            raise ConfigError(str(e)) from None


def _check_chat_records(root: Path, d) -> None:
    """data.format=chat: the first records of each file are conversations (every record is checked as it is
    tokenized, still before any rank starts), and data.train_on is known."""
    if d.train_on not in (None, *TRAIN_ON):
        raise ConfigError(f"data.train_on={d.train_on!r} (valid: {', '.join(TRAIN_ON)})")
    for path in text_files(root, d.pattern) if root.is_dir() else [root]:
        try:
            for n, record in enumerate(first_chat_records(path, d.messages_key)):
                check_messages(record, d.messages_key, f"{path}, record {n + 1}")
        except (CorpusError, ChatError) as e:
            raise ConfigError(str(e)) from None


def _check_tokenizer(cfg: DictConfig, against_model: bool = True) -> None:
    """The tokenizer loads, and the model has a row for each of its ids."""
    d, m = cfg.data, cfg.model
    try:
        tok = load_tokenizer(d.tokenizer, m.init_from, d.eos_token)
    except TokenizerError as e:
        raise ConfigError(str(e)) from None
    if against_model and tok.vocab_size > m.vocab_size:
        raise ConfigError(
            f"data.tokenizer={d.tokenizer!r} has {tok.vocab_size} tokens, more than model.vocab_size={m.vocab_size} "
            f"(a tokenizer may be smaller than the model, not larger: valid: model.vocab_size >= {tok.vocab_size})"
        )


@functools.lru_cache(maxsize=16)
def _check_sources(root: str, pattern: str, fmt: str, text_key: str, _mtime_ns: int) -> None:
    """The first JSONL and Parquet file of the corpus hold data.text_key (once per corpus: the planner asks often)."""
    path = Path(root)
    files = [path] if path.is_file() else text_files(path, pattern)
    if not files:
        raise CorpusError(f"data.path={root!r}: no files match data.pattern={pattern!r}")
    seen = set()
    for f in files:
        kind = file_kind(f, resolve_format(path, fmt))
        if kind != "text" and kind not in seen:
            seen.add(kind)
            check_source(f, kind, text_key)


def _check_optim_logging(cfg: DictConfig) -> None:
    o = cfg.optim
    _choice("optim.name", o.name, OPTIMIZERS)
    _choice("optim.schedule", o.schedule, LR_SCHEDULES)
    if o.lr <= 0:
        raise ConfigError(f"optim.lr={o.lr} must be positive")
    if o.min_lr is not None and o.min_lr_ratio is not None:
        raise ConfigError(f"optim.min_lr={o.min_lr} and optim.min_lr_ratio={o.min_lr_ratio} are both set: set one "
                          "(an absolute floor: optim.min_lr=... optim.min_lr_ratio=null; a fraction of optim.lr: "
                          "optim.min_lr_ratio=... optim.min_lr=null)")
    if o.min_lr_ratio is not None and not 0 <= o.min_lr_ratio <= 1:
        raise ConfigError(f"optim.min_lr_ratio={o.min_lr_ratio} must be between 0 and 1 (a fraction of optim.lr)")
    if o.min_lr is not None and not 0 <= o.min_lr <= o.lr:
        raise ConfigError(f"optim.min_lr={o.min_lr} must be between 0 and optim.lr={o.lr}")
    _at_least("optim.warmup_steps", o.warmup_steps, 0)
    _at_least("optim.grad_clip", o.grad_clip, 0)
    _choice("optim.implementation", o.implementation, IMPLEMENTATIONS)
    _choice("logging.wandb.mode", cfg.logging.wandb.mode, WANDB_MODES)
    _at_least("logging.every", cfg.logging.every, 1)
    _at_least("logging.console_every", cfg.logging.console_every, 1)


def _check_faults(cfg: DictConfig) -> list[str]:
    """The fault-handling keys (docs/faults.md); returns warnings."""
    t, lg, la, par = cfg.train, cfg.logging, cfg.launcher, cfg.parallel
    _choice("train.nonfinite", t.nonfinite, NONFINITE)
    _at_least("train.max_skipped_steps", t.max_skipped_steps, 1)
    if t.step_timeout_s is not None:
        if t.step_timeout_s <= 0:
            raise ConfigError(f"train.step_timeout_s={t.step_timeout_s} must be positive (seconds), or null to derive "
                              "it from the first steps (at least 60)")
        if t.step_timeout_s >= par.timeout_s:
            raise ConfigError(
                f"train.step_timeout_s={t.step_timeout_s} must be below parallel.timeout_s={par.timeout_s}: the "
                "process-group timeout would end a hung run first, without naming the rank "
                f"(valid: 0 < step_timeout_s < {par.timeout_s}, or raise parallel.timeout_s)")
    sp = t.spike
    if sp.factor is not None and sp.factor <= 1:
        raise ConfigError(f"train.spike.factor={sp.factor} must be above 1 (a loss that many times the running "
                          "median is a spike), or null to turn spike detection off")
    _at_least("train.spike.window", sp.window, 3)
    _at_least("train.spike.skip_batches", sp.skip_batches, 0)
    _at_least("train.spike.max_rollbacks", sp.max_rollbacks, 0)
    _at_least("launcher.max_restarts", la.max_restarts, 0)
    if la.name == "external" and la.max_restarts:
        raise ConfigError(f"launcher.max_restarts={la.max_restarts} with launcher=external: the program that "
                          "started the ranks restarts them (torchrun --max-restarts); valid here: 0")
    if lg.straggler_factor is not None and lg.straggler_factor <= 1:
        raise ConfigError(f"logging.straggler_factor={lg.straggler_factor} must be above 1 (times the median "
                          "rank's busy time), or null to never name stragglers")
    _at_least("logging.straggler_steps", lg.straggler_steps, 1)
    _choice("parallel.layout", par.layout, LAYOUTS)
    if par.auto_cluster is not None:
        presets = sorted(p.stem for p in (Path(CONF_DIR) / "cluster").glob("*.yaml"))
        _choice("parallel.auto_cluster", par.auto_cluster, presets)
    warnings = []
    if sp.factor is not None and not cfg.checkpoint.every:
        warnings.append(f"train.spike.factor={sp.factor} with checkpoint.every=0: there is no checkpoint to roll "
                        "back to before the end, so a spike's step is only skipped")
    return warnings


def _check_levers(cfg: DictConfig) -> None:
    t = cfg.train
    _choice("train.dtype", t.dtype, tuple(DTYPES))
    _choice("train.activation_checkpointing", t.activation_checkpointing, AC_MODES)
    _choice("train.compile_backend", t.compile_backend, COMPILE_BACKENDS)
    _at_least("train.loss_chunks", t.loss_chunks, 1)
    par = cfg.parallel
    if t.loss_chunks > 1 and (par.tp > 1 or par.pp > 1):
        raise ConfigError(
            f"train.loss_chunks={t.loss_chunks} with parallel.tp={par.tp} parallel.pp={par.pp}: chunking the loss "
            "needs the whole output projection in the model's forward (valid: train.loss_chunks=1, or tp=pp=1; "
            "under tp>1 the logits are already split over the vocabulary by loss parallel)"
        )


def check_corpus(cfg: DictConfig, corpus) -> None:
    """Checks that need the prepared corpus: vocabulary and split lengths."""
    if corpus.max_token >= cfg.model.vocab_size:
        raise ConfigError(
            f"model.vocab_size={cfg.model.vocab_size} is too small for the data: {corpus.source} "
            f"holds token id {corpus.max_token} (valid: vocab_size >= {corpus.max_token + 1})"
        )
    for name in ("train", "eval"):
        split = getattr(corpus, name)
        if split.num_tokens <= cfg.train.seq_len + 1:
            raise ConfigError(
                f"data.path={cfg.data.path!r}: its {name} split holds {split.num_tokens} tokens, "
                f"fewer than train.seq_len+2={cfg.train.seq_len + 2} (use more data or a shorter seq_len)"
            )
