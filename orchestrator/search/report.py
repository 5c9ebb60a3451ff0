"""What a search leaves in its sweep dir and what `trident-status` says about it.

  study.csv   one row per trial: number, state, objective, duration, start and
              end times, every parameter, the run dir, the error of a failed trial
  sweep.png   the objective against the trial number with the best so far
              (optimisation history), and against each parameter
"""

import csv
import datetime
import math
from pathlib import Path
from typing import Optional

import optuna
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

JOURNAL = "study.journal"  # the default storage: an Optuna journal file in the sweep dir


def storage_for(sweep_dir: Path, url: Optional[str] = None):
    """The study's storage: the URL given (sqlite:///..., an RDB), else the journal file in the sweep dir."""
    if url:
        return url
    path = Path(sweep_dir) / JOURNAL
    path.parent.mkdir(parents=True, exist_ok=True)
    return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))


def load_study(sweep_dir: Path) -> Optional[optuna.Study]:
    """The study of a sweep dir that holds one (read-only use), else None."""
    path = Path(sweep_dir) / JOURNAL
    if not path.exists():
        return None
    storage = storage_for(sweep_dir)
    names = optuna.study.get_all_study_names(storage)
    return optuna.load_study(study_name=names[-1], storage=storage) if names else None


def state_name(trial: FrozenTrial) -> str:
    """COMPLETE / PRUNED / FAIL / RUNNING / WAITING, and INTERRUPTED for a trial whose sweep was stopped."""
    if trial.state == TrialState.FAIL and trial.user_attrs.get("interrupted"):
        return "INTERRUPTED"
    return trial.state.name


def duration_s(trial: FrozenTrial) -> Optional[float]:
    attrs = trial.user_attrs
    if attrs.get("started") is None:
        return None
    end = attrs.get("ended") or (datetime.datetime.now().timestamp() if trial.state == TrialState.RUNNING else None)
    return None if end is None else end - attrs["started"]


def write_csv(study: optuna.Study, path: Path) -> None:
    trials = study.get_trials(deepcopy=False)
    keys = sorted({k for t in trials for k in t.distributions} | {k for t in trials for k in t.params})
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["trial", "state", "objective", "duration_s", "started", "ended", *keys, "run_dir", "error"])
        for t in trials:
            d = duration_s(t)
            stamp = lambda x: datetime.datetime.fromtimestamp(x).isoformat(timespec="milliseconds") if x else ""
            out.writerow([t.number, state_name(t), "" if t.value is None else repr(t.value),
                          "" if d is None else f"{d:.2f}", stamp(t.user_attrs.get("started")),
                          stamp(t.user_attrs.get("ended")), *(t.params.get(k, "") for k in keys),
                          t.user_attrs.get("run_dir", ""), t.user_attrs.get("error", "")])


def plot(study: optuna.Study, path: Path, objective: str) -> Optional[str]:
    """sweep.png; returns why it could not be drawn (None when drawn)."""
    try:
        import matplotlib  # optional: pip install matplotlib (trident[plot])

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # after the backend is chosen
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib)"
    done = [t for t in study.get_trials(deepcopy=False) if t.value is not None and math.isfinite(t.value)]
    if not done:
        return "no trial has an objective yet"
    keys = sorted({k for t in done for k in t.params})
    fig, axes = plt.subplots(1, 1 + len(keys), figsize=(4.2 * (1 + len(keys)), 3.6), squeeze=False)
    axes = axes[0]
    colors = {TrialState.COMPLETE: "tab:blue", TrialState.PRUNED: "tab:orange"}
    ax = axes[0]
    for state, color in colors.items():
        pts = [(t.number, t.value) for t in done if t.state == state]
        if pts:
            ax.scatter(*zip(*pts), c=color, s=22, label=state.name.lower())
    complete = sorted((t.number, t.value) for t in done if t.state == TrialState.COMPLETE)
    if complete:
        better = min if study.direction == StudyDirection.MINIMIZE else max
        best, xs, ys = None, [], []
        for n, v in complete:
            best = v if best is None else better(best, v)
            xs.append(n)
            ys.append(best)
        ax.step(xs, ys, where="post", c="k", lw=1, label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel(objective)
    ax.set_title("optimisation history")
    ax.legend(fontsize=7)
    for ax, key in zip(axes[1:], keys):
        for state, color in colors.items():
            pts = [(t.params[key], t.value) for t in done if t.state == state and key in t.params]
            if pts:
                xs = [p[0] for p in pts]
                if all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs):
                    ax.scatter(xs, [p[1] for p in pts], c=color, s=22)
                else:
                    ax.scatter([str(x) for x in xs], [p[1] for p in pts], c=color, s=22)
        dist = next((t.distributions[key] for t in done if key in t.distributions), None)
        if getattr(dist, "log", False):
            ax.set_xscale("log")
        ax.set_xlabel(key)
        ax.set_title(f"{objective} vs {key}")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return None


def counts(study: optuna.Study) -> dict[str, int]:
    out: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        out[state_name(t)] = out.get(state_name(t), 0) + 1
    return out


def best_trial(study: optuna.Study) -> Optional[FrozenTrial]:
    try:
        return study.best_trial
    except ValueError:  # no trial completed
        return None


def summary_lines(study: optuna.Study) -> list[str]:
    """The study in a few lines: counts by state and the best trial (trident-status and the sweep's end)."""
    c = counts(study)
    order = ("COMPLETE", "RUNNING", "PRUNED", "FAIL", "INTERRUPTED", "WAITING")
    parts = ", ".join(f"{c[s]} {s.lower()}" for s in order if c.get(s))
    lines = [f"study {study.study_name}: {sum(c.values())} trial(s): {parts or 'none yet'}; "
             f"running {c.get('RUNNING', 0)}, pruned {c.get('PRUNED', 0)}, failed {c.get('FAIL', 0)}"]
    best = best_trial(study)
    if best is None:
        lines.append("best: none yet (no trial has completed)")
    else:
        params = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in best.params.items())
        lines.append(f"best: trial {best.number}, {best.user_attrs.get('objective', 'objective')} {best.value:.4f}: "
                     f"{params}  ({best.user_attrs.get('run_dir', '')})")
    return lines


def trial_rows(study: optuna.Study) -> dict[str, dict]:
    """Per run dir: the trial's number, state and objective (trident-status joins them to its rows)."""
    return {t.user_attrs["run_dir"]: {"trial": t.number, "state": state_name(t), "objective": t.value,
                                      "error": t.user_attrs.get("error")}
            for t in study.get_trials(deepcopy=False) if "run_dir" in t.user_attrs}
