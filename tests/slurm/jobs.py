"""What the slurm tests ask of a job: its state in sacct, its losses, and waiting for either."""

import json
import subprocess
import time
from pathlib import Path


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def job_state(job_id: str) -> str:
    """The job's state in sacct: its latest record (a job that lost a node has a RESIZING one before it)."""
    out = subprocess.run(["sacct", "-n", "-X", "-j", job_id, "-o", "State"], capture_output=True, text=True)
    return out.stdout.strip().split("\n")[-1].strip() if out.stdout.strip() else ""


def hosts(run_dir: Path) -> dict[int, str]:
    """Where each rank of the run's latest start ran: the host its ranks/rank-<r>.json names."""
    infos = [json.loads(p.read_text()) for p in (run_dir / "ranks").glob("rank-*.json") if ".hang" not in p.name]
    world = next(i["world"] for i in infos if i["rank"] == 0)  # a start with more ranks left files beyond it
    return {i["rank"]: i["host"] for i in infos if i["rank"] < world}


def wait_for(predicate, timeout_s: float, what: str, poll_s: float = 1.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    raise AssertionError(f"timed out waiting for {what}")
