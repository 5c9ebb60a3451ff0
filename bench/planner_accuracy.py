"""How well the planner's step times rank and predict real runs on this machine (8 local gloo ranks).

    .venv/bin/python bench/planner_accuracy.py [--cluster cpu] [--calibrate] [--steps 8] [--out DIR]

--calibrate first measures this machine (`trident-plan --calibrate`) into
conf/cluster/<cluster>.yaml, which the rest then plans with; without it the
committed file is used. Then, each a real `trident-plan` run:

  default    llama-debug, seq 256, global batch 16: --tune-spread 8 (8 fitting
             layouts spread over the predicted range, best to worst)
  long-seq   the same model at seq 1024, global batch 8, a shape the
             calibration never ran (its curve is read at tokens it did not
             measure): --tune-spread 8
  top6       the default shape, --tune 6: is the planner's first pick within
             15% of the fastest of the six?

Prints JSON: per part the Spearman rank correlation between predicted and
measured step time, the median |predicted - measured| / measured, each
layout's figures, and the targets met. Runs one after another: each takes
the whole machine.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PLAN = [sys.executable, "-m", "orchestrator.cli.plan"]
SHAPES = {"default": [], "long-seq": ["train.seq_len=1024", "train.global_batch=8"]}
TARGETS = {"spearman": 0.8, "median_abs_rel_error": 0.25, "first_pick_within": 0.15}


def run(args: list[str], log: Path) -> None:
    with open(log, "w") as out:
        code = subprocess.call([*PLAN, *args], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    if code:
        raise SystemExit(f"planner_accuracy: {' '.join(args)} failed ({code}); see {log}")


def tuned(cluster: str, flag: str, k: int, overrides: list[str], steps: int, out: Path) -> dict:
    run([f"cluster={cluster}", *overrides, flag, str(k), "--tune-steps", str(steps), "--tune-dir", str(out)],
        out.with_suffix(".log"))
    doc = json.loads((out / "tune.json").read_text())
    rows = [{"layout": " ".join(r["overrides"]), "predicted_s": r["predicted_step_s"], "measured_s": r["measured_step_s"]}
            for r in doc["layouts"]]
    return {"spearman": doc["spearman"], "median_abs_rel_error": doc["median_abs_rel_error"], "layouts": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cluster", default="cpu")
    ap.add_argument("--calibrate", action="store_true")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    out = Path(a.out or f"multirun/planner-accuracy-{time.strftime('%Y-%m-%d-%H-%M-%S')}").absolute()
    out.mkdir(parents=True, exist_ok=True)
    result: dict = {"cluster": a.cluster, "steps": a.steps, "out": str(out)}
    if a.calibrate:
        started = time.perf_counter()
        run([f"cluster={a.cluster}", f"calibrate.name={a.cluster}", "--calibrate", "--calibrate-out",
             str(ROOT / "conf" / "cluster" / f"{a.cluster}.yaml")], out / "calibrate.log")
        result["calibrate_s"] = round(time.perf_counter() - started, 1)
    for name, overrides in SHAPES.items():
        part = tuned(a.cluster, "--tune-spread", 8, overrides, a.steps, out / name)
        part["met"] = (part["spearman"] is not None and part["spearman"] >= TARGETS["spearman"]
                       and part["median_abs_rel_error"] <= TARGETS["median_abs_rel_error"])
        result[name] = part
        print(json.dumps({name: {k: part[k] for k in ("spearman", "median_abs_rel_error", "met")}}), flush=True)
    top = tuned(a.cluster, "--tune", 6, [], a.steps, out / "top6")
    measured = [r["measured_s"] for r in top["layouts"] if r["measured_s"] is not None]
    first = top["layouts"][0]["measured_s"]
    top["first_pick_over_fastest"] = first / min(measured) if first and measured else None
    top["met"] = top["first_pick_over_fastest"] is not None and \
        top["first_pick_over_fastest"] <= 1 + TARGETS["first_pick_within"]
    result["top6"] = top
    result["targets"] = TARGETS
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
