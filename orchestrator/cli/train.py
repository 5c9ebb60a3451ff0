"""`trident-train` / `python -m orchestrator.cli.train`: the Hydra app.

Compose the config, check it, prepare the data, then hand the ranks to the
launcher: `local` spawns them here, `external` is already one of them
(torchrun or srun started it), `slurm` submits a job whose tasks are the
ranks (under `-m`, every point joins one job array: orchestrator/search/sweep.py).
Nothing is spawned or submitted until every check passed.
"""

import json
import os
import sys
from pathlib import Path
from typing import Optional

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from launch.env import from_environ
from launch.local import RankFailed, spawn, thread_count
from launch.rank import pick_backend, run_rank
from launch.slurm import SlurmRun, submit, sweep_point, tasks_per_node
from orchestrator.config import CONF_DIR, register
from orchestrator.data.chat import ChatError
from orchestrator.data.corpus import CorpusError
from orchestrator.data.dataset import prepare
from orchestrator.data.tokenizer import TokenizerError
from orchestrator.evaluate.harness import check_beside
from orchestrator.planner.auto import choose, relayout
from orchestrator.planner.dry_run import dry_run
from orchestrator.runs.checkpoint import CheckpointError, check_compatible, find_resume
from orchestrator.search.sweep import SWEEP_POINT_ENV
from orchestrator.search.sweep import active as active_sweep
from orchestrator.search.sweep import failures as sweep_failures
from orchestrator.slurm_checks import check_cluster
from orchestrator.train.trainer import run_worker
from orchestrator.validate import ConfigError, check_corpus, validate
from parallel.mesh import ParallelDims

# The threads once everything is imported: the main one and OpenBLAS's idle pool (numpy's; it stops its threads
# before a fork and starts them again after). One started later (a tokenizer's or torch's pool, W&B) could hold a
# lock that a forked rank would wait on forever: then the ranks come from the fork server (launch/local.py).
THREADS_AT_IMPORT = thread_count()
# Whether parallel=auto's planner ran in this process (for this run or, under -m, an earlier point): it builds
# models in a fake world, and DTensor keeps what it computed there (orchestrator/planner/auto.py).
_planned_here = False


def may_fork() -> bool:
    """Whether launcher=local may fork the ranks from this process: no thread started since the imports, and
    no torch code ran here (a copy of a process the planner ran in would shard as rank 0 of its fake world)."""
    return not _planned_here and THREADS_AT_IMPORT is not None and thread_count() == THREADS_AT_IMPORT


def rank_env(cfg: DictConfig):
    """launcher=external: the environment torchrun or srun gave this process (None for local)."""
    if cfg.launcher.name != "external":
        return None
    try:
        return from_environ()
    except RuntimeError as e:
        raise ConfigError(str(e)) from None


def resume_path(cfg: DictConfig, env) -> Optional[str]:
    """The checkpoint this run starts from, checked before launch (None: a fresh start)."""
    ckpt = cfg.checkpoint
    try:
        path = find_resume(ckpt.resume, ckpt.dir)
        if path is None:
            leftovers = list(Path(ckpt.dir).glob("step-*")) if ckpt.resume == "auto" and Path(ckpt.dir).is_dir() else []
            if leftovers and (env is None or env.rank == 0):
                print(f"trident: warning: {ckpt.dir} holds no complete checkpoint (only {leftovers[0].name}...): "
                      "starting fresh", file=sys.stderr, flush=True)
            return None
        check_compatible(path, cfg.model)
    except CheckpointError as e:
        raise ConfigError(str(e)) from None
    return str(path)


def available_world(cfg: DictConfig, env) -> tuple[int, int]:
    """(ranks, ranks per node) the run has: what torchrun/srun started, or what the launcher will start."""
    la, par = cfg.launcher, cfg.parallel
    if env is not None:
        return env.world_size, env.local_world_size
    if la.name == "slurm":
        if la.nprocs is None and la.tasks_per_node is None:
            raise ConfigError("parallel=auto with launcher=slurm needs launcher.tasks_per_node (or launcher.nprocs): "
                              "the job's size is what the layout is planned for")
        world = la.nprocs or la.nodes * la.tasks_per_node
        return world, tasks_per_node(la, world) if la.nprocs is None else world // la.nodes
    world = la.nprocs or ParallelDims.of(par).world_size
    return world, world


def auto_layout(cfg: DictConfig, env) -> DictConfig:
    """parallel=auto: the planner's best layout for the ranks there are (orchestrator/planner/auto.py)."""
    global _planned_here
    if cfg.parallel.layout != "auto":
        return cfg
    world, local = available_world(cfg, env)
    if env is None:
        _planned_here = True
    cfg, line = choose(cfg, world, local, isolated=env is not None)  # a rank plans in a child process
    if env is None or env.rank == 0:
        print(f"trident: {line}", flush=True)
    return cfg


def first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def deliberate_stop(run_dir: str) -> bool:
    """The run ended itself on purpose (orchestrator/train/faults.py FaultStop): a restart would repeat it."""
    fault = Path(run_dir) / "fault.json"
    return fault.exists() and not json.loads(fault.read_text()).get("restart", True)


def spawn_with_restarts(cfg: DictConfig, plain: dict, run_dir: str, corpus, resume: Optional[str]) -> None:
    """launcher=local: spawn the ranks; if one fails, start again up to launcher.max_restarts times."""
    par, la = cfg.parallel, cfg.launcher
    for attempt in range(la.max_restarts + 1):
        (Path(run_dir) / "fault.json").unlink(missing_ok=True)
        try:
            spawn(run_worker, ParallelDims.of(par).world_size, plain, run_dir, corpus, resume, backend=la.backend,
                  timeout_s=par.timeout_s, ranks_dir=str(Path(run_dir) / "ranks"),
                  fork_here=may_fork())
            return
        except RankFailed as e:
            if attempt == la.max_restarts or deliberate_stop(run_dir):
                raise
            newest = find_resume("auto", cfg.checkpoint.dir)
            resume = str(newest) if newest is not None else resume
            print(f"trident: {first_line(e)}; restart {attempt + 1} of launcher.max_restarts={la.max_restarts}, "
                  f"from {resume or 'the start'}", file=sys.stderr, flush=True)


def run(cfg: DictConfig, run_dir: str) -> None:
    """Check, prepare, launch. Raises ConfigError before anything starts if the config cannot work."""
    env = rank_env(cfg)
    if cfg.data.format == "chat" and not cfg.data.mask_across_documents:
        # Conversations are packed into sequences: each stays a document of its own (attention and loss).
        with open_dict(cfg):
            cfg.data.mask_across_documents = True
    cfg = auto_layout(cfg, env)
    for warning in validate(cfg, env):
        if env is None or env.rank == 0:
            print(f"trident: warning: {warning}", file=sys.stderr, flush=True)
    if cfg.dry_run:  # every pp rank's stages built on the meta device at the full world size; nothing spawned
        if env is None or env.rank == 0:
            print(dry_run(cfg), flush=True)
        return
    try:
        # Tokenized here, once, before any rank starts (under SLURM: before submission); ranks memory-map it.
        corpus = prepare(cfg.data, cfg.model.init_from)
    except FileNotFoundError as e:
        raise ConfigError(f"data.path={cfg.data.path!r}: {e}") from None
    except (CorpusError, TokenizerError, ChatError) as e:
        raise ConfigError(str(e)) from None
    check_corpus(cfg, corpus)
    check_beside(cfg, env)
    resume = resume_path(cfg, env)

    sweep = active_sweep()
    if cfg.launcher.name == "slurm":
        check_cluster(cfg)
    plain = OmegaConf.to_container(cfg, resolve=True)
    if sweep is not None:  # this run is one point of a -m sweep: its W&B group and the overrides it varies
        hc = HydraConfig.get()
        plain["sweep"] = sweep.describe(hc.job.num, hc.overrides.task)
    elif os.environ.get(SWEEP_POINT_ENV):  # a trial of a search (hydra/sweeper=trident-optuna) started this run
        plain["sweep"] = json.loads(os.environ[SWEEP_POINT_ENV])
    if env is None or env.rank == 0:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        OmegaConf.save(OmegaConf.create(plain), Path(run_dir) / "config.yaml")

    par = cfg.parallel
    if cfg.launcher.name == "slurm":
        job = SlurmRun(run_worker, find_resume, plain, run_dir, corpus, cfg.launcher.backend, par.timeout_s,
                       relayout=relayout)
        if sweep is not None:
            sweep.pending.append(sweep_point(job, cfg))  # submitted with the others
        else:
            submit(job, cfg)
    elif env is None:
        spawn_with_restarts(cfg, plain, run_dir, corpus, resume)
    else:
        backend = pick_backend(cfg.launcher.backend, env.local_world_size)
        run_rank(run_worker, env, backend, par.timeout_s, plain, run_dir, corpus, resume,
                 trace_dir=str(Path(run_dir) / "ranks"))


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def _hydra_main(cfg: DictConfig) -> None:
    try:
        run(cfg, HydraConfig.get().runtime.output_dir)
    except ConfigError as e:
        print(f"trident: config error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except RankFailed as e:
        print(f"trident: training failed: {e}", file=sys.stderr, flush=True)
        sys.exit(1)


def main() -> None:
    register()
    _hydra_main()
    # A waited-for SLURM sweep (launcher.wait=true) whose points did not all complete: Hydra swallows what
    # its callbacks raise, so the verdict is taken here, after Hydra returned.
    failed = sweep_failures()
    if failed:
        print(f"trident: sweep failed: {len(failed)} point(s) did not complete", file=sys.stderr, flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
