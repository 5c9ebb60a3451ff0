"""Activation memory measured: the bytes autograd keeps saved for backward, live and at their peak.

What `orchestrator.planner.memory`'s activation formula predicts, measured on
a real step (tests/dist/test_plan_memory.py, bench/pipeline_memory.py).
"""

import weakref

import torch
from torch.distributed.tensor import DTensor


class _Saved:
    __slots__ = ("value", "__weakref__")

    def __init__(self, value):
        self.value = value


class SavedTensorMeter:
    """Live bytes of the tensors autograd saves for backward, and their peak: activation memory measured.

    Storages of parameters (FSDP2's gathered ones included) and buffers are not
    activations; a storage saved twice counts once. On a GPU the allocator shows
    the same; on CPU this count is the direct measure. Use as
    `with meter.measuring(): forward and backward`.
    """

    def __init__(self, modules):
        self.modules = modules
        self.live: dict[int, int] = {}  # storage pointer -> bytes
        self.refs: dict[int, int] = {}
        self.now = self.peak = 0

    def measuring(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)

    def _excluded(self) -> set:
        out = set()
        for m in self.modules:
            for t in [*m.parameters(), *m.buffers()]:
                local = t.to_local() if isinstance(t, DTensor) else t
                out.add(local.untyped_storage().data_ptr())
        return out

    def pack(self, t):
        local = t.to_local() if isinstance(t, DTensor) else t
        try:
            ptr = local.untyped_storage().data_ptr()
        except RuntimeError:  # a fake or meta tensor: the pipeline's shape inference, not the step
            return t
        if ptr in self._excluded():
            return t
        if self.refs.get(ptr, 0) == 0:
            self.live[ptr] = local.untyped_storage().nbytes()
            self.now += self.live[ptr]
            self.peak = max(self.peak, self.now)
        self.refs[ptr] = self.refs.get(ptr, 0) + 1
        box = _Saved([t])
        weakref.finalize(box, self._release, ptr)
        return box

    def _release(self, ptr):
        self.refs[ptr] -= 1
        if self.refs[ptr] == 0:
            self.now -= self.live.pop(ptr)

    @staticmethod
    def unpack(x):
        return x.value[0] if isinstance(x, _Saved) else x
