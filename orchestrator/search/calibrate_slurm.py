"""`trident-plan --calibrate launcher=slurm`: the calibration's ranks as the tasks of one SLURM job.

The job has the launcher's nodes and tasks per node (launcher.tasks_per_node,
else launcher.gpus_per_node, else cluster.gpus_per_node), so it measures
the links a training job on those nodes would use, inter-node ones
included. Rank 0 writes its figures beside submitit's job files (shared
storage, as the job's logs are), and this process waits for the job, reads
them and writes the cluster file itself.
"""

import time
from pathlib import Path
from typing import Callable

from omegaconf import DictConfig

from launch.env import from_environ
from launch.rank import pick_backend, run_rank
from launch.slurm import error_line, job_error, time_minutes
from orchestrator.planner.cluster import CalibrationError


class CalibrationTask:
    """What submitit pickles and every task of the job calls: one rank of the calibration (measure(env, device,
    spec, corpus), a module-level function, pickled by name)."""

    def __init__(self, measure: Callable, spec: dict, backend: str, timeout_s: float, corpus=None):
        self.measure, self.spec, self.backend, self.timeout_s, self.corpus = measure, spec, backend, timeout_s, corpus

    def __call__(self) -> int:
        env = from_environ()
        backend = pick_backend(self.backend, env.local_world_size)
        run_rank(self.measure, env, backend, self.timeout_s, self.spec, self.corpus, exit_process=False)
        return env.rank


def slurm_shape(cfg: DictConfig) -> tuple[int, int]:
    """(ranks, ranks per node) of the calibration job."""
    launcher = cfg.launcher
    local = launcher.tasks_per_node or launcher.gpus_per_node or cfg.cluster.gpus_per_node
    return launcher.nodes * local, local


def calibrate_in_job(measure: Callable, cfg: DictConfig, spec: dict, tmp: str, corpus=None) -> None:
    """Submit the job, wait for it, leave rank 0's figures at tmp/raw.json; CalibrationError if it fails."""
    import submitit  # only launcher=slurm needs it

    launcher = cfg.launcher
    folder = Path(launcher.folder or "slurm").absolute() / f"calibrate-{time.strftime('%Y%m%d-%H%M%S')}"
    folder.mkdir(parents=True, exist_ok=True)
    spec = {**spec, "out": str(folder / "raw.json")}
    _, local = slurm_shape(cfg)
    executor = submitit.AutoExecutor(folder=str(folder), cluster="slurm")
    params = {"name": "trident-calibrate", "nodes": launcher.nodes, "tasks_per_node": local,
              "cpus_per_task": launcher.cpus_per_task, "timeout_min": time_minutes(launcher.time),
              "gpus_per_node": launcher.gpus_per_node or None, "mem_gb": launcher.mem_gb,
              "slurm_partition": launcher.partition, "slurm_account": launcher.account, "slurm_qos": launcher.qos,
              "slurm_constraint": launcher.constraint, "slurm_setup": list(launcher.setup) or None,
              "slurm_srun_args": ["--kill-on-bad-exit=1"]}
    executor.update_parameters(**{k: v for k, v in params.items() if v is not None})
    job = executor.submit(CalibrationTask(measure, spec, launcher.backend, float(cfg.parallel.timeout_s), corpus))
    print(f"trident-plan: calibration submitted as SLURM job {job.job_id} ({launcher.nodes} node(s) x {local} "
          f"task(s)); logs in {folder}", flush=True)
    while not job.done():
        time.sleep(2)
    error = job_error(job)
    if error is not None:
        raise CalibrationError(f"SLURM job {job.job_id} failed: {error_line(error)}")
    Path(tmp, "raw.json").write_text(Path(spec["out"]).read_text())
