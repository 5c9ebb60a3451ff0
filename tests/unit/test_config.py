"""The config tree composes, overrides reach it, and every bad input is refused before launch."""

import sys

import pytest
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf.errors import ValidationError

import orchestrator.cli.train as train_app
from orchestrator.train.trainer import lr_at, min_lr_of
from orchestrator.validate import ConfigError
from tests.conftest import compose_as_shipped, make_cfg, run_cmd, run_train


def test_default_config_composes_with_llama_field_names():
    cfg = compose_as_shipped()
    assert cfg.model.name == "llama-debug"
    for key in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "ffn_dim_multiplier",
                "multiple_of", "norm_eps", "rope_theta"):
        assert key in cfg.model
    assert (cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.dp) == (2, 2, 2)


def test_command_line_overrides_reach_every_group():
    cfg = make_cfg("optim.lr=3e-4", "train.steps=200", "parallel.dp=4", "model=llama-125m", "model.n_layers=3")
    assert cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.train.steps == 200
    assert cfg.parallel.dp == 4
    assert cfg.model.name == "llama-125m" and cfg.model.n_layers == 3 and cfg.model.dim == 32  # TINY's dim wins


def test_typo_in_a_key_fails_at_composition():
    with pytest.raises(ConfigCompositionException) as e:
        make_cfg("train.stpes=5")
    assert "stpes" in str(e.value.__cause__ or e.value)


def test_levers_default_off_and_compile_takes_only_a_bool():
    cfg = compose_as_shipped()
    t = cfg.train
    assert (t.dtype, t.activation_checkpointing, t.compile, t.compile_backend, t.loss_chunks) == (
        "fp32", "none", False, "inductor", 1)
    assert cfg.optim.implementation == "auto"
    with pytest.raises(ConfigCompositionException) as e:
        make_cfg("train.compile=maybe")
    assert "train.compile" in str(e.value.__cause__)


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_min_lr_ratio_floor_follows_lr_so_a_sweep_over_lr_ends_each_trial_at_a_tenth(schedule):
    for lr in (1e-3, 2e-2):
        o = make_cfg(f"optim.lr={lr}", "optim.min_lr_ratio=0.1", f"optim.schedule={schedule}").optim
        assert lr_at(100, o, 100) == pytest.approx(0.1 * lr)
        assert lr_at(2, o, 100) == pytest.approx(lr)  # the peak, at the end of the warmup


def test_floor_defaults_to_a_tenth_of_lr_as_documented():
    o = compose_as_shipped().optim
    assert o.min_lr is None and o.min_lr_ratio is None
    assert min_lr_of(o) == pytest.approx(3e-4)  # the shipped floor before min_lr_ratio existed
    o = make_cfg("optim.lr=1e-2").optim
    assert min_lr_of(o) == pytest.approx(1e-3) and lr_at(100, o, 100) == pytest.approx(1e-3)
    assert min_lr_of(make_cfg("optim.min_lr=1e-5").optim) == pytest.approx(1e-5)


@pytest.mark.parametrize("preset", ["finetune-llama", "sft-llama"])
def test_presets_keep_a_ratio_that_yields_to_an_absolute_floor_when_cleared(preset):
    o = compose_as_shipped(f"+experiment={preset}", "optim.lr=1e-3").optim
    assert o.min_lr is None and min_lr_of(o) == pytest.approx(1e-3)
    o = compose_as_shipped(f"+experiment={preset}", "optim.min_lr=1e-6", "optim.min_lr_ratio=null").optim
    assert min_lr_of(o) == pytest.approx(1e-6)


def test_wrong_type_fails_at_composition():
    with pytest.raises(ConfigCompositionException) as e:
        make_cfg("train.steps=many")
    assert isinstance(e.value.__cause__, ValidationError)
    assert "train.steps" in str(e.value.__cause__)


def test_unknown_model_fails_naming_the_group():
    with pytest.raises(MissingConfigException) as e:
        make_cfg("model=no-such-model")
    assert "no-such-model" in str(e.value) and "model" in str(e.value)


@pytest.mark.parametrize(
    "overrides, names",
    [
        (["launcher.nprocs=3"], ["launcher.nprocs=3", "parallel.tp*pp*dp"]),
        (["parallel.dp=3"], ["parallel.dp=3", "train.global_batch=8", "valid dp here: 1, 2, 4"]),
        (["parallel.dp=0"], ["parallel.dp=0", ">= 1"]),
        (["parallel.tp=3", "parallel.dp=1"], ["parallel.tp=3 does not divide model.n_heads=8", "valid tp: 1, 2, 4"]),
        (["parallel.tp=4", "parallel.dp=1", "model.n_kv_heads=2"],
         ["parallel.tp=4 does not divide model.n_kv_heads=2", "kv heads", "valid tp: 1, 2"]),
        (["parallel.tp=4", "parallel.dp=1", "model.multiple_of=2"],
         ["parallel.tp=4 does not divide the SwiGLU hidden size=86", "valid tp: 1, 2"]),
        (["parallel.tp=2", "model.tie_embeddings=true"], ["model.tie_embeddings=true with parallel.tp=2"]),
        (["parallel.tp=4", "parallel.dp=1", "train.seq_len=30"],
         ["train.seq_len=30 is not divisible by parallel.tp=4", "sequence_parallel=false"]),
        (["parallel.pp=4", "parallel.dp=1", "model.n_layers=4", "train.micro_batch=4"],
         ["parallel.schedule=1f1b needs micro-batches at least parallel.pp=4, but there are 2"]),
        (["parallel.pp=2", "parallel.dp=1", "model.n_layers=4", "parallel.schedule=dualpipev", "train.micro_batch=4"],
         ["parallel.schedule=dualpipev needs micro-batches at least the 4 stages, but there are 2"]),
        (["parallel.pp=2", "parallel.dp=1", "model.n_layers=4", "parallel.schedule=interleaved-1f1b",
          "train.global_batch=6"], ["parallel.schedule=interleaved-1f1b needs micro-batches a multiple of parallel.pp=2"]),
        (["parallel.pp=2", "parallel.dp=1", "parallel.schedule=zero-bubble"],
         ["model.n_layers=2 is fewer than the 4 pipeline stages"]),
        (["parallel.pp=2", "parallel.dp=1", "parallel.schedule=pipedream"],
         ["parallel.schedule='pipedream'", "gpipe, 1f1b, interleaved-1f1b, zero-bubble, zbv, dualpipev"]),
        (["parallel.microbatches=3"], ["train.global_batch=8 != train.micro_batch * parallel.microbatches * parallel.dp",
                                       "valid here: parallel.microbatches=2"]),
        (["parallel.pp=2", "parallel.dp=1", "model.n_layers=4", "parallel.cut_points=[4]"],
         ["parallel.cut_points=[4]", "e.g. [2]"]),
        (["parallel.pp=2", "parallel.dp=1", "parallel.schedule=zbv", "parallel.stages_per_rank=3"],
         ["parallel.stages_per_rank=3 with parallel.schedule=zbv", "valid: 2 or null"]),
        (["parallel.pp=2", "parallel.dp=1", "model.tie_embeddings=true"], ["model.tie_embeddings=true with parallel.pp=2"]),
        (["launcher=slurm", "launcher.nodes=3"], ["launcher.nodes=3 does not divide the world size tp*pp*dp*cp=2",
                                                  "valid nodes: 1, 2"]),
        (["launcher=slurm", "launcher.tasks_per_node=4"], ["launcher.nodes * launcher.tasks_per_node = 1*4 = 4 != "
                                                           "parallel.tp*pp*dp*cp = 2"]),
        (["launcher=slurm", "launcher.gpus_per_node=1"], ["launcher.gpus_per_node=1 < 2 tasks per node"]),
        (["launcher=slurm", "launcher.time=soon"], ["launcher.time: 'soon' is not a SLURM time"]),
        (["parallel.dp_shard=zero7"], ["parallel.dp_shard='zero7'", "full, optimizer, replicate"]),
        (["train.dtype=fp16"], ["train.dtype='fp16'", "fp32, bf16"]),
        (["train.activation_checkpointing=some"], ["train.activation_checkpointing='some'", "none, full, selective"]),
        (["train.compile_backend=cudagraphs"], ["train.compile_backend='cudagraphs'", "inductor, aot_eager"]),
        (["launcher.backend=mpi"], ["launcher.backend='mpi'", "auto, gloo, nccl"]),
        (["data.path=/no/such/corpus"], ["data.path='/no/such/corpus'", "does not exist"]),
        (["data.format=csv"], ["data.format='csv'", "auto, text, jsonl, parquet, bin"]),
        (["model.n_kv_heads=3"], ["model.n_kv_heads=3", "valid: 1, 2, 4, 8"]),
        (["model.dim=36"], ["model.dim=36", "model.n_heads=8"]),
        (["train.seq_len=4096"], ["train.seq_len=4096", "model.max_seq_len=2048"]),
        (["parallel.cp=0"], ["parallel.cp=0", ">= 1"]),
        (["parallel.cp=2", "train.seq_len=30"], ["train.seq_len=30 is not divisible by 2 x parallel.cp = 4",
                                                 "valid: a multiple of 4, e.g. 28"]),
        (["parallel.cp=2", "parallel.tp=4", "parallel.dp=1", "train.seq_len=36"],
         ["train.seq_len=36 / parallel.cp=2 = 18 tokens per rank is not divisible by parallel.tp=4",
          "seq_len a multiple of 8, or sequence_parallel=false"]),
        (["parallel.cp=2", "train.compile=true"], ["train.compile=true with parallel.cp=2", "valid: train.compile=false"]),
        (["parallel.cp=2", "train.seq_len=4096"], ["train.seq_len=4096", "model.max_seq_len=2048"]),
        (["optim.schedule=step"], ["optim.schedule='step'", "cosine, linear, constant"]),
        (["optim.min_lr=1e-5", "optim.min_lr_ratio=0.1"],
         ["optim.min_lr=1e-05 and optim.min_lr_ratio=0.1 are both set", "optim.min_lr_ratio=null"]),
        (["optim.min_lr_ratio=1.5"], ["optim.min_lr_ratio=1.5 must be between 0 and 1"]),
        (["optim.min_lr_ratio=-0.1"], ["optim.min_lr_ratio=-0.1 must be between 0 and 1"]),
        (["optim.min_lr=0.1"], ["optim.min_lr=0.1 must be between 0 and optim.lr=0.003"]),
        (["logging.wandb.mode=cloud"], ["logging.wandb.mode='cloud'", "offline, online, disabled"]),
        (["model.vocab_size=100"], ["model.vocab_size=100", "vocab_size >= 256"]),
        (["optim.implementation=apex"], ["optim.implementation='apex'", "auto, fused, foreach"]),
        (["train.loss_chunks=0"], ["train.loss_chunks=0 must be >= 1"]),
        (["train.loss_chunks=4", "parallel.tp=2"], ["train.loss_chunks=4 with parallel.tp=2 parallel.pp=1",
                                                    "valid: train.loss_chunks=1, or tp=pp=1"]),
    ],
)
def test_bad_input_is_a_config_error_and_spawns_nothing(overrides, names, tmp_path, monkeypatch):
    spawned = []
    monkeypatch.setattr(train_app, "spawn", lambda *a, **k: spawned.append(a))
    cfg = make_cfg(*overrides, tmp=tmp_path)
    with pytest.raises(ConfigError) as e:
        train_app.run(cfg, str(tmp_path / "run"))
    for name in names:
        assert name in str(e.value)
    assert spawned == []
    assert not (tmp_path / "run").exists()


def test_external_world_size_must_match_the_layout_fake_torchrun_env(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "4")
    cfg = make_cfg("launcher=external", "parallel.tp=1", "parallel.dp=2", tmp=tmp_path)
    with pytest.raises(ConfigError, match=r"world size=4 != parallel.tp\*pp\*dp\*cp = 1\*1\*2\*1 = 2"):
        train_app.run(cfg, str(tmp_path / "run"))


def test_tp_across_nodes_is_refused_unless_allowed_then_a_warning_fake_torchrun_env(tmp_path):
    from launch.env import from_environ
    from orchestrator.validate import validate

    env = from_environ({"RANK": "0", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2"})
    assert env.nodes == 2
    with pytest.raises(ConfigError, match=r"parallel.tp=4 would put tensor-parallel groups across nodes \(2 ranks per "
                                          r"node; tp must divide it\).*valid: parallel.tp in 1, 2, .*allow_cross_node_tp=true"):
        validate(make_cfg("launcher=external", "parallel.tp=4", "parallel.dp=1", tmp=tmp_path), env)
    warnings = validate(make_cfg("launcher=external", "parallel.tp=4", "parallel.dp=1",
                                 "parallel.allow_cross_node_tp=true", tmp=tmp_path), env)
    assert len(warnings) == 1 and "parallel.tp=4 would put tensor-parallel groups across nodes" in warnings[0]
    assert validate(make_cfg("launcher=external", "parallel.tp=2", "parallel.dp=2", tmp=tmp_path), env) == []


def test_slurm_tp_across_nodes_is_refused_and_time_limits_parse(tmp_path):
    from launch.slurm import time_minutes
    from orchestrator.validate import validate

    cfg = make_cfg("launcher=slurm", "launcher.nodes=2", "parallel.tp=2", "parallel.dp=1", tmp=tmp_path)
    with pytest.raises(ConfigError, match=r"tp=2 would put tensor-parallel groups across nodes "
                                          r"\(launcher.tasks_per_node=1; tp must divide it\)"):
        validate(cfg)
    # 3 tasks per node cannot hold tp=2 groups whole either (ranks 2 and 3 would sit on two nodes)
    cfg = make_cfg("launcher=slurm", "launcher.nodes=2", "launcher.tasks_per_node=3", "parallel.tp=2",
                   "parallel.dp=3", tmp=tmp_path)
    with pytest.raises(ConfigError, match=r"\(launcher.tasks_per_node=3; tp must divide it\).*valid: "
                                          r"parallel.tp in 1,"):
        validate(cfg)
    assert validate(make_cfg("launcher=slurm", "launcher.nodes=2", "launcher.tasks_per_node=2", "parallel.tp=2",
                             "parallel.dp=2", tmp=tmp_path)) == []
    assert [time_minutes(t) for t in ("30", "30:15", "4:00:00", "1-2", "1-2:30:10")] == [30, 31, 240, 1560, 1591]


def test_external_launcher_without_a_rank_environment_is_a_config_error(tmp_path, monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(var, raising=False)
    cfg = make_cfg("launcher=external", tmp=tmp_path)
    with pytest.raises(ConfigError, match="launcher=external found no rank environment"):
        train_app.run(cfg, str(tmp_path / "run"))


def test_command_line_errors_are_one_clear_line_and_exit_nonzero(tmp_path):
    """As a user sees them: the process fails fast and its stderr names the setting."""
    cases = [
        (["model=no-such-model"], "no-such-model"),
        (["launcher=nowhere"], "launcher"),
        (["train.steps=abc"], "train.steps"),
        (["parallel.dp=3"], "trident: config error: parallel.dp=3"),
        (["data.path=/no/such/corpus"], "trident: config error: data.path='/no/such/corpus' does not exist"),
    ]
    for overrides, message in cases:
        out = run_train(f"hydra.run.dir={tmp_path / 'run'}", *overrides, timeout=60)
        assert out.returncode != 0, overrides
        assert message in out.stderr, (overrides, out.stderr)
        assert "Traceback" not in out.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_cfg_job_prints_the_composed_config():
    out = run_train("--cfg", "job", "parallel.dp=4", timeout=60)
    assert out.returncode == 0, out.stderr
    assert "dp: 4" in out.stdout and "name: llama-debug" in out.stdout
    # python -m orchestrator.train is the same program (a box without the console scripts, docs/gpus.md)
    again = run_cmd([sys.executable, "-m", "orchestrator.train", "--cfg", "job", "parallel.dp=4"], timeout=60)
    assert again.returncode == 0 and again.stdout == out.stdout, again.stderr
