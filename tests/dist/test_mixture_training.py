"""A weighted mixture trained for real: the same sequences at tp=2 x dp=2 as at one process, and after a resume
at dp=4 from a checkpoint saved at dp=2 (three launches)."""

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import TINY, run_train

pytestmark = pytest.mark.dist

TOL = 1e-5  # fp32 sums in another order (TP shards, dp averaging): the layout-independence tolerance


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_mixture_draws_the_same_sequences_at_every_layout_and_after_a_resume_at_another_dp(tmp_path):
    for name, word in (("a", "alpha"), ("b", "beta")):
        (tmp_path / f"{name}.txt").write_text("\n".join(f"{word} {i} {i * 7 % 13} " * 2 for i in range(600)))
    mix = [*TINY, f"data.sources={{a:{{path:{tmp_path / 'a.txt'},weight:0.75}},b:{{path:{tmp_path / 'b.txt'},"
                  f"weight:0.25}}}}", f"data.cache_dir={tmp_path / 'cache'}", "train.steps=8", "train.eval_every=4",
           "checkpoint.every=4", "logging.every=1"]
    one = run_train(f"hydra.run.dir={tmp_path / 'one'}", *mix, "parallel.dp=1")
    assert one.returncode == 0, one.stderr[-3000:]
    grid = run_train(f"hydra.run.dir={tmp_path / 'grid'}", *mix, "parallel.tp=2", "parallel.dp=2")
    assert grid.returncode == 0, grid.stderr[-3000:]
    ref, got = rows(tmp_path / "one"), rows(tmp_path / "grid")
    assert [r["step"] for r in got] == [r["step"] for r in ref]
    for r, g in zip(ref, got):
        for key in ("loss", "eval_loss", "eval_loss/a", "eval_loss/b"):
            if key in r:
                assert g[key] == pytest.approx(r[key], rel=TOL, abs=0), (r["step"], key)
        for key in ("tokens/a", "tokens/b", "epochs/a", "epochs/b"):
            if key in r:
                assert g[key] == r[key], (r["step"], key)
    last = ref[-1]
    assert last["tokens/a"] + last["tokens/b"] == 8 * 8 * 32  # steps x global batch x seq_len
    assert last["eval_loss"] == pytest.approx(0.75 * last["eval_loss/a"] + 0.25 * last["eval_loss/b"], rel=1e-12)
    # Saved at dp=2 (tp=2 x dp=2), resumed at dp=4: steps 5..8 continue on the same sequences.
    shutil.copytree(tmp_path / "grid" / "checkpoints" / "step-4", tmp_path / "ck" / "step-4")
    four = run_train(f"hydra.run.dir={tmp_path / 'four'}", *mix, "parallel.dp=4", f"checkpoint.dir={tmp_path / 'ck'}")
    assert four.returncode == 0, four.stderr[-3000:]
    resumed = {r["step"]: r for r in rows(tmp_path / "four") if "loss" in r}
    assert sorted(resumed) == [5, 6, 7, 8]
    for r in ref:
        if r["step"] in resumed:
            assert resumed[r["step"]]["loss"] == pytest.approx(r["loss"], rel=TOL, abs=0), r["step"]
            assert resumed[r["step"]]["tokens/a"] == r["tokens/a"]
