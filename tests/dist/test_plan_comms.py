"""The step-time model's collective counts against what real gloo ranks issue in a training step.

One launch of 8 ranks builds several layouts in turn; each rank runs one step of each (after a first, which
also infers the pipeline's shapes) under a dispatch mode that records every c10d op: DTensor's (let through
to its plain-tensor collectives, as CommDebugMode does), FSDP2's, the loop's plain torch.distributed calls
and the pipeline's send/recv, which CommDebugMode does not see. (CommDebugMode itself fails inside the
trainer's step on torch 2.13: its module tracker's forward hook finds no parent module under FSDP2's
hooks.) Per rank and kind of collective, the count must be what orchestrator/planner/comms.py says that
rank's code issues.
"""

import json
from collections import Counter
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode

from launch.local import spawn
from models.llama import ModelArgs
from orchestrator.data.dataset import prepare
from orchestrator.planner.comms import shape_of, step_comms
from orchestrator.train.trainer import Trainer
from orchestrator.validate import validate
from tests.conftest import make_cfg

pytestmark = pytest.mark.dist

BASE = ("model.n_layers=4", "train.global_batch=16", "train.micro_batch=2", "train.eval_every=0")
LAYOUTS = {
    "tp2-dp4-sp-fsdp": ("parallel.tp=2", "parallel.pp=1", "parallel.dp=4", "parallel.dp_shard=full"),
    "tp2-dp4-zero1": ("parallel.tp=2", "parallel.pp=1", "parallel.dp=4", "parallel.dp_shard=optimizer",
                      "parallel.sequence_parallel=false"),
    "dp8-fsdp": ("parallel.tp=1", "parallel.pp=1", "parallel.dp=8", "parallel.dp_shard=full"),
    "dp8-ddp": ("parallel.tp=1", "parallel.pp=1", "parallel.dp=8", "parallel.dp_shard=replicate"),
    "tp2-pp2-dp2-1f1b": ("parallel.tp=2", "parallel.pp=2", "parallel.dp=2", "parallel.schedule=1f1b"),
    "pp2-dp4-interleaved": ("parallel.tp=1", "parallel.pp=2", "parallel.dp=4", "parallel.schedule=interleaved-1f1b"),
    "tp2-pp4-gpipe-ac": ("parallel.tp=2", "parallel.pp=4", "parallel.dp=1", "parallel.schedule=gpipe",
                         "train.activation_checkpointing=full"),
    # Context parallelism: K/V gathers per block (again where recomputed), FSDP2 and ZeRO-1 over dp x cp, the
    # document ids gathered per stage and micro-batch.
    "tp2-dp2-cp2-sp-fsdp": ("parallel.tp=2", "parallel.pp=1", "parallel.dp=2", "parallel.cp=2",
                            "parallel.dp_shard=full"),
    "pp2-dp2-cp2-1f1b-docs": ("parallel.tp=1", "parallel.pp=2", "parallel.dp=2", "parallel.cp=2",
                              "parallel.schedule=1f1b", "data.mask_across_documents=true"),
    "dp2-cp4-zero1-ac": ("parallel.tp=1", "parallel.pp=1", "parallel.dp=2", "parallel.cp=4",
                         "parallel.dp_shard=optimizer", "train.activation_checkpointing=full"),
}
KINDS = {"allreduce": "all_reduce", "all_reduce": "all_reduce", "allgather": "all_gather",
         "all_gather": "all_gather", "reduce_scatter": "reduce_scatter", "broadcast": "broadcast"}


def kind_of(op_name: str):
    name = op_name.split(".")[-1].rstrip("_").lower()
    return next((k for frag, k in KINDS.items() if frag in name), None)


class Collectives(TorchDispatchMode):
    """Counts each c10d collective and transfer (not the waits) by kind."""

    def __init__(self):
        super().__init__()
        self.counts = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(issubclass(t, DTensor) for t in types):
            return NotImplemented  # DTensor runs its op as plain-tensor collectives, which come back here
        if func.namespace in ("c10d", "_c10d_functional"):
            name = func._schema.name.split("::")[-1]
            kind = "send_recv" if name in ("send", "recv_") else kind_of(name)
            if kind is not None:
                self.counts[kind] += 1
            elif name not in ("wait_tensor", "barrier", "_wrap_tensor_autograd"):  # waits and autograd wrappers
                raise AssertionError(f"an uncounted collective: {name}")
        return func(*args, **(kwargs or {}))


def _worker(env, device, layouts: dict, run_dir: str, corpus):
    out = {}
    for name, cfg_dict in layouts.items():
        trainer = Trainer(OmegaConf.create(cfg_dict), env, device, f"{run_dir}/{name}", corpus)
        trainer.train_step()
        mode = Collectives()
        with mode:
            trainer.train_step()
        out[name] = {"pp_rank": trainer.mesh["pp"].get_local_rank(), "counts": dict(mode.counts)}
    Path(run_dir, f"rank-{env.rank}.json").write_text(json.dumps(out))


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("comms")
    cfgs = {}
    for name, overrides in LAYOUTS.items():
        cfg = make_cfg(*BASE, *overrides, tmp=tmp)
        validate(cfg)
        cfgs[name] = cfg
    first = next(iter(cfgs.values()))
    spawn(_worker, 8, {n: OmegaConf.to_container(c, resolve=True) for n, c in cfgs.items()}, str(tmp),
          prepare(first.data), backend="gloo", timeout_s=120)
    ranks = {int(p.stem.split("-")[1]): json.loads(p.read_text()) for p in tmp.glob("rank-*.json")}
    return cfgs, ranks


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_the_planner_counts_every_collective_a_layouts_step_issues_on_each_rank(measured, name):
    cfgs, ranks = measured
    cfg = cfgs[name]
    args = ModelArgs.from_config(cfg.model)
    assert len(ranks) == 8
    for rank, layouts in sorted(ranks.items()):
        got = layouts[name]
        predicted = Counter()
        for c in step_comms(shape_of(cfg, args, got["pp_rank"], 1, 1), args):
            predicted[c.kind] += c.count
        assert dict(predicted) == got["counts"], (rank, got["pp_rank"])
