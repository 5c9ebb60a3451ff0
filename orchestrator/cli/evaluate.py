"""`trident-eval` / `python -m orchestrator.cli.evaluate`: lm-evaluation-harness tasks on a checkpoint, tensor-parallel.

    trident-eval eval.checkpoint=RUN/checkpoints "eval.tasks=[stdlib_next_line_mc,stdlib_complete_line]" \\
        parallel.tp=2 eval.limit=100

A Hydra app over the same config tree as trident-generate (conf/eval.yaml =
generate.yaml + the `eval` group): the checkpoint brings its run's model and
tokenizer, `parallel.tp` splits it, `launcher=local|external` starts or joins
the ranks, `launcher=slurm` submits them as a job of their own. The tasks, the
checkpoint and the layout are checked before a rank starts or a job is
submitted (orchestrator/evaluate/harness.py); rank 0 runs lm-eval and appends the
results to evals.jsonl in the checkpoint's run dir.
"""

import sys
from pathlib import Path
from typing import Optional, Sequence

from omegaconf import DictConfig, OmegaConf

from launch.local import spawn
from launch.rank import pick_backend, run_rank
from launch.slurm import follow, submit_command
from orchestrator.cli import external_env, rank_app
from orchestrator.evaluate.beside import quote, slurm_params
from orchestrator.evaluate.harness import eval_worker, output_path, prepare
from orchestrator.validate import ConfigError


def run(cfg: DictConfig, overrides: Sequence[str] = ()) -> None:
    env = external_env(cfg)
    cfg, checkpoint, names, folders = prepare(cfg, env, overrides)
    if cfg.launcher.name == "slurm":
        submit_job(cfg, checkpoint, overrides)
        return
    plain = OmegaConf.to_container(cfg, resolve=True)
    if env is None:
        spawn(eval_worker, cfg.parallel.tp, plain, checkpoint, names, folders, backend=cfg.launcher.backend,
              timeout_s=cfg.parallel.timeout_s)
    else:
        backend = pick_backend(cfg.launcher.backend, env.local_world_size)
        run_rank(eval_worker, env, backend, cfg.parallel.timeout_s, plain, checkpoint, names, folders)


def submit_job(cfg: DictConfig, checkpoint: Optional[str], overrides: Sequence[str]) -> None:
    """launcher=slurm: the same evaluation as a job of its own (one node, parallel.tp tasks, each a rank of
    `trident-eval launcher=external`), checked here first; launcher.wait follows it."""
    try:
        params = slurm_params(cfg, cfg.parallel.tp)
    except ValueError as e:
        raise ConfigError(f"launcher.time: {e}") from None
    argv = [sys.executable, "-m", "orchestrator.cli.evaluate",
            *(o for o in overrides if not o.lstrip("+~").startswith("launcher")), "launcher=external"]
    if checkpoint is not None:
        argv.append(f"eval.checkpoint={quote(str(Path(checkpoint).resolve()))}")
    folder = output_path(cfg, checkpoint).resolve().parent / "evals" / "slurm"
    job = submit_command(argv, params, str(folder))
    print(f"trident-eval: submitted SLURM job {job.job_id} (1 node x {cfg.parallel.tp} task(s))", flush=True)
    print(f"  log      {job.paths.stdout}", flush=True)
    print(f"  results  {output_path(cfg, checkpoint)}", flush=True)
    if cfg.launcher.wait:
        follow(job)


main = rank_app("trident-eval", "eval", "evaluation", lambda cfg, hydra: run(cfg, hydra.overrides.task))


if __name__ == "__main__":
    main()
