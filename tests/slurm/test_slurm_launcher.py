"""launcher=slurm against the real local SLURM cluster: a submitted job trains exactly like a local run."""

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT, TINY, run_train

pytestmark = pytest.mark.slurm


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


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
    script = ROOT / "launch/slurm/sbatch_template.sh"
    out = subprocess.run(
        ["sbatch", "--wait", "--parsable", f"--output={tmp_path}/%j.out", str(script), *LAYOUT],
        cwd=ROOT, env={**os.environ, "TRIDENT_RUN_DIR": str(tmp_path / "run")},
        capture_output=True, text=True, timeout=300,
    )
    log = "\n".join(p.read_text() for p in tmp_path.glob("*.out"))
    assert out.returncode == 0, out.stderr + log[-3000:]
    assert losses(tmp_path / "run") == losses(local_run)


def test_without_wait_the_command_returns_once_the_job_is_queued(slurm_cluster, tmp_path):
    out = run_train(f"hydra.run.dir={tmp_path / 'nowait'}", *TINY, "parallel.dp=2", "train.steps=2",
                    "launcher=slurm", timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    assert re.search(r"submitted SLURM job \d+", out.stdout) and "trident: done" not in out.stdout
