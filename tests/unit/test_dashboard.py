"""The W&B run's bookkeeping (orchestrator/runs/dashboard.py), in one process with real W&B offline runs."""

import json
from types import SimpleNamespace

from orchestrator.runs.dashboard import WandbRun, _first_difference, effective_rows, read_state
from orchestrator.runs.wandb_files import attempts, read_history


def wandb_cfg(**kw):
    return SimpleNamespace(**{"mode": "offline", "project": "trident-test", "entity": None, "name": None,
                              "group": None, "tags": [], **kw})


def write_metrics(run_dir, steps_and_losses):
    with open(run_dir / "metrics.jsonl", "a") as f:
        for step, loss in steps_and_losses:
            f.write(json.dumps({"step": step, "loss": loss}) + "\n")


def test_rows_a_later_attempt_repeats_replace_the_earlier_ones_from_its_first_step(tmp_path):
    # 0..6, rolled back to 4 (5 and 6 again), killed after 7, restarted from 6 (7 again), then 8.
    write_metrics(tmp_path, [(0, 9.0), (1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 5.0), (6, 6.0),
                             (5, 50.0), (6, 60.0), (7, 70.0), (7, 700.0), (8, 800.0)])
    rows = effective_rows(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["loss"]) for r in rows] == [(0, 9.0), (1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 50.0),
                                                      (6, 60.0), (7, 700.0), (8, 800.0)]
    have = [{"_step": s, "loss": v} for s, v in [(0, 9.0), (1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 5.0)]]
    assert _first_difference(have, rows) == 5  # W&B holds the undone step 5
    assert _first_difference(have[:3], rows) == 3  # W&B never got step 3
    assert _first_difference([{"_step": r["step"], **r} for r in rows], rows) == 9


def test_a_resume_keeps_the_id_a_fresh_start_takes_a_new_one_and_missing_rows_are_sent(tmp_path):
    first = WandbRun(str(tmp_path), wandb_cfg(), {"a": 1}, "name", "group", first_step=0)
    write_metrics(tmp_path, [(0, 9.0), (1, 1.0), (2, 2.0)])
    first.log({"step": 0, "loss": 9.0})  # W&B gets step 0 only: the rest "died" with the attempt
    first.finish()
    assert read_state(str(tmp_path))["attempts"] == 1
    resumed = WandbRun(str(tmp_path), wandb_cfg(), {"a": 1}, "name", "group", first_step=3)
    assert resumed.id == first.id
    write_metrics(tmp_path, [(3, 3.0)])
    resumed.log({"step": 3, "loss": 3.0})
    resumed.finish()
    history = read_history(str(tmp_path / "wandb"), first.id)
    assert [(h["_step"], h["loss"]) for h in history] == [(0, 9.0), (1, 1.0), (2, 2.0), (3, 3.0)]
    assert [a["config"]["trident_attempt"] for a in attempts(str(tmp_path / "wandb"))] == [
        {"number": 1, "first_step": 0}, {"number": 2, "first_step": 1}]
    fresh = WandbRun(str(tmp_path), wandb_cfg(), {"a": 1}, "name", "group", first_step=0)
    fresh.finish()
    assert fresh.id != first.id and read_state(str(tmp_path)) == {"id": fresh.id, "attempts": 1, "last_step": None}


def test_no_writable_wandb_dir_is_a_warning_and_logging_goes_on(tmp_path, capsys):
    (tmp_path / "wandb").write_text("a file where W&B wants its folder")
    run = WandbRun(str(tmp_path), wandb_cfg(), {}, "name", "group", first_step=0)
    for step in range(3):
        run.log({"step": step, "loss": 1.0})
    run.finish()
    err = capsys.readouterr().err
    assert "trident: warning: W&B init failed (" in err and "metrics.jsonl has every row" in err
    assert run.failed and not run.thread.is_alive() and read_state(str(tmp_path))["id"] == run.id
