"""All-reduce bandwidth of gloo between processes on this machine: the CPU cluster preset's link speed.

    .venv/bin/python bench/gloo_bandwidth.py [ranks] [MiB]

Spawns `ranks` processes (default 8) and times all-reduces of a `MiB`-sized
fp32 tensor (default 4), after warm-up. Prints JSON: the median time and the
bus bandwidth, 2(n-1)/n x bytes / time per rank, the figure the planner's
cost model divides ring traffic by (conf/cluster/cpu.yaml: intra_node_gbps).
"""

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from launch.local import spawn  # noqa: E402


def worker(env, device, mib: float, reps: int, out: str) -> None:
    x = torch.ones(int(mib * 2**20 / 4))
    for _ in range(3):
        dist.all_reduce(x)
    times = []
    for _ in range(reps):
        dist.barrier()
        t0 = time.perf_counter()
        dist.all_reduce(x)
        times.append(time.perf_counter() - t0)
    if env.rank == 0:
        Path(out).write_text(json.dumps(times))


def main() -> None:
    ranks = int(sys.argv[1]) if len(sys.argv) > 1 else 8
    mib = float(sys.argv[2]) if len(sys.argv) > 2 else 4.0
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "times.json")
        spawn(worker, ranks, mib, 20, out, backend="gloo", timeout_s=120)
        times = json.loads(Path(out).read_text())
    t = statistics.median(times)
    size = mib * 2**20
    print(json.dumps({"ranks": ranks, "mib": mib, "median_s": t,
                      "bus_gbps": 2 * (ranks - 1) / ranks * size / t / 1e9}, indent=1))


if __name__ == "__main__":
    main()
