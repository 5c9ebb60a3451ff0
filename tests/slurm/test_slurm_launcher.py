"""launcher=slurm against the real local SLURM cluster: a submitted job trains exactly like a local run."""

import json
import re
from pathlib import Path

import pytest

from tests.conftest import TINY, run_train

pytestmark = pytest.mark.slurm


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_a_4_task_slurm_job_trains_like_the_local_launcher(slurm_cluster, tmp_path):
    layout = [*TINY, "parallel.tp=2", "parallel.pp=1", "parallel.dp=2", "train.steps=4"]
    local = run_train(f"hydra.run.dir={tmp_path / 'local'}", *layout)
    assert local.returncode == 0, local.stderr[-2000:]
    out = run_train(f"hydra.run.dir={tmp_path / 'slurm'}", *layout, "launcher=slurm", "launcher.wait=true")
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    job_id = re.search(r"submitted SLURM job (\d+) \(1 node\(s\) x 4 task\(s\)\)", out.stdout).group(1)
    assert f"{job_id}_0_log.out" in out.stdout and "trident: done" in out.stdout  # rank 0's log, streamed
    assert losses(tmp_path / "slurm") == losses(tmp_path / "local")
    assert len(losses(tmp_path / "local")) == 4


def test_without_wait_the_command_returns_once_the_job_is_queued(slurm_cluster, tmp_path):
    out = run_train(f"hydra.run.dir={tmp_path / 'nowait'}", *TINY, "parallel.dp=2", "train.steps=2",
                    "launcher=slurm", timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    assert re.search(r"submitted SLURM job \d+", out.stdout) and "trident: done" not in out.stdout
