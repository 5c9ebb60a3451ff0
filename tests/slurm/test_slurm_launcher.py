"""launcher=slurm against the real local SLURM cluster: a submitted job trains exactly like a local run."""

import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT, TINY, run_train
from tests.slurm.jobs import job_state, losses, wait_for

pytestmark = pytest.mark.slurm


LAYOUT = [*TINY, "parallel.tp=2", "parallel.pp=1", "parallel.dp=2", "train.steps=4"]


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("local") / "run"
    out = run_train(f"hydra.run.dir={run_dir}", *LAYOUT)
    assert out.returncode == 0, out.stderr[-2000:]
    return run_dir


def test_a_4_task_slurm_job_trains_like_the_local_launcher(slurm_cluster, local_run, tmp_path):
    layout = LAYOUT
    out = run_train(f"hydra.run.dir={tmp_path / 'slurm'}", *layout, "launcher=slurm", "launcher.wait=true")
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    job_id = re.search(r"submitted SLURM job (\d+) \(1 node\(s\) x 4 task\(s\)\)", out.stdout).group(1)
    assert f"{job_id}_0_log.out" in out.stdout and "trident: done" in out.stdout  # rank 0's log, streamed
    assert losses(tmp_path / "slurm") == losses(local_run)
    assert len(losses(local_run)) == 4


def test_a_hand_written_sbatch_script_with_srun_and_launcher_external_trains_the_same(slurm_cluster, local_run,
                                                                                    tmp_path):
    script = ROOT / "launch/cluster/sbatch_template.sh"
    out = subprocess.run(
        ["sbatch", "--parsable", f"--output={tmp_path}/%j.out", str(script), *LAYOUT],
        cwd=ROOT, env={**os.environ, "TRIDENT_RUN_DIR": str(tmp_path / "run")},
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0, out.stderr
    job_id = out.stdout.strip().split(";")[0]
    # Polled: `sbatch --wait` notices the end of a job 2-10 s late here.
    state = wait_for(lambda: job_state(job_id) if job_state(job_id) in ("COMPLETED", "FAILED", "CANCELLED") else "",
                     300, "the batch job to end")
    log = "\n".join(p.read_text() for p in tmp_path.glob("*.out"))
    assert state == "COMPLETED", log[-3000:]
    assert losses(tmp_path / "run") == losses(local_run)


def test_without_wait_the_command_returns_once_the_job_is_queued(slurm_cluster, tmp_path):
    out = run_train(f"hydra.run.dir={tmp_path / 'nowait'}", *TINY, "parallel.dp=2", "train.steps=2",
                    "launcher=slurm", timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    assert re.search(r"submitted SLURM job \d+", out.stdout) and "trident: done" not in out.stdout


# The preemption tests' layout: long enough to interrupt; one local run is the uninterrupted reference for both.
LONG = [*TINY, "parallel.dp=2", "train.steps=200", "train.eval_every=0", "logging.every=1"]


@pytest.fixture(scope="module")
def long_local_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("long") / "local"
    local = run_train(f"hydra.run.dir={run_dir}", *LONG)
    assert local.returncode == 0, local.stderr[-2000:]
    return run_dir


def submitted(tmp_path: Path, layout: list[str]) -> tuple[Path, str]:
    """Submit the layout without waiting: (run dir, job id)."""
    run_dir = tmp_path / "slurm"
    out = run_train(f"hydra.run.dir={run_dir}", *layout, "launcher=slurm", timeout=60)
    return run_dir, re.search(r"submitted SLURM job (\d+)", out.stdout).group(1)


def finished_log(run_dir: Path, job_id: str) -> str:
    """Wait for the (requeued) job to end; it must have completed. Rank 0's log over all its runs."""
    wait_for(lambda: job_state(job_id) in ("COMPLETED", "FAILED", "CANCELLED"), 300, "the requeued job to end")
    assert job_state(job_id) == "COMPLETED"
    return (run_dir / "slurm" / f"{job_id}_0_log.out").read_text()


def test_usr2_before_a_time_limit_checkpoints_requeues_and_finishes_the_same_curve(slurm_cluster, long_local_run,
                                                                                   tmp_path):
    """scancel --signal=USR2 (what SLURM sends before a time limit): save, requeue, resume, same losses."""
    run_dir, job_id = submitted(tmp_path, LONG)
    metrics = run_dir / "metrics.jsonl"
    wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) > 20, 120, "training to start")
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
    wait_for(lambda: list((run_dir / "checkpoints").glob("step-*/trident.json")), 120, "the preemption checkpoint")
    log = finished_log(run_dir, job_id)
    assert "trident: preempted at step" in log and "resumed from" in log and "trident: done" in log
    assert losses(run_dir) == losses(long_local_run)


def test_scontrol_requeue_restarts_the_job_and_it_resumes_from_its_periodic_checkpoint(slurm_cluster, long_local_run,
                                                                                      tmp_path):
    """Preemption: submitit does not checkpoint on it; the restarted job finds its newest checkpoint itself."""
    run_dir, job_id = submitted(tmp_path, [*LONG, "checkpoint.every=20"])
    wait_for(lambda: list((run_dir / "checkpoints").glob("step-*/trident.json")), 120, "a periodic checkpoint")
    subprocess.run(["scontrol", "requeue", job_id], check=True)
    log = finished_log(run_dir, job_id)
    assert "resumed from" in log and "trident: done" in log
    # Steps after the resume point repeat the uninterrupted run exactly (the ones before it may be logged twice).
    assert losses(run_dir) == losses(long_local_run)
