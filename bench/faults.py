"""The fault suite: each fault injected for real into a real run; one JSON line per fault.

Local runs (gloo, tiny model) and, unless --no-slurm, jobs on the project's
single-machine SLURM cluster (started here; needs root). Faults come from
outside the product: signals sent from here (SIGSTOP, SIGKILL, USR2,
`scontrol requeue`), files corrupted from here, and tests/faults/
sitecustomize.py patching the ranks (a NaN gradient or weight, a loss spike,
a slow rank, a crash in the middle of a checkpoint write).

Each line says:
  detected        the run noticed (a log line, a metric, a restart, a named error)
  detect_s        seconds from the injection to the run saying so
  recover_s       seconds from the injection to the run being healthy again (a new step logged after it),
                  or to its clean non-zero exit (`outcome`)
  steps_lost      optimizer steps done again from a checkpoint
  data_lost       batches neither trained on nor dropped on purpose (skips and rollbacks are counted
                  apart, in `batches_dropped`): must be 0
  left_behind     processes of the run still alive at the end: must be 0

    .venv/bin/python bench/faults.py [--no-slurm] [--only NAME ...]
"""

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TINY = ["parallel.tp=1", "parallel.pp=1", "parallel.timeout_s=60", "model.dim=32", "model.n_layers=2",
        "model.n_heads=8", "model.n_kv_heads=4", "model.multiple_of=16", "train.seq_len=32", "train.global_batch=8",
        "train.micro_batch=2", "train.eval_every=0", "train.eval_sequences=8", "logging.wandb.mode=disabled",
        "logging.console_every=1000"]
GB = 8  # train.global_batch
FAULTS = ROOT / "tests" / "faults"  # the test-only injection (never imported by the product)


# --- watching a run from outside -----------------------------------------------------------------------------------

class Run:
    """One trident-train invocation, watched through its files."""

    def __init__(self, root: Path, name: str, *overrides: str, env: dict = None):
        self.dir = root / name
        self.dir.mkdir(parents=True)
        self.out, self.err = self.dir / "out.txt", self.dir / "err.txt"
        base = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "SLURM_PROCID")}
        self.proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli.train", f"hydra.run.dir={self.dir}",
                                      *overrides], cwd=ROOT, env={**base, **(env or {})},
                                     stdout=open(self.out, "w"), stderr=open(self.err, "w"))
        self.pids: set[int] = set()

    def rows(self) -> list[dict]:
        path = self.dir / "metrics.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def steps(self) -> list[int]:
        return [r["step"] for r in self.rows() if "loss" in r]

    def text(self) -> str:
        return self.out.read_text() + self.err.read_text()

    def rank_pids(self) -> dict[int, int]:
        found = {}
        for p in (self.dir / "ranks").glob("rank-*.json"):
            if not p.name.endswith(".hang.json"):
                try:
                    info = json.loads(p.read_text())
                except ValueError:
                    continue
                found[info["rank"]] = info["pid"]
        self.pids |= set(found.values())
        return found

    def wait_for(self, predicate, timeout_s: float = 300) -> float:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.rank_pids()
            if predicate():
                return time.monotonic()
            time.sleep(0.05)
        raise TimeoutError(f"{self.dir.name}: waited {timeout_s}s")

    def finish(self, timeout_s: float = 300) -> int:
        try:
            return self.proc.wait(timeout=timeout_s)
        finally:
            self.proc.kill()

    def left_behind(self) -> int:
        self.rank_pids()
        return sum(alive(p) for p in self.pids)


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def marker(run_dir: Path) -> dict:
    ck = sorted((run_dir / "checkpoints").glob("step-*/trident.json"), key=lambda p: int(p.parent.name[5:]))
    return json.loads(ck[-1].read_text()) if ck else {}


def data_lost(*runs: Run) -> int:
    """Steps up to the newest checkpoint's that no run logged: each step trains on its own batch (step +
    data_offset), so a missing step is a batch lost. Dropped on purpose (skips, rollbacks) counts apart."""
    m = max((marker(run.dir) for run in runs), key=lambda m: m.get("step", 0))
    if not m:
        return 0
    logged = {s for run in runs for s in run.steps()}
    return sum(1 for s in range(1, m["step"] + 1) if s not in logged)


def replayed_exactly(run: Run) -> bool:
    """Steps run twice (before a failure and again after the resume) have the same loss, bit for bit."""
    seen = {}
    for r in run.rows():
        if "loss" in r and r.get("rollbacks", 0) == 0:
            if r["step"] in seen and seen[r["step"]] != r["loss"]:
                return False
            seen[r["step"]] = r["loss"]
    return True


def line(fault: str, **fields) -> dict:
    out = {"fault": fault, "detected": False, "detect_s": None, "recover_s": None, "outcome": None,
           "steps_lost": 0, "data_lost": 0, "batches_dropped": 0, "left_behind": 0, **fields}
    for k in ("detect_s", "recover_s"):
        if out[k] is not None:
            out[k] = round(out[k], 2)
    print(json.dumps(out), flush=True)
    return out


def new_step_after(run: Run, count: int):
    return lambda: len(run.steps()) > count


# --- local faults --------------------------------------------------------------------------------------------------

def nonfinite_skip(root: Path) -> dict:
    run = Run(root, "nonfinite-skip", *TINY, "parallel.dp=2", "train.steps=40",
              env={"PYTHONPATH": str(FAULTS), "TRIDENT_TEST_NAN_GRAD": "1:20"})
    rc = run.finish()
    rows = {r["step"]: r for r in run.rows() if "loss" in r}
    # Found at the step's own boundary; healthy again at the next step.
    return line("non-finite gradient (one rank, one step)", detected=rows[20].get("skipped", False),
                detect_s=rows[20]["step_time_s"], recover_s=rows[20]["step_time_s"] + rows[21]["step_time_s"],
                outcome=f"step 20 skipped on every rank, run went on (exit {rc})", batches_dropped=1,
                data_lost=data_lost(run), left_behind=run.left_behind())


def nonfinite_stop(root: Path) -> dict:
    run = Run(root, "nonfinite-stop", *TINY, "parallel.dp=2", "train.steps=40", "train.nonfinite=stop",
              "checkpoint.every=5", env={"PYTHONPATH": str(FAULTS), "TRIDENT_TEST_NAN_WEIGHT": "0:12"})
    run.wait_for(lambda: any(r["step"] == 11 for r in run.rows()), 300)
    t = time.monotonic()
    rc = run.finish()
    ended = time.monotonic() - t
    said = "train.nonfinite=stop" in run.err.read_text()
    return line("NaN in a weight, nonfinite=stop", detected=said, detect_s=ended, recover_s=ended,
                outcome=f"clean exit {rc}, newest checkpoint step {marker(run.dir).get('step')} kept",
                data_lost=data_lost(run), left_behind=run.left_behind())


def spike(root: Path) -> dict:
    run = Run(root, "spike", *TINY, "parallel.dp=2", "train.steps=40", "checkpoint.every=5", "train.spike.factor=3",
              "train.spike.window=5", "train.spike.skip_batches=10",
              env={"PYTHONPATH": str(FAULTS), "TRIDENT_TEST_SPIKE": "18"})
    run.wait_for(lambda: any(r["step"] == 17 for r in run.rows()), 300)
    t = time.monotonic()
    detected = run.wait_for(lambda: "loss spike at step 18" in run.out.read_text(), 120) - t
    recovered = run.wait_for(lambda: any(r.get("rollbacks") and r["step"] == 16 for r in run.rows()), 120) - t
    rc = run.finish()
    m = marker(run.dir)
    return line("loss spike (output weights x1000)", detected=True, detect_s=detected, recover_s=recovered,
                outcome=f"rolled back to step 15, {m.get('data_offset')} batches skipped (exit {rc})",
                steps_lost=17 - 15, batches_dropped=m.get("data_offset", 0), data_lost=data_lost(run),
                left_behind=run.left_behind())


def straggler(root: Path) -> dict:
    run = Run(root, "straggler", *TINY, "parallel.dp=2", "parallel.dp_shard=optimizer", "train.steps=30",
              "logging.straggler_steps=5", env={"PYTHONPATH": str(FAULTS), "TRIDENT_TEST_SLOW": "1:0.3"})
    run.wait_for(lambda: run.steps(), 300)
    t = time.monotonic()
    detected = run.wait_for(lambda: "straggler: rank 1" in run.out.read_text(), 120) - t
    rc = run.finish()
    return line("straggler (rank 1 sleeps 0.3 s a step)", detected=True, detect_s=detected, recover_s=None,
                outcome=f"named on the console and in metrics (straggler_rank); run went on (exit {rc})",
                data_lost=data_lost(run), left_behind=run.left_behind())


def hang(root: Path) -> dict:
    run = Run(root, "hang", *TINY, "parallel.pp=2", "parallel.dp=2", "train.steps=100000", "train.step_timeout_s=10",
              "checkpoint.every=10")
    run.wait_for(lambda: len(run.steps()) >= 5, 300)
    os.kill(run.rank_pids()[2], signal.SIGSTOP)
    t = time.monotonic()
    rc = run.finish(120)
    ended = time.monotonic() - t
    err = run.err.read_text()
    return line("hung rank (SIGSTOP), step_timeout_s=10", detected="rank(s) 2 did not reach" in err,
                detect_s=ended, recover_s=ended, outcome=f"clean exit {rc} naming rank 2, stacks of all 4 ranks",
                data_lost=data_lost(run), left_behind=run.left_behind())


def dead_rank(root: Path) -> dict:
    run = Run(root, "dead", *TINY, "parallel.dp=2", "train.steps=100000", "checkpoint.every=10",
              "launcher.max_restarts=1")
    run.wait_for(lambda: len(run.steps()) >= 25, 300)
    first = run.rank_pids()
    before = max(run.steps())
    os.kill(first[1], signal.SIGKILL)
    t = time.monotonic()
    detected = run.wait_for(lambda: "restart 1 of" in run.err.read_text(), 60) - t
    count = len(run.steps())
    recovered = run.wait_for(new_step_after(run, count), 300) - t
    resumed = marker(run.dir).get("step", 0)
    second = run.rank_pids()
    os.kill(second[0], signal.SIGKILL)
    t2 = time.monotonic()
    rc = run.finish(60)
    ended = time.monotonic() - t2
    return line("dead rank (SIGKILL), local, max_restarts=1", detected=True, detect_s=detected, recover_s=recovered,
                outcome=f"restarted from step {resumed}; a second kill: exit {rc} in {ended:.1f}s naming rank 0",
                steps_lost=before - resumed, data_lost=data_lost(run), replayed_exactly=replayed_exactly(run),
                left_behind=run.left_behind())


def smaller_world(root: Path) -> dict:
    common = [*TINY, "parallel=auto", "checkpoint.every=10"]
    big = Run(root, "auto-8", *common, "train.steps=100000", "launcher.nprocs=8")
    big.wait_for(lambda: len(big.steps()) >= 25, 600)
    before = max(big.steps())
    os.kill(big.rank_pids()[5], signal.SIGKILL)  # ranks are gone (a node): start again on what is left
    t = time.monotonic()
    big.finish(60)
    detected = time.monotonic() - t
    resumed = marker(big.dir)["step"]
    small = Run(root, "auto-4", *common, f"train.steps={resumed + 10}", "launcher.nprocs=4",
                f"checkpoint.dir={big.dir / 'checkpoints'}")
    recovered = small.wait_for(lambda: small.steps(), 600) - t
    rc = small.finish(300)
    return line("lost ranks: 8 -> 4, parallel=auto", detected=True, detect_s=detected, recover_s=recovered,
                outcome=f"re-planned for 4 ranks ({marker(big.dir)['layout']}), resumed from step {resumed} "
                        f"(exit {rc})", steps_lost=before - resumed, data_lost=data_lost(big, small),
                left_behind=big.left_behind() + small.left_behind())


def crash_mid_save(root: Path) -> dict:
    run = Run(root, "crash-in-save", *TINY, "parallel.dp=2", "train.steps=40", "checkpoint.every=10",
              "launcher.max_restarts=1", env={"PYTHONPATH": str(FAULTS), "TRIDENT_TEST_CRASH_IN_SAVE": "1:20"})
    t0 = run.wait_for(lambda: any(r["step"] == 19 for r in run.rows()), 300)  # step 20's save crashes
    detected = run.wait_for(lambda: "restart 1 of" in run.err.read_text(), 60) - t0
    count = len(run.steps())
    recovered = run.wait_for(new_step_after(run, count), 300) - t0
    rc = run.finish()
    return line("crash in the middle of a checkpoint write", detected=True, detect_s=detected, recover_s=recovered,
                outcome=f"restarted from step 10, the partial step-20.tmp never read; finished (exit {rc})",
                steps_lost=20 - 10, data_lost=data_lost(run), replayed_exactly=replayed_exactly(run),
                left_behind=run.left_behind())


def corrupt_checkpoint(root: Path) -> dict:
    first = Run(root, "corrupt-save", *TINY, "parallel.dp=2", "train.steps=10")
    first.finish()
    for shard in (first.dir / "checkpoints" / "step-10").glob("*.distcp"):
        shard.write_bytes(shard.read_bytes()[:64])
    t = time.monotonic()
    again = Run(root, "corrupt-resume", *TINY, "parallel.dp=2", "train.steps=20",
                f"checkpoint.dir={first.dir / 'checkpoints'}")
    rc = again.finish()
    ended = time.monotonic() - t
    said = "could not be read" in again.err.read_text()
    return line("corrupted checkpoint (truncated shards)", detected=said, detect_s=ended, recover_s=ended,
                outcome=f"clean exit {rc} naming the checkpoint", left_behind=again.left_behind())


def bad_config(root: Path) -> dict:
    t = time.monotonic()
    run = Run(root, "bad-config", *TINY, "train.nonfinite=maybe")
    rc = run.finish()
    ended = time.monotonic() - t
    err = run.err.read_text()
    return line("bad config (train.nonfinite=maybe)", detected="train.nonfinite='maybe'" in err, detect_s=ended,
                recover_s=ended, outcome=f"exit {rc} before any rank started: {err.strip().splitlines()[-1]}",
                left_behind=run.left_behind())


# --- SLURM faults --------------------------------------------------------------------------------------------------

CLUSTER = {"SLURM_BASE": "/tmp/trident-bench-faults-slurm", "SLURM_PORT_BASE": "6947", "SLURM_DB_PORT": "13436",
           "SLURM_CRED_EXPIRE": "10", "SLURM_EXTRA_CONF": "SchedulerParameters=sched_interval=2,bf_interval=2"}


def sacct_state(job: str) -> str:
    out = subprocess.run(["sacct", "-n", "-X", "-j", job, "-o", "State"], capture_output=True, text=True).stdout
    return out.strip().split("\n")[0].strip() if out.strip() else ""


def slurm_run(root: Path, name: str, *extra: str) -> tuple[Run, str]:
    run = Run(root, name, *TINY, "parallel.dp=2", "train.steps=150", "checkpoint.every=10", "launcher=slurm", *extra)
    run.finish(120)
    return run, json.loads((run.dir / "slurm_job.json").read_text())["job_id"]


def slurm_end(run: Run, job: str) -> str:
    run.wait_for(lambda: sacct_state(job) in ("COMPLETED", "FAILED", "CANCELLED"), 600)
    return sacct_state(job)


def slurm_fault(root: Path, name: str, label: str, inject, noticed: str, *extra: str) -> dict:
    """inject(run, job) at step >= 30; `noticed`: the words in rank 0's logs that say the run saw it."""
    run, job = slurm_run(root, name, *extra)
    run.wait_for(lambda: len(run.steps()) >= 30 and marker(run.dir), 600)
    t = time.monotonic()
    inject(run, job)
    out, err = run.dir / "slurm" / f"{job}_0_log.out", run.dir / "slurm" / f"{job}_0_log.err"
    detected = run.wait_for(lambda: noticed in out.read_text() + err.read_text(), 300) - t
    run.wait_for(lambda: "resumed from" in out.read_text(), 600)
    logged = len(run.steps())  # the first run is gone: this is what it logged; the resumed one logs next
    before = max(run.steps())
    resumed = int(re.search(r"resumed from \S+ at step (\d+)", out.read_text()).group(1))
    recovered = run.wait_for(new_step_after(run, logged), 600) - t
    state = slurm_end(run, job)
    return line(label, detected=True, detect_s=detected, recover_s=recovered,
                outcome=f"requeued, resumed from step {resumed}, job {state}", steps_lost=max(0, before - resumed),
                data_lost=data_lost(run), replayed_exactly=replayed_exactly(run), left_behind=run.left_behind())


def slurm_faults(root: Path, only) -> list:
    env = {**os.environ, **CLUSTER}
    subprocess.run(["bash", str(ROOT / "launch/cluster/start-cluster.sh")], env=env, check=True, capture_output=True)
    os.environ["SLURM_CONF"] = f"{CLUSTER['SLURM_BASE']}/etc/slurm.conf"
    try:
        cases = {
            "usr2": ("preemption (scancel --signal=USR2)",
                     lambda run, job: subprocess.run(["scancel", "--signal=USR2", job], check=True),
                     "preempted at step"),
            "requeue": ("scontrol requeue",
                        lambda run, job: subprocess.run(["scontrol", "requeue", job], check=True),
                        "DUE TO JOB REQUEUE"),
            "slurm-dead": ("dead srun task (SIGKILL), max_restarts=1",
                           lambda run, job: os.kill(run.rank_pids()[1], signal.SIGKILL), "requeueing job",
                           "launcher.max_restarts=1"),
        }
        return [slurm_fault(root, name, *case) for name, case in cases.items() if not only or name in only]
    finally:
        subprocess.run(["bash", str(ROOT / "launch/cluster/stop-cluster.sh"), "--clean"], env=env, capture_output=True)


LOCAL = {"nonfinite-skip": nonfinite_skip, "nonfinite-stop": nonfinite_stop, "spike": spike, "straggler": straggler,
         "hang": hang, "dead": dead_rank, "smaller": smaller_world, "crash-in-save": crash_mid_save,
         "corrupt": corrupt_checkpoint, "bad-config": bad_config}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--no-slurm", action="store_true", help="only the local faults")
    ap.add_argument("--only", nargs="*", help=f"some of: {', '.join(LOCAL)}, usr2, requeue, slurm-dead")
    ap.add_argument("--keep", action="store_true", help="keep the runs' folders")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="trident-faults-"))
    try:
        for name, fn in LOCAL.items():
            if not args.only or name in args.only:
                try:
                    fn(root)
                except Exception as e:  # one fault's harness failing must not hide the others
                    line(name, outcome=f"bench error: {type(e).__name__}: {e}")
        if not args.no_slurm and (not args.only or set(args.only) & {"usr2", "requeue", "slurm-dead"}):
            slurm_faults(root, args.only)
    finally:
        if args.keep:
            print(f"runs kept in {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
