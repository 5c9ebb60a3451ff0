"""Evaluations under SLURM against the real local cluster: a launcher=slurm training run whose checkpoints are
evaluated by jobs of their own (train.eval_tasks), and trident-eval launcher=slurm on its checkpoint."""

import json
import re
import sys
from collections import Counter

import pytest

from orchestrator.runs.eval_files import read_results, read_state
from tests.conftest import TINY, run_cmd, run_train

pytestmark = pytest.mark.slurm


def test_a_slurm_run_evaluates_its_checkpoints_in_jobs_of_their_own_and_trident_eval_submits_one(slurm_cluster,
                                                                                                  tmp_path):
    run_dir = tmp_path / "run"
    out = run_train(f"hydra.run.dir={run_dir}", *TINY, "parallel.dp=1", "train.steps=4", "checkpoint.every=2",
                    "train.eval_every=0", "train.eval_tasks=[stdlib_next_line_mc]", "eval.limit=2",
                    "eval.launcher={time: '0:10:00'}", "launcher=slurm", "launcher.wait=true", timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    state = read_state(run_dir)
    assert sorted(state) == [2, 4]
    training_job = json.loads((run_dir / "slurm_job.json").read_text())["job_id"]
    jobs = {state[s]["job_id"] for s in state}
    assert all(e["where"] == "slurm" and e["state"] == "done" for e in state.values()), state
    assert len(jobs) == 2 and training_job not in jobs
    rows = read_results(run_dir)
    assert Counter((r["metric"], r["step"]) for r in rows) == {("acc", 2): 1, ("acc_norm", 2): 1, ("acc", 4): 1,
                                                               ("acc_norm", 4): 1}
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert sorted(r["eval/step"] for r in logged if "eval/step" in r) == [2, 4]

    # The same evaluation of step 4 by hand, as a 2-task job: the same metrics (log-likelihoods at tp=2 within
    # float summation order of tp=1's; with 2 documents, an accuracy is 0, 0.5 or 1).
    out = run_cmd([sys.executable, "-m", "orchestrator.cli.evaluate", f"eval.checkpoint={run_dir / 'checkpoints'}",
                   "eval.tasks=[stdlib_next_line_mc]", "eval.limit=2", "parallel.tp=2", "launcher=slurm",
                   "launcher.wait=true", f"eval.output={tmp_path / 'by-hand.jsonl'}"], timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert re.search(r"submitted SLURM job \d+ \(1 node x 2 task\(s\)\)", out.stdout)
    by_hand = [json.loads(line) for line in (tmp_path / "by-hand.jsonl").read_text().splitlines()]
    assert {(r["metric"], r["step"], r["value"]) for r in by_hand} == \
        {(r["metric"], r["step"], r["value"]) for r in rows if r["step"] == 4}
