"""launcher=local: spawn the world's ranks as processes on this machine, and watch them.

On gloo, ranks are forked: a rank then starts in milliseconds instead of
paying its own imports (4.8 s of CPU each, most of a short run's time on a
small machine). `trident-train` forks them itself when no thread has started
in it since its imports (orchestrator/cli/train.py). Any other launcher (a
test process; one where a tokenizer's or torch's thread pool runs) could
hand a rank a lock held by a thread the copy does not have, so its ranks
come from a fork server that imported torch and the rank's function once
(`multiprocessing`'s forkserver, preloaded with fn's module), each with the
launcher's environment, stdout and stderr of the moment. The server dies
with the launcher (launch/forkserver.py), each rank with its parent. NCCL
ranks are spawned: no process that might have touched CUDA is ever forked.

The launcher waits on every rank's process at once. The first one to fail
ends the run: the others are continued (a stopped process cannot die of
SIGTERM), sent SIGTERM, and after a grace period SIGKILL, so nothing is left
running; the error names the rank and its exception, exit code or signal.
A rank that ends because its step deadline passed (launch/watchdog.py) makes
the launcher wait for the others' reports, ask the ranks that could not
report (stopped ones) for their stacks, and name the late rank(s).
"""

import ctypes
import multiprocessing
import multiprocessing.connection
import os
import pickle
import random
import signal
import socket
import sys
import time
from multiprocessing import reduction
from pathlib import Path
from typing import Callable, Optional

import torch.multiprocessing as mp

from launch.env import RankEnv
from launch.rank import pick_backend, run_rank
from launch.watchdog import HUNG_EXIT, SETTLE_S, describe_hang, hang_reports, process_state, rank_file

GRACE_S = 5.0  # after SIGTERM, before SIGKILL
PR_SET_PDEATHSIG = 1  # prctl(2)


class RankFailed(RuntimeError):
    """A spawned rank died; the message holds its error (traceback or exit code)."""


def _ephemeral_ports() -> tuple[int, int]:
    """The range the kernel hands out to sockets that bind no port (Linux; the usual one elsewhere)."""
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999


def free_port() -> int:
    """A port for rank 0's store that nothing listens on. Taken below the ephemeral range: a port the kernel
    gave out and took back (bind to port 0) can be given out again, to one of the many connections gloo's
    ranks open, before rank 0 binds it (EADDRINUSE seen with two test workers). Here only another explicit
    binder can take it."""
    low, _ = _ephemeral_ports()
    first = max(1024, low - 16384)
    pick = random.SystemRandom()
    for port in [pick.randrange(first, low) for _ in range(64)] if first < low else [0]:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise RuntimeError("no free TCP port below the ephemeral range for the ranks' store")


def thread_count() -> Optional[int]:
    """The threads this process runs (Linux; elsewhere None: not known)."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return None


def die_with_parent() -> None:
    """SIGKILL this process when its parent dies, even if it is stopped (torch asks for SIGINT, which a
    stopped process never handles): a rank's parent is the launcher or the fork server, which dies with the
    launcher (launch/forkserver.py), so nothing outlives a launcher that was killed."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: torch's own SIGINT stays
        pass


class _Launcher:
    """The launcher's environment, stdout and stderr at spawn time, for a rank forked from a server that holds
    those of when it started (its stdout may be a file a test captured then, since closed)."""

    def __init__(self):
        self.environ = dict(os.environ)

    def __reduce__(self):
        # DupFd while the process is pickled: the fds travel to the child with it.
        return _Launcher._adopt, (self.environ, reduction.DupFd(1), reduction.DupFd(2))

    @staticmethod
    def _adopt(environ, out, err):
        os.environ.clear()
        os.environ.update(environ)
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, dup in ((1, out), (2, err)):
            fresh = dup.detach()
            os.dup2(fresh, fd)
            os.close(fresh)


def _entry(local_rank: int, fn, world_size: int, port: int, backend: str, timeout_s: float, trace_dir, launcher,
           args) -> None:
    die_with_parent()
    env = RankEnv(
        rank=local_rank,
        world_size=world_size,
        local_rank=local_rank,
        local_world_size=world_size,
        master_addr="127.0.0.1",
        master_port=port,
        source="local",
    )
    run_rank(fn, env, backend, timeout_s, *args, trace_dir=trace_dir)


def exit_text(code: int) -> str:
    if code < 0:
        try:
            return f"exited with code {code} (killed by {signal.Signals(-code).name})"
        except ValueError:
            return f"exited with code {code}"
    return f"exited with code {code}"


def spawn(fn: Callable, world_size: int, *args, backend: str = "auto", timeout_s: float = 300.0,
          ranks_dir: Optional[str] = None, fork_here: bool = False) -> None:
    """Run fn(env, device, *args) on world_size new processes; return when all finish.

    fn must be importable by name (ranks may come from a fork server). If
    any rank fails, the others are ended and RankFailed says which rank and
    why. ranks_dir: the run's `ranks/` folder (hang reports and stacks; the
    NCCL flight recorder's dumps). fork_here: gloo ranks may be forked from
    this process itself (the caller knows no thread of it could hold a lock).
    """
    backend = pick_backend(backend, world_size)
    if ranks_dir is not None:
        for stale in Path(ranks_dir).glob("rank-*.hang.json"):
            stale.unlink()
    launcher = None
    if backend != "gloo":
        method = "spawn"
    elif fork_here:
        method = "fork"
    else:
        method, launcher = "forkserver", _Launcher()
        # Takes effect when the server starts (this process's first spawn); a later fn's module is imported by
        # its ranks, on top of what the server holds. A script's own __main__ is not preloaded by name.
        multiprocessing.set_forkserver_preload(["launch.forkserver", "launch.local", fn.__module__])
    context = mp.start_processes(
        _entry,
        args=(fn, world_size, free_port(), backend, timeout_s, ranks_dir, launcher, args),
        nprocs=world_size,
        join=False,
        start_method=method,
    )
    try:
        _watch(context, ranks_dir)
    finally:
        _end_all(context.processes)


def _watch(context, ranks_dir: Optional[str]) -> None:
    processes = context.processes
    running = {p.sentinel: i for i, p in enumerate(processes)}
    while running:
        failed = []
        for sentinel in multiprocessing.connection.wait(list(running)):
            rank = running.pop(sentinel)
            processes[rank].join()
            if processes[rank].exitcode != 0:
                failed.append(rank)
        if not failed:
            continue
        # A dead rank's peers fail right after it ("connection closed"): name the cause, not an echo.
        time.sleep(0.3)
        failed += [r for r, p in enumerate(processes) if r not in failed and not p.is_alive() and p.exitcode]
        codes = {r: processes[r].exitcode for r in failed}
        if ranks_dir is not None and HUNG_EXIT in codes.values():
            raise RankFailed(_hang_message(processes, ranks_dir))
        first = cause(failed, codes, context.error_files)
        raise RankFailed(_failure_message(context, first, codes[first]))


def cause(failed: list, codes: dict, error_files: list) -> int:
    """Which failed rank to name. Several may have exited before the launcher woke; their peers' "connection
    closed" exceptions are echoes, written after the first one's socket closed. So: a rank killed by a
    signal, else one that exited without an exception (os._exit, SystemExit: it ended itself, it was not
    told by a peer), else the one whose exception was written first, the lowest rank breaking ties."""
    return min(failed, key=lambda r: (codes[r] >= 0, _written_at(error_files[r]) < float("inf"),
                                      _written_at(error_files[r]), r))


def _written_at(error_file) -> float:
    """When the rank wrote its exception; inf if it wrote none."""
    try:
        return os.stat(error_file).st_mtime_ns
    except (OSError, TypeError):
        return float("inf")


def _failure_message(context, rank: int, code: int) -> str:
    error_file = context.error_files[rank]
    if error_file and os.access(error_file, os.R_OK):
        with open(error_file, "rb") as fh:
            trace = pickle.load(fh)
        last = trace.strip().splitlines()[-1] if trace.strip() else ""
        return f"rank {rank} failed: {last}\n{trace}"
    return f"rank {rank} {exit_text(code)}"


def _hang_message(processes, ranks_dir: str) -> str:
    """A rank's step deadline passed: let the live ranks report, ask the silent ones for stacks, say who."""
    world = len(processes)
    until = time.monotonic() + SETTLE_S + 3
    while time.monotonic() < until and any(p.is_alive() for p in processes):
        if len(hang_reports(ranks_dir)) == world:
            break
        time.sleep(0.2)
    reports = hang_reports(ranks_dir)
    states = {}
    asked = []
    for rank, p in enumerate(processes):
        if rank in reports:
            continue
        state = process_state(p.pid) if p.is_alive() else None
        states[rank] = f"(pid {p.pid}) " + (state or exit_text(p.exitcode if p.exitcode is not None else 0))
        if state is not None:
            # faulthandler answers SIGUSR1 even in a process stuck outside Python; a stopped one, once continued.
            size = _size(rank_file(ranks_dir, rank, ".stacks"))
            try:
                os.kill(p.pid, signal.SIGUSR1)
                os.kill(p.pid, signal.SIGCONT)
                asked.append((rank, size))
            except ProcessLookupError:
                pass
    until = time.monotonic() + 3
    while asked and time.monotonic() < until:
        asked = [(r, s) for r, s in asked if _size(rank_file(ranks_dir, r, ".stacks")) <= s]
        time.sleep(0.1)
    _end_all(processes)
    text = describe_hang(ranks_dir, world, reports, states)
    (Path(ranks_dir).parent / "hang.txt").write_text(text + "\n")
    return text


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _end_all(processes) -> None:
    """Continue, terminate, then kill whatever is still running; reap every process."""
    alive = [p for p in processes if p.is_alive()]
    for p in alive:
        for sig in (signal.SIGCONT, signal.SIGTERM):
            try:
                os.kill(p.pid, sig)
            except ProcessLookupError:
                pass
    until = time.monotonic() + GRACE_S
    for p in alive:
        p.join(max(0.0, until - time.monotonic()))
    for p in alive:
        if p.is_alive():
            p.kill()
        p.join()
