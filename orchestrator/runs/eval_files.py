"""What a run's evaluations leave in its run dir (orchestrator/evaluate/beside.py writes them; trident-status reads them),
and the lock that says a training run is live in it.

- evals.json: each evaluated checkpoint's evaluation by step: its state (pending, running, done, failed),
  where it runs (a local child's pid, a SLURM job's id), its log, its error, and the metrics row that carried
  its results (logged_at);
- evals.jsonl: trident-eval's results, one line per task, metric and checkpoint step (appended).
"""

import fcntl
import json
import os
import time
from pathlib import Path
from typing import Optional

STATE = "evals.json"
RESULTS = "evals.jsonl"
LIVE = ".live.lock"  # flock'ed by a training run's logging rank while it runs


_HELD: dict[str, int] = {}  # run dir -> this process's descriptor of its live lock


def hold_live(run_dir, wait_s: float = 0.0, for_good: bool = False) -> Optional[int]:
    """The run's live lock: a training run's logging rank holds it while it runs (for_good: till its process
    ends), so that trident-eval by hand knows the run logs the results itself. The descriptor (the lock lasts
    while it is open, or its process), or None where another process still holds it after wait_s. Where this
    process holds it for good already (a second Trainer of the run in one process, as tests build), a
    duplicate of its descriptor."""
    key = os.path.realpath(run_dir)
    if key in _HELD:
        return os.dup(_HELD[key])
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    fd = os.open(Path(run_dir) / LIVE, os.O_CREAT | os.O_RDWR, 0o644)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if for_good:
                _HELD[key] = fd
            return fd
        except BlockingIOError:
            if time.monotonic() >= deadline:
                os.close(fd)
                return None
            time.sleep(0.2)


def read_state(run_dir) -> dict[int, dict]:
    try:
        return {int(k): v for k, v in json.loads((Path(run_dir) / STATE).read_text()).items()}
    except (OSError, ValueError):
        return {}


def write_state(run_dir, state: dict[int, dict]) -> None:
    path = Path(run_dir) / STATE
    tmp = path.with_name(f"{STATE}.tmp{os.getpid()}")
    tmp.write_text(json.dumps({str(k): v for k, v in sorted(state.items())}, indent=1))
    os.replace(tmp, path)


def read_results(run_dir) -> list[dict]:
    rows = []
    try:
        lines = (Path(run_dir) / RESULTS).read_text().splitlines()
    except OSError:
        return rows
    for line in lines:
        try:
            rows.append(json.loads(line))
        except ValueError:  # a line cut short by a killed evaluation
            continue
    return rows


def metric_key(row: dict) -> str:
    """eval/<task>/<metric>, and /<filter> for a filter other than lm-eval's `none`."""
    filt = row.get("filter") or "none"
    return f"eval/{row['task']}/{row['metric']}" + (f"/{filt}" if filt != "none" else "")


def alive(pid) -> bool:
    """Whether a process of this machine still runs."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def evaluations(run_dir) -> list[dict]:
    """A run's evaluations, oldest checkpoint first: {step, state, where, error, log, results: {metric key:
    value}} (the results of its newest evaluation). A local one whose process is gone without a word is `lost`
    (the run's next attempt takes it up)."""
    results = read_results(run_dir)
    out = []
    for step, entry in sorted(read_state(run_dir).items()):
        state = entry["state"]
        if state == "running" and entry.get("where") == "local" and not alive(entry.get("pid")):
            state = "lost"
        mine = [r for r in results[entry.get("offset", 0):] if r.get("step") == step] if state == "done" else []
        out.append({"step": step, "state": state, "where": entry.get("where"), "job_id": entry.get("job_id"),
                    "error": entry.get("error"), "log": entry.get("log"),
                    "results": {metric_key(r)[len("eval/"):]: r["value"] for r in mine}})
    return out
