"""Layout tuning: the planner's best layouts run for real, measured, and set against its prediction.

`trident-plan --tune K` takes the K best fitting layouts of the plan (same
model, cluster, batch and levers), runs each as a short real trident-train
run (`--tune-steps`, default 10) in `<tune dir>/<i>` -- one after the other on
this machine (launcher=local: runs sharing cores would measure each other), or
all submitted at once as SLURM jobs (launcher=slurm) -- and reads each run's
metrics.jsonl: the median step time after the first steps (warm-up), the
tokens/s it gives, and the peak memory rank 0 logged. It prints prediction
and measurement side by side, the Spearman rank correlation between predicted
and measured step time, and the trident-train line of the fastest measured
layout.
"""

import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig

from orchestrator.planner.layouts import Layout
from orchestrator.search.trials import RunProcess

WARMUP = 2  # steps left out of the measured step time: the first ones pay for allocation and caches


@dataclass
class Measured:
    layout: Layout
    run_dir: Path
    step_s: Optional[float] = None  # median measured step time
    tokens_per_s: Optional[float] = None
    mem_gb: Optional[float] = None  # peak memory rank 0 logged (on CPU: its process's peak RSS)
    error: Optional[str] = None


def ranks(values: list[float]) -> list[float]:
    """1-based ranks, ties sharing their mean rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(a: list[float], b: list[float]) -> Optional[float]:
    """Spearman's rank correlation (Pearson's on the ranks); None for fewer than 3 pairs or constant ranks."""
    if len(a) != len(b) or len(a) < 3:
        return None
    ra, rb = ranks(a), ranks(b)
    ma, mb = statistics.fmean(ra), statistics.fmean(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    var = (sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb)) ** 0.5
    return cov / var if var else None


def layout_overrides(layout: Layout) -> list[str]:
    o = layout.overrides()
    return [f"parallel.{k}={v}" for k, v in o["parallel"].items()] + [f"train.micro_batch={layout.micro_batch}"]


def run_overrides(user: list[str], layout: Layout, steps: int) -> list[str]:
    """The user's overrides, less those the tuning sets, then the layout's and the short run's own."""
    taken = {"parallel.tp", "parallel.pp", "parallel.dp", "parallel.schedule", "train.micro_batch", "train.steps",
             "train.eval_every", "checkpoint.at_end", "checkpoint.every", "logging.wandb.mode", "parallel.microbatches",
             "parallel.cut_points", "launcher.wait", "launcher.nprocs"}
    mine = [o for o in user if o.partition("=")[0].lstrip("+~") not in taken]
    return [*mine, *layout_overrides(layout), f"train.steps={steps}", "train.eval_every=0",
            "checkpoint.at_end=false", "checkpoint.every=0", "logging.wandb.mode=disabled"]


def measure(m: Measured) -> None:
    path = m.run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    rows = [r for r in map(json.loads, filter(str.strip, lines)) if "step_time_s" in r]
    timed = [r["step_time_s"] for r in rows if r["step"] > WARMUP] or [r["step_time_s"] for r in rows]
    if not timed:
        m.error = m.error or "no step was logged"
        return
    m.step_s = statistics.median(timed)
    m.tokens_per_s = statistics.median(r["tokens_per_s"] for r in rows if r["step_time_s"] in timed)
    m.mem_gb = max(r["mem_peak_gb"] for r in rows)


def spread(rows: list[Layout], k: int) -> list[Layout]:
    """k fitting layouts spread evenly over the predicted step times, best to worst: for each of k evenly
    spaced targets the not yet chosen layout predicted nearest to it (what tests a model, where the best k
    test only its top)."""
    fitting = sorted((r for r in rows if r.fits), key=lambda r: r.step_s)
    if k > len(fitting):
        raise ValueError(f"{k} > {len(fitting)}")
    lo, hi = fitting[0].step_s, fitting[-1].step_s
    chosen: list[Layout] = []
    for i in range(k):
        target = lo + (hi - lo) * i / max(1, k - 1)
        free = [r for r in fitting if all(r is not c for c in chosen)]
        chosen.append(min(free, key=lambda r: (abs(r.step_s - target), r.step_s)))
    return sorted(chosen, key=lambda r: r.step_s)


def tune(cfg: DictConfig, layouts: list[Layout], user: list[str], tune_dir: Path, steps: int,
         out=print) -> list[Measured]:
    """Run each of `layouts` for `steps` steps and measure it."""
    slurm = cfg.launcher.name == "slurm"
    runs = [Measured(layout, Path(tune_dir) / str(i)) for i, layout in enumerate(layouts)]
    procs = []
    for i, m in enumerate(runs):
        proc = RunProcess(m.run_dir, run_overrides(user, m.layout, steps), slurm=slurm)
        procs.append(proc)
        if not slurm:  # one at a time: runs sharing this machine's cores would slow each other down
            out(f"trident-plan: tuning {i + 1}/{len(runs)}: {' '.join(layout_overrides(m.layout))}  {m.run_dir}")
            proc.start()
            while proc.poll() is None:
                time.sleep(0.5)
    if slurm:
        for m, proc in zip(runs, procs):
            proc.start()
            out(f"trident-plan: tuning {m.run_dir.name}: {' '.join(layout_overrides(m.layout))} (SLURM)")
        while any(p.poll() is None for p in procs):
            time.sleep(2)
    for m, proc in zip(runs, procs):
        outcome = proc.poll()
        if not outcome.ok:
            m.error = outcome.error
        measure(m)
    return runs


def median_relative_error(predicted: list[float], measured: list[float]) -> Optional[float]:
    """median |predicted - measured| / measured (None without a pair)."""
    errors = [abs(p - m) / m for p, m in zip(predicted, measured) if m > 0]
    return statistics.median(errors) if errors else None


def report(runs: list[Measured], cfg: DictConfig, user: list[str]) -> tuple[str, Optional[float], Optional[float]]:
    """The side-by-side table, the rank correlation, the median relative error of the predicted step times,
    and the fastest measured layout's trident-train line."""
    ok = [m for m in runs if m.step_s is not None and m.error is None]
    pred_rank = dict(zip(map(id, ok), ranks([m.layout.step_s for m in ok])))
    meas_rank = dict(zip(map(id, ok), ranks([m.step_s for m in ok])))
    head = (f"{'tp':>3} {'pp':>3} {'dp':>3} {'mb':>3} {'schedule':<16} {'pred step_s':>11} {'meas step_s':>11} "
            f"{'pred rank':>9} {'meas rank':>9} {'meas tok/s':>10} {'pred MiB':>9} {'meas MiB':>9}")
    lines = [head]
    for m in runs:
        L = m.layout
        cells = f"{L.tp:>3} {L.pp:>3} {L.dp:>3} {L.micro_batch:>3} {L.schedule:<16} {L.step_s:>11.4g} "
        if id(m) in pred_rank:
            cells += (f"{m.step_s:>11.4g} {pred_rank[id(m)]:>9g} {meas_rank[id(m)]:>9g} {m.tokens_per_s:>10.0f} "
                      f"{L.worst.total / 2**20:>9.1f} {m.mem_gb * 1024:>9.1f}")
        else:
            cells += f"{'failed':>11}  {m.error}"
        lines.append(cells)
    rho = spearman([m.layout.step_s for m in ok], [m.step_s for m in ok])
    lines.append(f"Spearman rank correlation, predicted vs measured step time over {len(ok)} layout(s): "
                 + (f"{rho:+.2f}" if rho is not None else "n/a (needs 3 or more measured layouts)"))
    mdre = median_relative_error([m.layout.step_s for m in ok], [m.step_s for m in ok])
    if mdre is not None:
        lines.append(f"median |predicted - measured| / measured step time: {100 * mdre:.1f}%")
    if cfg.launcher.name == "local" and not str(cfg.cluster.name).startswith("cpu"):
        lines.append(f"(measured on this machine's local processes, predicted for cluster={cfg.cluster.name}: "
                     "compare them on the hardware the cluster preset describes)")
    lines.append("pred MiB: the fullest rank's tensors (planner); meas MiB: the peak memory rank 0 logged "
                 "(on CPU its process's peak RSS, Python and torch included)")
    if ok:
        fastest = min(ok, key=lambda m: m.step_s)
        taken = {"parallel.tp", "parallel.pp", "parallel.dp", "parallel.schedule", "train.micro_batch"}
        mine = [o for o in user if o.partition("=")[0].lstrip("+~") not in taken]
        lines.append(f"fastest measured: tp={fastest.layout.tp} pp={fastest.layout.pp} dp={fastest.layout.dp} "
                     f"mb={fastest.layout.micro_batch} {fastest.layout.schedule}, {fastest.step_s:.4g} s/step, "
                     f"{fastest.tokens_per_s:.0f} tokens/s")
        lines.append(" ".join(["trident-train", *mine, *layout_overrides(fastest.layout)]))
    return "\n".join(lines), rho, mdre
