"""The typed schema of the config tree.

The values live in `conf/` (one YAML per config group); these dataclasses only
give every key its type, so that Hydra rejects a typo or a wrong type while it
composes the config. No defaults here: a knob has exactly one home, its YAML.
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")  # the config tree every CLI composes


@dataclass
class ModelConfig:
    name: str = MISSING
    dim: int = MISSING
    n_layers: int = MISSING
    n_heads: int = MISSING
    n_kv_heads: Optional[int] = MISSING
    vocab_size: int = MISSING
    multiple_of: int = MISSING
    ffn_dim_multiplier: Optional[float] = MISSING
    norm_eps: float = MISSING
    rope_theta: float = MISSING
    rope_scaling: Any = MISSING  # a dict or null; untyped so that the fine-tune preset may interpolate it
    max_seq_len: int = MISSING
    tie_embeddings: bool = MISSING
    init_from: Optional[str] = MISSING


@dataclass
class ParallelConfig:
    tp: int = MISSING
    pp: int = MISSING
    dp: int = MISSING
    cp: int = 1
    sequence_parallel: bool = MISSING
    allow_cross_node_tp: bool = False
    schedule: str = MISSING
    microbatches: Optional[int] = MISSING
    stages_per_rank: Optional[int] = MISSING
    cut_points: Optional[list[int]] = MISSING
    dp_shard: str = MISSING
    timeout_s: float = MISSING
    layout: str = MISSING
    auto_cluster: Optional[str] = MISSING


@dataclass
class LauncherConfig:
    name: str = MISSING
    nprocs: Optional[int] = MISSING
    max_restarts: int = MISSING
    backend: str = MISSING
    # launcher=slurm only (conf/launcher/slurm.yaml gives their values; the others have none).
    nodes: Optional[int] = None
    min_nodes: Optional[int] = None
    tasks_per_node: Optional[int] = None
    gpus_per_node: Optional[int] = None
    cpus_per_task: Optional[int] = None
    mem_gb: Optional[int] = None
    time: Optional[str] = None
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    extra_sbatch: dict[str, Any] = field(default_factory=dict)
    setup: list[str] = field(default_factory=list)
    wait: Optional[bool] = None
    array_parallelism: Optional[int] = None
    folder: Optional[str] = None


@dataclass
class DataConfig:
    path: Optional[str] = MISSING
    format: str = MISSING
    pattern: str = MISSING
    bin_dtype: str = MISSING
    eval_fraction: float = MISSING
    cache_dir: str = MISSING
    tokenizer: str = MISSING
    text_key: str = MISSING
    eos_token: Optional[str] = MISSING
    mask_across_documents: bool = MISSING
    tokenize_workers: Optional[int] = MISSING
    chat_template: Optional[str] = None
    train_on: Optional[str] = None
    messages_key: str = "messages"
    sources: Any = None  # {name: {path, weight, ...}} (Any: Hydra cannot merge into a typed dict left null)


@dataclass
class OptimConfig:
    name: str = MISSING
    lr: float = MISSING
    min_lr: Optional[float] = None
    min_lr_ratio: Optional[float] = None
    warmup_steps: int = MISSING
    schedule: str = MISSING
    weight_decay: float = MISSING
    beta1: float = MISSING
    beta2: float = MISSING
    eps: float = MISSING
    grad_clip: float = MISSING
    implementation: str = MISSING


@dataclass
class WandbConfig:
    mode: str = MISSING
    project: str = MISSING
    entity: Optional[str] = MISSING
    name: Optional[str] = MISSING
    group: Optional[str] = MISSING
    tags: list[str] = MISSING
    plan: bool = MISSING


@dataclass
class LoggingConfig:
    every: int = MISSING
    console_every: int = MISSING
    straggler_factor: Optional[float] = MISSING
    straggler_steps: int = MISSING
    peak_tflops: Optional[float] = MISSING
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class CheckpointConfig:
    dir: str = MISSING
    every: int = MISSING
    at_end: bool = MISSING
    keep: int = MISSING
    async_save: bool = MISSING
    resume: str = MISSING


@dataclass
class SpikeConfig:
    factor: Optional[float] = MISSING
    window: int = MISSING
    skip_batches: int = MISSING
    max_rollbacks: int = MISSING


@dataclass
class LoopConfig:
    seq_len: int = MISSING
    global_batch: int = MISSING
    micro_batch: int = MISSING
    steps: int = MISSING
    seed: int = MISSING
    eval_every: int = MISSING
    eval_sequences: int = MISSING
    dtype: str = MISSING
    activation_checkpointing: str = MISSING
    compile: bool = MISSING
    compile_backend: str = MISSING
    loss_chunks: int = MISSING
    nonfinite: str = MISSING
    max_skipped_steps: int = MISSING
    step_timeout_s: Optional[float] = MISSING
    spike: SpikeConfig = field(default_factory=SpikeConfig)
    eval_tasks: list[str] = MISSING
    eval_tasks_every: int = MISSING


@dataclass
class EvalSettings:
    checkpoint: Optional[str] = MISSING
    tasks: list[str] = MISSING
    limit: Optional[int] = MISSING
    num_fewshot: Optional[int] = MISSING
    batch_size: int = MISSING
    dtype: str = MISSING
    output: Optional[str] = MISSING
    samples: Optional[str] = MISSING
    tp: int = MISSING
    launcher: Any = MISSING
    wandb: bool = MISSING


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    train: LoopConfig = field(default_factory=LoopConfig)
    eval: EvalSettings = field(default_factory=EvalSettings)  # trident-eval's, and train.eval_tasks' evaluations
    dry_run: bool = MISSING


@dataclass
class ClusterConfig:
    name: str = MISSING
    gpus: int = MISSING
    gpus_per_node: int = MISSING
    gpu_memory_gb: float = MISSING
    memory_reserve_gb: float = MISSING
    device: str = MISSING
    mfu: float = MISSING
    intra_node_gbps: float = MISSING
    inter_node_gbps: float = MISSING
    hbm_gbps: float = MISSING
    hbm_efficiency: float = MISSING
    intra_node_latency_us: float = MISSING
    inter_node_latency_us: float = MISSING
    # Measured (`trident-plan --calibrate`) or published figures the step-time model prefers where given
    # (orchestrator/planner/cluster.py reads and checks them).
    comm_overlap: Optional[bool] = None
    collectives: Any = None
    compute: Any = None
    loop: Any = None
    overheads: Any = None


@dataclass
class CalibrateConfig:
    name: Optional[str] = MISSING
    sizes_kib: list[int] = MISSING
    seconds_per_point: float = MISSING
    max_reps: int = MISSING
    microbatches: Optional[list[int]] = MISSING


@dataclass
class GenerateSettings:
    checkpoint: Optional[str] = MISSING
    prompt: Optional[str] = MISSING
    prompts_file: Optional[str] = MISSING
    max_new_tokens: int = MISSING
    temperature: float = MISSING
    top_k: int = MISSING
    top_p: float = MISSING
    seed: int = MISSING
    stop_ids: list[int] = MISSING
    batch_size: int = MISSING
    max_total_tokens: Optional[int] = MISSING
    dtype: str = MISSING
    compile: bool = MISSING
    cuda_graphs: bool = MISSING
    output: Optional[str] = MISSING
    echo: bool = MISSING


# A schema that extends TrainConfig is merged after train.yaml's groups: MISSING leaves what they set, where
# LauncherConfig's own None defaults (for its slurm-only keys) would cover the launcher group's values.
_KEEP = MISSING


@dataclass
class GenerateConfig(TrainConfig):
    """`trident-generate`: the training config (model, parallel, launcher, data.tokenizer) plus `generate`."""

    launcher: Any = _KEEP
    generate: GenerateSettings = field(default_factory=GenerateSettings)


@dataclass
class EvalConfig(GenerateConfig):
    """`trident-eval`: generate's config (the model from a checkpoint, tp) and `eval` (which every config has:
    the evaluations beside a training run take it too)."""


@dataclass
class PlanConfig(TrainConfig):
    """`trident-plan`: the training config plus the cluster it is planned for (and, for --serve, `generate`)."""

    launcher: Any = _KEEP
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    generate: GenerateSettings = field(default_factory=GenerateSettings)
    calibrate: CalibrateConfig = field(default_factory=CalibrateConfig)


def hf_config_value(folder: Optional[str], key: str):
    """`${hf:${model.init_from},hidden_size}`: a field of a Hugging Face model folder's config.json."""
    from models.hf import hf_value, read_config  # torch comes with it: only when a preset reads a HF folder

    if folder is None:
        raise ValueError(f"${{hf:...,{key}}} needs model.init_from (a Hugging Face Llama folder); it is null")
    return hf_value(read_config(folder), key)


def register() -> None:
    """Make the schema known to Hydra; `conf/train.yaml` extends it, `conf/plan.yaml` and `conf/generate.yaml` theirs."""
    if not OmegaConf.has_resolver("hf"):
        OmegaConf.register_new_resolver("hf", hf_config_value)
    ConfigStore.instance().store(name="trident_schema", node=TrainConfig)
    ConfigStore.instance().store(name="trident_plan_schema", node=PlanConfig)
    ConfigStore.instance().store(name="trident_generate_schema", node=GenerateConfig)
    ConfigStore.instance().store(name="trident_eval_schema", node=EvalConfig)
