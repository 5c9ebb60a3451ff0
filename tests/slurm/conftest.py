"""The slurm tier: a real 2-node SLURM cluster on this machine (slurmctld + slurmdbd for sacct on the host; node1
and node2 each a network namespace with its own address, hostname and slurmd), started once per session."""

import os
import subprocess

import pytest

from tests.conftest import ROOT

# Ports apart from the defaults, so a cluster a developer already runs is left alone (and movable, so two
# checkouts can test at once: TRIDENT_TEST_SLURM_BASE, TRIDENT_TEST_SLURM_PORT_BASE, TRIDENT_TEST_SLURM_DB_PORT).
CLUSTER_ENV = {
    "SLURM_BASE": os.environ.get("TRIDENT_TEST_SLURM_BASE", "/tmp/trident-test-slurm"),
    "SLURM_PORT_BASE": os.environ.get("TRIDENT_TEST_SLURM_PORT_BASE", "6917"),
    "SLURM_DB_PORT": os.environ.get("TRIDENT_TEST_SLURM_DB_PORT", "13406"),
    "SLURM_CRED_EXPIRE": "10",
    # A node whose slurmd is silent this long is DOWN: the lost-node test waits for it; under load a node
    # answers within a second, so 30 s never takes a live node down.
    "SLURM_SLURMD_TIMEOUT": "30",
    "SLURM_EXTRA_CONF": "SchedulerParameters=sched_interval=2,bf_interval=2",
}


@pytest.fixture(scope="session")
def slurm_cluster():
    env = {**os.environ, **CLUSTER_ENV}
    start = subprocess.run(["bash", str(ROOT / "launch/cluster/start-cluster.sh"), "--nodes", "2"], env=env,
                           capture_output=True, text=True, timeout=600)
    # die() writes its reason first, then the daemons' log tails: keep the reason whatever the length.
    reason = [line for line in start.stderr.splitlines() if "ERROR:" in line]
    assert start.returncode == 0, "\n".join(reason) + "\n" + start.stdout[-3000:] + start.stderr[-3000:]
    conf = f"{CLUSTER_ENV['SLURM_BASE']}/etc/slurm.conf"
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = conf  # sbatch, sacct and submitit in this process and its children
    yield conf
    if previous is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = previous
    subprocess.run(["bash", str(ROOT / "launch/cluster/stop-cluster.sh"), "--clean"], env=env,
                   capture_output=True, timeout=120)
