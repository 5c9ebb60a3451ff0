"""Where metrics go: metrics.jsonl in the run dir, W&B, and a progress line on the console.

Only the rank that holds the loss logs; the others get a logger that does nothing.
"""

import json
import math
import sys
from pathlib import Path
from typing import Optional

from orchestrator.runs.dashboard import WandbRun


class MetricsLogger:
    """metrics.jsonl, and the run's W&B run (orchestrator/runs/dashboard.py) unless logging.wandb.mode=disabled."""

    def __init__(self, run_dir: str, wandb_cfg, run_config: dict, default_name: str, default_group: str,
                 first_step: int = 0, kept_id: Optional[str] = None):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a")
        self.wandb = None if wandb_cfg.mode == "disabled" else \
            WandbRun(run_dir, wandb_cfg, run_config, default_name, default_group, first_step, kept_id)

    @property
    def wandb_id(self) -> Optional[str]:
        return self.wandb.id if self.wandb is not None else None

    def log(self, row: dict) -> None:
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self.wandb is not None:
            self.wandb.log(row)

    def rewind(self, first_step: int) -> None:
        """A rollback: the steps from first_step on are logged again (metrics.jsonl keeps both)."""
        if self.wandb is not None:
            self.wandb.rewind(first_step)

    def finish(self) -> None:
        self._file.close()
        if self.wandb is not None:
            self.wandb.finish()


class NullLogger:
    """The logger of the ranks that do not log."""
    wandb = None
    wandb_id = None
    path = None

    def log(self, row: dict) -> None:
        pass

    def rewind(self, first_step: int) -> None:
        pass

    def finish(self) -> None:
        pass


def fmt_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def fmt_count(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.1f}{unit}"
    return f"{x:.0f}"


def progress_line(step: int, steps: int, row: dict, elapsed: float, width: int = 20) -> str:
    done = int(width * step / steps)
    eta = elapsed / step * (steps - step) if step else math.inf
    parts = [
        f"[{'#' * done}{'.' * (width - done)}] step {step}/{steps}",
        f"loss {row['loss']:.4f}",
    ]
    if "eval_loss" in row:
        parts.append(f"eval {row['eval_loss']:.4f}")
    parts += [
        f"lr {row['lr']:.2e}",
        f"gnorm {row['grad_norm']:.3f}",
        f"{fmt_count(row['tokens_per_s'])} tok/s",
        f"mfu {100 * row['mfu']:.2f}%",
    ]
    if "pp_bubble" in row:
        parts.append(f"bubble {100 * row['pp_bubble']:.0f}%")
    parts.append(f"eta {fmt_duration(eta)}")
    return " | ".join(parts)


def console(msg: str) -> None:
    print(msg, file=sys.stdout, flush=True)

