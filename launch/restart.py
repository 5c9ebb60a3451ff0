"""`python -m launch.restart MAX_RESTARTS STATUS`: the teardown of a SLURM job's batch script (launcher.max_restarts).

srun has ended with STATUS. If the run failed (a rank died, raised or hung:
any non-zero status) and did not stop itself on purpose (the run dir's
`fault.json`, orchestrator/train/faults.py), and the job has been requeued fewer
than MAX_RESTARTS times for failures, requeue it with `scontrol requeue`: the
job starts again from its own script, and the run resumes from its newest
checkpoint. The count lives beside submitit's files, per job id, so
preemption requeues (submitit's) do not spend it. Exits with STATUS, so a
job that is not requeued still ends FAILED.

A node lost (SLURM marks it down or not responding; the job runs with
`--no-kill`, so its batch script lives on to get here) is named. With
parallel=auto the requeued job asks only for the nodes that are left, and
the run plans its layout again for their ranks; a fixed layout keeps its
shape and waits for SLURM to find it other nodes.
"""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from launch.env import expand_hostlist


def job_folder(job_id: str) -> Path:
    """submitit's folder of this job: where its stdout goes (asked of slurmctld)."""
    out = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, timeout=60).stdout
    m = re.search(r"StdOut=(\S+)", out)
    return Path(m.group(1)).parent if m else Path.cwd()


def lost_nodes(nodelist: str) -> dict[str, str]:
    """The job's nodes that SLURM reports down, failing or not responding: {node: "state: reason"}."""
    if not nodelist:
        return {}
    out = subprocess.run(["sinfo", "-h", "-N", "-n", nodelist, "-o", "%N|%t|%E"], capture_output=True, text=True,
                         timeout=60).stdout
    return parse_lost(out)


def parse_lost(sinfo_out: str) -> dict[str, str]:
    """`sinfo -h -N -o "%N|%t|%E"` lines -> the nodes down, failing, drained or not responding (a `*`)."""
    lost = {}
    for line in sinfo_out.splitlines():
        node, state, reason = (line.split("|") + ["", ""])[:3]
        if state.startswith(("down", "fail", "drain")) or state.endswith("*"):
            lost[node] = f"{state}: {reason}" if reason and reason != "none" else state
    return lost


def run_info(folder: Path, job_id: str) -> dict:
    """What rank 0 wrote of the run at the job's start (launch/slurm.py): run_dir, relayout, tasks_per_node."""
    info = folder / f"trident-run-{job_id}.json"
    return json.loads(info.read_text()) if info.exists() else {}


def decide(max_restarts: int, status: int, job_id: str, folder: Path, started: float) -> tuple[bool, str]:
    """(requeue?, why) and, when requeueing, the restart counted."""
    if status == 0:
        return False, "srun succeeded"
    run = run_info(folder, job_id)
    run_dir = Path(run["run_dir"]) if run else None
    fault = run_dir / "fault.json" if run_dir else None
    if fault is not None and fault.exists() and fault.stat().st_mtime >= started - 1:
        if not json.loads(fault.read_text()).get("restart", True):
            return False, f"the run stopped itself: {json.loads(fault.read_text())['message']}"
    counter = folder / f"trident-restarts-{job_id}.json"
    done = json.loads(counter.read_text())["restarts"] if counter.exists() else 0
    if done >= max_restarts:
        return False, f"launcher.max_restarts={max_restarts} restarts already done"
    return True, f"restart {done + 1} of launcher.max_restarts={max_restarts}"


def main(argv: list[str]) -> int:
    max_restarts, status = int(argv[0]), int(argv[1])
    job_id = os.environ.get("SLURM_JOB_ID", "")
    started = float(os.environ.get("TRIDENT_JOB_STARTED", "0"))
    folder = job_folder(job_id)
    requeue, why = decide(max_restarts, status, job_id, folder, started)
    job_nodes = expand_hostlist(os.environ.get("SLURM_JOB_NODELIST", ""))
    lost = lost_nodes(",".join(job_nodes)) if status else {}
    if lost:
        print(f"trident: lost node(s) of job {job_id}: " + "; ".join(f"{n} ({why_})" for n, why_ in lost.items()),
              file=sys.stderr, flush=True)
    if not requeue:
        if status:
            print(f"trident: srun ended with status {status}; not requeued: {why}", file=sys.stderr, flush=True)
        return status
    # Counted and said before the requeue: SLURM ends this script as it requeues the job.
    counter = folder / f"trident-restarts-{job_id}.json"
    before = counter.read_text() if counter.exists() else None
    history = json.loads(before)["history"] if before else []
    history.append({"time": time.time(), "status": status})
    counter.write_text(json.dumps({"restarts": len(history), "history": history}))
    print(f"trident: srun ended with status {status}; requeueing job {job_id} ({why}); it resumes from its newest "
          "checkpoint", file=sys.stderr, flush=True)
    run = run_info(folder, job_id)
    left = [n for n in job_nodes if n not in lost]
    if lost and left and run.get("relayout"):
        tasks = int(run["tasks_per_node"])
        print(f"trident: without {', '.join(lost)} the job runs on the {len(left)} node(s) left ({', '.join(left)}) "
              f"x {tasks} task(s): parallel=auto plans the layout again for {len(left) * tasks} rank(s)",
              file=sys.stderr, flush=True)
    done = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        if before is None:
            counter.unlink()
        else:
            counter.write_text(before)
        print(f"trident: `scontrol requeue {job_id}` failed: {done.stderr.strip()}", file=sys.stderr, flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
