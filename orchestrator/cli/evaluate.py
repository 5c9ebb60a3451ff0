"""`trident-eval` / `python -m orchestrator.cli.evaluate`: lm-evaluation-harness tasks on a checkpoint, tensor-parallel.

    trident-eval eval.checkpoint=RUN/checkpoints "eval.tasks=[stdlib_next_line_mc,stdlib_complete_line]" \\
        parallel.tp=2 eval.limit=100

A Hydra app over the same config tree as trident-generate (conf/eval.yaml =
generate.yaml + the `eval` group): the checkpoint brings its run's model and
tokenizer, `parallel.tp` splits it, `launcher=local|external` starts or joins
the ranks. The tasks, the checkpoint and the layout are checked before a rank
starts (orchestrator/evaluate.py); rank 0 runs lm-eval and appends the results
to evals.jsonl in the checkpoint's run dir.
"""

from typing import Sequence

from omegaconf import DictConfig, OmegaConf

from launch.local import spawn
from launch.rank import pick_backend, run_rank
from orchestrator.cli import external_env, rank_app
from orchestrator.evaluate import eval_worker, prepare
from orchestrator.validate import ConfigError


def run(cfg: DictConfig, overrides: Sequence[str] = ()) -> None:
    env = external_env(cfg)
    if cfg.launcher.name not in ("local", "external"):
        raise ConfigError(f"launcher={cfg.launcher.name}: trident-eval runs with launcher=local or external "
                          "(under SLURM: srun trident-eval launcher=external)")
    cfg, checkpoint, names, folders = prepare(cfg, env, overrides)
    plain = OmegaConf.to_container(cfg, resolve=True)
    if env is None:
        spawn(eval_worker, cfg.parallel.tp, plain, checkpoint, names, folders, backend=cfg.launcher.backend,
              timeout_s=cfg.parallel.timeout_s)
    else:
        backend = pick_backend(cfg.launcher.backend, env.local_world_size)
        run_rank(eval_worker, env, backend, cfg.parallel.timeout_s, plain, checkpoint, names, folders)


main = rank_app("trident-eval", "eval", "evaluation", lambda cfg, hydra: run(cfg, hydra.overrides.task))


if __name__ == "__main__":
    main()
