"""The step deadline: a hung rank is found, every live rank's stacks are written, and the late rank is named.

Each rank runs a `StepWatchdog`: a thread that the loop re-arms at every step
boundary (and with a longer deadline around evaluation and checkpoints). It
costs nothing per step but an attribute write. When a deadline passes, the
rank is stuck: the thread writes, in the run's `ranks/` folder,

  rank-<r>.stacks     every Python thread's stack (faulthandler), under a header
  rank-<r>.hang.json  what the loop was doing (its phase) and the main thread's frames

then waits a few seconds for the other ranks' reports, names the ranks that
did not reach the step boundary (`describe_hang`), prints that (the lowest
reporting rank does), and ends its process with HUNG_EXIT. A rank that cannot
report (stopped, frozen outside Python, on a lost node) is named by its
silence. The local launcher (launch/local.py) then also asks a stopped rank for
its stacks (SIGUSR1, which `faulthandler` answers even there, then SIGCONT)
and ends every process; under SLURM `srun --kill-on-bad-exit` does.

Every rank also answers SIGUSR1 with its stacks at any time
(`kill -USR1 <pid>`, pids in ranks/rank-<r>.json): an operator's look at a
slow run without stopping it.
"""

import faulthandler
import json
import os
import re
import signal
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Optional

HUNG_EXIT = 86  # a rank's exit status after its step deadline passed
BOUNDARY = "waiting at the step boundary"  # the loop's phase while it takes part in the step's agreement
SETTLE_S = 5.0  # how long a hung rank waits for the others' reports before it names the late ones
# A rank's own dump in rank-<r>.stacks (StepWatchdog._write_dump): starts on a line of its own, ends with a line.
DUMP_HEAD = "\n--- rank {rank} (pid {pid}): "
DUMP_END = "--- end of the dump\n"
_DUMP = re.compile(r"\n--- rank \d+ \(pid \d+\): .*?" + re.escape(DUMP_END), re.S)
_FRAME = re.compile(r'^\s+File "(.*)", line (\d+) in (\S+)')
_PROJECT = str(Path(__file__).resolve().parent.parent) + os.sep


def rank_file(ranks_dir, rank: int, suffix: str) -> Path:
    return Path(ranks_dir) / f"rank-{rank}{suffix}"


class StepWatchdog:
    """One rank's deadline thread (see the module's doc). arm() at each boundary; stop() at the end."""

    def __init__(self, rank: int, world: int, ranks_dir: str, setting: str,
                 on_hang: Optional[Callable[[], Optional[str]]] = None, settle_s: float = SETTLE_S,
                 announce: bool = True):
        # announce=False: a launcher that watches the ranks (launch/local.py) says who hung, with more.
        self.rank, self.world, self.dir, self.setting = rank, world, Path(ranks_dir), setting
        self.on_hang, self.settle_s, self.announce = on_hang, settle_s, announce
        self.phase, self.step = "start-up", 0
        self._deadline_s, self._armed_at = None, time.monotonic()
        self._stop = threading.Event()
        self._main = threading.main_thread().ident
        self.dir.mkdir(parents=True, exist_ok=True)
        rank_file(self.dir, rank, ".hang.json").unlink(missing_ok=True)  # a previous attempt's
        self._stacks = open(rank_file(self.dir, rank, ".stacks"), "w")
        faulthandler.register(signal.SIGUSR1, file=self._stacks, all_threads=True, chain=False)
        rank_file(self.dir, rank, ".json").write_text(json.dumps(
            {"rank": rank, "world": world, "pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
             "parent": os.getppid(),  # the launcher, its fork server, or srun's step daemon
             "interface": os.environ.get("GLOO_SOCKET_IFNAME")}))  # set on a job of several nodes (launch.env)
        self._thread = threading.Thread(target=self._watch, name="trident-step-watchdog", daemon=True)
        self._thread.start()

    def arm(self, deadline_s: float, phase: str, step: Optional[int] = None) -> None:
        """A new timed section: it must end (the next arm) within deadline_s."""
        self.phase = phase
        if step is not None:
            self.step = step
        self._armed_at = time.monotonic()
        self._deadline_s = deadline_s

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        faulthandler.unregister(signal.SIGUSR1)
        self._stacks.close()

    def _watch(self) -> None:
        while not self._stop.is_set():
            deadline = self._deadline_s
            if deadline is None:
                self._stop.wait(1.0)
                continue
            late = time.monotonic() - self._armed_at - deadline
            if late < 0:
                self._stop.wait(min(1.0, -late + 0.05))
                continue
            if not self._stop.is_set():
                self._hung(time.monotonic() - self._armed_at, deadline)

    def _write_dump(self, why: str) -> None:
        """Every thread's stack, appended to rank-<r>.stacks in one write, between DUMP_HEAD and DUMP_END.

        A SIGUSR1 can arrive meanwhile (the launcher asks a stopped rank for its stacks, and this thread
        runs as soon as it is continued): faulthandler writes that dump piecewise, from whichever thread
        the signal reached. One write keeps this dump whole among its pieces; stacks_from_dump takes it out
        and reads the pieces around it as one.
        """
        with tempfile.TemporaryFile("w+") as f:
            faulthandler.dump_traceback(file=f, all_threads=True)
            f.seek(0)
            dump = f.read()
        text = f"{DUMP_HEAD.format(rank=self.rank, pid=os.getpid())}{why}; all threads:\n{dump}{DUMP_END}"
        self._stacks.flush()
        os.write(self._stacks.fileno(), text.encode())

    def _hung(self, waited: float, deadline: float) -> None:
        frame = sys._current_frames().get(self._main)
        frames = []
        while frame is not None:
            frames.append([frame.f_code.co_filename, frame.f_lineno, frame.f_code.co_name])
            frame = frame.f_back
        frames.reverse()  # outermost first
        self._write_dump(f"no step boundary for {waited:.0f}s ({self.setting}); the loop: {self.phase} "
                         f"(step {self.step})")
        extra = None
        if self.on_hang is not None:
            try:
                extra = self.on_hang()
            except Exception as e:  # a diagnostic must never stop the run from ending
                extra = f"(could not write it: {e})"
        report = {"rank": self.rank, "pid": os.getpid(), "host": socket.gethostname(), "phase": self.phase,
                  "step": self.step, "waited_s": waited, "deadline_s": deadline, "setting": self.setting,
                  "frames": frames, "time": time.time(), "extra": extra}
        tmp = rank_file(self.dir, self.rank, ".hang.json.tmp")
        tmp.write_text(json.dumps(report))
        os.replace(tmp, rank_file(self.dir, self.rank, ".hang.json"))
        until = time.monotonic() + self.settle_s
        while time.monotonic() < until and len(hang_reports(self.dir)) < self.world:
            time.sleep(0.2)
        reports = hang_reports(self.dir)
        if self.announce and min(reports) == self.rank:  # one rank says it
            text = describe_hang(self.dir, self.world, reports)
            (self.dir.parent / "hang.txt").write_text(text + "\n")
            print(f"trident: {text}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(HUNG_EXIT)


def rank_info(ranks_dir, rank: int) -> dict:
    """What rank `rank` wrote of itself at start (rank-<r>.json: pid, host, ...); {} if nothing (yet)."""
    try:
        return json.loads(rank_file(ranks_dir, rank, ".json").read_text())
    except (OSError, ValueError):
        return {}


def hang_reports(ranks_dir) -> dict[int, dict]:
    out = {}
    for p in Path(ranks_dir).glob("rank-*.hang.json"):
        try:
            r = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        out[r["rank"]] = r
    return out


def stacks_from_dump(text: str) -> list[list]:
    """The main thread's frames (outermost first) from a rank's stacks file: the thread running our loop.

    The rank's own dumps (each written whole) are read apart from what SIGUSR1 dumps wrote around them.
    """
    own = _DUMP.findall(text)
    threads, current = [], None
    for line in "\n".join([_DUMP.sub("", text), *own]).splitlines():
        if line.startswith(("Thread 0x", "Current thread 0x")):
            current = []
            threads.append(current)
        m = _FRAME.match(line)
        if m and current is not None:
            current.append([m.group(1), int(m.group(2)), m.group(3)])
    # faulthandler lists a thread's frames most recent first; the loop's thread holds the trainer's frames.
    for frames in reversed(threads):  # the latest dump wins
        if any("trainer.py" in f for f, _, _ in frames):
            return list(reversed(frames))
    return list(reversed(threads[-1])) if threads else []


def _short(path: str) -> str:
    m = re.search(r"(?:site|dist)-packages/(.*)", path)
    if m:
        return m.group(1)
    return path[len(_PROJECT):] if path.startswith(_PROJECT) else path


def where(frames: list[list]) -> str:
    """'<our innermost frame> (innermost: <frame>)' from frames listed outermost first."""
    if not frames:
        return "no Python frames"
    ours = [f for f in frames if _ours(f[0])]
    inner = frames[-1]
    text = f"{_short(inner[0])}:{inner[1]} in {inner[2]}"
    if ours and ours[-1] is not inner:
        text = f"{_short(ours[-1][0])}:{ours[-1][1]} in {ours[-1][2]} (innermost: {text})"
    return text


def _ours(path: str) -> bool:
    return path.startswith(_PROJECT) and "-packages" + os.sep not in path


def in_collective(frames: list[list]) -> bool:
    """Blocked inside torch.distributed (a collective, a p2p wait, a barrier): a torch.distributed frame below
    our innermost one, however deep the dispatcher, autograd and DTensor layers wrap its wait."""
    last_ours = max((i for i, (f, _, _) in enumerate(frames) if _ours(f)), default=-1)
    return any("torch/distributed/" in f for f, _, _ in frames[last_ours + 1:])


def describe_hang(ranks_dir, world: int, reports: Optional[dict] = None, states: Optional[dict] = None) -> str:
    """Who did not reach the step boundary and what each rank was doing, from the reports and stacks.

    states: what the launcher knows of ranks that wrote no report ({rank: "stopped (state T)"}).
    """
    reports = hang_reports(ranks_dir) if reports is None else reports
    states = states or {}
    any_report = next(iter(reports.values()), {})
    step, setting = any_report.get("step", "?"), any_report.get("setting", "the step deadline")
    step = max((rep.get("step", 0) for rep in reports.values()), default=step)
    late, busy, waiting = [], [], []
    hosts = {r: (reports.get(r) or rank_info(ranks_dir, r)).get("host") for r in range(world)}
    for r in range(world):
        rep = reports.get(r)
        if rep is None:
            dump = rank_file(ranks_dir, r, ".stacks")
            text = dump.read_text(errors="replace") if dump.exists() else ""
            frames = stacks_from_dump(text)
            state = states.get(r, "wrote no report (stopped, frozen outside Python, or its node is gone)")
            what = f"it was at {where(frames)}" if frames else "its stacks are unknown"
            on = f" on {hosts[r]}" if hosts[r] else ""
            late.append((r, f"rank {r} {state}{on}; {what}"))
        elif rep["phase"] == BOUNDARY or in_collective(rep["frames"]):
            waiting.append((r, rep))
        else:
            busy.append((r, f"rank {r} (pid {rep['pid']}, {rep['host']}) was still in {rep['phase']}, at "
                            f"{where(rep['frames'])}"))
    if not late:  # every rank answered: the late ones are those busy outside torch.distributed
        late, busy = busy, []
    lines = []
    if late:
        names = ", ".join(str(r) for r, _ in late)
        where_ = sorted({hosts[r] for r, _ in late if hosts[r]})
        lines.append(f"the run hung after step {step}: rank(s) {names} did not reach the step boundary within "
                     f"{setting}" + (f" (on {', '.join(where_)})" if where_ else ""))
        lines += [f"  {text}" for _, text in late]
    else:
        lines.append(f"the run hung after step {step}: every rank is blocked in torch.distributed within {setting} "
                     "(collectives that do not match: a schedule or a rank's control flow differs)")
    lines += [f"  {text} (it answered; probably waiting on the rank(s) above)" for _, text in busy]
    at_boundary = [r for r, rep in waiting if rep["phase"] == BOUNDARY]
    inside = [(r, rep) for r, rep in waiting if rep["phase"] != BOUNDARY]
    if at_boundary:
        lines.append(f"  rank(s) {_ranks(at_boundary)} reached the step boundary and waited there")
    for r, rep in inside:
        lines.append(f"  rank {r} waited in a collective during {rep['phase']}: {where(rep['frames'])}")
    extras = sorted({rep["extra"] for rep in reports.values() if rep.get("extra")})
    lines += [f"  {e}" for e in extras]
    lines.append(f"  stacks: {Path(ranks_dir)}/rank-<r>.stacks")
    return "\n".join(lines)


def _ranks(ranks: list[int]) -> str:
    return ", ".join(map(str, ranks)) if len(ranks) <= 16 else f"{len(ranks)} ranks ({ranks[0]}..{ranks[-1]})"


def process_state(pid: int) -> Optional[str]:
    """A live process's state from /proc ("stopped (state T)", ...), None when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return {"T": "was stopped by a signal (SIGSTOP; state T)", "t": "was stopped by a debugger (state t)",
            "Z": "had exited (zombie)", "D": "was blocked in the kernel (state D: I/O)"}.get(
        fields[0], f"was alive (state {fields[0]}) but wrote no report")


def nccl_trace_env(trace_dir: str) -> dict[str, str]:
    """The NCCL flight recorder's settings: keep the last collectives, dump them on a timeout, into trace_dir."""
    return {"TORCH_NCCL_TRACE_BUFFER_SIZE": "2000", "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
            "TORCH_NCCL_DEBUG_INFO_TEMP_FILE": str(Path(trace_dir) / "nccl-trace-rank-")}


def dump_nccl_trace(rank: int) -> Optional[str]:
    """Write the NCCL flight recorder's buffer where TORCH_NCCL_DEBUG_INFO_TEMP_FILE says; return a line saying where.

    The recorder dumps by itself only on NCCL's own timeout; a step deadline comes first, so it is asked
    here (a private torch function, looked up, not assumed: without it, nothing is written).
    """
    prefix = os.environ.get("TORCH_NCCL_DEBUG_INFO_TEMP_FILE")
    # torch._C is imported only on this path: the watchdog module itself needs no torch.
    import torch

    dump = getattr(torch._C._distributed_c10d, "_dump_nccl_trace", None)
    if prefix is None or dump is None:
        return None
    path = f"{prefix}{rank}"
    Path(path).write_bytes(dump())
    return f"NCCL flight recorder: {prefix}<rank> (read with `torchfrtrace` / torch.distributed.flight_recorder)"
