"""Evaluations beside a training run (orchestrator/evaluate/beside.py), in one process: which checkpoints, the command
each gets, the checks before any rank, the holds on checkpoints, and what a later attempt takes up."""

import json
from pathlib import Path

import datasets.config
import huggingface_hub.constants
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from orchestrator.config import CONF_DIR, register
from orchestrator.evaluate.beside import EvalQueue, due, eval_argv, metrics_row
from orchestrator.evaluate.harness import SHIPPED_TASKS, check_beside, check_tasks
from orchestrator.runs import checkpoint
from orchestrator.runs.eval_files import write_state
from orchestrator.validate import ConfigError
from tests.conftest import make_cfg


def test_every_nth_checkpoint_and_the_last_are_evaluated():
    cfg = make_cfg("train.steps=35", "checkpoint.every=10", "train.eval_tasks=[stdlib_next_line_mc]",
                   "train.eval_tasks_every=2")
    assert [s for s in range(1, 36) if due(cfg, s)] == [20, 35]
    cfg = make_cfg("train.steps=35", "checkpoint.every=0", "train.eval_tasks=[stdlib_next_line_mc]")
    assert [s for s in range(1, 36) if due(cfg, s)] == [35]
    assert not any(due(make_cfg("train.steps=35", "checkpoint.every=5"), s) for s in range(1, 36))


def test_the_evaluation_command_reads_back_in_hydra_as_the_run_settings_and_the_checkpoint(tmp_path):
    odd = tmp_path / "a run, with 'quotes' = and \\ back"
    (odd / "checkpoints" / "step-4").mkdir(parents=True)
    task = odd / "my task.yaml"
    task.write_text("task: t\n")
    cfg = make_cfg("train.eval_tasks=[stdlib_next_line_mc]", "eval.limit=3", "eval.num_fewshot=2", "eval.tp=2",
                   "eval.batch_size=5")
    cfg.train.eval_tasks = ["stdlib_next_line_mc", str(task)]
    argv = eval_argv(cfg, str(odd / "checkpoints" / "step-4"), str(odd), "local")
    assert argv[1:4] == ["-m", "orchestrator.cli.evaluate", "launcher=local"]
    register()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        got = compose(config_name="eval", overrides=argv[3:])
    assert got.eval.checkpoint == str(odd / "checkpoints" / "step-4")
    assert got.eval.output == str(odd / "evals.jsonl")
    assert list(got.eval.tasks) == ["stdlib_next_line_mc", str(task)]
    assert (got.eval.limit, got.eval.num_fewshot, got.eval.batch_size, got.parallel.tp) == (3, 2, 5, 2)
    assert got.eval.samples is None and got.launcher.name == "local"


@pytest.mark.parametrize("overrides, message", [
    (["train.eval_tasks=[stdlib_next_line]"],
     r"train.eval_tasks: lm-eval knows no task 'stdlib_next_line' \(close: stdlib_next_line_mc"),
    (["eval.tp=3"], r"eval.tp=3 does not divide model.n_heads=8"),
    (["checkpoint.every=0", "checkpoint.at_end=false"], r"train.eval_tasks evaluates checkpoints, and this run "
                                                        r"saves none: set checkpoint.every"),
    (["train.eval_tasks_every=0"], r"train.eval_tasks_every=0 must be at least 1"),
])
def test_bad_settings_of_the_evaluations_beside_a_run_are_refused_before_it_starts(overrides, message):
    with pytest.raises(ConfigError, match=message):
        check_beside(make_cfg("train.eval_tasks=[stdlib_next_line_mc]", *overrides))


def test_a_task_whose_data_is_not_on_this_machine_is_refused_naming_the_file_or_dataset(tmp_path, monkeypatch):
    task = tmp_path / "local.yaml"
    task.write_text((SHIPPED_TASKS / "stdlib_next_line_mc.yaml").read_text()
                    .replace("task: stdlib_next_line_mc", "task: local_copy")
                    .replace("custom_dataset: !function utils.load_beside", "dataset_path: json")
                    .replace("test: stdlib_next_line_mc.jsonl", "test: gone/missing.jsonl"))
    with pytest.raises(ConfigError, match=r"train.eval_tasks: task 'local_copy' .* reads the data file "
                                          r"'gone/missing.jsonl', which is not on this machine"):
        check_tasks(OmegaConf.create({"tasks": [str(task)]}), "train.eval_tasks")
    (tmp_path / "gone").mkdir()
    (tmp_path / "gone" / "missing.jsonl").write_text("{}\n")  # beside the YAML: found
    assert check_tasks(OmegaConf.create({"tasks": [str(task)]}))[0] == ["local_copy"]
    # One of lm-eval's own tasks, with empty caches: its Hugging Face dataset would be downloaded.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ConfigError, match=r"eval.tasks: task 'arc_easy' .* reads the Hugging Face dataset "
                                          r"'allenai/ai2_arc' \(ARC-Easy\), which is not on this machine"):
        check_tasks(OmegaConf.create({"tasks": ["arc_easy"]}))
    (tmp_path / "hub" / "datasets--allenai--ai2_arc").mkdir(parents=True)  # as a download leaves it
    assert check_tasks(OmegaConf.create({"tasks": ["arc_easy"]}))[0] == ["arc_easy"]


def _checkpoint(root: Path, step: int) -> str:
    path = root / f"step-{step}"
    path.mkdir(parents=True)
    (path / "trident.json").write_text(json.dumps({"step": step}))
    (path / ".metadata").write_text("")
    return str(path)


def test_a_held_checkpoint_outlives_checkpoint_keep_until_its_evaluation_releases_it(tmp_path):
    held = _checkpoint(tmp_path, 2)
    checkpoint.hold(held)
    for step in (4, 6):
        _checkpoint(tmp_path, step)
        checkpoint.prune(str(tmp_path), keep=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-2", "step-6"]
    checkpoint.release(held, keep=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-6"]


def test_a_later_attempt_takes_up_what_earlier_ones_left(tmp_path):
    """Resumed at step 30 (it logs from 31): the evaluation of 10 was logged at 33, a row W&B's rewind drops, so
    it waits for a row again; 20's never started; 40's checkpoint is made again, so its entry is forgotten."""
    run = tmp_path / "run"
    ckpts = run / "checkpoints"
    paths = {s: _checkpoint(ckpts, s) for s in (10, 20, 40)}
    write_state(run, {10: {"state": "done", "checkpoint": paths[10], "offset": 0, "logged_at": 33},
                      20: {"state": "pending", "checkpoint": paths[20]},
                      40: {"state": "running", "checkpoint": paths[40], "where": "local", "pid": None}})
    rows = [{"task": "t", "metric": "acc", "filter": "none", "value": v, "step": 10} for v in (0.5,)]
    (run / "evals.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    queue = EvalQueue.__new__(EvalQueue)  # its state alone: no thread, nothing started
    queue.run_dir, queue.state, queue.waiting, queue.running, queue.rows = str(run), {}, [], {}, []
    queue.state = {int(k): v for k, v in json.loads((run / "evals.json").read_text()).items()}
    queue._take_up(31)
    assert queue.waiting == [20] and queue.running == {}
    assert queue.rows == [(metrics_row(10, rows), 0)] == [({"eval/step": 10, "eval/t/acc": 0.5}, 0)]
    assert sorted(json.loads((run / "evals.json").read_text())) == ["10", "20"]
