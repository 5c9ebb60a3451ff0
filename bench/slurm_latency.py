"""SLURM round trips on the local cluster: start-up, submit to first step, and USR2 preemption to the resumed step.

Starts the project's single-machine cluster (launch/cluster/start-cluster.sh
--nodes N, with the fast-requeue settings the tests use unless --stock),
submits a tiny run with launcher=slurm (dp=2 on one node; with --nodes 2,
dp=4 as 2 nodes x 2 tasks, across the nodes' network namespaces), and times
from the file system what a user sees: when `trident-train` returns, when
the first step is logged, and after `scancel --signal=USR2` when the
requeued job logs its first step again. Prints one JSON object. Needs root
(the cluster script installs and starts the daemons).

    .venv/bin/python bench/slurm_latency.py [--nodes 2] [--stock]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TINY = ["parallel.tp=1", "parallel.pp=1", "model.dim=32", "model.n_layers=2", "model.n_heads=8",
        "model.n_kv_heads=4", "model.multiple_of=16", "train.seq_len=32", "train.global_batch=8",
        "train.micro_batch=2", "train.eval_every=0", "train.eval_sequences=8", "logging.wandb.mode=disabled",
        "train.steps=100000", "logging.every=1"]


def rows(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def wait(predicate, timeout_s: float = 600, poll_s: float = 0.1) -> float:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return time.monotonic()
        time.sleep(poll_s)
    raise TimeoutError


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stock", action="store_true", help="SLURM's default requeue hold (cred_expire 120 s)")
    parser.add_argument("--nodes", type=int, default=1, help="nodes of the cluster and of the job (2 tasks each)")
    args = parser.parse_args()
    cluster = {"SLURM_BASE": "/tmp/trident-bench-slurm", "SLURM_PORT_BASE": "6937", "SLURM_DB_PORT": "13426"}
    if not args.stock:
        cluster |= {"SLURM_CRED_EXPIRE": "10", "SLURM_EXTRA_CONF": "SchedulerParameters=sched_interval=2,bf_interval=2"}
    env = {**os.environ, **cluster}
    t_start = time.monotonic()
    subprocess.run(["bash", str(ROOT / "launch/cluster/start-cluster.sh"), "--nodes", str(args.nodes)], env=env,
                   check=True, capture_output=True)
    started_s = time.monotonic() - t_start
    shape = ([f"parallel.dp={2 * args.nodes}", f"launcher.nodes={args.nodes}", "launcher.tasks_per_node=2"]
             if args.nodes > 1 else ["parallel.dp=2"])
    env["SLURM_CONF"] = f"{cluster['SLURM_BASE']}/etc/slurm.conf"
    run_dir = Path(tempfile.mkdtemp(prefix="trident-bench-")) / "run"
    metrics = run_dir / "metrics.jsonl"
    try:
        t0 = time.monotonic()
        out = subprocess.run([sys.executable, "-m", "orchestrator.cli.train", f"hydra.run.dir={run_dir}", *TINY,
                              "launcher=slurm", *shape], cwd=ROOT, env=env, capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(f"trident-train failed:\n{out.stdout[-2000:]}{out.stderr[-2000:]}")
        t_queued = time.monotonic()
        job_id = json.loads((run_dir / "slurm_job.json").read_text())["job_id"]
        t_first = wait(lambda: rows(metrics) >= 1)
        wait(lambda: rows(metrics) >= 20)
        t_signal = time.monotonic()
        subprocess.run(["scancel", "--signal=USR2", job_id], env=env, check=True)
        log = Path(json.loads((run_dir / "slurm_job.json").read_text())["stdout"])
        t_saved = wait(lambda: "trident: preempted at step" in log.read_text())
        t_resumed = wait(lambda: "resumed from" in log.read_text())
        at_resume = rows(metrics)
        t_step = wait(lambda: rows(metrics) > at_resume)
        print(json.dumps({
            "cluster": "stock requeue hold" if args.stock else "SLURM_CRED_EXPIRE=10, sched_interval=2",
            "nodes": args.nodes, "cluster_start_s": round(started_s, 2),
            "submit_command_s": round(t_queued - t0, 2),
            "submit_to_first_step_s": round(t_first - t0, 2),
            "usr2_to_checkpoint_saved_s": round(t_saved - t_signal, 2),
            "usr2_to_resumed_s": round(t_resumed - t_signal, 2),
            "usr2_to_first_resumed_step_s": round(t_step - t_signal, 2),
            "job": job_id, "submit_output": out.stdout.splitlines()[0],
        }, indent=1))
    finally:
        if (run_dir / "slurm_job.json").exists():
            job = json.loads((run_dir / "slurm_job.json").read_text())["job_id"]
            subprocess.run(["scancel", "--full", job], env=env)
        subprocess.run(["bash", str(ROOT / "launch/cluster/stop-cluster.sh"), "--clean"], env=env, capture_output=True)


if __name__ == "__main__":
    main()
