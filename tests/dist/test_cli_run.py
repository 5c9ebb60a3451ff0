"""End to end, as a user runs it: the Hydra app, its run dir, metrics.jsonl, W&B offline, torchrun."""

import json
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from orchestrator.runs.wandb_files import attempts, join_attempts, read_history, read_run
from tests.conftest import TINY, fault_env, run_cmd, run_train

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
                    "logging.wandb.mode=offline", "logging.wandb.group=cli-test", "logging.wandb.plan=false")
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
        # The fault counters and per-rank step statistics reach W&B too (docs/faults.md).
        assert history[s]["skipped_steps"] == rows[s]["skipped_steps"] == 0
        assert history[s]["rank_step_s_max"] == rows[s]["rank_step_s_max"] > 0
    assert history[0]["eval_loss"] == rows[0]["eval_loss"]
    assert logged["group"] == "cli-test"
    assert logged["name"] == "llama-debug-tp1-pp1-dp2"
    assert logged["config"]["parallel"]["dp"] == 2
    assert logged["id"] == json.loads((run_dir / "wandb.json").read_text())["id"]
    assert f"W&B run     {logged['id']} in {run_dir / 'wandb'}" in out.stdout


def test_torchrun_with_launcher_external_trains_the_same_run(local_run, tmp_path):
    run_dir, _ = local_run
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    ext_dir = tmp_path / "external"
    # W&B refuses the project name: a warning, and the run trains on (metrics.jsonl has every row).
    out = run_cmd([torchrun, "--standalone", "--nproc_per_node=2", "-m", "orchestrator.cli.train",
                   "launcher=external", f"hydra.run.dir={ext_dir}", *TINY, f"train.steps={STEPS}", "parallel.dp=2",
                   "parallel.tp=1", "logging.wandb.mode=offline", "logging.wandb.project=not/a/project"])
    assert out.returncode == 0, out.stderr[-3000:]
    assert "trident: warning: W&B init failed (UsageError: Invalid project name 'not/a/project'" in out.stderr
    assert "trident: done" in out.stdout and sorted(metrics(ext_dir)) == list(range(STEPS + 1))
    ref, got = metrics(run_dir), metrics(ext_dir)
    for s in range(1, STEPS + 1):
        assert got[s]["loss"] == pytest.approx(ref[s]["loss"], rel=1e-6)


# --- one W&B run through a kill and a restart, and what the dashboard shows ------------------------------------

KILLED_STEPS = 12


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory):
    """pp=2, 12 steps, a checkpoint every 4. The loss spikes at step 6: rolled back to step 4. Rank 0 is killed
    (SIGKILL) once step 10 is done, and the launcher restarts the run from step 8 (launcher.max_restarts=1).
    Rank 0 is slowed so its W&B thread has time to write."""
    run_dir = tmp_path_factory.mktemp("cli") / "killed"
    overrides = [o for o in TINY if not o.startswith("logging.wandb.mode")]
    out = run_train(f"hydra.run.dir={run_dir}", *overrides, f"train.steps={KILLED_STEPS}", "parallel.pp=2",
                    "parallel.dp=1", "checkpoint.every=4", "launcher.max_restarts=1", "logging.wandb.mode=offline",
                    "train.spike.factor=2", "train.spike.window=3", "train.spike.max_rollbacks=1",
                    env=fault_env(TRIDENT_TEST_KILL_AFTER="0:10", TRIDENT_TEST_SLOW="0:0.3", TRIDENT_TEST_SPIKE="6"))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "loss spike at step 6" in out.stdout and "rolled back to" in out.stdout
    assert "rank 0 exited with code -9 (killed by SIGKILL); restart 1 of launcher.max_restarts=1, from " \
           f"{run_dir}/checkpoints/step-8" in out.stderr
    return run_dir, out


def test_a_rolled_back_killed_and_restarted_run_is_one_wandb_run_with_each_step_once_in_order(killed_run):
    run_dir, _ = killed_run
    state = json.loads((run_dir / "wandb.json").read_text())
    assert state["attempts"] == 3 and state["last_step"] == KILLED_STEPS  # the start, the rollback, the restart
    runs = attempts(str(run_dir / "wandb"))
    assert runs and {r["id"] for r in runs} == {state["id"]}
    assert all(Path(r["folder"]).name.split("-")[3] == state["id"] for r in runs)
    history = read_history(str(run_dir / "wandb"))
    assert [h["_step"] for h in history] == list(range(KILLED_STEPS + 1))
    # metrics.jsonl keeps every attempt's rows (5 and 6 undone by the rollback, 9 and 10 by the kill); W&B
    # shows the last of each step.
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in logged if "loss" in r]
    assert steps.count(5) == steps.count(6) == steps.count(9) == 2 and steps.count(7) == 1
    last = {r["step"]: r for r in logged}
    for h in history[1:]:
        assert h["loss"] == last[h["_step"]]["loss"]
    assert history[9]["_attempt"] == history[10]["_attempt"] == 3 and history[5]["rollbacks"] == 1
    # Each attempt that reached W&B's files replaced the rows from its first step on, by W&B's rewind
    # where the files held those steps already.
    numbers = [r["config"]["trident_attempt"]["number"] for r in runs]
    assert numbers == sorted(set(numbers)) and numbers[0] == 1 and numbers[-1] == 3
    for i, run in enumerate(runs[1:], 1):
        first = run["config"]["trident_attempt"]["first_step"]
        held = join_attempts(runs[:i])
        assert run["resume_from"] == (first - 1 if held and held[-1]["_step"] >= first else None)  # W&B keeps <= it
        assert [h["_step"] for h in run["history"]][0] == first


def test_the_dashboard_holds_the_planner_prediction_the_pipeline_timeline_and_per_rank_fields(killed_run):
    run_dir, _ = killed_run
    final = attempts(str(run_dir / "wandb"))[-1]
    summary = final["summary"]
    assert summary["planner/prediction"]["_type"] == "table-file"
    assert summary["planner/fits"] is True and 0 < summary["planner/step_s"] and 0 < summary["planner/mem_gb"]
    assert 0 < summary["measured/step_s"] and 0 < summary["measured/mem_gb_max"]
    assert summary["layout/pp"] == 2 and summary["layout/schedule"] == "1f1b" and summary["layout/world"] == 2
    assert len(summary["code/commit"]) >= 40 or summary["code/commit"] == "unknown"
    images = [h["pipeline/timeline"] for h in final["history"] if "pipeline/timeline" in h]
    assert len(images) == 1 and images[0]["_type"] == "image-file" and images[0]["height"] == 2 * 34 + 6
    assert (run_dir / "pipeline-timeline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for h in read_history(str(run_dir / "wandb"))[1:]:
        assert h["slowest_rank"] in (0, 1)  # which one, tests/dist/test_faults.py's straggler test checks
        assert 0 < h["rank_step_s_min"] <= h["rank_step_s_median"] <= h["rank_step_s_max"]
        assert 0 < h["rank_mem_gb_min"] <= h["rank_mem_gb_median"] <= h["rank_mem_gb_max"]
