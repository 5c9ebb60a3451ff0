"""`trident-plan`: every valid layout of a model on a cluster, its per-GPU memory and predicted step time.

    trident-plan model=llama3-70b cluster.gpus=256 train.seq_len=8192 train.global_batch=1024 \\
        train.dtype=bf16 [--top K] [--json] [--sweep K]
    trident-plan --serve model=llama3-70b generate.batch_size=16 generate.max_total_tokens=8192 [--json]
    trident-plan cluster=cpu --tune K | --tune-spread K [--tune-steps N] [--tune-dir DIR]
    trident-plan --calibrate [--calibrate-out FILE] [launcher=slurm launcher.nodes=2 ...]

--serve answers the question for serving instead: per tp degree, weights and
KV cache per GPU and the predicted decode latency and tokens/s
(orchestrator/planner/serve.py). --tune runs the best K layouts for a few
steps each and prints the measurement beside the prediction (orchestrator/search/tune.py);
--tune-spread K runs K layouts spread over the predicted range instead. --calibrate
measures the launcher's ranks (collectives, compute, the loop) and writes the cluster
file that `cluster=<name>` then plans with (orchestrator/search/calibrate.py).

A thin shell over `orchestrator.planner`: Hydra composes conf/plan.yaml (=
train.yaml + a cluster) with the overrides; the flags choose the output.
"""

import json
import sys
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from orchestrator.config import CONF_DIR, register
from orchestrator.planner.layouts import plan
from orchestrator.planner.render import as_json, serve_json, serve_table, sweep_lines, table
from orchestrator.planner.serve import serve_plan
from orchestrator.search.calibrate import CalibrationError, run_calibration
from orchestrator.search.tune import layout_overrides
from orchestrator.search.tune import report as tune_report
from orchestrator.search.tune import spread, tune
from orchestrator.validate import ConfigError


def user_overrides() -> list[str]:
    """The user's own overrides, minus the cluster's (trident-train has no cluster)."""
    try:
        return [o for o in HydraConfig.get().overrides.task if not o.lstrip("+~").startswith("cluster")]
    except ValueError:
        return []


def _flags(argv: list[str]) -> tuple[dict, list[str]]:
    """--top K, --json, --sweep K, --serve, --tune K, --tune-steps N, --tune-dir DIR: taken out before Hydra reads
    the overrides."""
    flags = {"top": None, "json": False, "sweep": None, "serve": False, "tune": None, "tune_spread": None,
             "tune_steps": 10, "tune_dir": None, "calibrate": False, "calibrate_out": None}
    rest, i = [], 0
    while i < len(argv):
        a = argv[i]
        if a in ("--top", "--sweep", "--tune", "--tune-spread", "--tune-steps"):
            if i + 1 >= len(argv) or not argv[i + 1].isdigit() or int(argv[i + 1]) < 1:
                raise SystemExit(f"trident-plan: {a} needs a number (1 or more)")
            flags[a[2:].replace("-", "_")] = int(argv[i + 1])
            i += 2
            continue
        if a in ("--tune-dir", "--calibrate-out"):
            if i + 1 >= len(argv) or argv[i + 1].startswith("-"):
                raise SystemExit(f"trident-plan: {a} needs a {'folder' if a == '--tune-dir' else 'file'}")
            flags[a[2:].replace("-", "_")] = argv[i + 1]
            i += 2
            continue
        if a in ("--json", "--serve", "--calibrate"):
            flags[a[2:]] = True
        else:
            rest.append(a)
        i += 1
    return flags, rest


def run(cfg: DictConfig, flags: dict) -> None:
    if flags["calibrate"] or flags["calibrate_out"]:
        try:
            run_calibration(cfg, flags["calibrate_out"], print_=lambda line: print(line, flush=True))
        except CalibrationError as e:
            print(f"trident-plan: calibration failed, nothing written: {e}", file=sys.stderr, flush=True)
            sys.exit(1)
        return
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
    if flags["tune"] or flags["tune_spread"]:
        run_tuning(cfg, rows, info, flags)
        return
    top = flags["top"]
    print(as_json(rows, info, top) if flags["json"] else table(rows, cfg, info, top))
    if flags["sweep"]:
        print("\n".join(sweep_lines(rows, flags["sweep"], user_overrides())), file=sys.stderr if flags["json"] else sys.stdout)


def run_tuning(cfg: DictConfig, rows, info: dict, flags: dict) -> None:
    """--tune K: the best K fitting layouts run for a few steps each; --tune-spread K: K fitting layouts spread
    over the predicted range, best to worst. Prediction and measurement side by side."""
    flag, k = ("--tune", flags["tune"]) if flags["tune"] else ("--tune-spread", flags["tune_spread"])
    if not any(r.fits for r in rows):
        raise ConfigError(f"{flag} {k}: no layout fits cluster={cfg.cluster.name}, so there is nothing to run")
    fitting = [r for r in rows if r.fits]
    if flags["tune"]:
        chosen = fitting[:k]
        print(table(rows, cfg, info, k), flush=True)
    else:
        if k > len(fitting):
            raise ConfigError(f"--tune-spread {k}: only {len(fitting)} layouts of {cfg.model.name} fit "
                              f"cluster={cfg.cluster.name}; choose K of at most {len(fitting)}")
        chosen = spread(rows, k)
        print(table(chosen, cfg, info), flush=True)
    tune_dir = Path(flags["tune_dir"] or f"multirun/tune-{time.strftime('%Y-%m-%d-%H-%M-%S')}").absolute()
    user = user_overrides()
    runs = tune(cfg, chosen, user, tune_dir, flags["tune_steps"], out=lambda line: print(line, flush=True))
    text, rho, mdre = tune_report(runs, cfg, user)
    print(text, flush=True)
    (tune_dir / "tune.json").write_text(json.dumps({
        "spearman": rho, "median_abs_rel_error": mdre, "selection": flag.lstrip("-"), "steps": flags["tune_steps"],
        "cluster": cfg.cluster.name, "model": cfg.model.name,
        "layouts": [{"overrides": layout_overrides(m.layout), "predicted_step_s": m.layout.step_s,
                     "predicted": {"compute_s": m.layout.compute_s, "tp_s": m.layout.tp_s, "pp_s": m.layout.pp_s,
                                   "dp_s": m.layout.dp_s, "bubble": m.layout.bubble},
                     "measured_step_s": m.step_s, "tokens_per_s": m.tokens_per_s,
                     "predicted_gib": m.layout.worst.total / 2**30, "measured_peak_gb": m.mem_gb,
                     "run_dir": str(m.run_dir), "error": m.error} for m in runs]}, indent=1) + "\n")
    print(f"trident-plan: runs and tune.json in {tune_dir}", flush=True)


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
