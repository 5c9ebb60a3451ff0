"""The run's W&B run: one per training run, through every resume, written from a thread of its own.

The id is chosen at the run's first start and kept in the run dir (`wandb.json`, with the number of attempts
and the last step W&B was given); a checkpoint's trident.json keeps it too. Every later start of the run (an
automatic resume, a SLURM requeue, a local restart, a shrink-resume, `checkpoint.resume=<path>` into the same
run dir) and every rollback after a loss spike is a new *attempt* of the same W&B run:

- An attempt that repeats steps the run already logged (it resumed from a checkpoint older than the last
  logged step, or rolled back) starts with W&B's run rewind, `resume_from="<id>?_step=<first step>"`: W&B
  drops the rows from that step on and the attempt logs them again, so no step shows twice or out of order.
  Online, where the W&B server refuses rewinds (a beta it enables per entity), the attempt resumes the run
  (`resume="allow"`) and does not send W&B the steps up to the last one logged (W&B would drop them: steps
  must grow), with a warning; metrics.jsonl has every attempt's rows.
- Offline, each attempt is its own folder `wandb/offline-run-<time>-<id>` with the same id, its rewind in
  its run record, and `trident_attempt: {number, first_step}` in its config. `wandb sync` of the folders in
  order gives one run; orchestrator/runs/wandb_files.py's `read_history` joins them the same way.

W&B is called only in this module's thread, on the rank that logs: the training loop puts rows in a queue
and goes on, so a slow W&B call never holds a step or a collective. A W&B failure (a setting it refuses, no
writable dir, a server that does not answer) is a warning; metrics.jsonl keeps everything.
"""

import json
import math
import os
import queue
import secrets
import string
import sys
import threading
import time
from concurrent.futures import Future, wait
from pathlib import Path
from typing import Callable, Optional

from orchestrator.runs.wandb_files import finished, read_history

STATE = "wandb.json"  # in the run dir: {"id", "attempts", "last_step" (online: the last step sent to W&B)}
FINISH_TIMEOUT_S = 120.0


def warn(message: str) -> None:
    print(f"trident: warning: {message}", file=sys.stderr, flush=True)


def new_id() -> str:
    """A W&B run id: 8 lower-case letters and digits, as W&B's own."""
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def read_state(run_dir: str) -> dict:
    try:
        return json.loads((Path(run_dir) / STATE).read_text())
    except (OSError, ValueError):
        return {}


def write_state(run_dir: str, state: dict) -> None:
    path = Path(run_dir) / STATE
    tmp = path.with_name(f"{STATE}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(state))
    os.replace(tmp, path)


def run_names(cfg) -> tuple[str, str]:
    """A run's default W&B name and group (logging.wandb.name / group override them): <model>-tp-pp-dp[-cp] and
    the model's name; a -m sweep's point shares its sweep's group and adds its number."""
    par = cfg.parallel
    cp = par.get("cp", 1)
    name, group = f"{cfg.model.name}-tp{par.tp}-pp{par.pp}-dp{par.dp}" + (f"-cp{cp}" if cp > 1 else ""), cfg.model.name
    sweep = cfg.get("sweep")
    if sweep is not None:
        name, group = f"{name}-{sweep.num}", sweep.id
    return name, group


class WandbRun:
    """The run's W&B run, fed from the training loop through a queue (see the module doc)."""

    def __init__(self, run_dir: str, wandb_cfg, run_config: dict, name: str, group: str, first_step: int,
                 kept_id: Optional[str] = None):
        """first_step: the first step this attempt logs (0 on a fresh run: the evaluation before training;
        a resumed run's checkpoint step + 1). kept_id: the id of the checkpoint resumed from, used where the
        run dir keeps none."""
        self.run_dir, self.cfg = run_dir, wandb_cfg
        # A run started afresh (not resumed) is a new W&B run, even in a run dir used before: an old history
        # cannot be rewound to before its first step.
        state = read_state(run_dir) if first_step > 0 else {}
        self.id = state.get("id") or kept_id or new_id()
        self.attempt = state.get("attempts", 0)
        self.last_step: Optional[int] = state.get("last_step")
        self.skip_through: Optional[int] = None  # online without rewinds: steps W&B already has
        self.run = None
        self.failed = False
        self.base = {"name": name, "group": group, "config": run_config}
        self._save_state()  # the id is kept before W&B is even imported
        # Imported here, before the first step (a disabled run never pays for it): its seconds of Python would
        # hold this rank's steps behind the GIL if the W&B thread imported it while they run.
        os.environ.setdefault("WANDB_SILENT", "true")
        try:
            import wandb  # (see above)
        except ImportError as e:
            wandb, self.failed = None, True
            warn(f"W&B is not installed ({e}); logging.wandb.mode={wandb_cfg.mode} logs to metrics.jsonl only")
        self._wandb = wandb
        self.pending: list[tuple[Future, Callable]] = []  # when_done's, in order
        self.queue: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._work, name="trident-wandb", daemon=True)
        self.thread.start()
        self.queue.put(("start", first_step))

    # --- the training loop's side: never waits --------------------------------------------------------------

    def log(self, row: dict) -> None:
        self.queue.put(("log", dict(row)))

    def rewind(self, first_step: int) -> None:
        """A rollback: a new attempt that logs again from first_step."""
        self.queue.put(("start", first_step))

    def summary(self, values: dict) -> None:
        self.queue.put(("summary", dict(values)))

    def call(self, fn: Callable) -> None:
        """fn(run, wandb, first_step) in the W&B thread (a table, an image), if W&B runs; first_step: the
        attempt's first step (what fn logs goes there)."""
        self.queue.put(("call", fn))

    def when_done(self, future: Future, fn: Callable) -> None:
        """fn(run, wandb, future) in the W&B thread once the future is done (by the run's end at the latest:
        finish waits for it). For work that must not hold the rows behind it (the planner's prediction)."""
        self.pending.append((future, fn))

    def finish(self, timeout_s: float = FINISH_TIMEOUT_S) -> None:
        self.queue.put(("finish", None))
        self.thread.join(timeout_s)
        if self.thread.is_alive():
            warn(f"W&B did not finish within {timeout_s:.0f}s; the run goes on without it (metrics.jsonl has "
                 "every row)")

    @property
    def folder(self) -> str:
        """Where this run's W&B files are."""
        return str(Path(self.run_dir) / "wandb")

    # --- the W&B thread --------------------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            kind, item = self.queue.get()
            if not self.failed and self.run is not None:
                self._done_calls()
            if kind == "finish":
                self._guard("finish", self._finish)
                return
            if self.failed:
                continue
            if kind == "start":
                self._guard("init", lambda: self._start(item))
            elif kind == "log" and self.run is not None:
                self._guard("log", lambda: self._log(item))
            elif kind == "summary" and self.run is not None:
                self._guard("summary", lambda: self.run.summary.update(item))
            elif kind == "call" and self.run is not None:
                self._guard("log", lambda: item(self.run, self._wandb, self.first_step))

    def _done_calls(self) -> None:
        while self.pending and self.pending[0][0].done():
            future, fn = self.pending.pop(0)
            self._guard("log", lambda: fn(self.run, self._wandb, future))

    def _guard(self, what: str, fn) -> None:
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - any W&B failure is a warning, never a dead run
            self.failed = True
            warn(f"W&B {what} failed ({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}); "
                 f"the run goes on, metrics.jsonl has every row")
            try:
                if self.run is not None:
                    self.run.finish(exit_code=1)
            except Exception:  # noqa: BLE001 - already warned
                pass
            self.run = None

    def _start(self, first_step: int) -> None:
        wandb = self._wandb
        if self.run is not None:  # a rollback: the attempt so far ends here
            self._end_attempt()
        self.attempt += 1
        cfg = self.cfg
        # What the dashboard must show before first_step: metrics.jsonl's rows as its attempts left them.
        expected = [r for r in effective_rows(Path(self.run_dir) / "metrics.jsonl") if r["step"] < first_step]
        if cfg.mode == "offline":
            # What W&B's files hold (a killed attempt's last rows, even its rewind, may never have reached
            # them): from the first step where they differ from metrics.jsonl, this attempt writes again.
            have = read_history(self.folder, self.id)
            redo = _first_difference(have, expected)
            rewind = redo if redo > 0 and any(h["_step"] >= redo for h in have) else None
        else:  # online: what this run dir says W&B was sent
            redo = first_step if self.last_step is None else min(self.last_step + 1, first_step)
            rewind = first_step if self.last_step is not None and self.last_step >= first_step else None
        self.first_step = first_step
        self._save_state()
        args = dict(mode=cfg.mode, dir=self.run_dir, project=cfg.project, entity=cfg.entity,
                    name=cfg.name or self.base["name"], group=cfg.group or self.base["group"], tags=list(cfg.tags),
                    config={**self.base["config"], "trident_attempt": {"number": self.attempt,
                                                                         "first_step": min(redo, first_step)}},
                    settings=wandb.Settings(allow_val_change=True))
        self.skip_through = None
        if rewind is not None:
            try:  # W&B keeps the steps up to the one named, and takes the next
                self.run = wandb.init(resume_from=f"{self.id}?_step={rewind - 1}", **args)
            except Exception as e:  # noqa: BLE001 - a server without rewinds: resume, and skip what it has
                warn(f"W&B refused to rewind run {self.id} to step {rewind} ({type(e).__name__}); steps "
                     f"{rewind}..{self.last_step} keep the earlier attempt's values on the dashboard")
                self.run = wandb.init(id=self.id, resume="allow", **args)
                self.skip_through = self.last_step
        else:
            self.run = wandb.init(id=self.id, resume="allow", **args)
        # Benchmarks beside the run (orchestrator/evaluate/beside.py) come in later rows: plotted against the step of the
        # checkpoint they evaluated.
        self.run.define_metric("eval/step")
        self.run.define_metric("eval/*", step_metric="eval/step")
        for row in expected:  # the steps W&B never got (an attempt died first, or its W&B failed)
            if row["step"] >= redo:
                self._log(row)

    def _log(self, row: dict) -> None:
        step = row["step"]
        if self.skip_through is not None and step <= self.skip_through:
            return
        self.run.log({k: v for k, v in row.items() if k != "step"}, step=step)
        self.last_step = step
        self._save_state()

    def _finish(self) -> None:
        if self.run is not None:
            wait([f for f, _ in self.pending], timeout=FINISH_TIMEOUT_S / 2)
            self._done_calls()
            self._end_attempt()

    def _end_attempt(self) -> None:
        folder = Path(self.run.dir).parent  # wandb/offline-run-<time>-<id>
        self.run.finish()
        self.run = None
        if self.cfg.mode == "offline":
            # finish() returns once W&B's service took the exit, which may still be writing the file: a reader
            # right after (the next attempt, trident-status, a test) would miss the last rows.
            deadline = time.monotonic() + FINISH_TIMEOUT_S / 2
            while not finished(str(folder)) and time.monotonic() < deadline:
                time.sleep(0.05)

    def _save_state(self) -> None:
        write_state(self.run_dir, {"id": self.id, "attempts": self.attempt, "last_step": self.last_step})


def _first_difference(have: list[dict], expected: list[dict]) -> int:
    """The first step where W&B's history (have) is not metrics.jsonl's (expected): a step missing, or a value
    that differs; where neither differs, the step after the shorter one's last."""
    for h, e in zip(have, expected):
        if h["_step"] != e["step"] or any(not _same(h.get(k), v) for k, v in e.items() if k != "step"):
            return min(h["_step"], e["step"])
    if len(have) > len(expected):
        return have[len(expected)]["_step"]
    if len(expected) > len(have):
        return expected[len(have)]["step"]
    return expected[-1]["step"] + 1 if expected else 0


def _same(a, b) -> bool:
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))


def effective_rows(metrics_path: Path) -> list[dict]:
    """metrics.jsonl's rows as the dashboard shows them: a row whose step is below the one before it starts a
    later attempt (a resume, a rollback), which replaces the rows from its step on; rows of one step merge."""
    rows: list[dict] = []
    try:
        lines = metrics_path.read_text().splitlines()
    except OSError:
        return rows
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:  # a line cut short by a killed process
            continue
        if rows and row["step"] < rows[-1]["step"]:
            rows = [r for r in rows if r["step"] < row["step"]]
        if rows and row["step"] == rows[-1]["step"]:
            rows[-1] = {**rows[-1], **row}
        else:
            rows.append(row)
    return rows
