"""`trident-plan`: every valid layout of a model on a cluster, its per-GPU memory and predicted step time.

    trident-plan model=llama3-70b cluster.gpus=256 train.seq_len=8192 train.global_batch=1024 \\
        train.dtype=bf16 [--top K] [--json] [--sweep K]
    trident-plan --serve model=llama3-70b generate.batch_size=16 generate.max_total_tokens=8192 [--json]

--serve answers the question for serving instead: per tp degree, weights and
KV cache per GPU and the predicted decode latency and tokens/s
(orchestrator/planner/serve.py).

A thin shell over `orchestrator.planner`: Hydra composes conf/plan.yaml (=
train.yaml + a cluster) with the overrides; the flags choose the output.
"""

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from orchestrator.config import CONF_DIR, register
from orchestrator.planner.layouts import plan
from orchestrator.planner.render import as_json, serve_json, serve_table, sweep_lines, table
from orchestrator.planner.serve import serve_plan
from orchestrator.validate import ConfigError


def user_overrides() -> list[str]:
    """The user's own overrides, minus the cluster's (trident-train has no cluster)."""
    try:
        return [o for o in HydraConfig.get().overrides.task if not o.lstrip("+~").startswith("cluster")]
    except ValueError:
        return []


def _flags(argv: list[str]) -> tuple[dict, list[str]]:
    """--top K, --json, --sweep K, --serve: output options, taken out before Hydra reads the overrides."""
    flags, rest, i = {"top": None, "json": False, "sweep": None, "serve": False}, [], 0
    while i < len(argv):
        a = argv[i]
        if a in ("--top", "--sweep"):
            if i + 1 >= len(argv) or not argv[i + 1].isdigit():
                raise SystemExit(f"trident-plan: {a} needs a number")
            flags[a[2:]] = int(argv[i + 1])
            i += 2
            continue
        if a in ("--json", "--serve"):
            flags[a[2:]] = True
        else:
            rest.append(a)
        i += 1
    return flags, rest


def run(cfg: DictConfig, flags: dict) -> None:
    if flags["serve"]:
        rows, info = serve_plan(cfg)
        if not rows:
            raise ConfigError(f"no tp degree of {cfg.model.name} on cluster.gpus={cfg.cluster.gpus}: "
                              + "; ".join(f"tp={tp}: {why}" for tp, why in info["rejected"].items()))
        print(serve_json(rows, info) if flags["json"] else serve_table(rows, cfg, info))
        return
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
