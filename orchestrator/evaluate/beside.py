"""Evaluations beside a training run (train.eval_tasks): lm-eval on its checkpoints while the training goes on.

Once a checkpoint the run evaluates is complete (every train.eval_tasks_every-th by step, and the last), the
logging rank queues its evaluation, and a thread of its own starts and watches it:

- launcher=local or external: `trident-eval` as a child process of eval.tp ranks, when this machine has that
  many to spare (on the CPU, the cores beyond one per local training rank, which the child is pinned to; on
  GPUs, those beyond the local training ranks'); otherwise it waits for the training's end. One at a time.
- launcher=slurm: `trident-eval` as a job of its own through submitit (one node, eval.tp tasks, the run's
  launcher settings with eval.launcher's over them), submitted at once.

The training never waits for an evaluation: the next metrics row the logging rank writes after one ends carries
its results (`eval/<task>/<metric>`, and `eval/step`: the checkpoint's step, which W&B plots them against). Only
at the end does the run wait for the evaluations left; their rows follow the last step's. A failed evaluation is
a warning; the training goes on.

What each evaluation is (pending, running, done, failed) is kept in evals.json in the run dir (trident-status
shows it), its results in evals.jsonl, its log in evals/step-N.log; a checkpoint waiting for its evaluation is
held from checkpoint.keep's pruning until it is done. A later attempt of the run (a resume, a requeue) takes up
what an earlier one left: evaluations still to do of checkpoints it keeps, and the rows of results that W&B's
rewind to the resumed step dropped.
"""

import json
import os
import queue
import re
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import DictConfig, OmegaConf

from launch.slurm import executor_params, job_at, submit_command
from orchestrator.runs.checkpoint import hold, is_complete, release
from orchestrator.runs.eval_files import RESULTS, STATE, alive, metric_key, read_results, read_state, write_state

POLL_S = 1.0  # how often the thread looks at what runs (a SLURM job: every few of these)


def due(cfg: DictConfig, step: int) -> bool:
    """Whether the checkpoint of this step is evaluated: every train.eval_tasks_every-th and the last."""
    t, every = cfg.train, cfg.checkpoint.every
    return bool(t.eval_tasks) and (step == t.steps or bool(every) and step % (every * t.eval_tasks_every) == 0)


def metrics_row(step: int, results: list[dict]) -> dict:
    return {"eval/step": step, **{metric_key(r): r["value"] for r in results}}


def quote(value: Any) -> str:
    """A value as Hydra's override grammar reads it back exactly (a quoted string, or null)."""
    if value is None:
        return "null"
    if isinstance(value, (bool, int, float)):
        return json.dumps(value)
    # In Hydra's quoted strings a backslash escapes only a quote, or backslashes before a quote or the end.
    text = re.sub(r"(\\*)'", lambda m: m.group(1) * 2 + "\\'", str(value))
    text = re.sub(r"(\\+)$", lambda m: m.group(1) * 2, text)
    return "'" + text + "'"


def _task(task: str) -> str:
    """A task given as a path, absolute (the evaluation may run elsewhere: a SLURM job); a name as it is."""
    path = Path(task).expanduser()
    return str(path.resolve()) if path.exists() else task


def eval_argv(cfg: DictConfig, checkpoint: str, run_dir: str, launcher: str) -> list[str]:
    """The `trident-eval` command of one checkpoint's evaluation, with the run's `eval` settings."""
    e = cfg.eval
    overrides = {
        "eval.checkpoint": str(Path(checkpoint).resolve()), "eval.output": str((Path(run_dir) / RESULTS).resolve()),
        "eval.limit": e.limit, "eval.num_fewshot": e.num_fewshot, "eval.batch_size": e.batch_size,
        "eval.dtype": e.dtype, "eval.samples": e.samples, "eval.tp": e.tp, "parallel.tp": e.tp,
        "parallel.timeout_s": cfg.parallel.timeout_s,
        "eval.wandb": False,  # the run logs the results itself
    }
    tasks = ",".join(quote(_task(t)) for t in cfg.train.eval_tasks)
    return [sys.executable, "-m", "orchestrator.cli.evaluate", f"launcher={launcher}", f"eval.tasks=[{tasks}]",
            *(f"{k}={quote(v)}" for k, v in overrides.items())]


def slurm_params(cfg: DictConfig, tp: int) -> dict:
    """submitit's parameters of an evaluation's job: one node, tp tasks (and GPUs, on a GPU partition), the
    launcher's settings with eval.launcher's over them."""
    launcher = OmegaConf.merge(cfg.launcher, {"nodes": 1, "tasks_per_node": tp, "max_restarts": 0,
                                              "min_nodes": None},
                               cfg.eval.launcher or {})
    if launcher.gpus_per_node:
        launcher.gpus_per_node = min(launcher.gpus_per_node, tp)
    shape = OmegaConf.create({"launcher": launcher, "parallel": {"tp": tp, "pp": 1, "dp": 1},
                              "model": {"name": f"{cfg.model.name}-eval"}})
    return executor_params(shape)


def cpu_split(local_world: int, tp: int) -> Optional[tuple[int, list[int]]]:
    """On the CPU, (threads per training rank, the cores of an evaluation beside it): the evaluation's tp ranks
    take the last tp cores this process may run on, the training ranks share the others; None where fewer than
    one core per training rank would be left (the evaluations then wait for the training's end)."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) - tp < local_world:
        return None
    return max(1, (len(cores) - tp) // local_world), cores[-tp:]


def spare_devices(device_type: str, local_world: int, tp: int) -> Optional[dict]:
    """What an evaluation of tp ranks may take on this machine while the training runs ({"gpus": ids} or
    {"cores": ids}), or None when there are not that many beyond the training's."""
    if device_type == "cuda":
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        ids = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
        free = ids[local_world:]
        return {"gpus": free[:tp]} if len(free) >= tp else None
    split = cpu_split(local_world, tp)
    return {"cores": split[1]} if split else None


def child_env(devices: Optional[dict]) -> dict:
    """The environment of a local evaluation: none of this rank's rendezvous, and the GPUs it may take."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                        "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID")}
    if devices and "gpus" in devices:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(devices["gpus"])
    return env


def _lines(run_dir) -> list[str]:
    """evals.jsonl's complete lines (one being written has no newline yet)."""
    try:
        text = (Path(run_dir) / RESULTS).read_text()
    except OSError:
        return []
    return text.split("\n")[:-1]


def _size(run_dir) -> int:
    try:
        return (Path(run_dir) / RESULTS).stat().st_size
    except OSError:
        return 0


def log_tail(path: Optional[str]) -> str:
    """The line of an evaluation's log that says what went wrong (its last non-empty line)."""
    try:
        lines = [line.strip() for line in Path(path).read_text(errors="replace").splitlines() if line.strip()]
    except (OSError, TypeError):
        return "no log"
    return lines[-1][:300] if lines else "an empty log"


class EvalQueue:
    """The evaluations of a training run (see the module doc); lives on the logging rank."""

    def __init__(self, cfg: DictConfig, run_dir: str, local_world: int, device_type: str, first_step: int):
        self.cfg, self.run_dir = cfg, run_dir
        self.local_world, self.device_type = local_world, device_type
        self.slurm = cfg.launcher.name == "slurm"
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.state = read_state(run_dir)
        self.waiting: list[int] = []  # steps to start, in order
        self.running: dict[int, Any] = {}  # step -> Popen, submitit Job, or pid (an earlier attempt's child)
        self.rows: list[tuple[dict, int]] = []  # (a metrics row of results, its first line in evals.jsonl)
        self.seen = len(_lines(run_dir))  # lines of evals.jsonl read (an earlier attempt's: _take_up's)
        self.seen_size = _size(run_dir)  # its size then: read again only once it grew
        self.ending = self.leaving = False
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()  # (step, checkpoint) from the training loop
        self._take_up(first_step)
        self.thread = threading.Thread(target=self._work, name="trident-evals", daemon=True)
        self.thread.start()

    # --- the training loop's side: never waits, but at the end ------------------------------------------------

    def add(self, step: int, checkpoint: str) -> None:
        """Queue the evaluation of a complete checkpoint (Saver's on_complete, on rank 0)."""
        hold(checkpoint)
        self.inbox.put((step, checkpoint))
        self.wake.set()

    def take(self, logged_at: int) -> dict:
        """The results of one evaluation not yet in a metrics row, as the fields of the row logged at this
        step ({} when none waits, or the thread is busy: a later row takes them)."""
        if not self.lock.acquire(blocking=False):
            return {}
        try:
            if not self.rows:
                return {}
            row, offset = self.rows.pop(0)
            # An evaluation this run did not start (trident-eval by hand, into this run dir) gets an entry too.
            entry = self.state.setdefault(row["eval/step"], {"state": "done", "where": "trident-eval",
                                                             "offset": offset, "ended": time.time()})
            entry["logged_at"] = logged_at
            self._save()
            return row
        finally:
            self.lock.release()

    def busy(self) -> bool:
        """Whether an evaluation waits or runs (the end of the run then waits for it)."""
        with self.lock:
            self._queue()
            return bool(self.waiting or self.running)

    def rewind(self, first_step: int) -> None:
        """A rollback: the run logs again from first_step (what W&B drops from there is shown again)."""
        with self.lock:
            self._take_up(first_step)

    def finish(self) -> None:
        """At the training's end: start what waits and wait for every evaluation (their rows: `take`)."""
        with self.lock:
            self._queue()
            left = len(self.waiting) + len(self.running)
        if left:
            print(f"trident: training done; waiting for {left} evaluation(s) (evals.json in {self.run_dir})",
                  file=sys.stderr, flush=True)
        self.ending = True
        self.wake.set()
        self.thread.join()

    def leave(self) -> None:
        """The run stops early (preempted, stopped, a fault): what runs goes on by itself, what waits stays
        pending in evals.json for the run's next attempt."""
        self.leaving = True
        self.wake.set()
        self.thread.join()

    # --- the thread ---------------------------------------------------------------------------------------------

    def _work(self) -> None:
        polls = 0
        while not self.leaving:
            with self.lock:
                self._queue()
                if not self.slurm or polls % 5 == 0:  # a SLURM job's state is sacct's: every 5 s is plenty
                    self._poll()
                self._watch()
                self._start()
                if self.ending and not self.waiting and not self.running:
                    return
            polls += 1
            self.wake.wait(POLL_S)
            self.wake.clear()

    def _queue(self) -> None:
        while not self.inbox.empty():
            step, checkpoint = self.inbox.get()
            self.state[step] = {"state": "pending", "checkpoint": checkpoint, "queued": time.time(),
                                "log": str(Path(self.run_dir) / "evals" / f"step-{step}.log")}
            self.waiting = [s for s in self.waiting if s != step] + [step]
            self._save()

    def _start(self) -> None:
        while self.waiting:
            step = self.waiting[0]
            entry = self.state[step]
            if not is_complete(Path(entry["checkpoint"])):
                self.waiting.pop(0)
                self._failed(step, f"its checkpoint {entry['checkpoint']} is gone")
                continue
            entry["offset"] = len(read_results(self.run_dir))
            if self.slurm:
                self._submit(step, entry)
            else:
                if self.running:
                    return
                devices = spare_devices(self.device_type, self.local_world, self.cfg.eval.tp)
                if devices is None and not self.ending:
                    return  # after the training, when its ranks are done
                self._spawn(step, entry, devices)
            self.waiting.pop(0)
            self._save()

    def _spawn(self, step: int, entry: dict, devices: Optional[dict]) -> None:
        argv = eval_argv(self.cfg, entry["checkpoint"], self.run_dir, "local")
        Path(entry["log"]).parent.mkdir(parents=True, exist_ok=True)
        with open(entry["log"], "w") as log:
            log.write(f"$ {shlex.join(argv)}\n")
            log.flush()
            child = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=child_env(devices), start_new_session=True)
        if devices and "cores" in devices and self.device_type != "cuda":
            # The cores beyond the training ranks' (its own ranks inherit them and size their threads to them).
            try:
                os.sched_setaffinity(child.pid, devices["cores"])
            except OSError:
                pass
        self.running[step] = child
        entry.update(state="running", started=time.time(), pid=child.pid, where="local")

    def _submit(self, step: int, entry: dict) -> None:
        argv = eval_argv(self.cfg, entry["checkpoint"], self.run_dir, "external")
        folder = str(Path(self.run_dir) / "evals" / "slurm")
        try:
            job = submit_command(argv, slurm_params(self.cfg, self.cfg.eval.tp), folder)
        except Exception as e:  # noqa: BLE001 - sbatch refused it: the evaluation failed, the training goes on
            self._failed(step, f"SLURM refused the job: {'; '.join(str(e).strip().splitlines())[:400]}")
            return
        self.running[step] = job
        entry.update(state="running", started=time.time(), job_id=job.job_id, folder=folder, where="slurm",
                     log=str(job.paths.stdout), error_log=str(job.paths.stderr))

    def _poll(self) -> None:
        for step, handle in list(self.running.items()):
            if isinstance(handle, subprocess.Popen):
                code = handle.poll()
                if code is None:
                    continue
                error = None if code == 0 else f"exit code {code}: {log_tail(self.state[step]['log'])}"
            elif isinstance(handle, int):  # an earlier attempt's child: done when it is gone
                if alive(handle):
                    continue
                error = None
            else:  # a submitit Job
                try:
                    if not handle.done():
                        continue
                    exc = handle.exception()
                except Exception as e:  # noqa: BLE001 - submitit could not read the job: try again later
                    print(f"trident: warning: the evaluation job of step {step}: {e}", file=sys.stderr, flush=True)
                    continue
                error = None if exc is None else log_tail(self.state[step].get("error_log"))
            del self.running[step]
            self._ended(step, error)

    def _watch(self) -> None:
        """New results in evals.jsonl (this run's evaluations', or trident-eval's run by hand into this run dir):
        each evaluation's rows (consecutive, of one step) wait for a metrics row."""
        size = _size(self.run_dir)
        if size == self.seen_size:
            return
        self.seen_size = size
        lines = _lines(self.run_dir)
        for index in range(self.seen, len(lines)):
            try:
                result = json.loads(lines[index])
            except ValueError:
                continue
            if self.rows and self.rows[-1][0]["eval/step"] == result.get("step") and self.rows[-1][1] >= self.seen:
                self.rows[-1][0].update(metrics_row(result["step"], [result]))
            elif isinstance(result.get("step"), int):
                self.rows.append((metrics_row(result["step"], [result]), index))
        self.seen = len(lines)

    def _ended(self, step: int, error: Optional[str]) -> None:
        entry = self.state[step]
        results = [r for r in read_results(self.run_dir)[entry.get("offset", 0):] if r.get("step") == step]
        if error is None and not results:
            error = f"no results written ({log_tail(entry['log'])})"
        if error is not None:
            self._failed(step, error)
            return
        entry.update(state="done", ended=time.time(), error=None)  # its rows: _watch's
        release(entry["checkpoint"], self.cfg.checkpoint.keep)
        self._save()

    def _failed(self, step: int, error: str) -> None:
        entry = self.state[step]
        entry.update(state="failed", ended=time.time(), error=error)
        release(entry["checkpoint"], self.cfg.checkpoint.keep)
        self._save()
        print(f"trident: warning: the evaluation of step {step} failed ({error}); log: {entry.get('log')}; "
              "the training goes on", file=sys.stderr, flush=True)

    def _take_up(self, first_step: int) -> None:
        """What earlier attempts of the run (or this one, before a rollback) left, for an attempt that logs from
        first_step: evaluations of the checkpoints before it still to do or still running are taken up, those of
        later steps forgotten (their checkpoints are made again); results whose metrics row W&B dropped (logged
        at first_step or later) wait for a row again."""
        results = read_results(self.run_dir)
        for step in sorted(self.state):
            entry = self.state[step]
            if step >= first_step:
                if entry["state"] in ("pending", "running") and step not in self.running:
                    del self.state[step]
                continue
            if entry["state"] == "pending" and step not in self.waiting:
                self.waiting.append(step)
            elif entry["state"] == "running" and step not in self.running:
                if entry.get("where") == "slurm":
                    self.running[step] = job_at(entry["folder"], entry["job_id"])
                elif alive(entry.get("pid")):
                    self.running[step] = entry["pid"]
                else:
                    self.waiting.append(step)
            elif entry["state"] == "done" and entry.get("logged_at", first_step) >= first_step:
                mine = [r for r in results[entry.get("offset", 0):] if r.get("step") == step]
                self.rows = [r for r in self.rows if r[0]["eval/step"] != step] + \
                    [(metrics_row(step, mine), entry.get("offset", 0))]
        if self.state or (Path(self.run_dir) / STATE).exists():
            self._save()

    def _save(self) -> None:
        write_state(self.run_dir, self.state)

