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
at once. Nothing requeues a failed job: only SLURM's USR2 does that.

No secrets travel in what is submitted: the pickle holds the plain config and
the sbatch script only the launcher's settings. A W&B key stays in the
environment, which sbatch passes to the job when it starts.
"""

import functools
import json
import re
import shutil
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from orchestrator.validate import ConfigError

from launch.env import from_environ
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


class SlurmRun:
    """What submitit pickles and every task of the job calls: one rank of the run.

    Preemption and time limits: SLURM's USR2 (sent before the time limit, or
    by `scancel --signal=USR2`) only raises a flag here; the loop agrees on
    it across ranks at a step boundary, saves a checkpoint and returns; then
    global rank 0 hands the signal to submitit, which calls `checkpoint()`
    and requeues the job. The requeued job finds that checkpoint by itself.
    """

    def __init__(self, cfg_dict: dict, run_dir: str, corpus, backend: str, timeout_s: float):
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
        from orchestrator.checkpoint import find_resume
        from orchestrator.trainer import run_worker

        ckpt = self.cfg_dict["checkpoint"]
        # Looked up here, not at submission: a requeued job resumes from what exists now.
        resume: Optional[Path] = find_resume(ckpt["resume"], ckpt["dir"])
        requested = []
        submitit_handler = signal.getsignal(signal.SIGUSR2)
        signal.signal(signal.SIGUSR2, lambda signum, frame: requested.append(signum))
        backend = pick_backend(self.backend, env.local_world_size)
        summary = run_rank(run_worker, env, backend, self.timeout_s, self.cfg_dict, self.run_dir, self.corpus,
                           str(resume) if resume else None, lambda: bool(requested), exit_process=False)
        if summary.get("preempted") and env.rank == 0 and callable(submitit_handler):
            submitit_handler(signal.SIGUSR2, None)  # checkpoint() below, then requeue and exit
        return env.rank

    def checkpoint(self, *args, **kwargs):
        """submitit's protocol: what to run when the job comes back (the same run; it resumes itself)."""
        import submitit

        return submitit.helpers.DelayedSubmission(self)


# --- before submission -------------------------------------------------------------------------

SECRET = re.compile(r"\b(\w*(API_KEY|TOKEN|SECRET|PASSWORD)\w*)\s*=\s*['\"]?[^$'\"\s]")


def check_no_secrets(launcher) -> None:
    """A literal key in a setup line or an sbatch option would be written into the job script."""
    for key, lines in (("launcher.setup", list(launcher.setup)),
                       ("launcher.extra_sbatch", [f"{k}={v}" for k, v in launcher.extra_sbatch.items()])):
        for line in lines:
            found = SECRET.search(str(line))
            if found:
                raise ConfigError(
                    f"{key} sets {found.group(1)} to a literal value, which would be written into the job script: "
                    f"export it in the submitting shell instead (sbatch passes the environment to the job)"
                )


@dataclass
class Partition:
    name: str
    default: bool
    gpus_per_node: int


def parse_sinfo(text: str) -> list[Partition]:
    """`sinfo -h -o "%P %G"` lines, e.g. `debug* gpu:h100:8(S:0-1)` or `cpu (null)`, one per node group."""
    found: dict[str, Partition] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        name, _, gres = line.strip().partition(" ")
        gpus = sum(int(m.group(1)) for m in re.finditer(r"gpu(?::[^:,(]+)?:(\d+)", gres))
        part = found.setdefault(name.rstrip("*"), Partition(name.rstrip("*"), name.endswith("*"), gpus))
        part.gpus_per_node = max(part.gpus_per_node, gpus)
    return list(found.values())


def check_partition(launcher, tasks: int, partitions: list[Partition]) -> None:
    """The partition exists (or the cluster has a default), and a GPU partition has a GPU per task."""
    names = ", ".join(p.name for p in partitions) or "none"
    if launcher.partition is None:
        chosen = next((p for p in partitions if p.default), None)
        if chosen is None:
            raise ConfigError(f"launcher.partition is not set and this cluster has no default partition "
                              f"(valid: {names})")
    else:
        chosen = next((p for p in partitions if p.name == launcher.partition), None)
        if chosen is None:
            raise ConfigError(f"launcher.partition={launcher.partition!r} is not a partition of this cluster "
                              f"(valid: {names})")
    if chosen.gpus_per_node and (launcher.gpus_per_node or 0) < tasks:
        raise ConfigError(
            f"partition {chosen.name!r} has {chosen.gpus_per_node} GPUs per node: launcher.gpus_per_node="
            f"{launcher.gpus_per_node} < {tasks} tasks per node (valid: {tasks}..{chosen.gpus_per_node}, "
            "one GPU per rank)"
        )


@functools.lru_cache(maxsize=1)
def partitions() -> list[Partition]:
    """The cluster's partitions, asked once per process (a sweep checks every point against them)."""
    out = subprocess.run(["sinfo", "-h", "-o", "%P %G"], capture_output=True, text=True, timeout=60)
    if out.returncode:
        raise ConfigError(f"launcher=slurm: sinfo failed, is the cluster up? {out.stderr.strip()}")
    return parse_sinfo(out.stdout)


def check_cluster(cfg) -> None:
    """What only the cluster can tell, asked before anything is submitted."""
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        raise ConfigError("launcher=slurm needs SLURM's sbatch and sinfo on PATH: submit from a login node "
                          "(or start a local cluster: launch/cluster/start-cluster.sh)")
    world = cfg.parallel.tp * cfg.parallel.pp * cfg.parallel.dp
    check_partition(cfg.launcher, tasks_per_node(cfg.launcher, world), partitions())
    check_no_secrets(cfg.launcher)


# --- submission --------------------------------------------------------------------------------

def executor_params(cfg) -> dict[str, Any]:
    """submitit's parameters for this run's job (an array's elements all share one set)."""
    launcher, par = cfg.launcher, cfg.parallel
    params = {
        "name": f"trident-{cfg.model.name}",
        "nodes": launcher.nodes,
        "tasks_per_node": tasks_per_node(launcher, par.tp * par.pp * par.dp),
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
        # One rank failing ends the job at once, instead of the others waiting in a collective.
        "slurm_srun_args": ["--kill-on-bad-exit=1"],
    }
    return {k: v for k, v in params.items() if v is not None}


def record(job, run_dir: str, **extra) -> None:
    """slurm_job.json in the run dir: what trident-status needs to find the job and its logs."""
    info = {"job_id": job.job_id, "stdout": str(job.paths.stdout), "stderr": str(job.paths.stderr),
            "folder": str(job.paths.folder), "submitted": time.time(), **extra}
    Path(run_dir, "slurm_job.json").write_text(json.dumps(info, indent=1) + "\n")


def submit(cfg, plain: dict, run_dir: str, corpus):
    """Submit one run as one job; return the submitit Job."""
    import submitit

    launcher = cfg.launcher
    params = executor_params(cfg)
    executor = submitit.AutoExecutor(folder=launcher.folder, cluster="slurm")
    executor.update_parameters(**params)
    job = executor.submit(SlurmRun(plain, run_dir, corpus, launcher.backend, cfg.parallel.timeout_s))
    record(job, run_dir)
    print(f"trident: submitted SLURM job {job.job_id} ({launcher.nodes} node(s) x "
          f"{params['tasks_per_node']} task(s))", flush=True)
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


def sweep_point(cfg, plain: dict, run_dir: str, corpus) -> SweepPoint:
    """A sweep's point (`plain` holds its `sweep` entry), ready to join the array."""
    run = SlurmRun(plain, run_dir, corpus, cfg.launcher.backend, cfg.parallel.timeout_s)
    label = " ".join(f"{k}={v}" for k, v in plain["sweep"]["overrides"].items())
    return SweepPoint(run, executor_params(cfg), cfg.launcher.array_parallelism, cfg.launcher.wait, label)


def submit_sweep(sweep) -> list:
    """Submit the sweep's points: one array per distinct set of job parameters. Returns the Jobs."""
    import submitit

    groups: dict[str, list[SweepPoint]] = {}
    for point in sweep.pending:
        groups.setdefault(json.dumps([point.params, point.array_parallelism], sort_keys=True), []).append(point)
    jobs = []
    for points in groups.values():
        executor = submitit.AutoExecutor(folder=Path(sweep.dir) / "slurm", cluster="slurm")
        executor.update_parameters(**points[0].params, slurm_array_parallelism=points[0].array_parallelism)
        with executor.batch():
            batch = [executor.submit(p.run) for p in points]
        for point, job in zip(points, batch):
            record(job, point.run.run_dir, sweep=sweep.id)
        kind = "array" if len(batch) > 1 else "job"  # submitit submits a batch of one as a plain job
        print(f"trident: submitted SLURM {kind} {batch[0].job_id.split('_')[0]}: {len(batch)} point(s), "
              f"{points[0].params['tasks_per_node']} task(s) each, at most {points[0].array_parallelism} at once",
              flush=True)
        for point, job in zip(points, batch):
            print(f"  {job.job_id:<10} {point.label:<40} {point.run.run_dir}", flush=True)
        jobs += batch
    print(f"  logs        {Path(sweep.dir) / 'slurm'}", flush=True)
    print(f"  status      trident-status {sweep.dir}", flush=True)
    if any(p.wait for p in sweep.pending):
        follow_all(jobs, sweep.dir)
    return jobs


# --- after submission --------------------------------------------------------------------------

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
    from submitit.core.utils import FailedJobError

    from launch.local import RankFailed

    try:
        job.results()
    except FailedJobError as e:  # carries the failing task's traceback
        raise RankFailed(f"SLURM job {job.job_id} failed:\n{e}") from None


def follow_all(jobs: list, sweep_dir: str, poll_s: float = 5.0) -> None:
    """Wait for every job of a sweep, print the status table; raise if any failed."""
    from launch.local import RankFailed
    from orchestrator.status import print_table, sweep_status

    while not all(job.done() for job in jobs):
        time.sleep(poll_s)
    rows = sweep_status(Path(sweep_dir))
    print_table(rows)
    failed = [r for r in rows if r["state"] != "COMPLETED"]
    if failed:
        raise RankFailed(f"{len(failed)} of {len(rows)} sweep point(s) did not complete: "
                         + ", ".join(f"{r['job_id']} {r['state']}" for r in failed))
