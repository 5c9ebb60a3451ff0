"""Rank environments read from torchrun's and srun's variables (faked here: no process is started)."""

import os

import pytest

import socket

from launch.env import RankEnv, bind_to_node_address, expand_hostlist, from_environ, interface_of, slurm_port
from launch.local import _ephemeral_ports, cause, free_port


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


def test_a_job_of_several_nodes_binds_gloo_and_nccl_to_the_interface_that_reaches_the_rendezvous_fake_env():
    assert interface_of("127.0.0.1") == "lo" and interface_of("192.0.2.254") is None
    env = RankEnv(0, 4, 0, 2, "127.0.0.1", 1234, "slurm", nodes=2)
    one_node = RankEnv(0, 2, 0, 2, "127.0.0.1", 1234, "slurm", nodes=1)
    environ: dict = {}
    assert bind_to_node_address(one_node, environ) is None and environ == {}
    assert bind_to_node_address(env, environ) is None and environ == {}  # loopback: nothing to name
    # This machine's own non-loopback addresses, each reached through its own interface.
    own = {}
    for _, name in socket.if_nameindex():
        for address in _ipv4_addresses(name):
            if not address.startswith("127."):
                own[address] = name
    for address, name in own.items():
        environ = {}
        assert bind_to_node_address(RankEnv(0, 4, 0, 2, address, 1, "slurm", nodes=2), environ) == name
        assert environ == {"GLOO_SOCKET_IFNAME": name, "NCCL_SOCKET_IFNAME": name}
        environ = {"GLOO_SOCKET_IFNAME": "ib0"}  # the user's choice wins
        bind_to_node_address(RankEnv(0, 4, 0, 2, address, 1, "slurm", nodes=2), environ)
        assert environ == {"GLOO_SOCKET_IFNAME": "ib0", "NCCL_SOCKET_IFNAME": name}


def _ipv4_addresses(name: str) -> list[str]:
    import fcntl
    import struct

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            raw = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))
        except OSError:
            return []
    return [socket.inet_ntoa(raw[20:24])]


def test_the_node_count_comes_from_slurm_or_from_torchruns_local_world_fake_env():
    base = {"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_JOB_NODELIST": "node[1-2]", "SLURM_TASKS_PER_NODE": "2(x2)"}
    assert from_environ(base).nodes == 2  # from the node list
    assert from_environ({**base, "SLURM_JOB_NUM_NODES": "3"}).nodes == 3
    assert from_environ({"RANK": "0", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4"}).nodes == 2
    assert from_environ({"RANK": "0", "WORLD_SIZE": "8"}).nodes == 1


def test_the_local_store_port_is_free_and_below_the_range_the_kernel_gives_out():
    """Below the ephemeral range no connection of another run's ranks can take it between the pick and rank
    0's bind (the EADDRINUSE a trident-eval child met in CI)."""
    low, high = _ephemeral_ports()
    assert 1024 < low < high
    ports = {free_port() for _ in range(20)}
    assert all(max(1024, low - 16384) <= p < low for p in ports) and len(ports) > 1
    for port in ports:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("", port))  # still free
