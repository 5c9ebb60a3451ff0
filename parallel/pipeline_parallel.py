"""Pipeline parallelism: the model's layers cut into stages, micro-batches scheduled through them.

Built on `torch.distributed.pipelining`. The whole model is built on the meta
device; each stage is a copy that keeps only its layers (the first also the
embedding, the last also the norm and output projection), so parameter names
stay those of the whole model. A rank holds one stage, or several for the
interleaved and V-shaped schedules:

  loop style  (gpipe, 1f1b, interleaved-1f1b, zero-bubble): rank r holds stages r, r+pp, r+2pp, ...
  V style     (zbv, dualpipev): rank r holds stages r and 2pp-1-r, so rank 0 holds both ends
"""

import copy
import inspect
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import schedules as _schedules
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleDualPipeV,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleInterleavedZeroBubble,
    ScheduleZBVZeroBubble,
)

SCHEDULES = {
    "gpipe": ScheduleGPipe,
    "1f1b": Schedule1F1B,
    "interleaved-1f1b": ScheduleInterleaved1F1B,
    "zero-bubble": ScheduleInterleavedZeroBubble,
    "zbv": ScheduleZBVZeroBubble,
    "dualpipev": ScheduleDualPipeV,
}
SINGLE_STAGE = ("gpipe", "1f1b")
V_SHAPED = ("zbv", "dualpipev")
# Schedules that split backward into input-gradient and (later) weight-gradient steps.
SPLIT_BACKWARD = ("zero-bubble", "zbv", "dualpipev")


def stages_per_rank(schedule: str, requested) -> int:
    """Virtual stages per rank: 1 for gpipe/1f1b, 2 for the V schedules, else as requested (default 2)."""
    if schedule in SINGLE_STAGE:
        return 1
    if schedule in V_SHAPED:
        return 2
    return requested or 2


def stage_ids(schedule: str, pp_rank: int, pp: int, per_rank: int) -> list[int]:
    if schedule in V_SHAPED:
        return [pp_rank, 2 * pp - 1 - pp_rank]
    return [pp_rank + i * pp for i in range(per_rank)]


def stage_owner(schedule: str, stage: int, pp: int) -> int:
    """The pp rank that holds a stage."""
    if schedule in V_SHAPED:
        return stage if stage < pp else 2 * pp - 1 - stage
    return stage % pp


def stage_module(whole: nn.Module, stage: int, n_stages: int, layers: range) -> nn.Module:
    """A copy of the (meta) model with only what `stage` computes."""
    module = copy.deepcopy(whole)
    for name in list(module.layers.keys()):
        if int(name) not in layers:
            del module.layers[name]
    if stage != 0:
        module.tok_embeddings = None
    if stage != n_stages - 1:
        module.norm = None
        module.output = None
    return module


class P2PWaitTimer:
    """Seconds this rank spends blocked on pipeline sends and receives: its share of the bubble.

    torch's schedules wait on every batch of p2p work through one helper of
    theirs; it is wrapped while a step runs. Where a torch version has no
    such helper, nothing is measured and `seconds` stays None.
    """

    def __init__(self):
        self.seconds = None

    def __enter__(self):
        self._original = getattr(_schedules, "_wait_batch_p2p", None)
        if self._original is None:
            return self
        self.seconds = 0.0

        def timed(work):
            start = time.perf_counter()
            try:
                return self._original(work)
            finally:
                self.seconds += time.perf_counter() - start

        # Module state of torch's, changed only while a step runs and restored after: torch has no public hook
        # on the pipeline's p2p waits.
        _schedules._wait_batch_p2p = timed
        return self

    def __exit__(self, *exc):
        if self._original is not None:
            _schedules._wait_batch_p2p = self._original


@dataclass
class Pipeline:
    """This rank's stages and the schedule that drives them."""

    schedule_name: str
    parts: list[nn.Module]
    stages: list[PipelineStage]
    stage_ids: list[int]
    n_stages: int
    schedule: object
    group: dist.ProcessGroup
    last_wait_s: float | None = field(default=None, init=False)

    @property
    def has_first(self) -> bool:
        return 0 in self.stage_ids

    @property
    def has_last(self) -> bool:
        return self.n_stages - 1 in self.stage_ids

    def step(self, inputs: torch.Tensor, targets: torch.Tensor, doc_ids: torch.Tensor | None = None) -> list[torch.Tensor]:
        """One forward+backward over all micro-batches; the per-micro-batch losses (on the last stage).

        doc_ids (the document of each input token, for document masking) reach every stage, not
        only the first: the schedule splits keyword arguments into micro-batches like the inputs
        and passes each stage its micro-batch's share, beside the hidden states it receives.

        The last stage's outputs (every micro-batch's logits) are not kept: the
        schedules would otherwise save each one and concatenate them all at the
        end of the step, unused (gigabytes at a 128k vocabulary).
        """
        losses: list[torch.Tensor] = []
        args = (inputs,) if self.has_first else ()
        kwargs = {"target": targets, "losses": losses} if self.has_last else {}
        if doc_ids is not None:
            kwargs["doc_ids"] = doc_ids
        if self.has_last and _takes_return_outputs(self.schedule):
            kwargs["return_outputs"] = False
        with P2PWaitTimer() as timer:
            self.schedule.step(*args, **kwargs)
        self.last_wait_s = timer.seconds
        return losses

    @torch.no_grad()
    def forward_only(self, inputs: torch.Tensor, activation_shape: tuple, dtype: torch.dtype,
                     doc_ids: torch.Tensor | None = None):
        """Run the stages in order on one batch (evaluation); the last stage's output, on its rank, else None.

        doc_ids, where given, go to every stage with its input (document masking).

        Plain blocking send/recv over the pp group: every rank walks the
        stages in the same order, so each send meets its recv.
        """
        me, pp = dist.get_rank(self.group), dist.get_world_size(self.group)
        hidden, out = None, None
        for stage in range(self.n_stages):
            owner = stage_owner(self.schedule_name, stage, pp)
            prev = stage_owner(self.schedule_name, stage - 1, pp) if stage else None
            if owner == me:
                if stage == 0:
                    x = inputs
                elif prev == me:
                    x = hidden
                else:
                    x = torch.empty(activation_shape, dtype=dtype, device=inputs.device)
                    dist.recv(x, group=self.group, group_src=prev)
                part = self.parts[self.stage_ids.index(stage)]
                hidden = part(x) if doc_ids is None else part(x, doc_ids=doc_ids)
                if stage == self.n_stages - 1:
                    out = hidden
            elif prev == me:
                # Always fp32 on the wire, whatever a stage computes in (train.dtype): the receiver expects it.
                dist.send(hidden.float().contiguous(), group=self.group, group_dst=owner)
        return out


def _takes_return_outputs(schedule) -> bool:
    """Whether this torch's schedule.step has `return_outputs` (recent torch; older ones always return them)."""
    return "return_outputs" in inspect.signature(type(schedule).step).parameters


def build_pipeline(
    schedule_name: str,
    modules: list[nn.Module],
    ids: list[int],
    n_stages: int,
    n_microbatches: int,
    loss_fn,
    pp_group: dist.ProcessGroup,
    device: torch.device,
) -> Pipeline:
    stages = [PipelineStage(m, i, n_stages, device, group=pp_group) for m, i in zip(modules, ids)]
    cls = SCHEDULES[schedule_name]
    if schedule_name in SINGLE_STAGE:
        schedule = cls(stages[0], n_microbatches, loss_fn=loss_fn)
    else:
        schedule = cls(stages, n_microbatches, loss_fn=loss_fn)
    return Pipeline(schedule_name, modules, stages, ids, n_stages, schedule, pp_group)
