"""Evaluations beside a training run (train.eval_tasks, orchestrator/evaluate/beside.py), with real processes: a local
training run whose checkpoints trident-eval children evaluate while it goes on, and one whose evaluation fails."""

import json
import sys
from collections import Counter
from pathlib import Path

import pytest

from orchestrator.runs.eval_files import read_results, read_state
from orchestrator.runs.wandb_files import attempts, read_history
from tests.conftest import TINY, run_cmd, run_train

TASKS = ["stdlib_next_line_mc", "stdlib_complete_line"]
STEPS, EVERY = 30, 10  # checkpoints at 10, 20, 30; every second one evaluated (20) and the last (30)


@pytest.fixture(scope="module")
def evaluated_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("evals") / "run"
    overrides = [o for o in TINY if not o.startswith("logging.wandb.mode")]
    out = run_train(f"hydra.run.dir={run_dir}", *overrides, "parallel.dp=1", f"train.steps={STEPS}",
                    f"checkpoint.every={EVERY}", "checkpoint.keep=1", "train.eval_tasks_every=2", "train.eval_every=0",
                    f"train.eval_tasks=[{','.join(TASKS)}]", "eval.limit=4", "eval.batch_size=4",
                    "logging.wandb.mode=offline", "logging.wandb.plan=false", timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return run_dir, out


def test_each_evaluated_checkpoint_has_one_result_per_task_and_metric_in_evals_jsonl(evaluated_run):
    run_dir, _ = evaluated_run
    rows = read_results(run_dir)
    counts = Counter((r["task"], r["metric"], r["step"]) for r in rows)
    assert set(counts.values()) == {1}
    assert {step for _, _, step in counts} == {2 * EVERY, STEPS}
    for step in (2 * EVERY, STEPS):
        assert {(t, m) for t, m, s in counts if s == step} == {
            ("stdlib_next_line_mc", "acc"), ("stdlib_next_line_mc", "acc_norm"), ("stdlib_complete_line", "exact_match")}
    assert all(r["samples"] == 4 and 0.0 <= r["value"] <= 1.0 and r["seconds"] > 0 for r in rows)
    # checkpoint.keep=1 left the newest; the evaluations' holds are gone with them.
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [f"step-{STEPS}"]
    assert not list((run_dir / "checkpoints").glob("*/.eval-hold"))


def test_the_wandb_run_holds_the_results_against_the_checkpoints_steps(evaluated_run):
    run_dir, _ = evaluated_run
    run_id = json.loads((run_dir / "wandb.json").read_text())["id"]
    assert attempts(str(run_dir / "wandb"), run_id)[0]["metrics"]["eval/*"] == "eval/step"
    shown = {h["eval/step"]: h for h in read_history(str(run_dir / "wandb"), run_id) if "eval/step" in h}
    assert sorted(shown) == [2 * EVERY, STEPS]
    for r in read_results(run_dir):
        assert shown[r["step"]][f"eval/{r['task']}/{r['metric']}"] == pytest.approx(r["value"], abs=0)
    # metrics.jsonl holds the same rows (the W&B thread is fed from them).
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert sorted(r["eval/step"] for r in logged if "eval/step" in r) == [2 * EVERY, STEPS]


def test_no_training_step_waited_for_an_evaluation(evaluated_run):
    """The evaluation of step 20 took seconds (a process, torch, lm-eval, 8 documents); had the loop waited for
    it, the step that did would show them."""
    run_dir, _ = evaluated_run
    state = read_state(run_dir)
    shortest = min(e["ended"] - e["started"] for e in state.values())
    assert shortest > 2.0
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    slowest = max(r["step_time_s"] for r in steps if "step_time_s" in r)
    assert slowest < shortest / 2, (slowest, shortest)
    assert state[2 * EVERY]["where"] == "local" and state[2 * EVERY]["state"] == "done"


def test_trident_status_shows_the_evaluations_and_their_results(evaluated_run):
    run_dir, _ = evaluated_run
    out = run_cmd([sys.executable, "-m", "orchestrator.cli.status", str(run_dir), "--json"], timeout=120)
    assert out.returncode == 0, out.stderr
    evals = json.loads(out.stdout)[0]["evals"]
    assert [(e["step"], e["state"]) for e in evals] == [(2 * EVERY, "done"), (STEPS, "done")]
    for r in read_results(run_dir):
        assert evals[[e["step"] for e in evals].index(r["step"])]["results"][f"{r['task']}/{r['metric']}"] == r["value"]
    table = run_cmd([sys.executable, "-m", "orchestrator.cli.status", str(run_dir)], timeout=120).stdout
    assert f"eval step {STEPS}" in table and "stdlib_next_line_mc/acc=" in table


def test_trident_eval_by_hand_on_the_finished_run_adds_its_results_to_the_run_and_its_wandb_run(evaluated_run):
    """After the run (its live lock free): one more attempt of its W&B run, a row after its last, and an entry in
    evals.json (run last in this module: it replaces step 30's entry)."""
    run_dir, _ = evaluated_run
    before = json.loads((run_dir / "wandb.json").read_text())
    out = run_cmd([sys.executable, "-m", "orchestrator.cli.evaluate", f"eval.checkpoint={run_dir / 'checkpoints'}",
                   "eval.tasks=[stdlib_next_line_mc]", "eval.limit=4", "eval.batch_size=4"], timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    at = STEPS + 3  # after the two evaluations' rows (31, 32)
    assert f"results in W&B run {before['id']} (eval/step {STEPS}, at step {at})" in out.stdout
    after = json.loads((run_dir / "wandb.json").read_text())
    assert after["id"] == before["id"] and after["attempts"] == before["attempts"] + 1
    history = read_history(str(run_dir / "wandb"), before["id"])
    assert [h["_step"] for h in history][-3:] == [STEPS + 1, STEPS + 2, at]
    mine = [r for r in read_results(run_dir)][-2:]
    assert {(r["metric"], r["step"]) for r in mine} == {("acc", STEPS), ("acc_norm", STEPS)}
    assert history[-1]["eval/step"] == STEPS
    assert history[-1]["eval/stdlib_next_line_mc/acc"] == mine[0]["value"] == \
        [r for r in read_results(run_dir) if r["step"] == STEPS and r["metric"] == "acc"][0]["value"]
    last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["step"] == at and last["eval/step"] == STEPS
    entry = read_state(run_dir)[STEPS]
    assert entry["where"] == "trident-eval" and entry["logged_at"] == at


def test_a_failing_evaluation_is_reported_and_the_training_finishes(tmp_path):
    """A task whose metric names an aggregation lm-eval does not have: lm-eval fails after scoring."""
    shipped = Path(__file__).resolve().parents[2] / "conf" / "eval_tasks"
    task = tmp_path / "bad.yaml"
    task.write_text((shipped / "stdlib_next_line_mc.yaml").read_text()
                    .replace("task: stdlib_next_line_mc", "task: bad_aggregation_task")
                    .replace("custom_dataset: !function utils.load_beside", "dataset_path: json")
                    .replace("test: stdlib_next_line_mc.jsonl", f"test: {shipped / 'stdlib_next_line_mc.jsonl'}")
                    .replace("aggregation: mean", "aggregation: no_such_aggregation", 1))
    run_dir = tmp_path / "run"
    out = run_train(f"hydra.run.dir={run_dir}", *TINY, "parallel.dp=1", "train.steps=3", "train.eval_every=0",
                    f"train.eval_tasks=[{task}]", "eval.limit=2", timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "trident: done, 3 steps" in out.stdout
    assert "the evaluation of step 3 failed (exit code 1: TypeError: 'NoneType' object is not callable)" in out.stderr
    entry = read_state(run_dir)[3]
    assert entry["state"] == "failed" and "exit code 1" in entry["error"]
    assert "Traceback" in Path(entry["log"]).read_text()
    assert not read_results(run_dir)
    status = json.loads(run_cmd([sys.executable, "-m", "orchestrator.cli.status", str(run_dir), "--json"]).stdout)
    assert status[0]["evals"][0]["state"] == "failed"
