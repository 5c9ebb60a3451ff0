"""Two nodes for real: jobs across node1 and node2 of the tier's cluster, each a network namespace with its own
address, hostname and slurmd (launch/cluster/start-cluster.sh --nodes 2). What runs here crosses a real network."""

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from orchestrator.runs.checkpoint import complete_checkpoints, read_marker
from parallel.mesh import ParallelDims
from tests.conftest import ROOT, TINY, fault_env, run_train
from tests.slurm.conftest import CLUSTER_ENV
from tests.slurm.jobs import hosts, job_state, losses, wait_for

pytestmark = pytest.mark.slurm

TWO = ["launcher=slurm", "launcher.nodes=2", "launcher.tasks_per_node=2"]
# tp=2 x dp=2 for 80 steps (~0.25 s each here): long enough to preempt; one local run of 4 processes is the
# reference for both tests.
TP_DP = [*TINY, "parallel.tp=2", "parallel.dp=2", "train.steps=80", "train.eval_every=0", "logging.every=1"]
TOL = 1e-5  # fp32 sums in another order (TP shards, pipeline stages): the layout-independence tolerance


@pytest.fixture(scope="module")
def local_tp_dp(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("local") / "run"
    out = run_train(f"hydra.run.dir={run_dir}", *TP_DP)
    assert out.returncode == 0, out.stderr[-2000:]
    return run_dir


def node(action: str, name: str) -> None:
    """launch/cluster/node.sh: lose or revive a node of the tier's cluster."""
    out = subprocess.run(["bash", str(ROOT / "launch/cluster/node.sh"), action, name], env={**os.environ, **CLUSTER_ENV},
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr


def ended(job_id: str, timeout_s: float = 300) -> str:
    return wait_for(lambda: job_state(job_id) if job_state(job_id) in ("COMPLETED", "FAILED", "CANCELLED") else "",
                    timeout_s, f"job {job_id} to end")


def submit(run_dir: Path, *overrides: str, env=None) -> str:
    out = run_train(f"hydra.run.dir={run_dir}", *overrides, timeout=120, env=env)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    return re.search(r"submitted SLURM job (\d+)", out.stdout).group(1)


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.endswith("}")]


def test_tp2_dp2_on_2_nodes_x_2_tasks_equals_4_local_processes_with_each_tp_group_inside_a_node(slurm_cluster,
                                                                                             local_tp_dp, tmp_path):
    run_dir = tmp_path / "two"
    out = run_train(f"hydra.run.dir={run_dir}", *TP_DP, *TWO, "launcher.wait=true", timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert re.search(r"submitted SLURM job \d+ \(2 node\(s\) x 2 task\(s\)\)", out.stdout)
    got, ref = losses(run_dir), losses(local_tp_dp)
    assert sorted(got) == list(range(1, 81))
    for step in got:
        assert got[step] == pytest.approx(ref[step], rel=TOL, abs=0), step
    # Ranks fill the nodes in order; the rendezvous is node1's; each rank's gloo left through its own node's eth0.
    placed = hosts(run_dir)
    assert placed == {0: "node1", 1: "node1", 2: "node2", 3: "node2"}
    infos = [json.loads((run_dir / "ranks" / f"rank-{r}.json").read_text()) for r in range(4)]
    assert {i["interface"] for i in infos} == {"eth0"}
    dims = ParallelDims(tp=2, pp=1, dp=2)
    for r in range(4):
        same_tp = [q for q in range(4) if {k: v for k, v in dims.coords(q).items() if k != "tp"}
                   == {k: v for k, v in dims.coords(r).items() if k != "tp"}]
        assert len(same_tp) == 2 and {placed[q] for q in same_tp} == {placed[r]}, (r, same_tp)


def test_tp2_pp2_with_the_pipeline_across_the_2_nodes_equals_one_process(slurm_cluster, tmp_path):
    layout = [*TINY, "train.steps=6", "train.eval_every=3"]
    one = run_train(f"hydra.run.dir={tmp_path / 'one'}", *layout, "parallel.dp=1")
    assert one.returncode == 0, one.stderr[-2000:]
    job = submit(tmp_path / "two", *layout, "parallel.tp=2", "parallel.pp=2", "parallel.dp=1", *TWO)
    assert ended(job) == "COMPLETED", (tmp_path / "two" / "slurm" / f"{job}_0_log.err").read_text()[-3000:]
    got, ref = losses(tmp_path / "two"), losses(tmp_path / "one")
    assert sorted(got) == sorted(ref) == list(range(1, 7))
    for step in got:
        assert got[step] == pytest.approx(ref[step], rel=TOL, abs=0), step
    evals = lambda d: [r["eval_loss"] for r in rows(d) if "eval_loss" in r]  # noqa: E731
    assert evals(tmp_path / "two") == pytest.approx(evals(tmp_path / "one"), rel=TOL, abs=0)
    # pp outermost: stage 0 (ranks 0, 1) on node1, stage 1 (ranks 2, 3) on node2
    assert hosts(tmp_path / "two") == {0: "node1", 1: "node1", 2: "node2", 3: "node2"}


def test_usr2_on_a_2_node_job_checkpoints_requeues_and_resumes_exactly(slurm_cluster, local_tp_dp, tmp_path):
    run_dir = tmp_path / "slurm"
    job = submit(run_dir, *TP_DP, *TWO)
    metrics = run_dir / "metrics.jsonl"
    wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) > 5, 180, "training to start")
    subprocess.run(["scancel", "--signal=USR2", job], check=True)
    assert ended(job) == "COMPLETED"
    log = (run_dir / "slurm" / f"{job}_0_log.out").read_text()
    assert "trident: preempted at step" in log and "resumed from" in log and "trident: done" in log
    assert losses(run_dir) == losses(local_tp_dp)  # bit for bit: the same layout, resumed exactly
    assert hosts(run_dir) == {0: "node1", 1: "node1", 2: "node2", 3: "node2"}


def test_a_hung_rank_on_node2_is_named_with_its_host_and_every_rank_leaves_its_stacks(slurm_cluster, tmp_path):
    run_dir = tmp_path / "hung"
    # Rank 3 (on node2) sleeps in every step, far past the 5 s step deadline: a rank stuck in Python.
    job = submit(run_dir, *TINY, "parallel.tp=2", "parallel.dp=2", "train.steps=20", "train.step_timeout_s=5",
                 *TWO, env=fault_env(TRIDENT_TEST_SLOW="3:120"))
    assert ended(job) == "FAILED"
    err = (run_dir / "slurm" / f"{job}_0_log.err").read_text()
    report = (run_dir / "hang.txt").read_text()
    first = report.splitlines()[0]
    assert re.fullmatch(r"the run hung after step \d+: rank\(s\) 3 did not reach the step boundary within "
                        r"train.step_timeout_s=5s? \(on node2\)", first), report
    assert f"trident: {first}" in err  # the one line, in rank 0's error log
    assert re.search(r"rank 3 \(pid \d+, node2\) was still in", report), report
    for r in range(4):
        stacks = (run_dir / "ranks" / f"rank-{r}.stacks").read_text()
        assert f"--- rank {r} (pid" in stacks and "trainer.py" in stacks, r
        assert json.loads((run_dir / "ranks" / f"rank-{r}.hang.json").read_text())["host"] == ("node1", "node2")[r // 2]


def past_a_checkpoint(run_dir: Path) -> bool:
    """A step after the newest complete checkpoint is logged: losing a node now repeats at least one step."""
    done = complete_checkpoints(str(run_dir / "checkpoints"))
    return bool(done) and (run_dir / "metrics.jsonl").exists() and \
        max((r.get("step", 0) for r in rows(run_dir)), default=0) > read_marker(done[-1])["step"]


def test_a_lost_node_requeues_a_parallel_auto_job_onto_the_node_left_planned_again_on_the_same_curve(
        slurm_cluster, tmp_path):
    run_dir = tmp_path / "auto"
    job = submit(run_dir, *TINY, "parallel=auto", "train.steps=400", "train.eval_every=0", "checkpoint.every=20",
                 *TWO, "launcher.max_restarts=1")
    try:
        wait_for(lambda: past_a_checkpoint(run_dir), 180, "a step logged after a checkpoint", poll_s=0.1)
        assert hosts(run_dir) == {0: "node1", 1: "node1", 2: "node2", 3: "node2"}
        lost_at = time.monotonic()
        node("lose", "node2")  # slurmd, the job's step daemon and ranks 2 and 3: the machine is gone
        assert ended(job, timeout_s=400) == "COMPLETED"
        recovered_s = time.monotonic() - lost_at
    finally:
        node("revive", "node2")
    err = (run_dir / "slurm" / f"{job}_0_log.err").read_text()
    log = (run_dir / "slurm" / f"{job}_0_log.out").read_text()
    assert re.search(r"trident: lost node\(s\) of job \d+: node2 \(down", err), err[-3000:]
    assert "without node2 the job runs on the 1 node(s) left (node1) x 2 task(s)" in err
    assert "trident: parallel=auto: 2 rank(s) -> " in log and "trident: done, 400 steps" in log
    assert hosts(run_dir) == {0: "node1", 1: "node1"}
    # The first start logged steps 1..k at 4 ranks; the second resumed from its checkpoint at 2 ranks. The steps
    # logged twice agree within the layout tolerance, and the second start went on to the end.
    resumed_at = int(re.search(r"resumed from \S+ at step (\d+)", log).group(1))
    logged = [r for r in rows(run_dir) if "loss" in r]
    second = logged[len(logged) - (400 - resumed_at):]
    first = logged[:len(logged) - len(second)]
    assert [r["step"] for r in second] == list(range(resumed_at + 1, 401))
    assert [r["step"] for r in first] == list(range(1, len(first) + 1)) and len(first) > resumed_at >= 20
    for again in second[:len(first) - resumed_at]:
        assert again["loss"] == pytest.approx(first[again["step"] - 1]["loss"], rel=TOL, abs=0), again["step"]
    print(f"node lost -> job completed on node1 in {recovered_s:.0f}s")
