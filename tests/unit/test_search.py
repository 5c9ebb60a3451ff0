"""The search's pieces that need no process: the space from Hydra's sweep syntax, slots on a cluster, ranks."""

from types import SimpleNamespace

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from orchestrator.search.space import encode, param_overrides, parse
from orchestrator.search.tune import ranks, spearman
from orchestrator.slurm_checks import jobs_at_once
from orchestrator.validate import ConfigError


def test_the_stock_optuna_sweepers_expressions_become_optuna_distributions_and_plain_values_stay_fixed():
    space, fixed = parse({"optim.lr": "tag(log, interval(1e-4, 1e-2))", "train.steps": "range(100, 500, 100)"},
                         ["optim.warmup_steps=int(interval(0, 10))", "parallel=choice({tp:1},{tp:2})",
                          "model=llama-debug", "train.steps=choice(4, 8)"])
    assert space == {
        "optim.lr": FloatDistribution(1e-4, 1e-2, log=True),
        "train.steps": CategoricalDistribution([4, 8]),  # the command line wins over params
        "optim.warmup_steps": IntDistribution(0, 10),
        "parallel": CategoricalDistribution(["{tp:1}", "{tp:2}"]),
    }
    assert fixed == ["model=llama-debug"]
    assert parse({"train.steps": "range(100, 500, 100)"}, [])[0]["train.steps"] == IntDistribution(100, 400, step=100)


@pytest.mark.parametrize("params, args, message", [
    ({"optim.lr": "interval(1e-2, 1e-3)"}, [],
     "hydra.sweeper.params.optim.lr=interval(1e-2, 1e-3) is empty: interval(low, high) needs low < high"),
    ({}, ["optim.lr=tag(log, interval(0, 1))"], "optim.lr=tag(log, interval(0, 1)): a log interval needs low > 0"),
    ({}, ["train.steps=range(5, 1)"], "train.steps=range(5, 1) is empty"),
])
def test_an_empty_or_impossible_range_is_a_config_error_naming_it(params, args, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse(params, args)


def test_sampled_values_go_back_to_hydra_as_the_same_values():
    parser = OverridesParser.create()
    for value in (0.0012345678901234567, 3, True, None, "a b", "x,y", "llama-debug", [1, 2], {"tp": 2, "pp": 1}):
        [line] = param_overrides({"k": value}) if not isinstance(value, (list, dict)) else [f"k={encode(value)}"]
        assert parser.parse_override(line).value() == value, line


def test_how_many_jobs_of_a_shape_a_partition_runs_at_once():
    one = SimpleNamespace(partition=None, tasks_per_node=None, nodes=1, cpus_per_task=1, gpus_per_node=0)
    assert jobs_at_once(one, 2, "n1 debug* 16 (null)\nn2 other 64 (null)\n")[0] == 8
    gpu = SimpleNamespace(partition="gpu", tasks_per_node=None, nodes=2, cpus_per_task=4, gpus_per_node=8)
    # 3 nodes of 8 GPUs, a job takes 2 whole nodes: one at a time.
    fits, why = jobs_at_once(gpu, 16, "g1 gpu 96 gpu:h100:8\ng2 gpu 96 gpu:h100:8(S:0-1)\ng3 gpu 96 gpu:h100:8\n")
    assert fits == 1 and "3 node(s)" in why and "8 GPU(s)" in why


def test_spearman_is_one_for_the_same_order_minus_one_for_the_reverse_and_handles_ties():
    assert ranks([3.0, 1.0, 2.0, 2.0]) == [4.0, 1.0, 2.5, 2.5]
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # d = (0, 0, 1, -1): 1 - 6 * 2 / (4 * 15) = 0.8
    assert spearman([1, 2, 3, 4], [1, 2, 4, 3]) == pytest.approx(0.8)
    assert spearman([1, 2], [2, 1]) is None
