"""The life of one rank: join the process group, run, leave cleanly."""

import datetime
import os
import sys
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist

from launch.env import RankEnv, bind_to_node_address
from launch.watchdog import nccl_trace_env


AFTER_RANKS = "after_ranks"  # a key of fn's result: a callable run_rank calls once the process group is gone


def pick_backend(choice: str, local_world_size: int) -> str:
    """auto: nccl when every rank on this node can have its own GPU, else gloo."""
    if choice != "auto":
        return choice
    if torch.cuda.is_available() and torch.cuda.device_count() >= local_world_size:
        return "nccl"
    return "gloo"


def device_for(backend: str, env: RankEnv) -> torch.device:
    if backend == "nccl":
        torch.cuda.set_device(env.local_rank)
        return torch.device("cuda", env.local_rank)
    return torch.device("cpu")


def run_rank(fn: Callable, env: RankEnv, backend: str, timeout_s: float, *args, exit_process: bool = True,
             trace_dir: Optional[str] = None):
    """Run fn(env, device, *args) inside an initialised process group, then exit the process.

    The exit is `os._exit` after a barrier and `destroy_process_group()`:
    gloo processes otherwise often abort in their atexit handlers. With
    exit_process=False (a submitit task, which still has its result to
    write) it returns fn's result after the teardown instead. An exception propagates
    untouched, so the launcher can show it. trace_dir: where NCCL's flight
    recorder dumps its last collectives (set only for nccl, before the
    process group exists; a user's own settings win). On several nodes, gloo
    and NCCL use the interface that reaches the rendezvous host
    (`launch.env.bind_to_node_address`).
    """
    env.export()
    bind_to_node_address(env)
    if backend == "nccl" and trace_dir is not None:
        Path(trace_dir).mkdir(parents=True, exist_ok=True)
        for key, value in nccl_trace_env(trace_dir).items():
            os.environ.setdefault(key, value)
    if backend == "gloo":
        # Ranks on one machine share the cores this process may run on: without this each takes them all.
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // env.local_world_size))
    device = device_for(backend, env)
    dist.init_process_group(
        backend,
        rank=env.rank,
        world_size=env.world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
        device_id=device if backend == "nccl" else None,
    )
    result = fn(env, device, *args)
    dist.barrier()
    dist.destroy_process_group()
    if isinstance(result, dict) and callable(result.get(AFTER_RANKS)):
        # What this rank alone still does once every rank is done (a training run's evaluations left): no
        # collective, so no other rank waits on it.
        result = result.pop(AFTER_RANKS)() or result
    sys.stdout.flush()
    sys.stderr.flush()
    if exit_process:
        os._exit(0)
    return result
