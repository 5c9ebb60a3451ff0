"""The pipeline bubble computed from the schedule itself.

Each torch schedule carries `pipeline_order`: for every pp rank, the list of
compute actions it runs in order (forward F, full backward B, or the split
backward's input part I and weight part W, per stage and micro-batch). We
replay those lists with per-action costs and the data dependencies between
stages — an action starts when its rank is free and its inputs exist — and
report each rank's idle time against the makespan.

Analytic values, where theory gives one (p ranks, m micro-batches, v stages
per rank, equal stages, idle time as a fraction of the total):
  GPipe, 1F1B:        (p - 1) / (m + p - 1)
  interleaved 1F1B:   (p - 1) / (v*m + p - 1)   (Megatron-LM's bubble divided by v)
The zero-bubble schedules have no closed form; they are simulated only.
"""

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.pipelining import PipelineStage

from parallel.mesh import fake_world
from parallel.pipeline_parallel import SCHEDULES, SINGLE_STAGE, stage_ids, stages_per_rank

# Unit costs: backward is twice forward; split, its input and weight halves cost one each.
UNIT_COSTS = {"F": 1.0, "B": 2.0, "I": 1.0, "W": 1.0}


@dataclass(frozen=True)
class Op:
    kind: str  # F, B, I or W
    stage: int
    microbatch: int


def analytic_bubble(schedule: str, pp: int, m: int, v: int):
    if schedule in SINGLE_STAGE:
        return (pp - 1) / (m + pp - 1)
    if schedule == "interleaved-1f1b":
        return (pp - 1) / (v * m + pp - 1)
    return None


def ops_of(action) -> list[Op]:
    """Compute ops of one torch `_Action` (an overlapped F+B action holds two); comm and FSDP ops drop out."""
    if action is None:
        return []
    if isinstance(action, Op):
        return [action]
    subs = getattr(action, "sub_actions", None)
    if subs:
        return [op for sub in subs for op in ops_of(sub)]
    kind = str(getattr(action.computation_type, "value", action.computation_type))
    kind = {"FULL_BACKWARD": "B", "BACKWARD_INPUT": "I", "BACKWARD_WEIGHT": "W", "FORWARD": "F"}.get(kind, kind)
    if kind not in UNIT_COSTS:
        return []
    return [Op(kind, action.stage_index, action.microbatch_index)]


def simulate(orders: dict[int, list], n_stages: int, costs: dict[str, float] = UNIT_COSTS) -> dict:
    """Replay each rank's ops; return the timeline, makespan and idle fractions."""
    queues = {rank: [op for a in actions for op in ops_of(a)] for rank, actions in orders.items()}
    done: dict[tuple, float] = {}  # (kind, stage, mb) -> finish time; I and B both count as "grad ready"
    free = {rank: 0.0 for rank in queues}
    pos = {rank: 0 for rank in queues}
    timeline = {rank: [] for rank in queues}

    def ready(op: Op):
        deps = []
        if op.kind == "F" and op.stage > 0:
            deps.append(("F", op.stage - 1, op.microbatch))
        if op.kind in ("B", "I"):
            deps.append(("F", op.stage, op.microbatch))
            if op.stage < n_stages - 1:
                deps.append(("G", op.stage + 1, op.microbatch))
        if op.kind == "W":
            deps.append(("G", op.stage, op.microbatch))
        if any(d not in done for d in deps):
            return None
        return max([done[d] for d in deps], default=0.0)

    remaining = sum(len(q) for q in queues.values())
    while remaining:
        progressed = False
        for rank, queue in queues.items():
            while pos[rank] < len(queue):
                op = queue[pos[rank]]
                inputs_at = ready(op)
                if inputs_at is None:
                    break
                start = max(free[rank], inputs_at)
                end = start + costs[op.kind]
                free[rank] = end
                done[(op.kind, op.stage, op.microbatch)] = end
                if op.kind in ("B", "I"):
                    done[("G", op.stage, op.microbatch)] = end
                timeline[rank].append((start, end, op))
                pos[rank] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            raise RuntimeError("schedule deadlocks: no rank can run its next action")
    makespan = max(free.values())
    busy = {rank: sum(e - s for s, e, _ in ops) for rank, ops in timeline.items()}
    idle = {rank: 1 - b / makespan for rank, b in busy.items()}
    return {
        "makespan": makespan,
        "idle_per_rank": idle,
        "bubble": 1 - sum(busy.values()) / (makespan * len(busy)),
        "timeline": timeline,
    }


def single_stage_orders(schedule: str, pp: int, m: int) -> dict[int, list[Op]]:
    """What torch's ScheduleGPipe and Schedule1F1B execute, rank by rank.

    These two run a hand-written loop rather than their `pipeline_order`
    (which, for 1F1B's last rank, is off by one micro-batch in torch 2.13),
    so their action lists are written out here from the same definition.
    """
    orders = {}
    for r in range(pp):
        if schedule == "gpipe":
            orders[r] = [Op("F", r, i) for i in range(m)] + [Op("B", r, i) for i in range(m)]
            continue
        warmup = min(pp - 1 - r, m)
        ops = [Op("F", r, i) for i in range(warmup)]
        for i in range(m - warmup):
            ops += [Op("F", r, warmup + i), Op("B", r, i)]
        ops += [Op("B", r, i) for i in range(m - warmup, m)]
        orders[r] = ops
    return orders


def pipeline_orders(schedule: str, pp: int, m: int, requested_stages_per_rank=None) -> tuple[dict, int]:
    """Each rank's action list for a schedule: (orders, number of stages).

    The multi-stage schedules execute torch's own `pipeline_order`, built here
    in a fake process group of pp ranks (so not inside a real one).
    """
    if schedule in SINGLE_STAGE:
        return single_stage_orders(schedule, pp, m), pp
    v = stages_per_rank(schedule, requested_stages_per_rank)
    n_stages = pp * v
    with fake_world(pp):
        stages = [PipelineStage(torch.nn.Linear(1, 1), sid, n_stages, torch.device("cpu"), group=dist.group.WORLD)
                  for sid in stage_ids(schedule, 0, pp, v)]
        cls = SCHEDULES[schedule]
        return cls(stages, m).pipeline_order, n_stages
