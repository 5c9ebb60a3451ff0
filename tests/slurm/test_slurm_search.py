"""hydra/sweeper=trident-optuna on the real local cluster: every trial its own job, submitted as a slot frees."""

import json
from pathlib import Path

import optuna
import pytest

from tests.conftest import TINY, run_train
from tests.slurm.jobs import job_state, wait_for

pytestmark = pytest.mark.slurm


def test_a_4_trial_search_2_at_once_submits_4_jobs_and_gets_4_results(slurm_cluster, tmp_path):
    search = ["-m", "hydra/sweeper=trident-optuna", *TINY, "parallel.dp=2", "launcher=slurm",
              "optim.lr=tag(log,interval(1e-3,1e-2))"]
    # More trials at once than the partition runs (2 nodes x 8 CPUs, 2 per job: 8) is refused before anything starts.
    over = run_train(*search, f"hydra.sweep.dir={tmp_path / 'over'}", "hydra.sweeper.n_jobs=9", timeout=120)
    assert over.returncode == 2, over.stderr[-2000:]
    assert ("trident: config error: hydra.sweeper.n_jobs=9: 9 trials of 2 rank(s) at once, but partition debug "
            "has 2 node(s), 16 CPU(s) in all, and a job needs 1 node(s) x 2 CPU(s) (valid: 1..8)") in over.stderr
    assert not (tmp_path / "over").exists()

    sweep_dir = tmp_path / "sweep"
    out = run_train(*search, f"hydra.sweep.dir={sweep_dir}", "train.steps=4", "hydra.sweeper.n_trials=4",
                    "hydra.sweeper.n_jobs=2", "hydra.sweeper.pruner.name=none", timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "4 trial(s) in all (0 done before), 2 at once as SLURM jobs" in out.stdout

    jobs = [json.loads((sweep_dir / str(i) / "slurm_job.json").read_text())["job_id"] for i in range(4)]
    assert len(set(jobs)) == 4 and all("_" not in j for j in jobs)  # four jobs of their own, not an array
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(sweep_dir / "study.journal")))
    [name] = optuna.study.get_all_study_names(storage)
    trials = optuna.load_study(study_name=name, storage=storage).get_trials()
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 4
    assert [t.user_attrs["job_id"] for t in trials] == jobs
    for t in trials:
        rows = [json.loads(line) for line in Path(t.user_attrs["run_dir"], "metrics.jsonl").read_text().splitlines()]
        assert [r["eval_loss"] for r in rows if "eval_loss" in r][-1] == t.value
    # Never more than 2 at once, and the 3rd and 4th were submitted only as earlier ones ended.
    spans = sorted((t.user_attrs["started"], t.user_attrs["ended"]) for t in trials)
    assert all(sum(1 for s, e in spans if s <= start < e) <= 2 for start, _ in spans)
    assert spans[2][0] >= min(e for _, e in spans[:2])
    wait_for(lambda: all(job_state(j) == "COMPLETED" for j in jobs), 120, "sacct to say COMPLETED")
