"""trident-generate in one process: the KV cache, sampling, the static decode path, prompts, and every bad input
refused before launch."""

import io
import json
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir

import orchestrator.cli.generate as generate_app
import orchestrator.generate.decode as generator_mod
from models.kv_cache import KVCache
from orchestrator.config import CONF_DIR, register
from orchestrator.data.tokenizer import load_tokenizer
from orchestrator.generate.decode import Generator, Sampling, build_model, resolve_dtype
from orchestrator.generate.sampling import filter_logits, prompt_generator, sample
from orchestrator.generate.worker import prepare, read_prompts
from orchestrator.validate import ConfigError, validate
from tests.conftest import TINY, run_cmd
from tests.unit.test_checkpoint_checks import fake_checkpoint

CPU = torch.device("cpu")


def gen_overrides(tmp_path, *overrides) -> list[str]:
    """The command line of a tiny model's generation."""
    return [*TINY, f"checkpoint.dir={tmp_path}/ck", f"data.cache_dir={tmp_path}/cache", *overrides]


def compose_generate(overrides: list[str]):
    register()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="generate", overrides=overrides)


def gen_cfg(tmp_path, *overrides):
    return compose_generate(gen_overrides(tmp_path, *overrides))


def tiny_model(tmp_path, seed=0):
    return build_model(gen_cfg(tmp_path).model, None, CPU, seed)


# ---- the cache and the decode paths ----

def test_left_padded_mask_hides_padding_and_the_future_and_lets_padding_see_itself():
    cache = KVCache(1, 2, 6, 1, 2, torch.float32, CPU)
    cache.reset([2, 0])
    mask = cache.at(torch.arange(4), 4).mask()[:, 0].int().tolist()
    assert mask[0] == [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]]  # slots 0, 1 are padding
    assert mask[1] == [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]
    assert cache.positions().tolist() == [[0, 0, 0, 1], [0, 1, 2, 3]]
    static = cache.at(torch.tensor([4])).mask()[:, 0, 0].int().tolist()  # the whole buffer, a decode step
    assert static == [[0, 0, 1, 1, 1, 0], [1, 1, 1, 1, 1, 0]]


def test_cached_decode_of_a_padded_batch_equals_a_full_recompute_in_fp32(tmp_path):
    model = tiny_model(tmp_path)
    gen = Generator(model, None, CPU, torch.float32, batch=2, max_len=48)
    prompts = [list(b"x = 1\n"), list(b"for i in range(10):\n    ")]
    with torch.no_grad():
        outs = gen.generate(prompts, [0, 1], Sampling(16), record_logits=True)
        for prompt, o in zip(prompts, outs):
            assert len(o.logits) == len(o.tokens) == 16
            for t, cached in enumerate(o.logits):
                full = model(torch.tensor([prompt + o.tokens[:t]]))[0, -1]
                assert (full - cached).abs().max().item() < 1e-5, t


def test_the_static_decode_step_compile_replays_gives_the_eager_tokens(tmp_path, monkeypatch):
    # The compiler itself is torch's: here torch.compile returns the function, so what runs is the
    # static-shape step (slot as a tensor, attention over the whole buffer under the mask).
    prompts = [list(b"def f(x):"), list(b"#")]
    eager = Generator(tiny_model(tmp_path), None, CPU, torch.float32, batch=2, max_len=32)
    monkeypatch.setattr(generator_mod.torch, "compile", lambda fn, **kw: fn)
    static = Generator(tiny_model(tmp_path), None, CPU, torch.float32, batch=2, max_len=32, compile=True)
    assert static.compiled and not eager.compiled
    for s in (Sampling(20), Sampling(20, temperature=1.0, seed=3)):
        assert [o.tokens for o in static.generate(prompts, [0, 1], s)] == [o.tokens for o in eager.generate(prompts, [0, 1], s)]


def test_compile_and_cuda_graphs_fall_back_with_a_message(tmp_path, monkeypatch, capsys):
    def broken(fn, **kw):
        def run(*a, **k):
            raise RuntimeError("no compiler here")
        return run

    monkeypatch.setattr(generator_mod.torch, "compile", broken)
    gen = Generator(tiny_model(tmp_path), None, CPU, torch.float32, batch=1, max_len=16, compile=True,
                    cuda_graphs=True)
    err = capsys.readouterr().err
    assert "generate.compile=true but the decode step does not compile here (RuntimeError: no compiler here)" in err
    assert "generate.cuda_graphs=true needs a CUDA device" in err
    assert not gen.compiled and not gen.graphed
    assert len(gen.generate([list(b"a")], [0], Sampling(5))[0].tokens) == 5


def test_generation_defaults_to_bf16_on_a_gpu_and_fp32_on_the_cpu():
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("auto", CPU) == torch.float32 and resolve_dtype("bf16", CPU) == torch.bfloat16


def test_output_stops_at_the_context_and_says_so(tmp_path):
    gen = Generator(tiny_model(tmp_path), None, CPU, torch.float32, batch=2, max_len=12)
    outs = gen.generate([list(b"0123456789"), list(b"ab")], [0, 1], Sampling(8))
    # The batch's longest prompt (10) leaves 2 slots: both rows stop there.
    assert [len(o.tokens) for o in outs] == [2, 2] and [o.finish for o in outs] == ["context", "context"]


# ---- sampling ----

def test_top_k_and_top_p_keep_the_tokens_they_should():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = lambda **kw: torch.isfinite(filter_logits(logits, 1.0, **kw))[0].tolist()  # noqa: E731
    assert kept(top_k=0, top_p=1.0) == [True] * 4
    assert kept(top_k=2, top_p=1.0) == [True, True, False, False]
    assert kept(top_k=0, top_p=0.5) == [True, False, False, False]  # 0.5 alone reaches 0.5
    assert kept(top_k=0, top_p=0.8) == [True, True, False, False]
    assert kept(top_k=0, top_p=0.81) == [True, True, True, False]
    assert kept(top_k=0, top_p=0.01) == [True, False, False, False]  # the likeliest always stays
    assert sample(logits, 0.0).tolist() == [0]


def test_sampling_draws_tokens_with_their_probabilities():
    probs = torch.tensor([0.6, 0.3, 0.1])
    n = 6000
    g = prompt_generator(0, 0, CPU)
    drawn = sample(torch.log(probs).expand(n, 3), 1.0, generators=[g] * n)
    freq = torch.bincount(drawn, minlength=3).float() / n
    sigma = (probs * (1 - probs) / n).sqrt()
    assert ((freq - probs).abs() < 4 * sigma).all(), freq


# ---- prompts and tokenizers ----

def test_prompts_come_from_the_string_the_file_jsonl_or_stdin(tmp_path):
    lines = tmp_path / "p.txt"
    lines.write_text("first\n\nsecond one\n")
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text(json.dumps({"prompt": "a\nb"}) + "\n" + json.dumps("plain") + "\n" + json.dumps({"text": "t"}) + "\n")
    assert read_prompts(gen_cfg(tmp_path, "generate.prompt=hi").generate) == ["hi"]
    assert read_prompts(gen_cfg(tmp_path, f"generate.prompts_file={lines}").generate) == ["first", "second one"]
    assert read_prompts(gen_cfg(tmp_path, f"generate.prompts_file={jsonl}").generate) == ["a\nb", "plain", "t"]
    assert read_prompts(gen_cfg(tmp_path).generate, io.StringIO("x\ny\n")) == ["x", "y"]


def test_a_tokenizer_json_encodes_decodes_and_names_its_eos(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(["def add(a, b): return a + b"] * 50,
                            trainers.BpeTrainer(vocab_size=60, special_tokens=["<unk>", "</s>", "<|eot|>"]))
    folder = tmp_path / "hf"
    folder.mkdir()
    tok.save(str(folder / "tokenizer.json"))
    loaded = load_tokenizer(str(folder / "tokenizer.json"))
    ids = loaded.encode("def add")
    assert loaded.decode(ids) == "def add" and loaded.eos_ids == (tok.token_to_id("</s>"),)
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|eot|>"}))
    assert load_tokenizer(str(folder)).eos_ids == (tok.token_to_id("<|eot|>"),)  # a folder; its config's EOS
    assert load_tokenizer("init_from", str(folder)).vocab_size == loaded.vocab_size
    assert load_tokenizer("bytes").encode("é") == [195, 169] and load_tokenizer("bytes").eos_ids == ()


# ---- refused before launch ----

def refused(cfg, monkeypatch, stdin=None, overrides=()) -> str:
    spawned = []
    monkeypatch.setattr(generate_app, "spawn", lambda *a, **k: spawned.append(a))
    monkeypatch.setattr(sys, "stdin", stdin or io.StringIO(""))
    with pytest.raises(ConfigError) as e:
        generate_app.run(cfg, overrides)
    assert spawned == []
    msg = str(e.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize("overrides, names", [
    (["generate.top_p=1.5"], ["generate.top_p=1.5 must be in (0, 1]"]),
    (["generate.top_p=0"], ["generate.top_p=0"]),
    (["generate.temperature=-1"], ["generate.temperature=-1"]),
    (["generate.top_k=-2"], ["generate.top_k=-2"]),
    (["generate.max_new_tokens=0"], ["generate.max_new_tokens=0 must be >= 1"]),
    (["generate.dtype=fp16"], ["generate.dtype='fp16'", "auto, fp32, bf16"]),
    (["generate.max_total_tokens=4096"], ["generate.max_total_tokens=4096", "model.max_seq_len=2048"]),
    (["parallel.pp=2"], ["parallel.pp=2 parallel.dp=1", "tensor parallelism only"]),
    (["parallel.dp=2"], ["parallel.pp=1 parallel.dp=2"]),
    (["parallel.cp=2"], ["parallel.cp=2: trident-generate decodes at parallel.cp=1", "valid: parallel.cp=1"]),
    (["parallel.tp=3"], ["parallel.tp=3 does not divide model.n_heads=8", "valid tp: 1, 2, 4"]),
    (["parallel.tp=8"], ["parallel.tp=8 does not divide model.n_kv_heads=4", "valid tp: 1, 2, 4"]),
    (["parallel.sequence_parallel=true", "parallel.tp=2"], ["parallel.sequence_parallel=true"]),
    (["generate.max_total_tokens=16", "generate.prompt=" + "x" * 16],
     ["prompt 0 is 16 tokens, longer than the context (generate.max_total_tokens=16)", "at most 15 tokens"]),
    (["generate.prompt=''"], ["prompt 0 is empty"]),
    (["data.tokenizer=/no/such/tokenizer.json", "generate.prompt=x"], ["data.tokenizer='/no/such/tokenizer.json'"]),
    (["launcher=external", "generate.prompt=x"], ["launcher=external found no rank environment"]),
    (["launcher=slurm"], ["launcher=slurm reads no stdin"]),
    (["generate.checkpoint=/dev", "generate.prompt=x"], ["generate.checkpoint='/dev' holds no complete checkpoint"]),
])
def test_bad_input_is_one_line_naming_the_setting_before_launch(tmp_path, monkeypatch, overrides, names):
    msg = refused(gen_cfg(tmp_path, *overrides), monkeypatch, io.StringIO("a prompt\n"))
    for name in names:
        assert name in msg, (name, msg)


def test_a_model_shape_on_the_command_line_that_contradicts_the_checkpoint_is_refused_naming_it(tmp_path,
                                                                                                  monkeypatch):
    line = gen_overrides(tmp_path, f"generate.checkpoint={tmp_path / 'run'}", "generate.prompt=x")
    cfg = compose_generate(line)
    fake_checkpoint(tmp_path / "run", 7, model={**dict(cfg.model), "dim": 64, "name": "bigger"})
    msg = refused(cfg, monkeypatch, overrides=line)
    assert msg.startswith("model.dim=32 contradicts generate.checkpoint=") and "(bigger) has dim=64:" in msg
    assert "drop model.dim=32" in msg
    preset = ["model=llama3-8b", f"generate.checkpoint={tmp_path / 'run'}", "generate.prompt=x"]
    msg = refused(compose_generate(preset), monkeypatch, overrides=preset)
    assert msg.startswith("model=llama3-8b (dim=4096, n_layers=32, ") and "has dim=64, n_layers=2, " in msg
    # Without the shape on the command line the checkpoint's is taken, whatever the config tree's defaults.
    bare = [f"generate.checkpoint={tmp_path / 'run'}", "generate.prompt=x"]
    assert prepare(compose_generate(bare), overrides=bare).config.model.dim == 64


def saved_run(root, step: int, config: dict):
    """A checkpoint whose marker holds a whole run's config (the DCP files are empty: nothing loads them)."""
    path = fake_checkpoint(root, step, model=config["model"])
    (path / "trident.json").write_text(json.dumps({"step": step, "config": config}))
    return path


def test_a_finetune_runs_checkpoint_gives_its_model_and_tokenizer_and_no_training_setting_is_checked(
        tmp_path, monkeypatch):
    """The story of issue 25: `+experiment=finetune-llama` with the run's checkpoint and no model settings. The
    preset's train.seq_len=2048 is beyond the model's 256 positions, its data.path does not exist here: neither
    is generation's, so neither refuses it."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    hf = tmp_path / "hf"  # the run's model.init_from: only its tokenizer is read
    hf.mkdir()
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(40)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(hf / "tokenizer.json"))
    (hf / "tokenizer_config.json").write_text(json.dumps({"bos_token": "w1", "eos_token": "w2"}))
    model = {"name": "finetune-llama", "dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 40,
             "multiple_of": 96, "ffn_dim_multiplier": None, "norm_eps": 1e-5, "rope_theta": 10000.0,
             "rope_scaling": None, "max_seq_len": 256, "tie_embeddings": False, "init_from": str(hf)}
    step = saved_run(tmp_path / "ck", 3, {"model": model, "data": {"tokenizer": "init_from", "eos_token": "w3"},
                                          "parallel": {"tp": 2}, "train": {"seq_len": 32}})
    line = ["+experiment=finetune-llama", f"generate.checkpoint={tmp_path / 'ck'}", "generate.prompt=w5 w6 w7",
            f"data.path={tmp_path / 'absent.jsonl'}"]
    cfg = compose_generate(line)
    assert cfg.train.seq_len == 2048
    plan = prepare(cfg, overrides=line)
    assert plan.checkpoint == str(step)
    assert dict(plan.config.model) == {**model, "init_from": None}  # the weights are the checkpoint's
    assert plan.config.data.tokenizer == str(hf) and plan.config.data.eos_token == "w3"
    assert plan.prompts == [{"prompt": "w5 w6 w7", "ids": [5, 6, 7]}] and plan.warnings == []
    with pytest.raises(ConfigError, match="train.seq_len=2048 exceeds model.max_seq_len=256"):
        validate(plan.config)  # what trident-train would refuse
    # Restating the run's own shape and init_from is accepted; a setting that shapes no weight wins.
    again = [*line, "model.dim=32", "model.n_layers=2", f"model.init_from={hf}", "model.max_seq_len=128"]
    plan = prepare(compose_generate(again), overrides=again)
    assert plan.config.model.max_seq_len == 128 and plan.config.model.init_from is None
    other = [*line, f"model.init_from={tmp_path}"]
    assert "are both set: give one source of weights" in refused(compose_generate(other), monkeypatch,
                                                                   overrides=other)


def test_a_checkpoint_dir_gives_its_newest_complete_step_and_both_weight_sources_are_refused(tmp_path, monkeypatch):
    cfg = gen_cfg(tmp_path, f"generate.checkpoint={tmp_path / 'run'}", "generate.prompt=x")
    for step in (3, 9):
        fake_checkpoint(tmp_path / "run", step, model=dict(cfg.model))
    fake_checkpoint(tmp_path / "run", 12, complete=False)
    plan = prepare(cfg)
    assert plan.checkpoint == str(tmp_path / "run" / "step-9") and plan.prompts == [{"prompt": "x", "ids": [120]}]
    both = gen_cfg(tmp_path, f"generate.checkpoint={tmp_path / 'run'}", "generate.prompt=x",
                   f"model.init_from={tmp_path}")
    assert "both set" in refused(both, monkeypatch) or "init_from" in refused(both, monkeypatch)


def test_a_tokenizer_larger_than_the_model_is_refused(tmp_path, monkeypatch):
    from tokenizers import Tokenizer, models

    vocab = {f"t{i}": i for i in range(300)}
    Tokenizer(models.WordLevel(vocab, unk_token="t0")).save(str(tmp_path / "tokenizer.json"))
    msg = refused(gen_cfg(tmp_path, f"data.tokenizer={tmp_path}", "generate.prompt=x"), monkeypatch)
    assert "has 300 tokens, more than model.vocab_size=256" in msg
    (tmp_path / "bad.json").write_text("{not json")
    msg = refused(gen_cfg(tmp_path, f"data.tokenizer={tmp_path / 'bad.json'}", "generate.prompt=x"), monkeypatch)
    assert "does not parse as a tokenizer.json" in msg


def test_the_cli_refuses_a_bad_top_p_with_exit_2_and_spawns_nothing(tmp_path):
    out = run_cmd([sys.executable, "-m", "orchestrator.cli.generate", "generate.top_p=1.5", "generate.prompt=x"],
                  timeout=120)
    assert out.returncode == 2 and "trident-generate: config error: generate.top_p=1.5" in out.stderr
