"""The lm-eval tasks the project ships (conf/eval_tasks): they load offline from any working directory,
their items are well formed as lm-eval sees them, and their data is what make_tasks.py writes."""

import importlib.util
import json
import platform
from pathlib import Path

import pytest

TASKS = Path(__file__).resolve().parents[2] / "conf" / "eval_tasks"
MC, GEN = "stdlib_next_line_mc", "stdlib_complete_line"
N_ITEMS = 200


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    """Both tasks through lm-eval's TaskManager, offline, from a working directory that holds no data."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        mp.setenv("HF_HUB_OFFLINE", "1")
        import datasets  # imported here, after the variables: it reads them at its first import

        mp.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # where another test imported it first
        mp.chdir(tmp_path_factory.mktemp("elsewhere"))
        from lm_eval.tasks import TaskManager  # imported here, offline (it imports datasets)

        yield TaskManager(include_path=str(TASKS), include_defaults=False).load([MC, GEN])["tasks"]


def test_shipped_tasks_load_offline_from_another_directory_with_all_their_items(tasks):
    assert sorted(tasks) == [GEN, MC]
    for task in tasks.values():
        assert len(list(task.test_docs())) == N_ITEMS


def test_every_multiple_choice_item_has_4_distinct_choices_and_a_gold_index_among_them(tasks):
    task = tasks[MC]
    for doc in task.test_docs():
        choices, gold = task.doc_to_choice(doc), task.doc_to_target(doc)
        assert len(choices) == 4 and len({c.strip() for c in choices}) == 4, doc["source"]
        assert isinstance(gold, int) and 0 <= gold < 4, doc["source"]
        context = task.doc_to_text(doc)
        assert 3 <= len(context.splitlines()) <= 6 and context.endswith("\n"), doc["source"]
        distractors = {c.strip() for i, c in enumerate(choices) if i != gold}
        assert not distractors & {line.strip() for line in context.splitlines()}, doc["source"]
        assert (context + "".join(choices)).isascii()


def test_every_completion_target_is_one_nonblank_line_after_a_short_context(tasks):
    task = tasks[GEN]
    for doc in task.test_docs():
        target, context = task.doc_to_target(doc), task.doc_to_text(doc)
        assert target.strip() and "\n" not in target, doc["source"]
        assert 3 <= len(context.splitlines()) <= 6 and context.endswith("\n"), doc["source"]
        assert len(context) + len(target) <= 400 and (context + target).isascii(), doc["source"]


def test_each_choice_is_scored_as_the_text_right_after_the_context(tasks):
    task = tasks[MC]
    doc = next(iter(task.test_docs()))
    ctx = task.fewshot_context(doc, num_fewshot=0)
    requests = task.construct_requests(doc, ctx)
    assert [r.arguments for r in requests] == [(doc["context"], c) for c in doc["choices"]]


def test_a_completion_counts_whatever_whitespace_surrounds_it_and_nothing_else(tasks):
    task = tasks[GEN]
    doc = next(iter(task.test_docs()))
    answer = doc["answer"]
    assert task.process_results(doc, [answer.strip() + "  "]) == {"exact_match": 1.0}
    assert task.process_results(doc, [answer + ";"]) == {"exact_match": 0.0}
    assert task.config.generation_kwargs["until"] == ["\n"] and task.config.generation_kwargs["max_gen_toks"] == 32


def test_shipped_data_is_what_make_tasks_writes():
    made_with = json.loads((TASKS / f"{MC}.jsonl").read_text().splitlines()[0])["python"]
    if platform.python_version() != made_with:
        pytest.skip(f"the data comes from Python {made_with}'s stdlib, this is {platform.python_version()}")
    spec = importlib.util.spec_from_file_location("make_tasks", TASKS / "make_tasks.py")
    make_tasks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_tasks)
    made = make_tasks.make()
    for key, path in make_tasks.OUTPUTS.items():
        assert path.read_text() == make_tasks.jsonl(made[key]), path.name
