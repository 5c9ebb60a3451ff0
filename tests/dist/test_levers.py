"""The memory and speed levers under the 3-D layout tp=2 x pp=2 x dp=2, against one plain fp32 process.

fp32 levers (activation checkpointing, the ZeRO-1 and replicate dp levels)
change where memory goes, never the arithmetic: the run must match to 1e-5,
as every layout does. bf16 rounds each matmul's inputs to 8 significant bits
(a relative step of 2^-9, about 2e-3), while weights, reductions, the loss
and AdamW stay fp32. The loss is a mean over 256 tokens of fp32 log-probs,
so its error stays well under one bf16 step: losses must agree within 2e-3
relative (measured: under 2e-4 over 10 steps). First-step gradients pass
through a few bf16 matmuls: within 3e-2 of their largest value (measured:
about 1e-2), and further than 1e-4, which proves bf16 was really used.
The ZeRO-1 run's checkpoint, where each dp rank holds the AdamW state of only
the parameters it owns, must resume whole on one process.
"""

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from launch.local import spawn
from models.llama import ModelArgs, Transformer, num_params
from orchestrator.data.dataset import prepare
from orchestrator.runs import checkpoint
from orchestrator.train.trainer import Trainer
from tests.conftest import make_cfg
from tests.dist.harness import Result, assert_same_run, run_layout

pytestmark = pytest.mark.dist

BF16_LOSS_REL, BF16_GRAD_REL = 2e-3, 3e-2


def assert_bf16_run(got: Result, ref: Result) -> None:
    """Identical initial weights; losses within one bf16 rounding step; gradients close but not fp32-exact."""
    assert set(got.init) == set(ref.init)
    assert sorted(got.losses()) == sorted(ref.losses())
    for s, r in ref.rows.items():
        for key in ("loss", "eval_loss"):
            if key in r:
                assert abs(got.rows[s][key] - r[key]) <= BF16_LOSS_REL * r[key], (s, key)
    assert 1e-4 < max(got.grad_errors.values()) < BF16_GRAD_REL, got.grad_errors


def _resume_and_evaluate(env, device, cfg_dict, corpus, run_dir, path):
    trainer = Trainer(OmegaConf.create(cfg_dict), env, device, run_dir, corpus, resume=path)
    with_state = sum(1 for opt in trainer.optimizers for p in trainer.params if "exp_avg" in opt.state.get(p, {}))
    Path(run_dir, "resumed.json").write_text(json.dumps(
        {"step": trainer.step, "eval_loss": trainer.evaluate(), "with_state": with_state, "params": len(trainer.params)}))


def test_tp2_pp2_dp2_full_ac_zero1_matches_single_process_and_its_checkpoint_resumes_on_one_process(single, tmp_path):
    got = run_layout(tmp_path, "full-optimizer", 2, 2, "train.activation_checkpointing=full",
                     "parallel.dp_shard=optimizer", "checkpoint.at_end=true", pp=2)
    assert_same_run(got, single)
    # Each dp rank saved the AdamW state of the parameters it owns: together, every parameter's.
    path = checkpoint.find_resume("auto", str(tmp_path / "checkpoints"))
    cfg = make_cfg("parallel.dp=1", "train.steps=10", tmp=tmp_path)
    spawn(_resume_and_evaluate, 1, OmegaConf.to_container(cfg, resolve=True), prepare(cfg.data), str(tmp_path),
          str(path), timeout_s=60)
    resumed = json.loads((tmp_path / "resumed.json").read_text())
    assert resumed["step"] == 10 and resumed["with_state"] == resumed["params"]
    assert resumed["eval_loss"] == pytest.approx(got.rows[10]["eval_loss"], rel=1e-5)


def test_tp2_pp2_dp2_selective_ac_replicate_matches_single_process(single, tmp_path):
    got = run_layout(tmp_path, "selective-replicate", 2, 2, "train.activation_checkpointing=selective",
                     "parallel.dp_shard=replicate", pp=2)
    assert_same_run(got, single)


def test_tp2_pp2_dp2_bf16_fsdp_mixed_precision_matches_single_fp32_process_within_bf16_rounding(single, tmp_path):
    assert_bf16_run(run_layout(tmp_path, "bf16-fsdp", 2, 2, "train.dtype=bf16", pp=2), single)


def test_tp2_pp2_bf16_autocast_matches_single_fp32_process_within_bf16_rounding(single, tmp_path):
    # dp=1: no FSDP2, so bf16 is autocast over the fp32 weights (as under the optimizer and replicate levels).
    assert_bf16_run(run_layout(tmp_path, "bf16-autocast", 2, 1, "train.dtype=bf16", pp=2), single)


def test_compiled_whole_model_and_loss_match_single_eager_process_and_log_mfu_by_its_formula(single, tmp_path):
    """tp=1: train.compile compiles the whole model with its loss (levers.compile_scope) in one graph."""
    got = run_layout(tmp_path, "compiled", 1, 1, "train.compile=true", "logging.peak_tflops=0.5")
    assert got.compiled == {"model"}
    assert_same_run(got, single)
    # MFU = model FLOPs per token x tokens/s / (peak x ranks), by hand: 6 N (the embedding is a lookup) + 12 L d s.
    cfg = make_cfg(tmp=tmp_path)
    with torch.device("meta"):
        n = num_params(Transformer(ModelArgs.from_config(cfg.model)))
    m, s = cfg.model, cfg.train.seq_len
    per_token = 6 * (n - m.vocab_size * m.dim) + 12 * m.n_layers * m.dim * s
    for row in got.rows.values():
        if "mfu" in row:
            assert row["mfu"] == pytest.approx(per_token * row["tokens_per_s"] / 0.5e12, rel=0.01)


def test_tp2_dp2_compiled_checkpointed_blocks_match_single_eager_process(single, tmp_path):
    """Under TP (with SP) and FSDP2 each block is compiled whole, its TP collectives inside the graph, FSDP2's
    hooks and the checkpoint outside it. Compiled blocks under TP used to fail in backward: the embedding's
    output (an asynchronous collective's result) entered the first graph unfinished, and a block
    checkpointed before compiling could not be compiled (levers._plain_input, levers.apply_levers).

    Both were in graph capture and AOTAutograd, which the aot_eager backend runs as inductor does, without
    generating and compiling kernels (~45 s of a CPU per rank on a cold cache, 4 ranks here); Inductor's
    kernels are held to eager by the whole-model test above and tests/unit/test_levers.py."""
    got = run_layout(tmp_path, "compiled-tp", 2, 2, "train.compile=true", "train.compile_backend=aot_eager",
                     "train.activation_checkpointing=full")
    assert got.compiled == {"blocks"}
    assert_same_run(got, single)
