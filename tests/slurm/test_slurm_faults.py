"""Faults on the real local SLURM cluster: an srun task killed for real, and a job that gets fewer tasks."""

import json
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from orchestrator.runs.checkpoint import complete_checkpoints, read_marker
from orchestrator.runs.wandb_files import attempts, read_history
from tests.conftest import ROOT, TINY, run_train
from tests.slurm.jobs import job_state, wait_for

pytestmark = pytest.mark.slurm


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_killed_srun_task_requeues_the_job_which_resumes_from_its_checkpoint_by_itself(slurm_cluster, tmp_path):
    run_dir = tmp_path / "run"
    layout = [*TINY, "parallel.dp=2", "train.steps=60", "train.eval_every=0", "checkpoint.every=10",
              "launcher=slurm", "launcher.max_restarts=1", "logging.wandb.mode=offline", "logging.wandb.plan=false"]
    out = run_train(f"hydra.run.dir={run_dir}", *layout, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    job_id = json.loads((run_dir / "slurm_job.json").read_text())["job_id"]
    # Polled often: a step takes ~40 ms here, the 60 steps ~4 s, and the kill must come before the last one.
    wait_for(lambda: past_a_checkpoint(run_dir), 180, "a step logged after a checkpoint", poll_s=0.1)
    pid = json.loads((run_dir / "ranks" / "rank-1.json").read_text())["pid"]
    os.kill(pid, signal.SIGKILL)  # srun's task of rank 1, as a dying process or node would
    wait_for(lambda: job_state(job_id) in ("COMPLETED", "FAILED", "CANCELLED"), 300, "the requeued job to end")
    log = (run_dir / "slurm" / f"{job_id}_0_log.out").read_text()
    err = (run_dir / "slurm" / f"{job_id}_0_log.err").read_text()
    assert job_state(job_id) == "COMPLETED", err[-3000:]
    assert "requeueing job" in err and "restart 1 of launcher.max_restarts=1" in err
    assert "resumed from" in log and "trident: done, 60 steps" in log
    counted = json.loads((run_dir / "slurm" / f"trident-restarts-{job_id}.json").read_text())
    assert counted["restarts"] == 1 and counted["history"][0]["status"] != 0
    # The steps logged between the checkpoint it resumed from and the kill ran twice and repeat bit for bit;
    # every other step ran once: nothing lost, nothing changed.
    resumed_at = int(re.search(r"resumed from \S+ at step (\d+)", log).group(1))
    logged = [r for r in rows(run_dir) if "loss" in r]
    restart = len(logged) - (60 - resumed_at)  # the second run logged steps resumed_at+1..60
    first_run, second_run = logged[:restart], logged[restart:]
    assert [r["step"] for r in first_run] == list(range(1, len(first_run) + 1))
    assert [r["step"] for r in second_run] == list(range(resumed_at + 1, 61))
    assert len(first_run) > resumed_at >= 10  # the kill came after a step past the checkpoint (past_a_checkpoint)
    for again in second_run[: len(first_run) - resumed_at]:
        assert again["loss"] == first_run[again["step"] - 1]["loss"], again["step"]
    # One W&B run through the requeue: every step once, in order, the resumed job's rows for the repeated ones.
    state = json.loads((run_dir / "wandb.json").read_text())
    assert state["attempts"] == 2 and {a["id"] for a in attempts(str(run_dir / "wandb"))} == {state["id"]}
    history = read_history(str(run_dir / "wandb"))
    assert [h["_step"] for h in history] == list(range(61))
    last = {r["step"]: r for r in logged}
    assert all(h["loss"] == last[h["_step"]]["loss"] for h in history[1:])
    assert all(h["_attempt"] == 2 for h in history[resumed_at + 1:])


def past_a_checkpoint(run_dir: Path) -> bool:
    """Whether a step after the newest complete checkpoint is logged, so that killing now repeats at least one."""
    done = complete_checkpoints(str(run_dir / "checkpoints"))
    metrics = run_dir / "metrics.jsonl"
    if not done or not metrics.exists():
        return False
    logged = [json.loads(line).get("step", 0) for line in metrics.read_text().splitlines() if line.endswith("}")]
    return max(logged, default=0) > read_marker(done[-1])["step"]


AUTO = [*TINY, "parallel=auto", "train.steps=8", "train.eval_every=0", "checkpoint.every=4"]


def sbatch(tmp_path: Path, name: str, tasks: int, *overrides: str) -> Path:
    """The hand-written batch script with `tasks` srun tasks, each running trident-train launcher=external."""
    run_dir = tmp_path / name
    out = subprocess.run(["sbatch", "--parsable", f"--ntasks-per-node={tasks}", f"--output={tmp_path}/{name}-%j.out",
                          str(ROOT / "launch/cluster/sbatch_template.sh"), *overrides],
                         cwd=ROOT, env={**os.environ, "TRIDENT_RUN_DIR": str(run_dir)},
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    job_id = out.stdout.strip().split(";")[0]
    wait_for(lambda: job_state(job_id) in ("COMPLETED", "FAILED", "CANCELLED"), 300, f"job {name}")
    log = "\n".join(p.read_text() for p in tmp_path.glob(f"{name}-*.out"))
    assert job_state(job_id) == "COMPLETED", log[-3000:]
    assert f"trident: parallel=auto: {tasks} rank(s) -> " in log
    return run_dir


def test_a_job_that_gets_fewer_srun_tasks_plans_its_layout_again_and_resumes_on_the_same_curve(slurm_cluster,
                                                                                               tmp_path):
    four = sbatch(tmp_path, "four", 4, *AUTO)
    shutil.copytree(four / "checkpoints" / "step-4", tmp_path / "ck" / "step-4")
    two = sbatch(tmp_path, "two", 2, *AUTO, f"checkpoint.dir={tmp_path / 'ck'}")
    ref = {r["step"]: r["loss"] for r in rows(four) if "loss" in r}
    got = {r["step"]: r["loss"] for r in rows(two) if "loss" in r}
    assert sorted(got) == [5, 6, 7, 8]
    for s in got:
        assert got[s] == pytest.approx(ref[s], rel=1e-5), s
    marker = json.loads((tmp_path / "ck" / "step-8" / "trident.json").read_text())
    assert marker["samples_seen"] == 8 * 8
    assert marker["layout"]["tp"] * marker["layout"]["pp"] * marker["layout"]["dp"] == 2
