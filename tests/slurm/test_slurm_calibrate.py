"""`trident-plan --calibrate launcher=slurm` against the real local SLURM cluster: the ranks are one job's tasks."""

import sys

import pytest
import yaml

from tests.conftest import TINY, run_cmd

pytestmark = pytest.mark.slurm

SMALL = ["calibrate.sizes_kib=[4,64]", "calibrate.seconds_per_point=0.01", "calibrate.max_reps=3",
         "calibrate.microbatches=[1]", "train.seq_len=32", "train.global_batch=4",
         *[o for o in TINY if not o.startswith("parallel.")]]


def test_a_calibration_on_2_nodes_measures_the_link_between_them_apart_and_writes_the_cluster_file(slurm_cluster,
                                                                                                 tmp_path):
    target = tmp_path / "slurm-cluster.yaml"
    out = run_cmd([sys.executable, "-m", "orchestrator.cli.plan", "--calibrate", "--calibrate-out", str(target),
                   "launcher=slurm", "launcher.nodes=2", "launcher.tasks_per_node=2", f"launcher.folder={tmp_path}",
                   "calibrate.name=slurm-test", f"checkpoint.dir={tmp_path}", *SMALL], timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "calibration submitted as SLURM job" in out.stdout and "(2 node(s) x 2 task(s))" in out.stdout
    doc = yaml.safe_load(target.read_text())
    assert doc["gpus"] == 4 and doc["gpus_per_node"] == 2
    # Within a node (ranks 0-1, 2-3) and across the bridge (ranks 0-2, 1-3), each fitted on its own.
    links = doc["collectives"]
    assert sorted(links["intra"]["all_reduce"]) == [2] and sorted(links["inter"]["all_reduce"]) == [2]
    assert "# the same across nodes (measured)" in target.read_text()
    assert doc["inter_node_gbps"] > 0 and doc["inter_node_latency_us"] > 0


def test_a_calibration_job_that_fails_says_so_in_one_line_and_writes_nothing(slurm_cluster, tmp_path):
    target = tmp_path / "never.yaml"
    # The job's setup line fails before srun starts a task: the job ends FAILED without a result.
    out = run_cmd([sys.executable, "-m", "orchestrator.cli.plan", "--calibrate", "--calibrate-out", str(target),
                   "launcher=slurm", "launcher.nodes=1", "launcher.tasks_per_node=2", f"launcher.folder={tmp_path}",
                   "launcher.setup=[exit 3]", f"checkpoint.dir={tmp_path}", *SMALL], timeout=300)
    assert out.returncode == 1 and not target.exists()
    errors = out.stderr.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith("trident-plan: calibration failed, nothing written: SLURM job "), \
        out.stderr[-2000:]
