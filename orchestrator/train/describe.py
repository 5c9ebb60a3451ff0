"""What a training run's W&B run shows beside its rows, from the start: the layout and the code's git commit,
the planner's prediction for the layout (computed in a process of its own), and with pp > 1 the pipeline
schedule's timeline. The W&B run itself, its attempts and rewinds: orchestrator/runs/dashboard.py."""

import multiprocessing
import subprocess
import threading
from concurrent.futures import Future
from pathlib import Path
from typing import Optional

from omegaconf import OmegaConf

from orchestrator.planner.auto import predict
from orchestrator.planner.timeline import schedule_png
from orchestrator.runs.dashboard import WandbRun, warn


def code_commit() -> Optional[str]:
    """The git commit of the code that runs (with `+dirty` when it has uncommitted changes), or None."""
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10)
        if head.returncode:
            return None
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return None
    return head.stdout.strip() + ("+dirty" if dirty else "")


def in_child(fn, *args) -> Future:
    """fn(*args) in a spawned process (nothing of this one's torch state goes with it: the planner builds
    models in a fake world), its answer a Future. The process ends with its answer, or with this one (a
    daemon), never waiting for more work as a pool's worker would when its parent is killed."""
    ctx = multiprocessing.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_answer, args=(send, fn, args), daemon=True)
    child.start()
    send.close()
    future: Future = Future()

    def wait_for_answer():
        try:
            ok, value = receive.recv()
        except EOFError:
            ok, value = False, f"the process ended with code {child.join() or child.exitcode} and no answer"
        child.join()
        if ok:
            future.set_result(value)
        else:
            future.set_exception(RuntimeError(value))

    threading.Thread(target=wait_for_answer, name="trident-planner", daemon=True).start()
    return future


def _answer(send, fn, args) -> None:
    try:
        send.send((True, fn(*args)))
    except Exception as e:  # noqa: BLE001 - said back to the parent, which warns
        send.send((False, f"{type(e).__name__}: {e}"))


def describe_run(run: WandbRun, cfg, world: int, local_world: int) -> None:
    """What the dashboard shows from the start, beside the resolved config: the layout and the code's git
    commit (summary fields), the planner's prediction for the layout (a table and `planner/*` summary fields,
    against the measured `step_time_s`, `mfu` and `rank_mem_gb_max` of each step; logging.wandb.plan), and
    with pp > 1 the schedule's timeline (a picture, also pipeline-timeline.png in the run dir)."""
    par, t = cfg.parallel, cfg.train
    layout = {"tp": par.tp, "pp": par.pp, "dp": par.dp, "cp": par.cp, "world": world, "dp_shard": par.dp_shard,
              "micro_batch": t.micro_batch, "schedule": par.schedule if par.pp > 1 else "-"}

    def about(r, wandb, step):
        commit = code_commit()
        r.config.update({"code_commit": commit}, allow_val_change=True)
        r.summary.update({**{f"layout/{k}": v for k, v in layout.items()}, "code/commit": commit or "unknown"})

    run.call(about)
    if cfg.logging.wandb.plan:
        plain = OmegaConf.to_container(cfg, resolve=True)
        # Started once W&B is up (a W&B that failed has no use for it), from the W&B thread.
        run.call(lambda r, wandb, step: run.when_done(in_child(predict, plain, world, local_world), _prediction))
    if par.pp > 1:
        microbatches = t.global_batch // (t.micro_batch * par.dp)
        run.call(lambda r, wandb, step: _timeline(r, wandb, step, run.run_dir, par.schedule, par.pp, microbatches,
                                                  par.stages_per_rank))


def _prediction(r, wandb, future: Future) -> None:
    if future.exception() is not None:
        warn(f"the planner failed on this run's layout ({future.exception()}): no prediction on the dashboard")
        return
    got = future.result()
    if got is None:
        warn("the planner does not take this run's layout: no prediction on the dashboard")
        return
    columns = ["layout", "fits", "memory per rank (GiB)", "step (s)", "MFU", "bubble", "communication share",
               "largest communication"]
    name = f"tp{got['tp']} pp{got['pp']} dp{got['dp']} cp{got['cp']} mb{got['micro_batch']} {got['schedule']}"
    table = wandb.Table(columns=columns, data=[[name, got["fits"], got["mem_gb"], got["step_s"], got["mfu"],
                                                got["bubble"], got["comm_share"], got["why"]]])
    r.summary.update({"planner/prediction": table, "planner/step_s": got["step_s"], "planner/mem_gb": got["mem_gb"], "planner/mfu": got["mfu"],
                      "planner/fits": got["fits"], "planner/bubble": got["bubble"]})


def _timeline(r, wandb, step: int, run_dir: str, schedule: str, pp: int, microbatches: int, stages_per_rank) -> None:
    path = Path(run_dir) / "pipeline-timeline.png"
    result = schedule_png(path, schedule, pp, microbatches, stages_per_rank)
    r.log({"pipeline/timeline": wandb.Image(str(path), caption=f"{schedule}, pp={pp}, {microbatches} "
                                            f"micro-batches: bubble {100 * result['bubble']:.0f}% (simulated)")},
          step=step)
