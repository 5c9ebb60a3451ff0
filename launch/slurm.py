"""launcher=slurm: submit the run as one SLURM job through submitit; each task is one rank.

The submitting process checks everything (the cluster's partitions too),
prepares the data, submits, prints the job id and where the logs are, and
returns (or, with launcher.wait=true, follows the job and streams rank 0's
log). A `-m` sweep becomes one job array (`submit_sweep`). Inside the job
every task reads its rank from SLURM's variables (`launch.env`) and runs the
same worker as the other launchers.

Each run dir gets `slurm_job.json` (job id, log paths), which `trident-status`
reads; a rank that fails writes its traceback beside it (`failed-rank<r>.txt`)
and exits non-zero, so srun (`--kill-on-bad-exit`) ends the whole job FAILED
at once. With launcher.max_restarts=N the batch script's teardown
(`python -m launch.restart`) requeues a job whose ranks failed or hung, up to
N times, unless the run stopped itself on purpose; the requeued job resumes
from its newest checkpoint, and with parallel=auto plans its layout again for
the tasks it got.

No secrets travel in what is submitted: the pickle holds the plain config and
the sbatch script only the launcher's settings. A W&B key stays in the
environment, which sbatch passes to the job when it starts.
"""

import json
import os
import shlex
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from launch.env import from_environ
from launch.local import RankFailed
from launch.rank import pick_backend, run_rank


def time_minutes(spec: str) -> int:
    """A SLURM time limit in whole minutes (rounded up).

    SLURM's forms: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS.
    """
    text = str(spec).strip()
    days, _, rest = text.rpartition("-")
    try:
        fields = [int(x) for x in rest.split(":")]
        days = int(days) if days else 0
    except ValueError:
        raise ValueError(f"{spec!r} is not a SLURM time ([D-]HH:MM:SS)") from None
    if len(fields) > 3 or min(fields + [days]) < 0:
        raise ValueError(f"{spec!r} is not a SLURM time ([D-]HH:MM:SS)")
    if "-" in text:  # D-HH[:MM[:SS]]
        hours, minutes, seconds = (fields + [0, 0])[:3]
    elif len(fields) == 3:  # HH:MM:SS
        hours, minutes, seconds = fields
    else:  # MM[:SS]
        hours, (minutes, seconds) = 0, (fields + [0])[:2]
    return days * 1440 + hours * 60 + minutes + (1 if seconds else 0)


def tasks_per_node(launcher, world: int) -> int:
    return launcher.tasks_per_node or world // launcher.nodes


def world_size(par) -> int:
    """tp * pp * dp * cp (launch imports nothing of ours: parallel.mesh.ParallelDims says the same)."""
    return par.tp * par.pp * par.dp * par.get("cp", 1)


def min_nodes(launcher, par) -> int:
    """The fewest nodes a requeued job may run on: launcher.min_nodes; unset, 1 for parallel=auto (it plans for
    whatever ranks it gets) and all of launcher.nodes for a fixed layout."""
    if launcher.get("min_nodes") is not None:
        return launcher.min_nodes
    return 1 if par.get("layout") == "auto" and launcher.max_restarts else launcher.nodes


class SlurmRun:
    """What submitit pickles and every task of the job calls: one rank of the run.

    Preemption and time limits: SLURM's USR2 (sent before the time limit, or
    by `scancel --signal=USR2`) only raises a flag here; the loop agrees on
    it across ranks at a step boundary, saves a checkpoint and returns; then
    global rank 0 hands the signal to submitit, which calls `checkpoint()`
    and requeues the job. The requeued job finds that checkpoint by itself.
    """

    def __init__(self, worker: Callable, find_resume: Callable, cfg_dict: dict, run_dir: str, corpus, backend: str,
                 timeout_s: float, relayout: Optional[Callable] = None):
        # worker(env, device, cfg_dict, run_dir, corpus, resume, should_stop) -> summary,
        # find_resume(resume, dir) -> checkpoint path or None, and relayout(cfg_dict, world, local_world) ->
        # (cfg_dict, message or None) for parallel=auto: module-level functions, pickled by name.
        self.worker, self.find_resume, self.relayout = worker, find_resume, relayout
        self.cfg_dict, self.run_dir, self.corpus = cfg_dict, run_dir, corpus
        self.backend, self.timeout_s = backend, timeout_s

    def __call__(self) -> int:
        env = from_environ()
        try:
            return self._run(env)
        except Exception:
            # Beside the run, for trident-status; the task's own log gets it from submitit too.
            Path(self.run_dir, f"failed-rank{env.rank}.txt").write_text(traceback.format_exc())
            raise

    def _run(self, env) -> int:
        cfg_dict = self.cfg_dict
        if self.relayout is not None:  # parallel=auto: planned again for the tasks this (requeued) job got
            cfg_dict, message = self.relayout(cfg_dict, env.world_size, env.local_world_size)
            if message and env.rank == 0:
                print(f"trident: {message}", flush=True)
        if env.rank == 0 and os.environ.get("SLURM_JOB_ID"):
            # For launch.restart in the batch script's teardown: which run this job is.
            import submitit  # only launcher=slurm needs it, and this is inside a SLURM job

            job_folder = submitit.JobEnvironment().paths.folder
            Path(job_folder, f"trident-run-{os.environ['SLURM_JOB_ID']}.json").write_text(json.dumps(
                {"run_dir": str(Path(self.run_dir).resolve()), "relayout": self.relayout is not None,
                 "tasks_per_node": env.local_world_size}))
        ckpt = cfg_dict["checkpoint"]
        # Looked up here, not at submission: a requeued job resumes from what exists now.
        resume: Optional[Path] = self.find_resume(ckpt["resume"], ckpt["dir"])
        requested = []
        submitit_handler = signal.getsignal(signal.SIGUSR2)
        signal.signal(signal.SIGUSR2, lambda signum, frame: requested.append(signum))
        backend = pick_backend(self.backend, env.local_world_size)
        summary = run_rank(self.worker, env, backend, self.timeout_s, cfg_dict, self.run_dir, self.corpus,
                           str(resume) if resume else None, lambda: bool(requested), exit_process=False,
                           trace_dir=str(Path(self.run_dir) / "ranks"))
        if summary.get("preempted") and env.rank == 0 and callable(submitit_handler):
            submitit_handler(signal.SIGUSR2, None)  # checkpoint() below, then requeue and exit
        return env.rank

    def checkpoint(self, *args, **kwargs):
        """submitit's protocol: what to run when the job comes back (the same run; it resumes itself)."""
        import submitit  # only launcher=slurm needs it: a GPU box running launcher=local may not have it

        return submitit.helpers.DelayedSubmission(self)


class CommandJob:
    """What submitit pickles for a job whose every task runs one command (trident-eval's ranks, launcher=external:
    each reads its rank from SLURM's variables). Fails, with the command's exit code, where the command does."""

    def __init__(self, argv: list[str]):
        self.argv = list(argv)

    def __call__(self) -> int:
        done = subprocess.run(self.argv)
        if done.returncode:
            raise RuntimeError(f"{shlex.join(self.argv[:4])} ... exited with code {done.returncode}")
        return 0


def submit_command(argv: list[str], params: dict, folder: str) -> Any:
    """Submit a CommandJob (a job of its own, even from inside a job: SLURM's variables of the job that submits
    are hidden from sbatch, but SLURM_CONF); return the submitit Job."""
    import submitit  # only launcher=slurm needs it: a GPU box running launcher=local may not have it

    executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
    executor.update_parameters(**params)
    conf = os.environ.get("SLURM_CONF")  # where sbatch finds the cluster: kept
    with submitit.helpers.clean_env():
        if conf:
            os.environ["SLURM_CONF"] = conf
        return executor.submit(CommandJob(argv))


def job_at(folder: str, job_id: str) -> Any:
    """A job submitted earlier (by an attempt of the run before this one), to follow again."""
    import submitit  # (likewise)

    return submitit.SlurmJob(folder=folder, job_id=job_id)


# --- submission --------------------------------------------------------------------------------

def executor_params(cfg) -> dict[str, Any]:
    """submitit's parameters for this run's job (an array's elements all share one set)."""
    launcher, par = cfg.launcher, cfg.parallel
    params = {
        "name": f"trident-{cfg.model.name}",
        "nodes": launcher.nodes,
        "tasks_per_node": tasks_per_node(launcher, world_size(par)),
        "cpus_per_task": launcher.cpus_per_task,
        "timeout_min": time_minutes(launcher.time),
        "gpus_per_node": launcher.gpus_per_node or None,
        "mem_gb": launcher.mem_gb,
        "slurm_partition": launcher.partition,
        "slurm_account": launcher.account,
        "slurm_qos": launcher.qos,
        "slurm_constraint": launcher.constraint,
        "slurm_setup": list(launcher.setup) or None,
        "slurm_additional_parameters": dict(launcher.extra_sbatch) or None,
        # One rank failing ends the job at once, instead of the others waiting in a collective; ranks fill the
        # nodes in order (block), so the innermost dimension, tp, stays inside a node.
        "slurm_srun_args": ["--kill-on-bad-exit=1", "--distribution=block"],
    }
    if launcher.max_restarts:
        # After srun ends ($? is its status): requeue a failed run, at most max_restarts times (launch/restart.py).
        params["slurm_setup"] = ["export TRIDENT_JOB_STARTED=$(date +%s)", *(params["slurm_setup"] or [])]
        params["slurm_teardown"] = [f"{shlex.quote(sys.executable)} -m launch.restart {launcher.max_restarts} $?"]
        least = min_nodes(launcher, par)
        if least < launcher.nodes:
            # Elastic (parallel=auto): a node lost does not end the job (--no-kill: SLURM takes it out of the
            # allocation, srun fails, the teardown names it and requeues), and the job asks for a range of
            # nodes and CPUs per node rather than a task count (SLURM keeps both across a requeue, and nodes x
            # tasks fit only all the nodes). srun starts tasks_per_node on each node the job got, so the
            # requeued job runs on the nodes left and parallel=auto plans for their ranks.
            per_node = params.pop("tasks_per_node")
            params["slurm_additional_parameters"] = {
                "nodes": f"{least}-{launcher.nodes}", "no_kill": True, "mincpus": per_node * launcher.cpus_per_task,
                **(params.get("slurm_additional_parameters") or {})}
            params["slurm_srun_args"] = [*params["slurm_srun_args"], f"--ntasks-per-node={per_node}"]
    return {k: v for k, v in params.items() if v is not None}


def record(job, run_dir: str, **extra) -> None:
    """slurm_job.json in the run dir: what trident-status needs to find the job and its logs."""
    info = {"job_id": job.job_id, "stdout": str(job.paths.stdout), "stderr": str(job.paths.stderr),
            "folder": str(job.paths.folder), "submitted": time.time(), **extra}
    Path(run_dir, "slurm_job.json").write_text(json.dumps(info, indent=1) + "\n")


def submit(run: SlurmRun, cfg) -> Any:
    """Submit one run as one job; return the submitit Job."""
    run_dir = run.run_dir
    launcher = cfg.launcher
    params = executor_params(cfg)
    import submitit  # only launcher=slurm needs it: a GPU box running launcher=local may not have it

    executor = submitit.AutoExecutor(folder=launcher.folder, cluster="slurm")
    executor.update_parameters(**params)
    job = executor.submit(run)
    record(job, run_dir)
    least = min_nodes(launcher, cfg.parallel)
    nodes = f"{least}-{launcher.nodes}" if least < launcher.nodes else launcher.nodes
    print(f"trident: submitted SLURM job {job.job_id} ({nodes} node(s) x "
          f"{tasks_per_node(launcher, world_size(cfg.parallel))} task(s))", flush=True)
    print(f"  rank 0 log  {job.paths.stdout}", flush=True)
    print(f"  errors      {job.paths.stderr}", flush=True)
    print(f"  run dir     {run_dir}", flush=True)
    print(f"  status      trident-status {run_dir}", flush=True)
    if launcher.wait:
        follow(job)
    return job


@dataclass
class SweepPoint:
    """One launcher=slurm point of a `-m` sweep, checked and prepared, waiting to be submitted."""

    run: SlurmRun
    params: dict
    array_parallelism: int
    wait: bool
    label: str


def sweep_point(run: SlurmRun, cfg) -> SweepPoint:
    """A sweep's point (its config holds its `sweep` entry), ready to join the array."""
    label = " ".join(f"{k}={v}" for k, v in run.cfg_dict["sweep"]["overrides"].items())
    return SweepPoint(run, executor_params(cfg), cfg.launcher.array_parallelism, cfg.launcher.wait, label)


def submit_sweep(pending: list[SweepPoint], sweep_dir: str, sweep_id: str) -> list:
    """Submit a sweep's points: one array per distinct set of job parameters. Returns the Jobs."""
    groups: dict[str, list[SweepPoint]] = {}
    for point in pending:
        groups.setdefault(json.dumps([point.params, point.array_parallelism], sort_keys=True), []).append(point)
    jobs = []
    import submitit  # only launcher=slurm needs it: a GPU box running launcher=local may not have it

    for points in groups.values():
        executor = submitit.AutoExecutor(folder=Path(sweep_dir) / "slurm", cluster="slurm")
        executor.update_parameters(**points[0].params, slurm_array_parallelism=points[0].array_parallelism)
        with executor.batch():
            batch = [executor.submit(p.run) for p in points]
        for point, job in zip(points, batch):
            record(job, point.run.run_dir, sweep=sweep_id)
        kind = "array" if len(batch) > 1 else "job"  # submitit submits a batch of one as a plain job
        print(f"trident: submitted SLURM {kind} {batch[0].job_id.split('_')[0]}: {len(batch)} point(s), "
              f"{points[0].params.get('tasks_per_node', 'elastic')} task(s) each, at most {points[0].array_parallelism} at once",
              flush=True)
        for point, job in zip(points, batch):
            print(f"  {job.job_id:<10} {point.label:<40} {point.run.run_dir}", flush=True)
        jobs += batch
    print(f"  logs        {Path(sweep_dir) / 'slurm'}", flush=True)
    print(f"  status      trident-status {sweep_dir}", flush=True)
    return jobs


# --- after submission --------------------------------------------------------------------------

def job_error(job) -> Optional[str]:
    """A finished job's error from submitit's own result files (None: every task returned), never sacct's state.

    sacct lags the job by seconds: a job whose every task has written its result can still read RUNNING
    there. submitit's `exception()` reads each task's result pickle: the failing task's traceback, or,
    for a task that wrote none (killed with the others by srun), the job's error stream.
    """
    error = job.exception()
    return None if error is None else str(error)


def error_line(error: str) -> str:
    """The line of a job error that says what went wrong: the last line of the task's traceback."""
    lines = error.strip().splitlines()
    bars = [i for i, line in enumerate(lines) if set(line.strip()) == {"-"}]
    inside = lines[bars[0] + 1:bars[1]] if len(bars) >= 2 else lines  # submitit fences the trace with dashes
    return next((line.strip() for line in reversed(inside) if line.strip()), error.strip()[:200])


def follow(job, poll_s: float = 2.0) -> None:
    """Stream rank 0's log until the job ends; raise if it failed."""
    shown = 0
    while True:
        done = job.done()
        log = Path(job.paths.stdout)
        if log.exists():
            text = log.read_text(errors="replace")
            sys.stdout.write(text[shown:])
            sys.stdout.flush()
            shown = len(text)
        if done:
            break
        time.sleep(poll_s)
    from submitit.core.utils import FailedJobError  # only launcher=slurm needs submitit

    try:
        job.results()
    except FailedJobError as e:  # carries the failing task's traceback
        raise RankFailed(f"SLURM job {job.job_id} failed:\n{e}") from None
