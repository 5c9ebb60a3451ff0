"""launcher=local's processes: ranks forked from a preloaded server behave as freshly spawned ones."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch.local import spawn
from tests.conftest import ROOT, TINY

pytestmark = pytest.mark.dist


def _report(env, device, out_dir):
    Path(out_dir, f"rank-{env.rank}.txt").write_text(f"{os.getpid()} {os.environ.get('TRIDENT_TEST_MARK')}")
    print(f"rank {env.rank} says hello", flush=True)


def test_ranks_take_the_launchers_environment_and_stdout_of_the_moment(tmp_path, monkeypatch, capfd):
    """The fork server keeps what it started with; each spawn's ranks must see what the launcher has now."""
    for i, mark in enumerate(("first", "second")):
        monkeypatch.setenv("TRIDENT_TEST_MARK", mark)
        out = tmp_path / mark
        out.mkdir()
        spawn(_report, 2, str(out), timeout_s=60)
        pids = {}
        for r in range(2):
            pid, seen = (out / f"rank-{r}.txt").read_text().split()
            assert seen == mark
            pids[r] = int(pid)
        assert os.getpid() not in pids.values() and pids[0] != pids[1]
        # The second spawn runs under a capture that began after the first one started the server.
        assert capfd.readouterr().out.count("says hello") == 2, i


def _sleep(env, device, out_dir):
    Path(out_dir, f"rank-{env.rank}.parent").write_text(str(os.getppid()))
    Path(out_dir, f"rank-{env.rank}.pid").write_text(str(os.getpid()))
    time.sleep(600)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.parametrize("fork_here", [False, True], ids=["from-the-fork-server", "forked-by-the-launcher"])
def test_a_killed_launcher_leaves_no_rank_running(tmp_path, fork_here):
    code = ("from launch.local import spawn; from tests.dist.test_launcher import _sleep; "
            f"spawn(_sleep, 2, {str(tmp_path)!r}, fork_here={fork_here})")
    launcher = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT)
    try:
        deadline = time.monotonic() + 120
        while len(list(tmp_path.glob("rank-*.pid"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        pids = [int(p.read_text()) for p in tmp_path.glob("rank-*.pid")]
        assert len(pids) == 2 and all(_alive(p) for p in pids)
        parents = {int(p.read_text()) for p in tmp_path.glob("rank-*.parent")}
        assert (parents == {launcher.pid}) == fork_here and len(parents) == 1  # else both the server's
        launcher.send_signal(signal.SIGKILL)  # no handler, no cleanup: only the kernel and the server notice
        launcher.wait()
        deadline = time.monotonic() + 10
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [p for p in pids if _alive(p)]
    finally:
        launcher.kill()
        for p in tmp_path.glob("rank-*.pid"):
            try:
                os.kill(int(p.read_text()), signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_trident_train_forks_its_ranks_itself_unless_the_planner_ran_in_it(tmp_path):
    """A fresh `trident-train` has run no torch code and started no thread: its ranks are its own children.
    Once parallel=auto's planner ran in it (torch code, DTensor caches), they come from the fork server, for
    that run and, under -m, every later point of the sweep."""
    def parents(run_dir: Path) -> set[int]:
        return {json.loads((run_dir / "ranks" / f"rank-{r}.json").read_text())["parent"] for r in range(2)}

    common = [*TINY, "parallel.dp=2", "train.steps=2", "checkpoint.at_end=false"]
    for name, args in (("plain", [f"hydra.run.dir={tmp_path / 'plain'}"]),
                       ("sweep", ["-m", f"hydra.sweep.dir={tmp_path / 'sweep'}", "launcher.nprocs=2",
                                  "parallel.layout=auto,manual"])):
        proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli.train", *args, *common], cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
        if name == "plain":
            assert parents(tmp_path / "plain") == {proc.pid}
        else:
            planned, manual = parents(tmp_path / "sweep" / "0"), parents(tmp_path / "sweep" / "1")
            assert out.count("trident: parallel=auto: 2 rank(s) -> ") == 1, out[-2000:]  # point 0 alone planned
            assert len(planned) == 1 and planned == manual and proc.pid not in planned, (planned, manual, proc.pid)
