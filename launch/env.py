"""Who am I in the world? One answer, whichever program started the processes.

torchrun exports RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT;
srun exports SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID and the job's node
list, whose first host is the rendezvous address. `launch.local` sets the
torchrun variables itself, so every path ends in the same `RankEnv`.

Across nodes, a rank's collectives must leave through the interface that
reaches the others: `bind_to_node_address` names it to gloo and NCCL (the
interface that routes to the rendezvous host), unless the user already did.
"""

import fcntl
import os
import re
import socket
import struct
from dataclasses import dataclass
from typing import Mapping, Optional

DEFAULT_PORT = 29500


@dataclass(frozen=True)
class RankEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    source: str  # "torchrun" or "slurm"
    nodes: int = 1  # nodes of the job (SLURM_JOB_NUM_NODES; torchrun: world / local world)

    def export(self) -> None:
        """Set the variables `init_process_group(init_method="env://")` reads."""
        os.environ.update(
            RANK=str(self.rank),
            WORLD_SIZE=str(self.world_size),
            LOCAL_RANK=str(self.local_rank),
            LOCAL_WORLD_SIZE=str(self.local_world_size),
            MASTER_ADDR=self.master_addr,
            MASTER_PORT=str(self.master_port),
        )


def expand_hostlist(hostlist: str) -> list[str]:
    """Expand SLURM's compressed host list: "gpu[01-03,07],login1" -> gpu01 gpu02 gpu03 gpu07 login1."""
    hosts = []
    for prefix, ranges, plain in re.findall(r"([^,\[]+)\[([^\]]+)\]|([^,\[\]]+)", hostlist):
        if plain:
            hosts.append(plain)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            if not hi:
                hosts.append(prefix + lo)
                continue
            for i in range(int(lo), int(hi) + 1):
                hosts.append(prefix + str(i).zfill(len(lo)))
    return hosts


def slurm_port(job_id: str) -> int:
    """A port that differs between jobs sharing a node, stable inside one job."""
    return 20000 + int(re.sub(r"\D", "", job_id) or 0) % 20000


def from_environ(environ: Optional[Mapping[str, str]] = None) -> RankEnv:
    """Read the rank environment of a process started by torchrun or srun."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        world = int(env["WORLD_SIZE"])
        local_world = int(env.get("LOCAL_WORLD_SIZE", world))
        return RankEnv(
            rank=int(env["RANK"]),
            world_size=world,
            local_rank=int(env.get("LOCAL_RANK", 0)),
            local_world_size=local_world,
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", DEFAULT_PORT)),
            source="torchrun",
            nodes=max(1, world // max(1, local_world)),
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or "127.0.0.1"
        job_id = env.get("SLURM_JOB_ID", "0")  # every array element has its own: ports differ between them
        tasks_per_node = env.get("SLURM_NTASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE", "")
        world = int(env["SLURM_NTASKS"])
        return RankEnv(
            rank=int(env["SLURM_PROCID"]),
            world_size=world,
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            local_world_size=_first_count(tasks_per_node, default=world),
            master_addr=env.get("MASTER_ADDR") or expand_hostlist(nodelist)[0],
            master_port=int(env.get("MASTER_PORT") or slurm_port(job_id)),
            source="slurm",
            nodes=int(env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES") or len(expand_hostlist(nodelist))),
        )
    raise RuntimeError(
        "launcher=external found no rank environment: expected RANK and WORLD_SIZE (torchrun) "
        "or SLURM_PROCID and SLURM_NTASKS (srun). Use launcher=local to spawn the ranks here."
    )


def _first_count(tasks_per_node: str, default: int) -> int:
    """SLURM_TASKS_PER_NODE looks like "4(x2),3": the first node's count."""
    m = re.match(r"(\d+)", tasks_per_node)
    return int(m.group(1)) if m else default


SIOCGIFADDR = 0x8915  # Linux ioctl: an interface's IPv4 address


def interface_of(address: str) -> Optional[str]:
    """The name of this host's interface that holds the IPv4 `address` (None if none does)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                raw = fcntl.ioctl(s.fileno(), SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
            except OSError:  # no IPv4 address on it
                continue
            if socket.inet_ntoa(raw[20:24]) == address:
                return name
    return None


def route_to(host: str) -> Optional[str]:
    """This host's own address on the way to `host` (the kernel's route; nothing is sent). None: unreachable."""
    try:
        target = socket.gethostbyname(host)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((target, 9))
            return s.getsockname()[0]
    except OSError:
        return None


def bind_to_node_address(env: RankEnv, environ=None) -> Optional[str]:
    """On a job of several nodes: point gloo and NCCL at the interface that reaches the rendezvous host.

    Left alone, gloo takes the address this host's name resolves to, which on many machines is a loopback
    alias (Debian's 127.0.1.1), and the other nodes cannot reach it. A user's GLOO_SOCKET_IFNAME or
    NCCL_SOCKET_IFNAME wins. Returns the interface named (None: one node, or nothing to name).
    """
    environ = os.environ if environ is None else environ
    if env.nodes <= 1:
        return None
    own = route_to(env.master_addr)
    name = interface_of(own) if own else None
    if name is None or own.startswith("127."):
        return None
    for key in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
        environ.setdefault(key, name)
    return name
