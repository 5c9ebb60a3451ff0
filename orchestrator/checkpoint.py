"""Distributed checkpoints with torch.distributed.checkpoint (DCP), written atomically.

Every rank writes its shards into `step-N.tmp`; after a barrier rank 0 renames
it to `step-N`, so a folder named `step-N` is always complete.
"""

import os
import shutil
from pathlib import Path

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict


def state_of(modules: list, optimizers: list) -> tuple[dict, dict]:
    """Model and optimizer state of this rank's parts, keyed by the whole model's parameter names."""
    model_state, optim_state = {}, {"state": {}, "param_groups": []}
    for module, opt in zip(modules, optimizers):
        m, o = get_state_dict(module, opt)
        model_state.update(m)
        optim_state["state"].update(o["state"])
        optim_state["param_groups"] += o["param_groups"]
    return model_state, optim_state


def save(modules: list, optimizers: list, step: int, directory: str) -> str:
    final = Path(directory) / f"step-{step}"
    tmp = final.with_name(final.name + ".tmp")
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    model_state, optim_state = state_of(modules, optimizers)
    dcp.save({"model": model_state, "optim": optim_state, "step": step}, checkpoint_id=str(tmp))
    dist.barrier()
    if dist.get_rank() == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    dist.barrier()
    return str(final)
