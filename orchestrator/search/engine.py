"""The asynchronous search: Optuna asks, trident-train runs, a slot never waits for a batch.

At most `n_jobs` trials run at once; the moment one ends the next is asked
for and started, in the same pass of the loop, so no slot idles while trials
remain (Hydra's stock optuna sweeper waits for a whole batch instead). A trial
is a trident-train run in `<sweep dir>/<trial number>` (orchestrator/search/trials.py):
a local run, or a job submitted on its own as its slot frees (launcher=slurm).

While a trial runs its metrics.jsonl is read: each eval_loss is reported to
the study and the pruner asked; a hopeless trial gets a STOP file, stops at
its next step boundary with a checkpoint, and is told PRUNED. A NaN or
infinite loss stops it too, and it is told FAIL, as is a run that exits
non-zero, with the error in the trial's `error` attribute; `max_failures`
failures end the sweep (the running trials are stopped, the exit is 1).

The study lives in an Optuna storage in the sweep dir (a journal file unless
`storage` names another): `-m` again with the same `hydra.sweep.dir` loads it
and runs what is left of `n_trials`, which counts every trial of the study.
Trials that a stopped sweep left running are marked INTERRUPTED (FAIL) and
their parameters tried again first.
"""

import json
import os
import re
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import optuna
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from optuna.trial import TrialState

from orchestrator.runs.metrics import fmt_duration
from orchestrator.search import report
from orchestrator.search.space import finite, param_overrides, parse
from orchestrator.search.sweep import SWEEP_POINT_ENV, Sweep
from orchestrator.search.trials import RunProcess
from orchestrator.slurm_checks import check_cluster, jobs_at_once
from orchestrator.validate import ConfigError, validate
from parallel.mesh import ParallelDims

OBJECTIVES = ("final", "best")
PRUNERS = ("median", "successive_halving", "hyperband", "none")
# Hydra overrides a trial must not inherit from the sweep's own command line.
_SWEEP_ONLY = re.compile(r"^[~+]*hydra(\.sweep\b|\.sweeper\b|/sweeper\b|\.mode\b|\.run\.dir\b|\.job\.num\b)")


def make_pruner(p: Any) -> optuna.pruners.BasePruner:
    if p is None:
        return optuna.pruners.NopPruner()
    if isinstance(p, optuna.pruners.BasePruner):
        return p
    p = dict(p)
    if "_target_" in p:
        return instantiate(p)
    name = p.get("name") or "none"
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=p["n_startup_trials"], n_warmup_steps=p["n_warmup_steps"])
    if name == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=p["min_resource"],
                                                      reduction_factor=p["reduction_factor"])
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=p["min_resource"] if p["min_resource"] != "auto" else 1,
                                              reduction_factor=p["reduction_factor"])
    if name == "none":
        return optuna.pruners.NopPruner()
    raise ConfigError(f"hydra.sweeper.pruner.name={name!r} is not a pruner (valid: {', '.join(PRUNERS)})")


def make_sampler(s: Any) -> optuna.samplers.BaseSampler:
    if isinstance(s, optuna.samplers.BaseSampler):
        return s
    if s is None:
        return optuna.samplers.TPESampler()
    return instantiate(s)


@dataclass
class Running:
    trial: optuna.Trial
    proc: RunProcess
    params: dict
    evals: list = field(default_factory=list)  # (step, eval_loss)
    stopping: Optional[str] = None  # why the sweep asked it to stop: pruned | diverged | max_failures
    reason: str = ""
    untrained: Optional[float] = None  # the run's eval_loss at step 0
    steps: Optional[int] = None  # the run's train.steps


class Search:
    def __init__(self, settings: DictConfig, config: DictConfig, config_loader, arguments: list[str],
                 sampler: Any = None):
        self.s, self.sampler = settings, sampler
        self.config, self.loader = config, config_loader
        self.sweep_dir = Path(str(config.hydra.sweep.dir)).absolute()
        params = OmegaConf.to_container(settings.params, resolve=True) if settings.params else {}
        self.space, self.fixed = parse(params, arguments)
        self.slurm = config.launcher.name == "slurm"
        self.sweep = Sweep(str(self.sweep_dir), list(self.space))
        self.passthrough = [o for o in config.hydra.overrides.hydra if not _SWEEP_ONLY.match(o)]
        self.failures = 0
        self.stopped_for: Optional[str] = None
        self.running: list[Running] = []

    # --- checks, before anything starts -------------------------------------------------------------

    def check(self) -> None:
        s = self.s
        if s.objective not in OBJECTIVES:
            raise ConfigError(f"hydra.sweeper.objective={s.objective!r} (valid: {', '.join(OBJECTIVES)})")
        if s.direction not in ("minimize", "maximize"):
            raise ConfigError(f"hydra.sweeper.direction={s.direction!r} (valid: minimize, maximize)")
        for key, low in (("n_trials", 1), ("n_jobs", 1)):
            if s[key] < low:
                raise ConfigError(f"hydra.sweeper.{key}={s[key]} (valid: {low} or more)")
        if s.diverged_above is not None and s.diverged_above <= 1:
            raise ConfigError(f"hydra.sweeper.diverged_above={s.diverged_above} (valid: above 1, or null)")
        if s.max_failures is not None and s.max_failures < 1:
            raise ConfigError(f"hydra.sweeper.max_failures={s.max_failures} (valid: 1 or more, or null: never end)")
        if not self.space:
            raise ConfigError("nothing to search: give hydra.sweeper.params (key: choice(...) | interval(a, b) | "
                              "tag(log, interval(a, b)) | range(...)) or such an override on the command line")
        make_pruner(s.pruner)
        for entry in s.enqueue or []:
            unknown = sorted(set(entry) - set(self.space))
            if unknown:
                raise ConfigError(f"hydra.sweeper.enqueue names {', '.join(unknown)}, which the search space does not "
                                  f"hold (valid: {', '.join(self.space)})")
        # Every key exists and every choice (and each interval's ends) gives a config trident-train accepts.
        base = {k: self._corner(d, 0) for k, d in self.space.items()}
        points = [base] + [{**base, k: v} for k, d in self.space.items() for v in self._corners(d)[1:]]
        points += [{**base, **dict(entry)} for entry in self.s.enqueue or []]
        first = None
        for point in points:
            cfg = self._compose(point)
            first = first or cfg
        self._check_capacity(first)

    @staticmethod
    def _corners(dist) -> list:
        if isinstance(dist, optuna.distributions.CategoricalDistribution):
            return list(dist.choices)
        return [dist.low, dist.high]

    def _corner(self, dist, i):
        return self._corners(dist)[i]

    def _compose(self, point: dict) -> DictConfig:
        overrides = self.fixed + param_overrides(point)
        try:
            cfg = self.loader.load_sweep_config(self.config, overrides)
        except ConfigCompositionException as e:
            msg = str(e)
            key = re.search(r"override '([^']+)'", msg)
            if key and (key.group(1) in self.space):
                raise ConfigError(f"{key.group(1)}: not a key of the config, so it cannot be searched "
                                  "(`trident-train --cfg job` lists the keys)") from None
            raise ConfigError(f"{' '.join(overrides)}: {msg.splitlines()[0]}") from None
        previous = HydraConfig.instance().cfg
        with open_dict(cfg):  # what the trial's own run will resolve ${hydra:runtime.output_dir} to
            cfg.hydra.runtime.output_dir = str(self.sweep_dir / "0")
        HydraConfig.instance().set_config(cfg)
        try:
            validate(cfg)
            if self.slurm:
                check_cluster(cfg)
        except ConfigError as e:
            shown = " ".join(param_overrides(point))
            raise ConfigError(f"{e} (in the trial {shown})") from None
        finally:
            if previous is not None:
                HydraConfig.instance().set_config(previous)
        return cfg

    def _check_capacity(self, cfg: DictConfig) -> None:
        par = cfg.parallel
        world = ParallelDims.of(par).world_size
        n = self.s.n_jobs
        if self.slurm:
            fit, what = jobs_at_once(cfg.launcher, world)
        else:
            fit, what = local_slots(world, cfg.launcher.backend)
        if n > max(1, fit):
            raise ConfigError(f"hydra.sweeper.n_jobs={n}: {n} trials of {world} rank(s) at once, but {what} "
                              f"(valid: 1..{max(1, fit)})")

    # --- the study ------------------------------------------------------------------------------------

    def open_study(self) -> optuna.Study:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        name = self.s.study_name or self.sweep.id
        storage = report.storage_for(self.sweep_dir, self.s.storage)
        study = optuna.create_study(storage=storage, study_name=name, direction=self.s.direction,
                                    sampler=make_sampler(self.sampler), pruner=make_pruner(self.s.pruner),
                                    load_if_exists=True)
        trials = study.get_trials(deepcopy=False)
        if not trials:
            for entry in self.s.enqueue or []:
                study.enqueue_trial(dict(entry))
        for t in trials:  # a sweep stopped hard (killed) left these: try their parameters again first
            if t.state == TrialState.RUNNING:
                # Optuna has no public handle on a trial another process asked for: rebuild one from its id.
                optuna.Trial(study, t._trial_id).set_user_attr("interrupted", True)
                study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
                study.enqueue_trial(t.params)
        return study

    def counted(self, study: optuna.Study) -> int:
        """Trials that count towards n_trials: finished ones, interrupted ones excepted."""
        return sum(1 for t in study.get_trials(deepcopy=False)
                   if t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
                   and not t.user_attrs.get("interrupted"))

    # --- the loop -------------------------------------------------------------------------------------

    def run(self) -> int:
        self.check()
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        study = self.open_study()
        done_before = self.counted(study)
        where = "SLURM jobs" if self.slurm else "local runs"
        print(f"trident: search {study.study_name} in {self.sweep_dir}: {self.s.n_trials} trial(s) in all "
              f"({done_before} done before), {self.s.n_jobs} at once as {where}; study {self._storage_text()}",
              flush=True)
        started = time.time()
        try:
            while True:
                self._launch_while_free(study)
                if not self.running:
                    break
                time.sleep(self.s.poll_s)
                for r in list(self.running):
                    self._watch(study, r)
                    if r.proc.ended is not None:
                        self._finish(study, r)
                        self._launch_while_free(study)  # the freed slot is refilled in the same pass
        except KeyboardInterrupt:
            self._interrupt(study)
            raise
        finally:
            report.write_csv(study, self.sweep_dir / "study.csv")
        why_not = report.plot(study, self.sweep_dir / "sweep.png", self._objective_name())
        print(f"trident: search done in {fmt_duration(time.time() - started)}", flush=True)
        for line in report.summary_lines(study):
            print(f"  {line}", flush=True)
        print(f"  table       {self.sweep_dir / 'study.csv'}", flush=True)
        print(f"  plot        {self.sweep_dir / 'sweep.png'}" if why_not is None
              else f"  plot        none: {why_not}", flush=True)
        print(f"  status      trident-status {self.sweep_dir}", flush=True)
        best = report.best_trial(study)
        if best is not None:
            print(f"  best run    trident-train {' '.join(self.fixed + param_overrides(best.params))}", flush=True)
        if self.stopped_for:
            print(f"trident: search ended early: {self.stopped_for}", file=sys.stderr, flush=True)
            return 1
        if best is None:
            print("trident: search failed: no trial completed", file=sys.stderr, flush=True)
            return 1
        return 0

    def _storage_text(self) -> str:
        return self.s.storage or str(self.sweep_dir / report.JOURNAL)

    def _objective_name(self) -> str:
        return "eval_loss" if self.s.objective == "final" else "best eval_loss"

    def _launch_while_free(self, study: optuna.Study) -> None:
        while (self.stopped_for is None and len(self.running) < self.s.n_jobs
               and self.counted(study) + len(self.running) < self.s.n_trials):
            self._launch(study)

    def _launch(self, study: optuna.Study) -> None:
        with warnings.catch_warnings():  # an enqueued value may lie outside the space: Optuna warns, and uses it
            warnings.filterwarnings("ignore", message="Fixed parameter")
            trial = study.ask(self.space)
        params = dict(trial.params)
        run_dir = self.sweep_dir / str(trial.number)
        overrides = self.fixed + param_overrides(params) + self.passthrough
        if self.slurm:  # the child submits the job and returns; the job is followed here
            overrides.append("launcher.wait=false")
        shown = {k: (f"{v:.4g}" if isinstance(v, float) else str(v)) for k, v in params.items()}
        point = {"id": self.sweep.id, "dir": str(self.sweep_dir), "num": trial.number, "overrides": shown,
                 "study": study.study_name}
        proc = RunProcess(run_dir, overrides, env={SWEEP_POINT_ENV: json.dumps(point)}, slurm=self.slurm).start()
        trial.set_user_attr("run_dir", str(run_dir))
        trial.set_user_attr("started", proc.started)
        self.running.append(Running(trial, proc, params))
        print(f"trident: trial {trial.number} started: {' '.join(f'{k}={v}' for k, v in shown.items())}  {run_dir}",
              flush=True)

    def _watch(self, study: optuna.Study, r: Running) -> None:
        for row in r.proc.new_rows():
            step = row.get("step", 0)
            if step == 0 and "eval_loss" in row:
                r.untrained = row["eval_loss"]
            limit = self.s.diverged_above * r.untrained if self.s.diverged_above and r.untrained else None
            for key in ("loss", "eval_loss"):
                if key in row and (not finite(row[key]) or (limit is not None and row[key] > limit)):
                    self._stop(r, "diverged", f"{key} {row[key]:.4g} at step {step}" + (
                        f", above {self.s.diverged_above:g} x the untrained {r.untrained:.4g}" if finite(row[key]) else ""))
            if "eval_loss" in row and step > 0:
                value = row["eval_loss"]
                r.evals.append((step, value))
                if r.stopping is None:
                    r.trial.report(value, step)
                    if step < self._steps(r) and r.trial.should_prune():  # the last eval ends the run anyway
                        self._stop(r, "pruned", f"eval_loss {value:.4f} at step {step}")
        r.proc.poll()

    @staticmethod
    def _steps(r: Running) -> int:
        """The trial's train.steps, from the config its run wrote (it exists once the run logs)."""
        if r.steps is None:
            r.steps = int(OmegaConf.load(r.proc.run_dir / "config.yaml").train.steps)
        return r.steps

    def _stop(self, r: Running, why: str, reason: str) -> None:
        if r.stopping is not None:
            return
        r.stopping, r.reason = why, reason
        r.proc.stop(f"{why}: {reason}")
        print(f"trident: trial {r.trial.number} {why} ({reason}): stopping it at its next step", flush=True)

    def _objective(self, r: Running) -> Optional[float]:
        values = [v for _, v in r.evals]
        if not values:
            return None
        return values[-1] if self.s.objective == "final" else (min if self.s.direction == "minimize" else max)(values)

    def _finish(self, study: optuna.Study, r: Running) -> None:
        self.running.remove(r)
        outcome, trial, proc = r.proc.poll(), r.trial, r.proc
        trial.set_user_attr("ended", proc.ended)
        trial.set_user_attr("objective", self._objective_name())
        if proc.job_id:
            trial.set_user_attr("job_id", proc.job_id)
        took = fmt_duration(proc.ended - proc.started)
        error = None
        if r.stopping == "diverged":
            error = f"diverged: {r.reason}"
        elif not outcome.ok:
            error = outcome.error or "failed"
        elif r.stopping is None and self._objective(r) is None:
            error = "the run logged no eval_loss"
        if error is not None:
            trial.set_user_attr("error", error)
            study.tell(trial, state=TrialState.FAIL)
            self.failures += 1
            print(f"trident: trial {trial.number} failed after {took}: {error}", flush=True)
            limit = self.s.max_failures
            if limit is not None and self.failures >= limit and self.stopped_for is None:
                self.stopped_for = f"{self.failures} trial(s) failed (hydra.sweeper.max_failures={limit})"
                for other in self.running:
                    self._stop(other, "max_failures", self.stopped_for)
            return
        if r.stopping is not None:  # pruned, or stopped because the sweep is ending
            trial.set_user_attr("stopped", r.reason)
            study.tell(trial, state=TrialState.PRUNED)
            print(f"trident: trial {trial.number} pruned after {took}: {r.reason}", flush=True)
            return
        value = self._objective(r)
        study.tell(trial, value)
        print(f"trident: trial {trial.number} complete after {took}: {self._objective_name()} {value:.4f}", flush=True)

    def _interrupt(self, study: optuna.Study) -> None:
        for r in self.running:
            r.proc.kill()
            r.trial.set_user_attr("interrupted", True)
            study.tell(r.trial, state=TrialState.FAIL, skip_if_finished=True)
            study.enqueue_trial(r.params)
        print(f"trident: search interrupted; {len(self.running)} running trial(s) marked INTERRUPTED and queued "
              f"again: `-m` with hydra.sweep.dir={self.sweep_dir} resumes the study", file=sys.stderr, flush=True)


def local_slots(world: int, backend: str) -> tuple[int, str]:
    """How many runs of `world` ranks this machine runs at once: one GPU per rank, else one core per rank."""
    if backend != "gloo" and torch.cuda.is_available():
        gpus = torch.cuda.device_count()
        return gpus // world, f"this machine has {gpus} GPU(s), one per rank"
    cores = os.cpu_count() or 1
    return cores // world, f"this machine has {cores} CPU core(s), one per rank"
