"""Where a run's or a sweep's SLURM jobs stand: one row per run (the library behind `trident-status`).

For each run: its job id, SLURM's state (from sacct), the last logged step and
loss (from metrics.jsonl), what the sweep varied, rank 0's log, for a failed
run the failing rank's error and its log, and the evaluations of its
checkpoints (train.eval_tasks: pending, running, done with their results, or
failed with their error). A sweep dir's points are
its subdirs.
"""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

from omegaconf import OmegaConf

from orchestrator.runs.eval_files import evaluations


def run_dirs(path: Path) -> list[Path]:
    """The runs at `path`: itself, or its subdirs that are runs (a sweep), in point order."""
    if (path / "config.yaml").exists() or (path / "slurm_job.json").exists():
        return [path]
    if not path.is_dir():
        return []
    runs = [d for d in path.iterdir() if d.is_dir() and run_dirs(d) == [d]]
    return sorted(runs, key=lambda d: (not d.name.isdigit(), int(d.name) if d.name.isdigit() else 0, d.name))


def newest(roots=("multirun", "outputs")) -> Optional[Path]:
    """The most recent sweep or run under the default output roots."""
    found = [d for root in roots for d in Path(root).glob("*/*") if d.is_dir()]
    return max(found, key=lambda d: d.stat().st_mtime, default=None)


def _expand(job_id: str) -> list[str]:
    """sacct's pending array elements `12_[0-2,5%8]` -> 12_0, 12_1, 12_2, 12_5."""
    m = re.fullmatch(r"(\d+)_\[([^\]%]+)(?:%\d+)?\]", job_id)
    if not m:
        return [job_id]
    out = []
    for part in m.group(2).split(","):
        low, _, high = part.partition("-")
        out += [f"{m.group(1)}_{i}" for i in range(int(low), int(high or low) + 1)]
    return out


def job_states(job_ids: list[str]) -> dict[str, dict]:
    """SLURM's state and exit code of each job (array elements as `<array>_<index>`); {} without sacct."""
    if not job_ids or shutil.which("sacct") is None:
        return {}
    roots = sorted({j.split("_")[0] for j in job_ids})
    out = subprocess.run(["sacct", "-n", "-X", "-P", "-j", ",".join(roots), "-o", "JobID,State,ExitCode"],
                         capture_output=True, text=True, timeout=60)
    states = {}
    for line in out.stdout.splitlines():
        fields = line.split("|")
        if len(fields) == 3:
            for job_id in _expand(fields[0]):
                states[job_id] = {"state": fields[1].split()[0], "exit_code": fields[2]}
    # The controller's queue is current where the accounting database lags (a just-submitted array).
    if shutil.which("squeue"):
        queue = subprocess.run(["squeue", "-h", "-r", "-j", ",".join(roots), "-o", "%i|%T"],
                               capture_output=True, text=True, timeout=60)
        for line in queue.stdout.splitlines():
            job_id, _, state = line.partition("|")
            if job_id in job_ids:
                states[job_id] = {"state": state, "exit_code": states.get(job_id, {}).get("exit_code")}
    return states


def last_metrics(run_dir: Path) -> dict:
    """The last logged training row (step, loss) of a run, {} before its first."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "loss" in r]
    return rows[-1] if rows else {}


def first_failure(run_dir: Path) -> Optional[tuple[int, str]]:
    """(rank, last line of its traceback) of the rank that failed first; others often fail because of it."""
    files = sorted(run_dir.glob("failed-rank*.txt"), key=lambda p: p.stat().st_mtime)
    if not files:
        return None
    lines = [line for line in files[0].read_text().splitlines() if line.strip()]
    return int(re.search(r"(\d+)", files[0].stem).group(1)), lines[-1] if lines else "?"


def run_status(run_dir: Path, states: dict) -> dict:
    job = json.loads((run_dir / "slurm_job.json").read_text()) if (run_dir / "slurm_job.json").exists() else {}
    config = {}
    if (run_dir / "config.yaml").exists():
        config = OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"))
    last = last_metrics(run_dir)
    job_id = job.get("job_id")
    row = {
        "run_dir": str(run_dir),
        "job_id": job_id or "-",
        "state": states.get(job_id, {}).get("state", "UNKNOWN" if job_id else "-"),
        "exit_code": states.get(job_id, {}).get("exit_code"),
        "step": last.get("step"),
        "steps": config.get("train", {}).get("steps"),
        "loss": last.get("loss"),
        "overrides": (config.get("sweep") or {}).get("overrides", {}),
        "log": job.get("stdout"),
        "error": None,
        "error_log": None,
        "evals": evaluations(run_dir),  # train.eval_tasks' evaluations of its checkpoints
    }
    failure = first_failure(run_dir)
    if failure:
        rank, message = failure
        row["error"] = f"rank {rank}: {message}"
        if job.get("stderr"):
            row["error_log"] = re.sub(r"_0_log\.err$", f"_{rank}_log.err", job["stderr"])
    return row


def sweep_status(path: Path) -> list[dict]:
    runs = run_dirs(path)
    ids = []
    for d in runs:
        if (d / "slurm_job.json").exists():
            ids.append(json.loads((d / "slurm_job.json").read_text())["job_id"])
    states = job_states(ids)
    rows = [run_status(d, states) for d in runs]
    trials = search_trials(path)
    for row in rows:  # a search's trial: its state in the study (a pruned trial's job still COMPLETED)
        trial = trials.get(row["run_dir"])
        if trial:
            row["job_state"], row["state"] = row["state"], trial["state"]
            row["trial"], row["objective"] = trial["trial"], trial["objective"]
            row["error"] = row["error"] or trial["error"]
    return rows


def _study(path: Path):
    """The Optuna study a search keeps in its sweep dir (hydra/sweeper=trident-optuna) with the module that
    reads it, or (None, None) for a dir without one."""
    if not (Path(path) / "study.journal").exists():
        return None, None
    from orchestrator.search import report  # deferred: optuna is imported only for a search's dir

    return report.load_study(Path(path)), report


def search_trials(path: Path) -> dict[str, dict]:
    """A search's trials by run dir, else {}."""
    study, report = _study(path)
    return report.trial_rows(study) if study else {}


def search_summary(path: Path) -> list[str]:
    """A search's counts by state and its best trial, in a few lines; [] for a dir without a study."""
    study, report = _study(path)
    return report.summary_lines(study) if study else []


def print_table(rows: list[dict], out=sys.stdout) -> None:
    header = f"{'JOB':<10} {'STATE':<11} {'STEP':>11} {'LOSS':>8}  {'OVERRIDES':<32} LOG"
    print(header, file=out)
    for r in rows:
        step = f"{r['step']}/{r['steps']}" if r["step"] is not None else "-"
        loss = f"{r['loss']:.4f}" if r["loss"] is not None else "-"
        overrides = " ".join(f"{k}={v}" for k, v in r["overrides"].items()) or "-"
        print(f"{r['job_id']:<10} {r['state']:<11} {step:>11} {loss:>8}  {overrides:<32} {r['log'] or r['run_dir']}",
              file=out)
        if r["error"]:
            print(f"{'':<10} error: {r['error']}", file=out)
            print(f"{'':<10} log:   {r['error_log'] or r['run_dir']}", file=out)
        for e in r.get("evals", []):
            where = f" (job {e['job_id']})" if e.get("job_id") else ""
            said = " ".join(f"{k}={v:.4f}" for k, v in e["results"].items()) if e["results"] else \
                (e["error"] or "")
            print(f"{'':<10} eval step {e['step']:<6} {e['state']:<8}{where} {said}".rstrip(), file=out)
    out.flush()
