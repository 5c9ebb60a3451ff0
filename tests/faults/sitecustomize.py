"""Fault injection for tests: Python loads this only where a test puts tests/faults on PYTHONPATH.

Nothing in the product reads these variables; this file patches the product
from outside, in the processes of a real run (the spawned ranks load it too).

TRIDENT_TEST_CRASH_RANK=r       the process of global rank r raises as soon as its process group is up, as a
                                rank that hits a bug would (the launcher and SLURM must then end the whole run,
                                say which rank failed, and not requeue it).
TRIDENT_TEST_NAN_GRAD=r:s1,s2   at steps s1, s2 (each once) rank r's loss and gradients become NaN after its
                                backward: a bad batch on one rank.
TRIDENT_TEST_NAN_WEIGHT=r:s     before step s (once) rank r writes NaN into one of its weights: every later
                                step is non-finite.
TRIDENT_TEST_SPIKE=s1,s2        before step s1, and again before s2 (each once), every rank multiplies the
                                output projection by 1000: the loss of that step spikes.
TRIDENT_TEST_SLOW=r:seconds     rank r sleeps that long in every step before its forward: a straggler.
TRIDENT_TEST_CRASH_IN_SAVE=r:s  rank r writes half a shard of step s's checkpoint, then its process is gone (once per
                                run: a restarted run saves step s normally).
TRIDENT_TEST_KILL_AFTER=r:s     once step s is done (logged, checkpointed), rank r kills itself with SIGKILL as the next
                                step starts (once per run: a restarted run goes on).
"""

import importlib.abc
import importlib.util
import math
import os
import signal
import sys
import time

_CRASH = os.environ.get("TRIDENT_TEST_CRASH_RANK")

if _CRASH is not None:
    import torch.distributed as dist

    _init_process_group = dist.init_process_group

    def _init_then_crash(*args, **kwargs):
        _init_process_group(*args, **kwargs)
        if dist.get_rank() == int(_CRASH):
            raise RuntimeError(f"TRIDENT_TEST_CRASH_RANK={_CRASH}: rank {dist.get_rank()} fails on purpose")

    dist.init_process_group = _init_then_crash


def _rank_steps(name: str):
    value = os.environ.get(name)
    if value is None:
        return None, []
    rank, _, steps = value.partition(":")
    return int(rank), [float(s) if "." in s else int(s) for s in steps.split(",") if s]


_NAN_GRAD = _rank_steps("TRIDENT_TEST_NAN_GRAD")
_NAN_WEIGHT = _rank_steps("TRIDENT_TEST_NAN_WEIGHT")
_SLOW = _rank_steps("TRIDENT_TEST_SLOW")
_CRASH_SAVE = _rank_steps("TRIDENT_TEST_CRASH_IN_SAVE")
_KILL_AFTER = _rank_steps("TRIDENT_TEST_KILL_AFTER")
_SPIKE = [int(s) for s in os.environ.get("TRIDENT_TEST_SPIKE", "").split(",") if s]
_fired: set = set()


def _once(key) -> bool:
    if key in _fired:
        return False
    _fired.add(key)
    return True


def _local(t):
    return t.to_local() if hasattr(t, "to_local") else t


def _patch_trainer(module) -> None:
    import torch
    import torch.distributed as dist

    original = module.Trainer._forward_backward

    def forward_backward(self, micro):
        rank, step = dist.get_rank(), self.step
        once = os.path.join(self.run_dir, ".test-killed")
        if _KILL_AFTER[0] == rank and step == _KILL_AFTER[1][0] + 1 and not os.path.exists(once):
            open(once, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)
        params = [(n, p) for m in self.modules for n, p in m.named_parameters()]
        with torch.no_grad():
            if _NAN_WEIGHT[0] == rank and step in _NAN_WEIGHT[1] and _once(("weight", step)):
                _local(params[0][1]).fill_(math.nan)
            if step in _SPIKE and _once(("spike", step)):
                for name, p in params:
                    if name == "output.weight":
                        _local(p).mul_(1000.0)
        if _SLOW[0] == rank:
            time.sleep(_SLOW[1][0])
        loss_sum = original(self, micro)
        if _NAN_GRAD[0] == rank and step in _NAN_GRAD[1] and _once(("grad", step)):
            with torch.no_grad():
                for _, p in params:
                    if p.grad is not None:
                        _local(p.grad).fill_(math.nan)
            loss_sum = loss_sum * math.nan
        return loss_sum

    module.Trainer._forward_backward = forward_backward


def _patch_checkpoint(module) -> None:
    import torch.distributed as dist

    real_save = module.dcp.save

    def dying_save(state, checkpoint_id):
        once = os.path.join(os.path.dirname(checkpoint_id), ".test-crashed-in-save")
        if _CRASH_SAVE[0] == dist.get_rank() and checkpoint_id.endswith(f"step-{_CRASH_SAVE[1][0]}.tmp") \
                and not os.path.exists(once):
            open(once, "w").close()
            with open(os.path.join(checkpoint_id, f"__{dist.get_rank()}_0.distcp"), "wb") as f:
                f.write(b"\0" * 100)
            os._exit(1)
        return real_save(state, checkpoint_id=checkpoint_id)

    module.dcp.save = dying_save


_PATCHES = {"orchestrator.train.trainer": _patch_trainer, "orchestrator.runs.checkpoint": _patch_checkpoint}


class _PatchAfterImport(importlib.abc.MetaPathFinder):
    """Patch a product module right after it is first imported."""

    def find_spec(self, name, path, target=None):
        if name not in _PATCHES:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        run_module = spec.loader.exec_module

        def exec_module(module):
            run_module(module)
            _PATCHES[name](module)

        spec.loader.exec_module = exec_module
        return spec


if _NAN_GRAD[0] is not None or _NAN_WEIGHT[0] is not None or _SLOW[0] is not None or _SPIKE or \
        _CRASH_SAVE[0] is not None or _KILL_AFTER[0] is not None:
    sys.meta_path.insert(0, _PatchAfterImport())
