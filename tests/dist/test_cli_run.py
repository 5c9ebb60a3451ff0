"""End to end, as a user runs it: the Hydra app, its run dir, metrics.jsonl, W&B offline, torchrun."""

import json
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from tests.wandb_history import read_run
from tests.conftest import TINY, run_cmd, run_train

pytestmark = pytest.mark.dist

STEPS = 4


def metrics(run_dir: Path) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows}


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("cli") / "local"
    overrides = [o for o in TINY if not o.startswith("logging.wandb.mode")]
    out = run_train(f"hydra.run.dir={run_dir}", *overrides, f"train.steps={STEPS}", "parallel.dp=2", "parallel.tp=1",
                    "logging.wandb.mode=offline", "logging.wandb.group=cli-test")
    assert out.returncode == 0, out.stderr[-3000:]
    return run_dir, out


def test_run_dir_holds_metrics_config_and_checkpoint(local_run):
    run_dir, out = local_run
    rows = metrics(run_dir)
    assert sorted(rows) == list(range(STEPS + 1))
    for s in range(1, STEPS + 1):
        for key in ("loss", "lr", "grad_norm", "tokens_per_s", "mfu", "mem_peak_gb"):
            assert isinstance(rows[s][key], float) and rows[s][key] >= 0, (s, key)
    assert rows[0]["eval_loss"] == pytest.approx(5.55, abs=0.1)  # ln 256: an untrained byte model
    composed = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert composed["parallel"]["dp"] == 2 and composed["train"]["steps"] == STEPS
    assert (run_dir / "checkpoints" / f"step-{STEPS}" / ".metadata").exists()
    assert not list((run_dir / "checkpoints").glob("*.tmp"))
    assert "trident: done" in out.stdout and f"metrics     {run_dir}/metrics.jsonl" in out.stdout


def test_wandb_offline_history_holds_the_logged_losses(local_run):
    run_dir, out = local_run
    wandb_runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(wandb_runs) == 1
    logged = read_run(str(wandb_runs[0]))
    rows = metrics(run_dir)
    history = {h["_step"]: h for h in logged["history"]}
    for s in range(1, STEPS + 1):
        assert history[s]["loss"] == rows[s]["loss"]
        assert history[s]["grad_norm"] == rows[s]["grad_norm"]
        # The fault counters and per-rank step statistics reach W&B too (README "Faults").
        assert history[s]["skipped_steps"] == rows[s]["skipped_steps"] == 0
        assert history[s]["rank_step_s_max"] == rows[s]["rank_step_s_max"] > 0
    assert history[0]["eval_loss"] == rows[0]["eval_loss"]
    assert logged["group"] == "cli-test"
    assert logged["name"] == "llama-debug-tp1-pp1-dp2"
    assert logged["config"]["parallel"]["dp"] == 2
    assert str(wandb_runs[0]) in out.stdout


def test_torchrun_with_launcher_external_trains_the_same_run(local_run, tmp_path):
    run_dir, _ = local_run
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    ext_dir = tmp_path / "external"
    out = run_cmd([torchrun, "--standalone", "--nproc_per_node=2", "-m", "orchestrator.cli.train",
                   "launcher=external", f"hydra.run.dir={ext_dir}", *TINY, f"train.steps={STEPS}", "parallel.dp=2", "parallel.tp=1"])
    assert out.returncode == 0, out.stderr[-3000:]
    ref, got = metrics(run_dir), metrics(ext_dir)
    for s in range(1, STEPS + 1):
        assert got[s]["loss"] == pytest.approx(ref[s]["loss"], rel=1e-6)
