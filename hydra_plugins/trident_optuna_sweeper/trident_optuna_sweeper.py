"""Hydra's side of `hydra/sweeper=trident-optuna`: the plugin Hydra finds in its hydra_plugins namespace.

Hydra only instantiates sweepers that its plugin scan found under `hydra_plugins`; the search itself is
trident's (orchestrator/search/engine.py), and its settings live in conf/hydra/sweeper/trident-optuna.yaml.
"""

import sys
from typing import Any, List, Optional, Sequence

from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

from orchestrator.search.engine import Search
from orchestrator.validate import ConfigError


class TridentOptunaSweeper(Sweeper):
    def __init__(self, **settings: Any) -> None:
        self.settings = OmegaConf.create({k: v for k, v in settings.items() if k != "sampler"})
        self.sampler = settings.get("sampler")  # Hydra has built it already (or left its config)
        self.config: Optional[DictConfig] = None
        self.hydra_context: Optional[HydraContext] = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        # Each trial is a trident-train process of its own: the task function is not called here.
        self.hydra_context, self.config = hydra_context, config

    def sweep(self, arguments: List[str]) -> Sequence[Any]:
        settings = self.settings.copy()
        try:
            search = Search(settings, self.config, self.hydra_context.config_loader, list(arguments),
                            sampler=self.sampler)
            code = search.run()
        except ConfigError as e:
            print(f"trident: config error: {e}", file=sys.stderr, flush=True)
            sys.exit(2)
        except KeyboardInterrupt:  # the search has marked its running trials INTERRUPTED
            sys.exit(130)
        if code:
            sys.exit(code)
        return []
