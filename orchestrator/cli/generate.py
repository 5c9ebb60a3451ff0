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
(orchestrator/generate.py); then `local` spawns tp processes here,
`external` is one of the ranks torchrun or srun started, `slurm` submits a
job of tp tasks.
"""

import sys
from typing import Sequence

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from launch.env import from_environ
from launch.local import RankFailed, spawn
from launch.rank import pick_backend, run_rank
from orchestrator.config import CONF_DIR, register
from orchestrator.generate import generate_worker, prepare, submit
from orchestrator.slurm_checks import check_cluster
from orchestrator.validate import ConfigError


def run(cfg: DictConfig, overrides: Sequence[str] = ()) -> None:
    """overrides: the command line's, which may restate a checkpoint's model (orchestrator.generate.run_config)."""
    env = None
    if cfg.launcher.name == "external":
        try:
            env = from_environ()
        except RuntimeError as e:
            raise ConfigError(str(e)) from None
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


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="generate")
def _hydra_main(cfg: DictConfig) -> None:
    try:
        run(cfg, HydraConfig.get().overrides.task)
    except ConfigError as e:
        print(f"trident-generate: config error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except RankFailed as e:
        print(f"trident-generate: generation failed: {e}", file=sys.stderr, flush=True)
        sys.exit(1)


def main() -> None:
    register()
    _hydra_main()


if __name__ == "__main__":
    main()
