"""Fault handling without processes: bad settings refused, parallel=auto's choice, safe checkpoint loading,
the hang report, spike and straggler rules, and the SLURM restart decision."""

import json
import os
import pickle
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

import orchestrator.cli.train as train_app
from launch import restart
from launch.watchdog import BOUNDARY, StepWatchdog, describe_hang, stacks_from_dump
from orchestrator.planner.auto import choose
from orchestrator.planner.layouts import plan
from orchestrator.runs import checkpoint
from orchestrator.train.faults import SpikeGuard, StragglerWatch, Verdict
from orchestrator.validate import ConfigError, validate
from tests.conftest import make_cfg


@pytest.mark.parametrize("overrides, names", [
    (["train.nonfinite=maybe"], ["train.nonfinite='maybe'", "skip, stop"]),
    (["train.max_skipped_steps=0"], ["train.max_skipped_steps=0 must be >= 1"]),
    (["train.step_timeout_s=-5"], ["train.step_timeout_s=-5", "must be positive"]),
    (["train.step_timeout_s=60"], ["train.step_timeout_s=60", "below parallel.timeout_s=60", "without naming the rank"]),
    (["parallel.timeout_s=-1"], ["parallel.timeout_s=-1", "positive"]),
    (["train.spike.factor=0.5"], ["train.spike.factor=0.5 must be above 1", "null"]),
    (["train.spike.window=1"], ["train.spike.window=1 must be >= 3"]),
    (["train.spike.max_rollbacks=-1"], ["train.spike.max_rollbacks=-1 must be >= 0"]),
    (["launcher.max_restarts=-2"], ["launcher.max_restarts=-2 must be >= 0"]),
    (["logging.straggler_factor=1"], ["logging.straggler_factor=1", "above 1"]),
    (["parallel.layout=sideways"], ["parallel.layout='sideways'", "manual, auto"]),
    (["parallel.auto_cluster=tpu-pod"], ["parallel.auto_cluster='tpu-pod'", "a100-80gb, cpu, h100-80gb"]),
    (["parallel=auto", "launcher.nprocs=3"],
     ["parallel=auto: no layout of llama-debug fits 3 rank(s)", "the smallest world size that fits is 1",
      "the largest below 3 is 2"]),
])
def test_bad_fault_settings_are_refused_before_launch_naming_key_and_valid_values(overrides, names, tmp_path,
                                                                                   monkeypatch):
    spawned = []
    monkeypatch.setattr(train_app, "spawn", lambda *a, **k: spawned.append(a))
    with pytest.raises(ConfigError) as e:
        train_app.run(make_cfg(*overrides, tmp=tmp_path), str(tmp_path / "run"))
    for name in names:
        assert name in str(e.value)
    assert spawned == [] and not (tmp_path / "run").exists()


def test_external_launcher_refuses_restarts_of_its_own(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="launcher.max_restarts=1 with launcher=external.*torchrun --max-restarts"):
        train_app.run(make_cfg("launcher=external", "launcher.max_restarts=1", tmp=tmp_path), str(tmp_path / "run"))


def test_parallel_auto_takes_trident_plans_first_fitting_layout_and_keeps_the_global_batch(tmp_path):
    overrides = ["model=llama-125m", "train.seq_len=1024", "train.global_batch=64", "train.micro_batch=1"]
    cfg = make_cfg(*overrides, "parallel=auto", "parallel.auto_cluster=h100-80gb", tmp=tmp_path)
    chosen, line = choose(cfg, 8)
    planned = make_cfg(*overrides, tmp=tmp_path)
    from hydra import compose, initialize_config_dir  # trident-plan's own config: train.yaml + a cluster

    from orchestrator.config import CONF_DIR
    from tests.conftest import TINY
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        plan_cfg = compose(config_name="plan", overrides=[*TINY, *overrides, "cluster=h100-80gb", "cluster.gpus=8",
                                                          f"checkpoint.dir={tmp_path / 'ck'}"])
    rows, _ = plan(plan_cfg)
    best = next(r for r in rows if r.fits)
    par = chosen.parallel
    assert (par.tp, par.pp, par.dp, chosen.train.micro_batch) == (best.tp, best.pp, best.dp, best.micro_batch)
    assert chosen.train.global_batch == planned.train.global_batch == 64
    assert f"8 rank(s) -> tp={best.tp} pp={best.pp} dp={best.dp}" in line


# --- checkpoints safe to load -------------------------------------------------------------------------------------

class Payload:
    def __reduce__(self):
        return (os.system, (f"touch {PWNED}",))


PWNED = Path("/tmp/trident-test-pwned")


def test_a_checkpoint_whose_metadata_would_run_code_is_refused_and_runs_nothing(tmp_path):
    PWNED.unlink(missing_ok=True)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(1, 3)).sum().backward()
    opt.step()
    good = tmp_path / "step-1"
    dcp.save({"model": {"weight": model.weight.detach().clone()}}, checkpoint_id=str(good), no_dist=True)
    (good / checkpoint.MARKER).write_text(json.dumps({"step": 1}))
    # A real checkpoint loads through the safe reader...
    state = {"model": {"weight": torch.zeros(2, 3)}}
    dcp.load(state, storage_reader=checkpoint.SafeReader(str(good)), planner=checkpoint.SafePlanner(), no_dist=True)
    assert torch.equal(state["model"]["weight"], model.weight.detach())
    # ...one whose .metadata pickle calls os.system does not, and the call never happens.
    (good / ".metadata").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(BaseException) as e:  # DCP's CheckpointException derives from BaseException
        dcp.load(state, storage_reader=checkpoint.SafeReader(str(good)), planner=checkpoint.SafePlanner(),
                 no_dist=True)
    assert "refused to unpickle" in str(e.value) and "system" in str(e.value)
    assert not PWNED.exists()


def test_no_checkpoint_load_in_the_product_uses_a_pickle_capable_loader():
    """Every dcp.load names the safe reader and planner; nothing calls torch.load or pickle.load on checkpoint data."""
    root = Path(__file__).resolve().parents[2]
    for pkg in ("orchestrator", "launch", "parallel", "models"):
        for path in (root / pkg).rglob("*.py"):
            text = path.read_text()
            assert "weights_only=False" not in text and "torch.load(" not in text, path
            # The one pickle read: the local launcher's own children's error files (torch.multiprocessing's).
            assert "pickle.load(" not in text or path.name == "local.py", path
            for line in text.splitlines():
                if "dcp.load(" in line:
                    assert "SafeReader" in line and "SafePlanner" in line, (path, line)


def test_folders_without_their_completion_marker_are_never_resumed_and_only_partial_ones_start_fresh(tmp_path,
                                                                                                   capsys):
    ck = tmp_path / "checkpoints"
    (ck / "step-6.tmp").mkdir(parents=True)  # a crash mid-save
    (ck / "step-4").mkdir()  # renamed, but DCP's .metadata missing
    (ck / "step-4" / checkpoint.MARKER).write_text(json.dumps({"step": 4}))
    (ck / "step-2").mkdir()  # .metadata but no marker
    (ck / "step-2" / ".metadata").write_bytes(b"")
    assert checkpoint.complete_checkpoints(str(ck)) == []
    assert checkpoint.find_resume("auto", str(ck)) is None
    with pytest.raises(checkpoint.CheckpointError, match="holds no complete checkpoint"):
        checkpoint.find_resume(str(ck / "step-4"), "")
    cfg = make_cfg(f"checkpoint.dir={ck}", tmp=tmp_path)
    assert train_app.resume_path(cfg, None) is None
    err = capsys.readouterr().err
    assert f"warning: {ck} holds no complete checkpoint (only step-" in err and "starting fresh" in err


# --- the hang report ----------------------------------------------------------------------------------------------

def _report(rank, phase, frames):
    return {"rank": rank, "pid": 100 + rank, "host": "n1", "phase": phase, "step": 41, "setting": "X=4s",
            "frames": frames}


def test_the_hang_report_names_the_silent_rank_first_and_the_waiting_ones_as_waiting(tmp_path):
    trainer = str(Path(train_app.__file__).resolve().parents[1] / "train" / "trainer.py")
    collective = [[trainer, 10, "train_step"], ["/x/site-packages/torch/distributed/distributed_c10d.py", 5, "wait"]]
    reports = {0: _report(0, BOUNDARY, collective), 1: _report(1, "forward/backward of step 42", collective)}
    (tmp_path / "rank-2.stacks").write_text(
        "Thread 0x01 (most recent call first):\n"
        '  File "/x/site-packages/torch/nn/modules/linear.py", line 125 in forward\n'
        f'  File "{trainer}", line 200 in train_step\n')
    text = describe_hang(tmp_path, 3, reports, {2: "(pid 7) was stopped by a signal (SIGSTOP; state T)"})
    first, *rest = text.splitlines()
    assert first == "the run hung after step 41: rank(s) 2 did not reach the step boundary within X=4s"
    assert "rank 2 (pid 7) was stopped by a signal (SIGSTOP; state T); it was at orchestrator/train/trainer.py:200 in " \
           "train_step (innermost: torch/nn/modules/linear.py:125 in forward)" in rest[0]
    assert any("rank(s) 0 reached the step boundary and waited there" in line for line in rest)
    assert any("rank 1 waited in a collective during forward/backward of step 42" in line for line in rest)
    # Everyone answered: the one busy outside torch.distributed is the late one.
    busy = {0: _report(0, BOUNDARY, collective), 1: _report(1, "forward/backward", [[trainer, 9, "sleepy"]])}
    assert describe_hang(tmp_path, 2, busy).splitlines()[0] == (
        "the run hung after step 41: rank(s) 1 did not reach the step boundary within X=4s (on n1)")
    # A silent rank's host comes from the file it wrote at start (on another node, it cannot say it now).
    (tmp_path / "rank-2.json").write_text(json.dumps({"rank": 2, "pid": 7, "host": "node2"}))
    first, second, *_ = describe_hang(tmp_path, 3, reports).splitlines()
    assert first.endswith("rank(s) 2 did not reach the step boundary within X=4s (on node2)")
    assert second.startswith("  rank 2 wrote no report (stopped, frozen outside Python, or its node is gone) on "
                             "node2; it was at orchestrator/train/trainer.py:200")


def test_a_ranks_own_dump_landing_inside_a_sigusr1_dump_leaves_both_readable(tmp_path):
    """A stopped rank, once continued, answers the launcher's SIGUSR1 (faulthandler, written piecewise) while its
    own watchdog dumps too (seen on CI: the two interleaved line by line, and the rank was placed in the watchdog's
    thread). The watchdog's dump is one write: wherever it lands among the pieces, both dumps parse whole."""
    trainer = str(Path(train_app.__file__).resolve().parents[1] / "train" / "trainer.py")
    watchdog = StepWatchdog(0, 1, str(tmp_path), "X=4s")
    watchdog._write_dump("no step boundary for 9s")
    watchdog.stop()
    own = (tmp_path / "rank-0.stacks").read_text()
    assert own.startswith("\n--- rank 0 (pid ") and "(most recent call first)" in own
    usr1 = ("Thread 0x02 (most recent call first):\n"
            '  File "/x/threading.py", line 5 in wait\n'
            "Current thread 0x01 (most recent call first):\n"
            '  File "/x/site-packages/torch/nn/modules/linear.py", line 125 in forward\n'
            f'  File "{trainer}", line 200 in train_step\n')
    cut = usr1.index("line 125")  # mid-line, as a piece of faulthandler's may end
    assert stacks_from_dump(usr1[:cut] + own + usr1[cut:]) == [[trainer, 200, "train_step"], [
        "/x/site-packages/torch/nn/modules/linear.py", 125, "forward"]]


# --- spike and straggler rules ------------------------------------------------------------------------------------

def test_a_spike_is_factor_times_the_running_median_once_the_window_is_full():
    guard = SpikeGuard(factor=2.0, window=3)
    for loss in (5.0, 4.0):
        assert guard.is_spike(100.0) is None  # the window is not full yet
        guard.add(loss)
    guard.add(4.5)
    assert guard.is_spike(8.9) is None and guard.is_spike(9.1) == 4.5


def test_a_straggler_is_named_after_n_slow_steps_in_a_row_with_its_host_and_cleared_when_it_recovers(tmp_path):
    (tmp_path / "rank-2.json").write_text(json.dumps({"rank": 2, "pid": 4242, "host": "node2"}))
    watch = StragglerWatch(factor=1.5, steps=3, ranks_dir=str(tmp_path))
    slow = Verdict(False, False, 0.0, 0.0, work_s=[1.0, 1.0, 1.0, 1.0], wait_s=[0.5, 0.5, 0.0, 0.5])
    messages = [watch.update(slow)[1] for _ in range(3)]
    assert messages[:2] == [None, None] and "straggler: rank 2 was busy 1.000s per step, 2.0x" in messages[2]
    assert messages[2].endswith("it runs on node2 (pid 4242)")
    row, _ = watch.update(slow)
    assert row["straggler_rank"] == 2 and row["slowest_rank"] == 2 and row["rank_wait_s_max"] == 0.5
    even = Verdict(False, False, 0.0, 0.0, work_s=[1.0] * 4, wait_s=[0.5] * 4)
    assert "rank 2 is back" in watch.update(even)[1]


# --- the SLURM restart decision -----------------------------------------------------------------------------------

def test_a_failed_job_is_requeued_up_to_max_restarts_unless_the_run_stopped_itself(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (tmp_path / "trident-run-7.json").write_text(json.dumps({"run_dir": str(run_dir)}))
    assert restart.decide(2, 0, "7", tmp_path, 0)[0] is False
    assert restart.decide(2, 1, "7", tmp_path, 0) == (True, "restart 1 of launcher.max_restarts=2")
    (tmp_path / "trident-restarts-7.json").write_text(json.dumps({"restarts": 2, "history": []}))
    assert restart.decide(2, 1, "7", tmp_path, 0) == (False, "launcher.max_restarts=2 restarts already done")
    (tmp_path / "trident-restarts-7.json").unlink()
    (run_dir / "fault.json").write_text(json.dumps({"restart": False, "message": "non-finite loss at step 9"}))
    assert restart.decide(2, 1, "7", tmp_path, 0) == (False, "the run stopped itself: non-finite loss at step 9")


def test_a_slurm_task_replans_an_auto_layout_for_the_tasks_its_requeued_job_got(tmp_path):
    """SlurmRun's relayout: planned for 4 at submission, the job came back with 2 tasks (planned in a child process)."""
    from omegaconf import OmegaConf

    from orchestrator.planner.auto import relayout
    cfg, _ = choose(make_cfg("parallel=auto", tmp=tmp_path), 4)
    plain = OmegaConf.to_container(cfg, resolve=True)
    assert relayout(plain, 4, 4) == (plain, None)  # the world it was planned for: unchanged
    again, line = relayout(plain, 2, 2)
    par = again["parallel"]
    assert par["tp"] * par["pp"] * par["dp"] == 2 and "parallel=auto: 2 rank(s) -> " in line
    assert again["train"]["global_batch"] == plain["train"]["global_batch"]
    manual = {**plain, "parallel": {**plain["parallel"], "layout": "manual"}}
    assert relayout(manual, 2, 2) == (manual, None)  # a manual layout is never changed behind the user's back


def test_the_teardown_counts_a_node_down_or_not_responding_as_lost_fake_sinfo():
    out = "node1|mix|none\nnode2|down*|Not responding\nnode3|idle*|none\nnode4|drain|maintenance\nnode5|alloc|none\n"
    assert restart.parse_lost(out) == {"node2": "down*: Not responding", "node3": "idle*",
                                       "node4": "drain: maintenance"}


def test_a_parallel_auto_job_with_restarts_on_several_nodes_is_elastic_and_a_fixed_layout_is_not(tmp_path):
    from launch.slurm import executor_params

    shape = ["launcher=slurm", "launcher.nodes=2", "launcher.tasks_per_node=2", "launcher.max_restarts=1"]
    elastic = executor_params(make_cfg(*shape, "parallel=auto", tmp=tmp_path))
    assert "tasks_per_node" not in elastic and elastic["nodes"] == 2
    assert elastic["slurm_additional_parameters"] == {"nodes": "1-2", "no_kill": True, "mincpus": 2}
    assert elastic["slurm_srun_args"][-1] == "--ntasks-per-node=2"
    least = executor_params(make_cfg(*shape, "parallel=auto", "launcher.min_nodes=2", tmp=tmp_path))
    assert least["tasks_per_node"] == 2 and "slurm_additional_parameters" not in least
    fixed = executor_params(make_cfg(*shape, "parallel.tp=2", "parallel.pp=1", "parallel.dp=2", tmp=tmp_path))
    assert fixed["tasks_per_node"] == 2 and "slurm_additional_parameters" not in fixed
    assert fixed["slurm_srun_args"] == ["--kill-on-bad-exit=1", "--distribution=block"]
    with pytest.raises(ConfigError, match=r"launcher.min_nodes=1 < launcher.nodes=2 needs parallel=auto"):
        validate(make_cfg(*shape, "parallel.tp=2", "parallel.pp=1", "parallel.dp=2", "launcher.min_nodes=1",
                          tmp=tmp_path))
