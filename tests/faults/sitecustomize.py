"""Fault injection for tests: Python loads this only where a test puts tests/faults on PYTHONPATH.

TRIDENT_TEST_CRASH_RANK=r: the process of global rank r raises as soon as its
process group is up, as a rank that hits a bug would (the launcher and SLURM
must then end the whole run, say which rank failed, and not requeue it).
"""

import os

_CRASH = os.environ.get("TRIDENT_TEST_CRASH_RANK")

if _CRASH is not None:
    import torch.distributed as dist

    _init_process_group = dist.init_process_group

    def _init_then_crash(*args, **kwargs):
        _init_process_group(*args, **kwargs)
        if dist.get_rank() == int(_CRASH):
            raise RuntimeError(f"TRIDENT_TEST_CRASH_RANK={_CRASH}: rank {dist.get_rank()} fails on purpose")

    dist.init_process_group = _init_then_crash
