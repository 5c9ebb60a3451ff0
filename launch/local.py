"""launcher=local: spawn the world's ranks as processes on this machine."""

import socket
from typing import Callable

import torch.multiprocessing as mp

from launch.env import RankEnv
from launch.rank import pick_backend, run_rank


class RankFailed(RuntimeError):
    """A spawned rank died; the message holds its error (traceback or exit code)."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(local_rank: int, fn, world_size: int, port: int, backend: str, timeout_s: float, args) -> None:
    env = RankEnv(
        rank=local_rank,
        world_size=world_size,
        local_rank=local_rank,
        local_world_size=world_size,
        master_addr="127.0.0.1",
        master_port=port,
        source="local",
    )
    run_rank(fn, env, backend, timeout_s, *args)


def spawn(fn: Callable, world_size: int, *args, backend: str = "auto", timeout_s: float = 300.0) -> None:
    """Run fn(env, device, *args) on world_size new processes; return when all finish.

    fn must be importable by name (the processes are spawned, not forked). If
    any rank fails, the others are terminated and RankFailed carries the
    failing rank's traceback.
    """
    backend = pick_backend(backend, world_size)
    try:
        mp.start_processes(
            _entry,
            args=(fn, world_size, free_port(), backend, timeout_s, args),
            nprocs=world_size,
            join=True,
            start_method="spawn",
        )
    except mp.ProcessRaisedException as e:
        raise RankFailed(f"rank {e.error_index} failed:\n{e}") from None
    except mp.ProcessExitedException as e:
        raise RankFailed(f"rank {e.error_index} exited with code {e.exit_code}") from None
