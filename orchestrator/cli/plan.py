"""`trident-plan`: every valid layout of a model on a cluster, its per-GPU memory and predicted step time.

    trident-plan model=llama3-70b cluster.gpus=256 train.seq_len=8192 train.global_batch=1024 \\
        train.dtype=bf16 [--top K] [--json] [--sweep K]

A thin shell over `orchestrator.planner`: Hydra composes conf/plan.yaml (=
train.yaml + a cluster) with the overrides; the flags choose the output.
"""

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from orchestrator.config import CONF_DIR, register
from orchestrator.planner.layouts import plan
from orchestrator.planner.render import as_json, sweep_lines, table
from orchestrator.validate import ConfigError


def user_overrides() -> list[str]:
    """The user's own overrides, minus the cluster's (trident-train has no cluster)."""
    try:
        return [o for o in HydraConfig.get().overrides.task if not o.lstrip("+~").startswith("cluster")]
    except ValueError:
        return []


def _flags(argv: list[str]) -> tuple[dict, list[str]]:
    """--top K, --json, --sweep K: output options, taken out before Hydra reads the overrides."""
    flags, rest, i = {"top": None, "json": False, "sweep": None}, [], 0
    while i < len(argv):
        a = argv[i]
        if a in ("--top", "--sweep"):
            if i + 1 >= len(argv) or not argv[i + 1].isdigit():
                raise SystemExit(f"trident-plan: {a} needs a number")
            flags[a[2:]] = int(argv[i + 1])
            i += 2
            continue
        if a == "--json":
            flags["json"] = True
        else:
            rest.append(a)
        i += 1
    return flags, rest


def run(cfg: DictConfig, flags: dict) -> None:
    rows, info = plan(cfg)
    if not rows:
        raise ConfigError(f"no valid layout of {cfg.model.name} on cluster.gpus={cfg.cluster.gpus}: "
                          + "; ".join(f"{n} rejected by {k}" for k, n in info["rejected"].items()))
    top = flags["top"]
    print(as_json(rows, info, top) if flags["json"] else table(rows, cfg, info, top))
    if flags["sweep"]:
        print("\n".join(sweep_lines(rows, flags["sweep"], user_overrides())), file=sys.stderr if flags["json"] else sys.stdout)


def _hydra_app(flags: dict):
    @hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="plan")
    def app(cfg: DictConfig) -> None:
        try:
            run(cfg, flags)
        except ConfigError as e:
            print(f"trident-plan: config error: {e}", file=sys.stderr, flush=True)
            sys.exit(2)

    return app


def main() -> None:
    flags, sys.argv[1:] = _flags(sys.argv[1:])
    register()
    _hydra_app(flags)()


if __name__ == "__main__":
    main()
