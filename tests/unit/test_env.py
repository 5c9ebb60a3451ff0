"""Rank environments read from torchrun's and srun's variables (faked here: no process is started)."""

import os

import pytest

from launch.env import expand_hostlist, from_environ, slurm_port
from launch.local import cause


def test_expand_hostlist():
    assert expand_hostlist("gpu[01-03,07],login1") == ["gpu01", "gpu02", "gpu03", "gpu07", "login1"]
    assert expand_hostlist("node7") == ["node7"]
    assert expand_hostlist("a[9-11]") == ["a9", "a10", "a11"]


def test_torchrun_variables_fake_env():
    env = from_environ({"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
                        "MASTER_ADDR": "n0", "MASTER_PORT": "1234"})
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (5, 8, 1, 4)
    assert (env.master_addr, env.master_port, env.source) == ("n0", 1234, "torchrun")


def test_srun_variables_fake_slurm_env():
    env = from_environ({"SLURM_PROCID": "6", "SLURM_NTASKS": "8", "SLURM_LOCALID": "2",
                        "SLURM_TASKS_PER_NODE": "4(x2)", "SLURM_JOB_NODELIST": "gpu[12-13]", "SLURM_JOB_ID": "4242"})
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (6, 8, 2, 4)
    assert env.master_addr == "gpu12" and env.source == "slurm"
    assert env.master_port == slurm_port("4242") == 24242


def test_array_elements_of_one_job_get_different_ports_fake_slurm_env():
    base = {"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_JOB_NODELIST": "n1", "SLURM_ARRAY_JOB_ID": "77"}
    ports = {from_environ({**base, "SLURM_ARRAY_TASK_ID": str(i), "SLURM_JOB_ID": str(78 + i)}).master_port for i in range(3)}
    assert len(ports) == 3


def test_no_rank_environment_is_a_clear_error():
    with pytest.raises(RuntimeError, match="RANK and WORLD_SIZE.*SLURM_PROCID"):
        from_environ({})


def test_the_launcher_names_the_rank_that_failed_first_not_its_echoes(tmp_path):
    """Several ranks exited before the launcher woke: rank 1 raised first, rank 0 then saw "connection closed"."""
    files = [tmp_path / "rank0.pickle", tmp_path / "rank1.pickle", str(tmp_path / "rank2-wrote-none")]
    for f, t in ((files[1], 1_000), (files[0], 2_000)):
        f.write_bytes(b"x")
        os.utime(f, ns=(t, t))
    assert cause([0, 1], {0: 1, 1: 1}, files) == 1
    assert cause([0, 1, 2], {0: 1, 1: 1, 2: 1}, files) == 2  # exited without an exception: it ended itself
    assert cause([0, 1, 2], {0: 1, 1: 1, 2: -9}, files) == 2  # a killed rank is the cause of the others
