"""`trident-generate` / `python -m orchestrator.cli.generate`: text from a checkpoint, tensor-parallel.

    trident-generate generate.checkpoint=RUN/checkpoints parallel.tp=2 generate.prompt="def fib("
    trident-generate model=llama3-8b model.init_from=DIR data.tokenizer=init_from parallel.tp=4 \\
        generate.prompts_file=prompts.jsonl generate.output=out.jsonl

A Hydra app over the same config tree as trident-train (conf/generate.yaml =
train.yaml + the `generate` group), so `model=`, `parallel.tp=` and
`launcher=local|external|slurm` mean what they mean there; with
generate.checkpoint, the model and the tokenizer are its run's, and the
command line may restate the model but not change its shape. Everything is
checked and the prompts tokenized before a rank starts
(orchestrator/generate/worker.py); then `local` spawns tp processes here,
`external` is one of the ranks torchrun or srun started, `slurm` submits a
job of tp tasks.
"""

import sys
from typing import Sequence

from omegaconf import DictConfig, OmegaConf

from launch.local import spawn
from launch.rank import pick_backend, run_rank
from orchestrator.cli import external_env, rank_app
from orchestrator.generate.worker import generate_worker, prepare, submit
from orchestrator.slurm_checks import check_cluster


def run(cfg: DictConfig, overrides: Sequence[str] = ()) -> None:
    """overrides: the command line's, which may restate a checkpoint's model (orchestrator.generate.worker.run_config)."""
    env = external_env(cfg)
    plan = prepare(cfg, env, overrides=overrides)
    cfg = plan.config
    if env is None or env.rank == 0:
        for warning in plan.warnings:
            print(f"trident-generate: warning: {warning}", file=sys.stderr, flush=True)
    if cfg.launcher.name == "slurm":
        check_cluster(cfg)
    plain = OmegaConf.to_container(cfg, resolve=True)
    par = cfg.parallel
    if cfg.launcher.name == "slurm":
        submit(cfg, plain, plan)
    elif env is None:
        spawn(generate_worker, par.tp, plain, plan.prompts, plan.checkpoint, backend=cfg.launcher.backend,
              timeout_s=par.timeout_s)
    else:
        backend = pick_backend(cfg.launcher.backend, env.local_world_size)
        run_rank(generate_worker, env, backend, par.timeout_s, plain, plan.prompts, plan.checkpoint)


main = rank_app("trident-generate", "generate", "generation", lambda cfg, hydra: run(cfg, hydra.overrides.task))


if __name__ == "__main__":
    main()
