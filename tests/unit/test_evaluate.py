"""trident-eval's checks, in one process before any rank: each bad input is one line naming the setting."""

import pytest
from hydra import compose, initialize_config_dir

from orchestrator.config import CONF_DIR, register
from orchestrator.evaluate.harness import SHIPPED_TASKS, prepare, shipped_tasks, task_names
from orchestrator.validate import ConfigError


def eval_cfg(*overrides: str):
    register()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="eval", overrides=["model.dim=32", "model.n_layers=2", "model.n_heads=8",
                                                      "model.n_kv_heads=4", "model.multiple_of=16", *overrides])


def test_the_shipped_tasks_are_found_by_name_file_and_folder():
    assert sorted(shipped_tasks()) == ["stdlib_complete_line", "stdlib_next_line_mc"]
    assert task_names([str(SHIPPED_TASKS / "stdlib_next_line_mc.yaml")]) == ["stdlib_next_line_mc"]
    assert task_names([str(SHIPPED_TASKS)]) == ["stdlib_complete_line", "stdlib_next_line_mc"]


def test_a_task_lm_eval_does_not_know_is_refused_naming_the_close_ones():
    with pytest.raises(ConfigError, match=r"eval.tasks: lm-eval knows no task 'stdlib_next_line' \(close: "
                                          r"stdlib_next_line_mc"):
        prepare(eval_cfg("eval.tasks=[stdlib_next_line]"))


@pytest.mark.parametrize("overrides, message", [
    (["eval.tasks=[]"], r"eval.tasks is empty: .*shipped: stdlib_complete_line, stdlib_next_line_mc"),
    (["eval.checkpoint=/nonexistent/run/checkpoints"], r"eval.checkpoint="),
    (["eval.limit=0"], r"eval.limit=0 must be positive"),
    (["parallel.tp=3"], r"parallel.tp=3"),
])
def test_bad_input_is_one_line_before_any_rank_starts(overrides, message):
    with pytest.raises(ConfigError, match=message):
        prepare(eval_cfg("eval.tasks=[stdlib_next_line_mc]", *overrides))


def test_a_task_file_that_names_no_task_is_refused(tmp_path):
    (tmp_path / "t.yaml").write_text("dataset_path: json\n")
    with pytest.raises(ConfigError, match=r"eval.tasks: .*t.yaml defines no `task:` name"):
        prepare(eval_cfg(f"eval.tasks=[{tmp_path / 't.yaml'}]"))
