"""A trident-train run as a child process: how a search's trials and the planner's layout tuning run.

Locally the child is the run (it spawns the ranks and ends with them). With
launcher=slurm the child checks and submits the run's job and returns; the job
is then followed here through submitit's own result files (the run dir's
`slurm_job.json` names it), never through sacct's lagging state. Either way a
run is started, polled (`poll()`: None while it runs, then its `Outcome`),
asked to stop (`stop()`: the STOP file the loop sees at its next step
boundary, where it saves a checkpoint and ends cleanly), and its metrics are
read as they are written (`new_rows()`).
"""

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from omegaconf import OmegaConf

from launch.slurm import error_line, job_error
from orchestrator.train.trainer import STOP_FILE

TRAIN = [sys.executable, "-m", "orchestrator.cli.train"]  # the trident-train entry point, run as a module
LOG = "run.log"  # the child's stdout and stderr, in the run dir


@dataclass
class Outcome:
    ok: bool
    error: Optional[str] = None  # one line: what went wrong
    exit_code: Optional[int] = None


def last_error(text: str) -> str:
    """The line of a run's log that says why it failed: trident's own message, else the last traceback line."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for prefix in ("trident: config error:", "trident: training failed:"):
        found = [line for line in lines if line.startswith(prefix)]
        if found:
            message = found[-1]
            # "training failed: rank 0 failed:" is followed by the traceback: its last line says what.
            tail = [line for line in lines[lines.index(message) + 1:] if not line.startswith("trident:")]
            return message if prefix.endswith("config error:") or not tail else f"{message} {tail[-1]}"
    return lines[-1] if lines else "no output"


class RunProcess:
    def __init__(self, run_dir: Path, overrides: list[str], env: Optional[dict] = None, slurm: bool = False):
        self.run_dir, self.overrides, self.slurm = Path(run_dir), list(overrides), slurm
        self.env = {**os.environ, **(env or {})}
        self.proc: Optional[subprocess.Popen] = None
        self.job = None  # the submitit job, once a launcher=slurm child has submitted it
        self.started = self.ended = None
        self._offset, self._partial = 0, ""
        self._last_force = 0.0

    @property
    def command(self) -> list[str]:
        return [*TRAIN, *self.overrides, f"hydra.run.dir={self.run_dir}"]

    def start(self) -> "RunProcess":
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.run_dir / LOG, "ab") as log:
            self.proc = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                         stdin=subprocess.DEVNULL)
        self.started = time.time()
        return self

    def log_text(self) -> str:
        path = self.run_dir / LOG
        return path.read_text(errors="replace") if path.exists() else ""

    def _job(self):
        info = json.loads((self.run_dir / "slurm_job.json").read_text())
        par = OmegaConf.load(self.run_dir / "config.yaml").parallel
        tasks = par["tp"] * par["pp"] * par["dp"]
        import submitit  # here: local searches and trident-plan never need it (a GPU box may lack it)

        return submitit.SlurmJob(folder=info["folder"], job_id=info["job_id"], tasks=tuple(range(tasks)))

    @property
    def job_id(self) -> Optional[str]:
        return self.job.job_id if self.job is not None else None

    def poll(self) -> Optional[Outcome]:
        """None while the run goes on; then how it ended (once: the end time is taken at the first answer)."""
        if self.ended is not None:
            return self._outcome
        code = self.proc.poll()
        if code is None:
            return None
        if code != 0 or not self.slurm:
            return self._end(Outcome(code == 0, None if code == 0 else last_error(self.log_text()), code))
        if self.job is None:  # the child submitted the job and returned: follow the job itself
            self.job = self._job()
        now = time.time()
        force = now - self._last_force > 5.0  # a task killed with the others leaves no result: ask SLURM now and then
        if force:
            self._last_force = now
        if not self.job.done(force_check=force):
            return None
        error = job_error(self.job)
        return self._end(Outcome(error is None, None if error is None else error_line(error), None))

    def _end(self, outcome: Outcome) -> Outcome:
        self.ended, self._outcome = time.time(), outcome
        return outcome

    def stop(self, reason: str) -> None:
        """Ask the run to stop at its next step boundary (it checkpoints and ends cleanly)."""
        (self.run_dir / STOP_FILE).write_text(reason + "\n")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
        if self.job is not None:
            self.job.cancel(check=False)

    def new_rows(self) -> list[dict]:
        """The metrics.jsonl rows written since the last call (a line still being written waits)."""
        path = self.run_dir / "metrics.jsonl"
        if not path.exists():
            return []
        with open(path) as f:
            f.seek(self._offset)
            text = f.read()
            self._offset = f.tell()
        text, self._partial = self._partial + text, ""
        lines = text.split("\n")
        self._partial = lines.pop()  # "" after a complete line
        return [json.loads(line) for line in lines if line.strip()]
