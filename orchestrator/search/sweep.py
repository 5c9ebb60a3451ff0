"""`trident-train -m ...`: a SLURM sweep is one job array, each point its own run.

Hydra's basic launcher calls the task function once per point, in this
process, each with its own output dir. This callback wraps the whole sweep:
while it is active, a point with launcher=slurm is checked and prepared in
its own dir but only recorded (`Sweep.pending`); a point with launcher=local
trains right away as usual. When every point has passed its checks, the
recorded points are submitted together through submitit (`submit_sweep`):
one job array per resource shape, since an array has one set of resources
for all its elements. If any point's config is invalid the sweep stops
there and nothing is submitted.

Every point also learns what the sweep varies (`Sweep.describe`), so its W&B
run joins the sweep's group with those overrides in its config.

With launcher.wait=true the callback waits for every point and judges each by
submitit's own result files (sacct's state lags the jobs by seconds). Hydra
turns an exception raised in a callback into a warning, so the failed points
are recorded here (`failures()`) and the entry point exits non-zero after
Hydra returns.
"""

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from launch.slurm import error_line, job_error, submit_sweep
from orchestrator.search.status import print_table, sweep_status


def split_override(override: str) -> tuple[str, str]:
    key, _, value = override.partition("=")
    return key.lstrip("+~"), value


def swept_keys(overrides: Sequence[str]) -> list[str]:
    """The keys a `-m` command line sweeps (`parallel.tp=1,2,4`, `optim.lr=range(...)`), in its order."""
    parsed = OverridesParser.create().parse_overrides(list(overrides))
    return [o.key_or_group for o in parsed if o.is_sweep_override()]


@dataclass
class Sweep:
    """What the points of one `-m` invocation share."""

    dir: str
    keys: list[str]
    pending: list = field(default_factory=list)  # launcher=slurm points, submitted together at the end

    @property
    def id(self) -> str:
        """The sweep's name, e.g. `multirun/2026-11-25/15-48-11` -> `sweep-2026-11-25-15-48-11`."""
        return "sweep-" + "-".join(Path(self.dir).parts[-2:])

    def describe(self, num: int, task_overrides: Sequence[str]) -> dict[str, Any]:
        """The point's place in the sweep, as it goes into the run's config (and so into W&B)."""
        mine = dict(map(split_override, task_overrides))
        return {"id": self.id, "dir": self.dir, "num": num,
                "overrides": {k: mine[k] for k in self.keys if k in mine}}


# A search's trial (hydra/sweeper=trident-optuna) is started as its own trident-train process: its place in
# the sweep (the same fields as Sweep.describe, JSON) comes in this environment variable.
SWEEP_POINT_ENV = "TRIDENT_SWEEP_POINT"

# Hydra builds the callback and calls the task function apart: this is where the two meet, per process.
_ACTIVE: Optional[Sweep] = None
# The points of the last waited-for sweep that did not complete (read by the entry point once Hydra returns).
_FAILED: list[str] = []


def active() -> Optional[Sweep]:
    """The sweep whose points are being prepared in this process, if any."""
    return _ACTIVE


def failures() -> list[str]:
    """The points of the sweep this process waited for that failed ("<job id> <error>"), empty if none."""
    return list(_FAILED)


class SweepCallback(Callback):
    """Listed under `hydra.callbacks` in conf/train.yaml; Hydra calls it around every `-m` run."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        global _ACTIVE
        _FAILED.clear()
        if not str(config.hydra.sweeper.get("_target_", "")).endswith(".BasicSweeper"):
            return  # another sweeper (hydra/sweeper=trident-optuna) starts its trials itself
        _ACTIVE = Sweep(str(config.hydra.sweep.dir), swept_keys(config.hydra.overrides.task))
        if config.launcher.name == "slurm":
            # Hydra's basic launcher would announce "Launching N jobs locally": here it only prepares them.
            logging.getLogger("hydra._internal.core_plugins.basic_launcher").setLevel(logging.WARNING)
            print(f"trident: checking {config.hydra.sweep.dir}'s points before submitting them to SLURM", flush=True)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        global _ACTIVE
        sweep, _ACTIVE = _ACTIVE, None
        if sweep is not None and sweep.pending:
            jobs = submit_sweep(sweep.pending, sweep.dir, sweep.id)
            if any(p.wait for p in sweep.pending):
                _FAILED[:] = follow_all(jobs, sweep.dir)


def follow_all(jobs: list, sweep_dir: str, poll_s: float = 2.0) -> list[str]:
    """Wait for every job of a sweep, print the status table; return the failed points ("<job id> <error>").

    Each point is judged by submitit's result files (`job_error`): the table shows that judgement, not
    sacct's state, which can still read RUNNING for a job whose tasks have all returned.
    """
    while not all(job.done() for job in jobs):
        time.sleep(poll_s)
    errors = {job.job_id: job_error(job) for job in jobs}
    rows = sweep_status(Path(sweep_dir))
    for row in rows:
        if row["job_id"] in errors:
            row["state"] = "FAILED" if errors[row["job_id"]] else "COMPLETED"
    print_table(rows)
    failed = [f"{job_id} {error_line(error)}" for job_id, error in errors.items() if error]
    if failed:
        print(f"trident: {len(failed)} of {len(jobs)} sweep point(s) failed: " + "; ".join(failed), flush=True)
    return failed
