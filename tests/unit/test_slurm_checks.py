"""What launcher=slurm checks before it submits, against faked sinfo output and fake sacct ids; and the sweep's keys."""

import os
import stat

import pytest
from omegaconf import OmegaConf

from orchestrator import slurm_checks
from orchestrator.search.status import _expand
from orchestrator.search.sweep import Sweep, swept_keys
from orchestrator.slurm_checks import check_no_secrets, check_partition, parse_sinfo
from orchestrator.validate import ConfigError

FAKE_SINFO = """\
cpu (null)
gpu gpu:h100:8(S:0-1)
gpu gpu:h100:4(S:0)
big gpu:8,shard:16
"""


def launcher(**kw):
    base = {"partition": None, "gpus_per_node": 0, "nodes": 1, "setup": [], "extra_sbatch": {}}
    return OmegaConf.create({**base, **kw})


def test_parse_sinfo_fake_output_finds_partitions_their_default_and_gpus():
    parts = {p.name: p for p in parse_sinfo("debug* (null)\n" + FAKE_SINFO)}
    assert [(p.name, p.default, p.gpus_per_node) for p in parts.values()] == [
        ("debug", True, 0), ("cpu", False, 0), ("gpu", False, 8), ("big", False, 8)]


def test_no_partition_on_a_cluster_without_a_default_is_refused_fake_sinfo():
    with pytest.raises(ConfigError, match=r"partition is not set .* no default partition \(valid: cpu, gpu, big\)"):
        check_partition(launcher(), 4, parse_sinfo(FAKE_SINFO))
    check_partition(launcher(partition="cpu"), 4, parse_sinfo(FAKE_SINFO))  # named: fine
    check_partition(launcher(), 4, parse_sinfo("debug* (null)\n"))  # the default: fine


def test_more_nodes_than_the_partition_has_are_refused_fake_sinfo():
    parts = parse_sinfo("debug* (null) 1\ndebug* (null) 1\ncpu (null) 5\n")  # sinfo's lines per node state
    assert [(p.name, p.nodes) for p in parts] == [("debug", 2), ("cpu", 5)]
    with pytest.raises(ConfigError, match=r"launcher.nodes=3 but partition 'debug' has 2 node\(s\) \(valid: 1..2\)"):
        check_partition(launcher(nodes=3), 2, parts)
    check_partition(launcher(nodes=2), 2, parts)
    check_partition(launcher(nodes=3, partition="cpu"), 2, parts)


def test_an_unknown_partition_is_refused_with_the_valid_ones_fake_sinfo():
    with pytest.raises(ConfigError, match=r"launcher.partition='gpus' is not a partition .*\(valid: cpu, gpu, big\)"):
        check_partition(launcher(partition="gpus"), 4, parse_sinfo(FAKE_SINFO))


def test_a_gpu_partition_needs_a_gpu_per_task_fake_sinfo():
    with pytest.raises(ConfigError, match=r"'gpu' has 8 GPUs per node: launcher.gpus_per_node=0 < 4 tasks"):
        check_partition(launcher(partition="gpu"), 4, parse_sinfo(FAKE_SINFO))
    with pytest.raises(ConfigError, match=r"gpus_per_node=2 < 4 tasks per node \(valid: 4..8"):
        check_partition(launcher(partition="gpu", gpus_per_node=2), 4, parse_sinfo(FAKE_SINFO))
    check_partition(launcher(partition="gpu", gpus_per_node=8), 8, parse_sinfo(FAKE_SINFO))


def test_literal_secrets_in_setup_lines_or_sbatch_options_are_refused():
    with pytest.raises(ConfigError, match="launcher.setup sets WANDB_API_KEY to a literal value"):
        check_no_secrets(launcher(setup=["module load cuda", "export WANDB_API_KEY=0123abcd"]))
    with pytest.raises(ConfigError, match="launcher.extra_sbatch sets HF_TOKEN"):
        check_no_secrets(launcher(extra_sbatch={"export": "ALL,HF_TOKEN=hf_abc"}))
    # Taken from the job's environment at run time: nothing secret is written.
    check_no_secrets(launcher(setup=['export WANDB_API_KEY="$WANDB_API_KEY"', "export WANDB_API_KEY=$(cat ~/.key)"]))


def test_swept_keys_are_the_overrides_with_several_values():
    assert swept_keys(["launcher=slurm", "parallel.tp=1,2,4", "optim.lr=1e-4,3e-4", "train.steps=10"]) == [
        "parallel.tp", "optim.lr"]
    # Named as split_override names them: without the + or ~ prefix.
    assert swept_keys(["+x=range(1,3)", "model=llama-debug,llama-125m"]) == ["x", "model"]
    sweep = Sweep("multirun/2026-11-25/15-48-11", ["parallel.tp", "optim.lr"])
    assert sweep.id == "sweep-2026-11-25-15-48-11"
    assert sweep.describe(3, ["launcher=slurm", "parallel.tp=2", "optim.lr=0.0003"]) == {
        "id": "sweep-2026-11-25-15-48-11", "dir": "multirun/2026-11-25/15-48-11", "num": 3,
        "overrides": {"parallel.tp": "2", "optim.lr": "0.0003"}}


def test_sacct_pending_array_ranges_expand_to_their_elements():
    assert _expand("12_[0-2,5%8]") == ["12_0", "12_1", "12_2", "12_5"]
    assert _expand("12_[3]") == ["12_3"] and _expand("12_4") == ["12_4"] and _expand("13") == ["13"]


def _fake_sinfo(tmp_path, monkeypatch, failures: int, error: str):
    """A fake `sinfo` on PATH that fails `failures` times with `error`, then prints one partition."""
    count = tmp_path / "calls"
    script = tmp_path / "sinfo"
    script.write_text(f"""#!/bin/sh
n=$(cat {count} 2>/dev/null || echo 0); n=$((n+1)); echo $n > {count}
if [ $n -le {failures} ]; then echo "sinfo: error: {error}" >&2; exit 1; fi
echo "debug* (null)"
""")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(slurm_checks, "RETRY_S", (0.01, 0.01, 0.01))
    return count


def test_an_unreachable_controller_is_asked_again_before_the_submission_fails_fake_sinfo(tmp_path, monkeypatch,
                                                                                         capsys):
    unreachable = "slurm_load_partitions: Unable to contact slurm controller (connect failure)"
    calls = _fake_sinfo(tmp_path, monkeypatch, 2, unreachable)
    assert slurm_checks.sinfo("-h") == "debug* (null)\n"
    assert calls.read_text().strip() == "3"
    assert capsys.readouterr().err.count("asking again") == 2
    calls.unlink()
    _fake_sinfo(tmp_path, monkeypatch, 4, unreachable)  # down for longer than the retries: the error is its own
    with pytest.raises(ConfigError, match="sinfo failed, is the cluster up.*connect failure"):
        slurm_checks.sinfo("-h")
    assert calls.read_text().strip() == "4"


def test_another_sinfo_error_is_not_asked_again_fake_sinfo(tmp_path, monkeypatch):
    calls = _fake_sinfo(tmp_path, monkeypatch, 1, "invalid option -- 'Z'")
    with pytest.raises(ConfigError, match="invalid option"):
        slurm_checks.sinfo("-Z")
    assert calls.read_text().strip() == "1"
