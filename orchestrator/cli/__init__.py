"""Entry points: thin shells (Hydra apps and argparse) over the library; nothing imports them."""

import sys
from typing import Callable

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from launch.env import from_environ
from launch.local import RankFailed
from orchestrator.config import CONF_DIR, register
from orchestrator.validate import ConfigError


def external_env(cfg: DictConfig):
    """launcher=external: this rank's place, from torchrun's or srun's variables (missing ones are a config
    error); None for the launchers that start their ranks themselves."""
    if cfg.launcher.name != "external":
        return None
    try:
        return from_environ()
    except RuntimeError as e:
        raise ConfigError(str(e)) from None


def rank_app(prog: str, config_name: str, doing: str, run: Callable) -> Callable[[], None]:
    """The console script of a Hydra app that runs a model over ranks (trident-generate, trident-eval): run(cfg,
    Hydra's own config); a ConfigError exits 2 and a failed rank 1, each with one line. (trident-train keeps
    its own: its job is named train, and it judges a sweep after Hydra returns.)"""

    @hydra.main(version_base="1.3", config_path=CONF_DIR, config_name=config_name)
    def hydra_main(cfg: DictConfig) -> None:
        try:
            run(cfg, HydraConfig.get())
        except ConfigError as e:
            print(f"{prog}: config error: {e}", file=sys.stderr, flush=True)
            sys.exit(2)
        except RankFailed as e:
            print(f"{prog}: {doing} failed: {e}", file=sys.stderr, flush=True)
            sys.exit(1)

    def main() -> None:
        register()
        hydra_main()

    return main
