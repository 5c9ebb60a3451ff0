"""The loop's side of faults: one agreement per step, non-finite steps, loss spikes, stragglers.

Every rank must take the same decision at the same step, or the ranks fall
out of step and hang. So each step, after backward and the gradient norm and
before the optimizer, every rank contributes to ONE all-reduce (a float64
vector, summed over the world), and every decision is a function of its
result, identical everywhere:

  [0] preemption requested on this rank (SLURM's USR2)     any > 0: save and stop
  [1] this rank saw a non-finite loss or gradient norm      any > 0: skip (or stop)
  [2] the rank's summed micro-batch losses, from one rank   the step's mean loss (also for
      per pipeline (its last stage, tp rank 0) and dp rank  the spike test): no separate
                                                            loss all-reduce
  [3] the pipeline's p2p wait, from the ranks of dp=tp=0    the logged pp_wait_s
  [4 + r]             rank r's seconds from the start of the step to this boundary
  [4 + world + r]     rank r's seconds of those blocked where the loop waits for others
                      (pipeline p2p, the gradient all-reduce of ZeRO-1 / replicate-with-TP,
                      the gradient norm's reductions)

The per-rank slots make straggler and memory statistics free: the vector is
3 x world floats (each rank's step time, wait and peak memory: 24 KiB at 1024
ranks), and it replaces the loss's and the pipeline wait's own all-reduces.
"""

import math
import statistics
from collections import deque
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist

from launch.watchdog import rank_info

HEAD = 4


class FaultStop(RuntimeError):
    """A deliberate end of the run (a non-finite step under nonfinite=stop, too many skipped steps or
    rollbacks): restarting would only repeat it, so no launcher restarts it."""


@dataclass
class Verdict:
    stop: float  # the ranks' stop flags summed: > 0 asks to stop (the trainer's _STOP_BY_* values)
    nonfinite: bool
    loss_sum: float  # summed over the world's contributing ranks
    pp_wait_s: float
    work_s: list[float]  # per rank
    wait_s: list[float]  # per rank
    mem_gb: list[float] = field(default_factory=list)  # per rank: peak allocated (GPU) or RSS (CPU)

    @property
    def busy_s(self) -> list[float]:
        return [max(0.0, w - b) for w, b in zip(self.work_s, self.wait_s)]


class StepAgreement:
    """The step's one collective (see the module doc)."""

    def __init__(self, world: int, rank: int, device: torch.device):
        self.world, self.rank, self.device = world, rank, device

    def agree(self, *, stop: float, loss_sum: torch.Tensor, grad_norm: torch.Tensor, owns_loss: bool,
              pp_wait_s: Optional[float], owns_pp_wait: bool, work_s: float, wait_s: float,
              mem_gb: float = 0.0) -> Verdict:
        w = self.world
        host = torch.zeros(HEAD + 3 * w, dtype=torch.float64)  # what this rank knows on the CPU
        host[0] = float(stop)
        host[3] = (pp_wait_s or 0.0) if owns_pp_wait else 0.0
        host[HEAD + self.rank], host[HEAD + w + self.rank], host[HEAD + 2 * w + self.rank] = work_s, wait_s, mem_gb
        vec = host.to(self.device)
        # What lives on the device joins without a host sync.
        vec[1] += (~torch.isfinite(loss_sum.detach())).to(torch.float64) + \
            (~torch.isfinite(grad_norm.detach())).to(torch.float64)
        if owns_loss:
            vec[2] += loss_sum.detach().to(torch.float64)
        if w > 1:
            dist.all_reduce(vec)
        v = vec.tolist()
        return Verdict(stop=v[0], nonfinite=v[1] > 0 or not math.isfinite(v[2]), loss_sum=v[2],
                       pp_wait_s=v[3], work_s=v[HEAD:HEAD + w], wait_s=v[HEAD + w:HEAD + 2 * w],
                       mem_gb=v[HEAD + 2 * w:])


class SpikeGuard:
    """A loss above factor x the median of the last `window` losses is a spike (once the window is full)."""

    def __init__(self, factor: float, window: int):
        self.factor = factor
        self.losses: deque = deque(maxlen=window)

    def median(self) -> Optional[float]:
        return statistics.median(self.losses) if len(self.losses) == self.losses.maxlen else None

    def is_spike(self, loss: float) -> Optional[float]:
        """The running median if `loss` is a spike, else None."""
        med = self.median()
        return med if med is not None and loss > self.factor * med else None

    def add(self, loss: float) -> None:
        self.losses.append(loss)


class StragglerWatch:
    """Per-rank step statistics, and a rank named once it is busier than factor x the median for `steps` steps."""

    def __init__(self, factor: Optional[float], steps: int, ranks_dir: Optional[str] = None):
        self.factor, self.steps, self.ranks_dir = factor, steps, ranks_dir
        self.suspect, self.count, self.named = None, 0, None

    def update(self, verdict: Verdict) -> tuple[dict, Optional[str]]:
        """(metrics of this step, a console message when a straggler is named or recovers)."""
        work, wait, busy = verdict.work_s, verdict.wait_s, verdict.busy_s
        slowest = max(range(len(busy)), key=busy.__getitem__)
        med = statistics.median(busy)
        row = {
            "rank_step_s_min": min(work), "rank_step_s_median": statistics.median(work), "rank_step_s_max": max(work),
            "rank_wait_s_min": min(wait), "rank_wait_s_median": statistics.median(wait), "rank_wait_s_max": max(wait),
            "slowest_rank": slowest, "slowest_rank_busy_s": busy[slowest], "rank_busy_s_median": med,
        }
        if verdict.mem_gb:
            mem = verdict.mem_gb
            row.update(rank_mem_gb_min=min(mem), rank_mem_gb_median=statistics.median(mem), rank_mem_gb_max=max(mem))
        if self.factor is None or len(busy) < 2:
            return row, None
        slow = busy[slowest] > self.factor * med and busy[slowest] > 0
        if slow and slowest == self.suspect:
            self.count += 1
        else:
            self.suspect, self.count = (slowest, 1) if slow else (None, 0)
        message = None
        if self.count >= self.steps:
            row["straggler_rank"] = slowest
            if self.named != slowest:
                self.named = slowest
                message = (f"trident: straggler: rank {slowest} was busy {busy[slowest]:.3f}s per step, "
                           f"{busy[slowest] / max(med, 1e-9):.1f}x the median rank's {med:.3f}s, for "
                           f"{self.count} steps in a row (logging.straggler_factor={self.factor}); "
                           f"{self._where(slowest)}")
        elif self.named is not None and self.suspect != self.named:
            message = f"trident: straggler: rank {self.named} is back within {self.factor}x the median"
            self.named = None
        return row, message

    def _where(self, rank: int) -> str:
        """'on <host> (pid <pid>)' from the rank's own file in the run's ranks/ folder (the file, if unread)."""
        info = rank_info(self.ranks_dir, rank) if self.ranks_dir else {}
        if not info:
            return f"its pid and host: ranks/rank-{rank}.json"
        return f"it runs on {info.get('host')} (pid {info.get('pid')})"
