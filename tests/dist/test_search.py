"""hydra/sweeper=trident-optuna on local runs: asynchronous slots, pruning, failures, resuming, W&B, status.

One 6-trial search (2 at once) checks most properties; resuming it adds 2 trials. The first four trials
are enqueued so that what they must show does not hang on the sampler: a short and a long good trial
(slots free at different times), one that diverges (lr=10), one that barely learns (lr=1e-5: pruned).
"""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest

from orchestrator.runs.wandb_files import read_run
from tests.conftest import ROOT, TINY, crash_rank_env, run_cmd, run_train

pytestmark = pytest.mark.dist

SEARCH = [
    "-m", "hydra/sweeper=trident-optuna", *[o for o in TINY if not o.startswith("logging.wandb.mode")],
    "parallel.dp=1", "train.eval_every=2", "optim.min_lr=1e-6", "logging.wandb.mode=offline", "logging.wandb.plan=false",
    "hydra.sweeper.n_jobs=2", "hydra.sweeper.pruner.n_startup_trials=1",
    "hydra.sweeper.params={optim.lr: 'tag(log, interval(1e-3, 1e-2))', train.steps: 'choice(4, 32)'}",
    "hydra.sweeper.enqueue=[{optim.lr: 0.005, train.steps: 32}, {optim.lr: 0.003, train.steps: 4}, "
    "{optim.lr: 10, train.steps: 32}, {optim.lr: 1e-5, train.steps: 32}]",
]


def trials(sweep_dir: Path) -> list[optuna.trial.FrozenTrial]:
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(sweep_dir / "study.journal")))
    [name] = optuna.study.get_all_study_names(storage)
    return optuna.load_study(study_name=name, storage=storage).get_trials()


def evals(run_dir: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]


@pytest.fixture(scope="module")
def search(tmp_path_factory):
    sweep_dir = tmp_path_factory.mktemp("search") / "sweep"
    first = run_train(*SEARCH, f"hydra.sweep.dir={sweep_dir}", "hydra.sweeper.n_trials=6", timeout=900)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    before = trials(sweep_dir)
    resumed = run_train(*SEARCH, f"hydra.sweep.dir={sweep_dir}", "hydra.sweeper.n_trials=8", timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    return sweep_dir, first, before, resumed


def test_six_trials_two_at_a_time_finish_and_the_study_file_holds_six(search):
    sweep_dir, first, before, _ = search
    assert [t.number for t in before] == list(range(6))
    assert all(t.state.is_finished() for t in before)
    rows = list(csv.DictReader(open(sweep_dir / "study.csv")))
    assert len(rows) == 8  # after the resume
    assert (sweep_dir / "sweep.png").stat().st_size > 10_000
    assert "trident: search done" in first.stdout


def test_the_best_trial_objective_is_its_runs_final_eval_loss(search):
    sweep_dir, first, before, _ = search
    complete = [t for t in before if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) >= 2
    best = min(complete, key=lambda t: t.value)
    for t in complete:
        steps = t.params["train.steps"]
        assert evals(Path(t.user_attrs["run_dir"]))[-1] == (steps, t.value)
    assert f"best: trial {best.number}, eval_loss {best.value:.4f}" in first.stdout


def test_a_diverging_trial_fails_with_its_error_and_a_hopeless_one_is_pruned_with_a_checkpoint(search):
    sweep_dir, first, before, _ = search
    diverged, slow = before[2], before[3]
    assert diverged.params["optim.lr"] == 10 and slow.params["optim.lr"] == 1e-5
    assert diverged.state == optuna.trial.TrialState.FAIL
    assert diverged.user_attrs["error"].startswith("diverged: ")
    assert slow.state == optuna.trial.TrialState.PRUNED
    run_dir = Path(slow.user_attrs["run_dir"])
    pruned_at = max(slow.intermediate_values)  # the eval the pruner judged (nothing is reported after it)
    assert pruned_at in dict(evals(run_dir))
    # Told after that eval, it stopped at the first step boundary that saw the STOP file (the sweep polls every
    # poll_s: the end of that same step or a later one) and saved a checkpoint there, before its last step.
    [ckpt] = [p.name for p in (run_dir / "checkpoints").iterdir()]
    stopped_at = int(ckpt.removeprefix("step-"))
    assert pruned_at <= stopped_at < 32
    assert f"at step {stopped_at}; checkpoint {run_dir / 'checkpoints' / ckpt}" in (run_dir / "run.log").read_text()
    status = run_cmd([sys.executable, "-m", "orchestrator.cli.status", str(sweep_dir)])
    assert status.returncode == 0
    assert "PRUNED" in status.stdout and "FAIL" in status.stdout and "error: diverged" in status.stdout
    now = trials(sweep_dir)  # the study after the resume
    pruned = sum(t.state == optuna.trial.TrialState.PRUNED for t in now)
    failed = sum(t.state == optuna.trial.TrialState.FAIL for t in now)
    assert f"running 0, pruned {pruned}, failed {failed}" in status.stdout
    best = min((t for t in now if t.value is not None and t.state == optuna.trial.TrialState.COMPLETE),
               key=lambda t: t.value)
    assert f"best: trial {best.number}, eval_loss {best.value:.4f}" in status.stdout


def test_no_slot_idles_while_trials_remain(search):
    """From the trials' start and end stamps: n_jobs=2 run at every moment until the last one started."""
    sweep_dir, _, before, _ = search
    spans = sorted((t.user_attrs["started"], t.user_attrs["ended"]) for t in before)
    last_start = spans[-1][0]
    # The scheduler's handover (tell, ask the sampler, fork) between noticing an end and the next start:
    # bounded by what each start itself took, never by the rest of a batch.
    gaps = []
    for _, end in spans:
        if end < last_start:
            nxt = min(s for s, _ in spans if s >= end)
            gaps.append(nxt - end)
            assert sum(1 for s, e in spans if s <= nxt < e) == 2  # after the handover, two run again
    assert len(gaps) >= 4 and max(gaps) < 1.0, gaps
    # A batch of two starts trials only once both of the last batch have ended; here at least one trial
    # started while one that started before it went on running (the first two run 32 and 4 steps).
    carried_over = [sum(1 for s, e in spans if s < nxt < e) for nxt in sorted(s for s, _ in spans)[2:]]
    assert 1 in carried_over, (spans, carried_over)


def test_resuming_the_sweep_dir_continues_the_same_study(search):
    sweep_dir, _, before, resumed = search
    after = trials(sweep_dir)
    assert [t.number for t in after] == list(range(8))
    assert [(t.params, t.state, t.value) for t in after[:6]] == [(t.params, t.state, t.value) for t in before]
    assert "(6 done before)" in resumed.stdout
    assert (sweep_dir / "7" / "metrics.jsonl").exists()


def test_every_trial_is_a_wandb_run_in_the_sweeps_group_with_its_sampled_params(search):
    sweep_dir, _, before, _ = search
    for t in before:
        [run] = (Path(t.user_attrs["run_dir"]) / "wandb").glob("offline-run-*")
        r = read_run(str(run))
        assert r["group"] == f"sweep-{sweep_dir.parent.name}-sweep"
        assert r["config"]["optim"]["lr"] == t.params["optim.lr"]
        assert r["config"]["train"]["steps"] == t.params["train.steps"]
        assert r["config"]["sweep"]["num"] == t.number


def test_bad_search_input_is_one_line_error_before_anything_starts(tmp_path):
    cases = {
        "unknown": (["optim.lrr=interval(1e-3,1e-2)"], "optim.lrr: not a key of the config, so it cannot be searched"),
        "empty": (["optim.lr=interval(1e-2,1e-3)"], "optim.lr=interval(1e-2,1e-3) is empty: interval(low, high) needs low < high"),
        "slots": ([f"hydra.sweeper.n_jobs={(os.cpu_count() or 1) + 1}", "optim.lr=interval(1e-3,1e-2)"],
                  f"hydra.sweeper.n_jobs={(os.cpu_count() or 1) + 1}: "),
    }
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "SLURM_PROCID")}
    procs = {name: subprocess.Popen([sys.executable, "-m", "orchestrator.cli.train", "-m", "hydra/sweeper=trident-optuna",
                                     f"hydra.sweep.dir={tmp_path / name}", *TINY, "parallel.dp=1", *args],
                                    cwd=ROOT, env=base, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, (args, _) in cases.items()}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 2, (name, out[-1000:], err[-1000:])
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("trident: config error: "), (name, err)
        assert cases[name][1] in lines[0], (name, lines[0])
        assert not (tmp_path / name / "study.journal").exists() and not (tmp_path / name / "0").exists()


def test_crashing_trials_are_failed_with_their_error_and_max_failures_ends_the_search(tmp_path):
    out = run_train("-m", "hydra/sweeper=trident-optuna", f"hydra.sweep.dir={tmp_path}", *TINY, "parallel.dp=1",
                    "hydra.sweeper.n_trials=5", "hydra.sweeper.n_jobs=2", "hydra.sweeper.max_failures=2",
                    "optim.lr=interval(1e-3,1e-2)", env=crash_rank_env(0), timeout=600)
    assert out.returncode == 1, out.stdout[-2000:] + out.stderr[-2000:]
    assert "trident: search ended early: 2 trial(s) failed (hydra.sweeper.max_failures=2)" in out.stderr
    done = trials(tmp_path)
    assert all(t.state == optuna.trial.TrialState.FAIL for t in done)
    # Nothing started once the second failure was seen (a trial started before it may fail too): 3 < 5 trials.
    second = sorted(t.user_attrs["ended"] for t in done)[1]
    assert len(done) <= 3 and all(t.user_attrs["started"] < second for t in done)
    for t in done:
        assert "RuntimeError: TRIDENT_TEST_CRASH_RANK=0: rank 0 fails on purpose" in t.user_attrs["error"]
    assert "best: none yet" in out.stdout and (tmp_path / "study.csv").exists()
