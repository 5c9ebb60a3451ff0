"""The pipeline bubble of every schedule, simulated from its action lists, against theory.

    .venv/bin/python bench/pipeline_bubble.py [--pp 4] [--png DIR]

Prints JSON: for each schedule and m in {4, 8, 16}, the simulated idle
fraction with unit costs (F=1, B=2, split backward I=1 + W=1) and the
analytic value where theory gives one. With --png, writes one timeline
picture per schedule at m=8 (orchestrator/planner/timeline.py: rows are pp
ranks; blue F, green B, light green I, orange W, white idle).
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from orchestrator.planner.bubble import analytic_bubble, pipeline_orders, simulate  # noqa: E402
from orchestrator.planner.timeline import draw  # noqa: E402
from parallel.pipeline_parallel import SCHEDULES  # noqa: E402

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pp", type=int, default=4)
    ap.add_argument("--png", type=Path, default=None)
    args = ap.parse_args()
    out = {"pp": args.pp, "costs": {"F": 1, "B": 2, "I": 1, "W": 1}, "schedules": {}}
    for name in SCHEDULES:
        rows = {}
        for m in (4, 8, 16):
            try:
                orders, n_stages = pipeline_orders(name, args.pp, m)
            except ValueError as e:  # e.g. DualPipeV with fewer micro-batches than stages
                rows[m] = {"error": str(e)}
                continue
            result = simulate(orders, n_stages)
            theory = analytic_bubble(name, args.pp, m, n_stages // args.pp)
            rows[m] = {
                "stages": n_stages,
                "simulated": round(result["bubble"], 6),
                "analytic": None if theory is None else round(theory, 6),
                "makespan": result["makespan"],
            }
            if args.png and m == 8:
                args.png.mkdir(parents=True, exist_ok=True)
                draw(result, args.pp).save(args.png / f"{name}-pp{args.pp}-m{m}.png")
        out["schedules"][name] = rows
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
