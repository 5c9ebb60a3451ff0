"""On the real local cluster: -m sweeps as job arrays, failing ranks, trident-status, checks before submitting."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.runs.wandb_files import read_run
from tests.conftest import ROOT, TINY, crash_rank_env, run_cmd, run_train
from tests.slurm.jobs import job_state, losses, wait_for

pytestmark = pytest.mark.slurm

SECRET = "trident-test-secret-0f9e8d7c"


def status(path: Path) -> list[dict]:
    out = run_cmd([sys.executable, "-m", "orchestrator.cli.status", "--json", str(path)])
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_a_3_point_sweep_is_one_array_that_returns_once_queued_with_3_wandb_runs_in_one_group(
        slurm_cluster, tmp_path):
    sweep_dir = tmp_path / "sweep"
    # One element at a time (%1): when the command returns, the later points cannot have run yet.
    out = run_train("-m", f"hydra.sweep.dir={sweep_dir}", *TINY, "parallel.dp=2", "train.steps=3", "launcher=slurm",
                    "launcher.array_parallelism=1", "logging.wandb.mode=offline", "logging.wandb.plan=false", "optim.lr=1e-3,2e-3,3e-3",
                    env={"WANDB_API_KEY": SECRET})
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    array = re.search(r"submitted SLURM array (\d+): 3 point\(s\), 2 task\(s\) each, at most 1 at once", out.stdout)
    assert array, out.stdout
    ids = [f"{array.group(1)}_{i}" for i in range(3)]
    queued = status(sweep_dir)  # sacct names pending elements as a range, 3_[1-2%1]: trident-status expands it
    assert [r["job_id"] for r in queued] == ids
    assert queued[2]["state"] == "PENDING", "the command returned only after the sweep ran"
    assert "#SBATCH --array=0-2%1" in (sweep_dir / "slurm" / f"{array.group(1)}_submission.sh").read_text()

    wait_for(lambda: all(job_state(j) == "COMPLETED" for j in ids), 240, "the array to complete")
    rows = status(sweep_dir)
    assert [(r["job_id"], r["state"], r["step"], r["steps"]) for r in rows] == [(j, "COMPLETED", 3, 3) for j in ids]
    assert [r["overrides"] for r in rows] == [{"optim.lr": v} for v in ("0.001", "0.002", "0.003")]
    assert [r["loss"] for r in rows] == [losses(sweep_dir / str(i))[3] for i in range(3)]
    assert rows[0]["log"] == str(sweep_dir / "slurm" / f"{ids[0]}_0_log.out")

    runs = [read_run(str(next((sweep_dir / str(i) / "wandb").glob("offline-run-*")))) for i in range(3)]
    group = f"sweep-{tmp_path.name}-sweep"
    assert [r["group"] for r in runs] == [group] * 3
    assert [r["config"]["optim"]["lr"] for r in runs] == [1e-3, 2e-3, 3e-3]
    assert [r["config"]["sweep"]["overrides"] for r in runs] == [r["overrides"] for r in rows]
    assert len({r["name"] for r in runs}) == 3
    assert [r["history"][-1]["loss"] for r in runs] == [r["loss"] for r in rows]

    # The key was in the submitting environment: it reached no script, pickle, log or run file.
    leaked = [p for p in sweep_dir.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert leaked == []


def test_a_crashing_rank_0_or_1_fails_the_job_once_with_its_error_in_trident_status_and_the_log(slurm_cluster,
                                                                                             tmp_path):
    layout = [*TINY, "parallel.dp=2", "train.steps=3", "launcher=slurm"]
    # Rank 1's job is queued without waiting; rank 0's is followed (launcher.wait=true) meanwhile.
    other = run_train(f"hydra.run.dir={tmp_path / 'rank1'}", *layout, env=crash_rank_env(1), timeout=60)
    assert other.returncode == 0, other.stderr[-2000:]
    first = run_train(f"hydra.run.dir={tmp_path / 'rank0'}", *layout, "launcher.wait=true",
                      env=crash_rank_env(0), timeout=240)
    assert first.returncode == 1, first.stdout[-2000:] + first.stderr[-2000:]
    assert "trident: training failed: SLURM job" in first.stderr and "rank 0 fails on purpose" in first.stderr
    for rank in (0, 1):
        run_dir = tmp_path / f"rank{rank}"
        job_id = json.loads((run_dir / "slurm_job.json").read_text())["job_id"]
        wait_for(lambda: job_state(job_id) in ("FAILED", "COMPLETED", "CANCELLED"), 120, "the job to end")
        [row] = status(run_dir)
        assert row["state"] == "FAILED" and row["step"] is None
        assert row["error"] == f"rank {rank}: RuntimeError: TRIDENT_TEST_CRASH_RANK={rank}: rank {rank} fails on purpose"
        assert row["error_log"] == str(run_dir / "slurm" / f"{job_id}_{rank}_log.err")
        assert "fails on purpose" in Path(row["error_log"]).read_text()
        # Not requeued: SLURM ran it exactly once.
        runs = subprocess.run(["sacct", "-n", "-X", "-D", "-j", job_id, "-o", "State"], capture_output=True, text=True)
        assert runs.stdout.split() == ["FAILED"]
    table = run_cmd([sys.executable, "-m", "orchestrator.cli.status", str(tmp_path / "rank1")]).stdout
    assert "FAILED" in table and "error: rank 1: RuntimeError" in table and "_1_log.err" in table


def test_an_unknown_partition_is_refused_before_anything_is_submitted(slurm_cluster, tmp_path):
    out = run_train(f"hydra.run.dir={tmp_path}", *TINY, "launcher=slurm", "launcher.partition=nope", timeout=60)
    assert out.returncode == 2
    assert "launcher.partition='nope' is not a partition of this cluster (valid: debug)" in out.stderr
    assert not (tmp_path / "slurm").exists() and not (tmp_path / "slurm_job.json").exists()


def test_a_sweep_with_one_invalid_point_submits_none_of_them(slurm_cluster, tmp_path):
    out = run_train("-m", f"hydra.sweep.dir={tmp_path}", *TINY, "launcher=slurm", "parallel.dp=2,3", timeout=120)
    assert out.returncode == 2
    assert "config error: parallel.dp=3 with train.micro_batch=2 does not divide train.global_batch=8" in out.stderr
    assert "submitted" not in out.stdout and not (tmp_path / "slurm").exists()


def test_a_waiting_sweep_exits_1_exactly_when_a_point_failed_and_0_when_all_completed(slurm_cluster, tmp_path):
    """launcher.wait=true judges each point by submitit's results, not sacct's lagging state, and says so by exit code."""
    common = [*TINY, "train.steps=3", "launcher=slurm", "launcher.wait=true", "logging.wandb.mode=disabled"]
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "SLURM_PROCID")}
    cmd = [sys.executable, "-m", "orchestrator.cli.train", "-m"]
    # Rank 1 fails on purpose: only the dp=2 point has one. Both sweeps run at once on the cluster.
    bad = subprocess.Popen([*cmd, f"hydra.sweep.dir={tmp_path / 'bad'}", *common, "parallel.dp=1,2"], cwd=ROOT,
                           env={**base, **crash_rank_env(1)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    good = subprocess.Popen([*cmd, f"hydra.sweep.dir={tmp_path / 'good'}", *common, "parallel.dp=2",
                             "optim.lr=1e-3,2e-3"], cwd=ROOT, env=base, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    bad_out, bad_err = bad.communicate(timeout=300)
    good_out, good_err = good.communicate(timeout=300)

    assert bad.returncode == 1, bad_out[-2000:] + bad_err[-2000:]
    assert "trident: sweep failed: 1 point(s) did not complete" in bad_err
    assert "rank 1 fails on purpose" in bad_out
    table = [line.split() for line in bad_out.splitlines() if re.match(r"\d+(_\d+)? +[A-Z]+ ", line)]
    assert [row[1] for row in table[-2:]] == ["COMPLETED", "FAILED"], bad_out
    assert not (tmp_path / "bad" / "0" / "failed-rank0.txt").exists()
    assert "fails on purpose" in (tmp_path / "bad" / "1" / "failed-rank1.txt").read_text()

    assert good.returncode == 0, good_out[-2000:] + good_err[-2000:]
    table = [line.split() for line in good_out.splitlines() if re.match(r"\d+(_\d+)? +[A-Z]+ ", line)]
    assert [(row[1], row[2]) for row in table[-2:]] == [("COMPLETED", "3/3")] * 2, good_out
    assert "failed" not in good_out + good_err
