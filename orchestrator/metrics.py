"""Where metrics go: metrics.jsonl in the run dir, W&B, and a progress line on the console.

Only the rank that holds the loss logs; the others get a logger that does nothing.
"""

import json
import math
import os
import sys
from pathlib import Path
from typing import Optional


class MetricsLogger:
    def __init__(self, run_dir: str, wandb_cfg, run_config: dict, default_name: str, default_group: str):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a")
        self.wandb_run = None
        self.wandb_dir: Optional[str] = None
        if wandb_cfg.mode != "disabled":
            self._start_wandb(run_dir, wandb_cfg, run_config, default_name, default_group)

    def _start_wandb(self, run_dir, wandb_cfg, run_config, default_name, default_group) -> None:
        os.environ.setdefault("WANDB_SILENT", "true")
        import wandb  # imported here: a disabled run never pays for it

        self.wandb_run = wandb.init(
            mode=wandb_cfg.mode,
            dir=run_dir,
            project=wandb_cfg.project,
            entity=wandb_cfg.entity,
            name=wandb_cfg.name or default_name,
            group=wandb_cfg.group or default_group,
            tags=list(wandb_cfg.tags),
            config=run_config,
        )
        # .../wandb/offline-run-<time>-<id>/files -> the run's own folder
        self.wandb_dir = str(Path(self.wandb_run.dir).parent)

    def log(self, row: dict) -> None:
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])

    def finish(self) -> None:
        self._file.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


class NullLogger:
    wandb_dir = None
    path = None

    def log(self, row: dict) -> None:
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

