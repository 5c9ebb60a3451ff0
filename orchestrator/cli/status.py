"""`trident-status [DIR ...] [--json]`: where a run's or a sweep's SLURM jobs stand.

DIR is a run dir, a sweep dir (its points are the subdirs), or left out: the
newest under `multirun/` and `outputs/`. For a search (hydra/sweeper=trident-optuna)
each trial's state is its state in the study, and the table ends with the
counts by state and the best trial.
"""

import argparse
import json
import sys
from pathlib import Path

from orchestrator.search.status import newest, print_table, search_summary, sweep_status


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="trident-status", description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="*", type=Path, help="run or sweep dirs (default: the newest)")
    parser.add_argument("--json", action="store_true", help="one JSON list of rows instead of a table")
    args = parser.parse_args(argv)
    paths = args.paths or [p for p in [newest()] if p is not None]
    if not paths:
        print("trident-status: no runs under multirun/ or outputs/; name a run or sweep dir", file=sys.stderr)
        return 2
    rows, summary = [], []
    for path in paths:
        if not path.is_dir():
            print(f"trident-status: {path} is not a directory", file=sys.stderr)
            return 2
        rows += sweep_status(path)
        summary += search_summary(path)
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print_table(rows)
        for line in summary:
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
