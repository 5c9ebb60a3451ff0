"""Checks of a launcher=slurm run that only the cluster can answer, made before anything is submitted."""

import functools
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Optional

from launch.slurm import tasks_per_node
from orchestrator.validate import ConfigError
from parallel.mesh import ParallelDims

UNREACHABLE = "Unable to contact slurm controller"
RETRY_S = (2, 4, 8)  # a controller restarting or failing over is back within seconds


def sinfo(*args: str) -> str:
    """`sinfo ARGS`'s output. A controller that cannot be reached is asked again a few times first (it may be
    restarting, failing over or too busy to accept): one refused connection must not fail a submission."""
    for wait in (*RETRY_S, None):
        out = subprocess.run(["sinfo", *args], capture_output=True, text=True, timeout=60)
        if out.returncode == 0:
            return out.stdout
        if wait is None or UNREACHABLE not in out.stderr:
            raise ConfigError(f"launcher=slurm: sinfo failed, is the cluster up? {out.stderr.strip()}")
        print(f"trident: {out.stderr.strip()}; asking again in {wait} s", file=sys.stderr, flush=True)
        time.sleep(wait)


SECRET = re.compile(r"\b(\w*(API_KEY|TOKEN|SECRET|PASSWORD)\w*)\s*=\s*['\"]?[^$'\"\s]")


def check_no_secrets(launcher) -> None:
    """A literal key in a setup line or an sbatch option would be written into the job script."""
    for key, lines in (("launcher.setup", list(launcher.setup)),
                       ("launcher.extra_sbatch", [f"{k}={v}" for k, v in launcher.extra_sbatch.items()])):
        for line in lines:
            found = SECRET.search(str(line))
            if found:
                raise ConfigError(
                    f"{key} sets {found.group(1)} to a literal value, which would be written into the job script: "
                    f"export it in the submitting shell instead (sbatch passes the environment to the job)"
                )


@dataclass
class Partition:
    name: str
    default: bool
    gpus_per_node: int
    nodes: int = 0  # 0: not known (sinfo's %D not asked)


def parse_sinfo(text: str) -> list[Partition]:
    """`sinfo -h -o "%P %G %D"` lines, e.g. `debug* gpu:h100:8(S:0-1) 4` or `cpu (null) 2`, one per node group
    (the node count is optional)."""
    found: dict[str, Partition] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        name, gres, *count = line.split()
        gpus = sum(int(m.group(1)) for m in re.finditer(r"gpu(?::[^:,(]+)?:(\d+)", gres))
        part = found.setdefault(name.rstrip("*"), Partition(name.rstrip("*"), name.endswith("*"), gpus))
        part.gpus_per_node = max(part.gpus_per_node, gpus)
        part.nodes += int(count[0]) if count and count[0].isdigit() else 0
    return list(found.values())


def check_partition(launcher, tasks: int, partitions: list[Partition]) -> None:
    """The partition exists (or the cluster has a default) and has the nodes asked for, and a GPU partition has a
    GPU per task."""
    names = ", ".join(p.name for p in partitions) or "none"
    if launcher.partition is None:
        chosen = next((p for p in partitions if p.default), None)
        if chosen is None:
            raise ConfigError(f"launcher.partition is not set and this cluster has no default partition "
                              f"(valid: {names})")
    else:
        chosen = next((p for p in partitions if p.name == launcher.partition), None)
        if chosen is None:
            raise ConfigError(f"launcher.partition={launcher.partition!r} is not a partition of this cluster "
                              f"(valid: {names})")
    if chosen.nodes and launcher.nodes > chosen.nodes:
        raise ConfigError(f"launcher.nodes={launcher.nodes} but partition {chosen.name!r} has {chosen.nodes} node(s) "
                          f"(valid: 1..{chosen.nodes})")
    if chosen.gpus_per_node and (launcher.gpus_per_node or 0) < tasks:
        raise ConfigError(
            f"partition {chosen.name!r} has {chosen.gpus_per_node} GPUs per node: launcher.gpus_per_node="
            f"{launcher.gpus_per_node} < {tasks} tasks per node (valid: {tasks}..{chosen.gpus_per_node}, "
            "one GPU per rank)"
        )


@functools.lru_cache(maxsize=1)
def partitions() -> list[Partition]:
    """The cluster's partitions, asked once per process (a sweep checks every point against them)."""
    return parse_sinfo(sinfo("-h", "-o", "%P %G %D"))


def check_cluster(cfg) -> None:
    """What only the cluster can tell, asked before anything is submitted."""
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        raise ConfigError("launcher=slurm needs SLURM's sbatch and sinfo on PATH: submit from a login node "
                          "(or start a local cluster: launch/cluster/start-cluster.sh)")
    world = ParallelDims.of(cfg.parallel).world_size
    check_partition(cfg.launcher, tasks_per_node(cfg.launcher, world), partitions())
    check_no_secrets(cfg.launcher)


def parse_nodes(text: str) -> list[tuple[str, str, int, int]]:
    """`sinfo -h -N -o "%N %P %c %G"` lines -> (node, partition, CPUs, GPUs); a default partition keeps its `*`."""
    nodes = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[2].isdigit():
            gres = fields[3] if len(fields) > 3 else ""
            gpus = sum(int(m.group(1)) for m in re.finditer(r"gpu(?::[^:,(]+)?:(\d+)", gres))
            nodes.append((fields[0], fields[1], int(fields[2]), gpus))
    return nodes


def jobs_at_once(launcher, world: int, text: Optional[str] = None) -> tuple[int, str]:
    """How many jobs of this shape the partition can run at the same time, and the figures that say so."""
    if text is None:
        text = sinfo("-h", "-N", "-o", "%N %P %c %G")
    nodes = parse_nodes(text)
    name = launcher.partition
    mine = [n for n in nodes if (n[1].rstrip("*") == name if name else n[1].endswith("*"))]
    per_node = tasks_per_node(launcher, world)
    cpus = per_node * (launcher.cpus_per_task or 1)
    gpus = launcher.gpus_per_node or 0
    fits = sum(min(c // cpus, g // gpus if gpus else c // cpus) for _, _, c, g in mine)
    jobs = fits // launcher.nodes
    total_cpus = sum(c for _, _, c, _ in mine)
    pname = name or (mine[0][1].rstrip("*") if mine else "(no default)")
    return jobs, (f"partition {pname} has {len(mine)} node(s), {total_cpus} CPU(s) in all, and a job needs "
                  f"{launcher.nodes} node(s) x {cpus} CPU(s)" + (f" and {gpus} GPU(s)" if gpus else ""))
