"""launcher=slurm: submit the run as one SLURM job through submitit; each task is one rank.

The submitting process checks everything, prepares the data, submits, prints
the job id and where the logs are, and returns (or, with launcher.wait=true,
follows the job and streams rank 0's log). Inside the job every task reads
its rank from SLURM's variables (`launch.env`) and runs the same worker as
the other launchers.
"""

import signal
import sys
import time
from pathlib import Path
from typing import Optional

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
        from orchestrator.checkpoint import find_resume
        from orchestrator.trainer import run_worker

        env = from_environ()
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


def submit(cfg, plain: dict, run_dir: str, corpus):
    """Submit the job; return the submitit Job."""
    import submitit

    launcher, par = cfg.launcher, cfg.parallel
    world = par.tp * par.pp * par.dp
    executor = submitit.AutoExecutor(folder=launcher.folder, cluster="slurm")
    params = {
        "name": f"trident-{cfg.model.name}",
        "nodes": launcher.nodes,
        "tasks_per_node": tasks_per_node(launcher, world),
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
    }
    executor.update_parameters(**{k: v for k, v in params.items() if v is not None})
    job = executor.submit(SlurmRun(plain, run_dir, corpus, launcher.backend, par.timeout_s))
    print(f"trident: submitted SLURM job {job.job_id} ({launcher.nodes} node(s) x "
          f"{params['tasks_per_node']} task(s))", flush=True)
    print(f"  rank 0 log  {job.paths.stdout}", flush=True)
    print(f"  errors      {job.paths.stderr}", flush=True)
    print(f"  run dir     {run_dir}", flush=True)
    if launcher.wait:
        follow(job)
    return job


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
