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
"""

import pytest

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


@pytest.mark.parametrize("ac, dp_shard", [("full", "optimizer"), ("selective", "replicate")])
def test_tp2_pp2_dp2_activation_checkpointing_and_dp_level_match_single_process(single, tmp_path, ac, dp_shard):
    got = run_layout(tmp_path, f"{ac}-{dp_shard}", 2, 2, f"train.activation_checkpointing={ac}",
                     f"parallel.dp_shard={dp_shard}", pp=2)
    assert_same_run(got, single)


def test_tp2_pp2_dp2_bf16_fsdp_mixed_precision_matches_single_fp32_process_within_bf16_rounding(single, tmp_path):
    assert_bf16_run(run_layout(tmp_path, "bf16-fsdp", 2, 2, "train.dtype=bf16", pp=2), single)


def test_tp2_pp2_bf16_autocast_matches_single_fp32_process_within_bf16_rounding(single, tmp_path):
    # dp=1: no FSDP2, so bf16 is autocast over the fp32 weights (as under the optimizer and replicate levels).
    assert_bf16_run(run_layout(tmp_path, "bf16-autocast", 2, 1, "train.dtype=bf16", pp=2), single)


def test_compiled_blocks_match_single_eager_process(single, tmp_path):
    assert_same_run(run_layout(tmp_path, "compiled", 1, 1, "train.compile=true"), single)
