"""The typed schema of the config tree.

The values live in `conf/` (one YAML per config group); these dataclasses only
give every key its type, so that Hydra rejects a typo or a wrong type while it
composes the config. No defaults here: a knob has exactly one home, its YAML.
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

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
    max_seq_len: int = MISSING
    tie_embeddings: bool = MISSING
    init_from: Optional[str] = MISSING


@dataclass
class ParallelConfig:
    tp: int = MISSING
    pp: int = MISSING
    dp: int = MISSING
    sequence_parallel: bool = MISSING
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


@dataclass
class OptimConfig:
    name: str = MISSING
    lr: float = MISSING
    min_lr: float = MISSING
    warmup_steps: int = MISSING
    schedule: str = MISSING
    weight_decay: float = MISSING
    beta1: float = MISSING
    beta2: float = MISSING
    eps: float = MISSING
    grad_clip: float = MISSING


@dataclass
class WandbConfig:
    mode: str = MISSING
    project: str = MISSING
    entity: Optional[str] = MISSING
    name: Optional[str] = MISSING
    group: Optional[str] = MISSING
    tags: list[str] = MISSING


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
    nonfinite: str = MISSING
    max_skipped_steps: int = MISSING
    step_timeout_s: Optional[float] = MISSING
    spike: SpikeConfig = field(default_factory=SpikeConfig)


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
    dry_run: bool = MISSING


@dataclass
class ClusterConfig:
    name: str = MISSING
    gpus: int = MISSING
    gpus_per_node: int = MISSING
    gpu_memory_gb: float = MISSING
    memory_reserve_gb: float = MISSING
    peak_tflops: dict[str, float] = MISSING
    mfu: float = MISSING
    intra_node_gbps: float = MISSING
    inter_node_gbps: float = MISSING


@dataclass
class PlanConfig(TrainConfig):
    """`trident-plan`: the training config plus the cluster it is planned for."""

    cluster: ClusterConfig = field(default_factory=ClusterConfig)


def register() -> None:
    """Make the schema known to Hydra; `conf/train.yaml` extends it, `conf/plan.yaml` the plan's."""
    ConfigStore.instance().store(name="trident_schema", node=TrainConfig)
    ConfigStore.instance().store(name="trident_plan_schema", node=PlanConfig)
