"""One rank's training: build everything from the config, then the loop.

Each dp rank reads its share of the step's sequences; under context
parallelism (parallel.cp > 1) each cp rank keeps its two chunks of every
sequence (parallel/context_parallel.py) and the dp x cp ranks are the
replicas data parallelism averages over.

The loop, per optimizer step: the step's micro-batches (gradient
accumulation with the dp reduction only on the last, or the pipeline
schedule when pp > 1), clipping by the global gradient norm, AdamW, and the
learning rate of that step (linear warmup, then cosine or linear decay),
metrics (the loss is shared from the last stage), periodic evaluation on the
held-out split, and checkpoints.

Stopping early, agreed by all ranks at a step boundary (one all-reduce of a
flag per step): a preemption signal (SLURM's USR2: checkpoint, then the
launcher requeues), or a file named STOP in the run dir (checkpoint, then end
cleanly: how a sweep prunes a trial, and how a person stops a run by hand).
"""

import json
import math
import resource
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torch.distributed.tensor import DTensor

from launch.env import RankEnv
from launch.rank import AFTER_RANKS
from launch.watchdog import BOUNDARY, StepWatchdog, dump_nccl_trace
from models.llama import token_loss
from orchestrator.build.flops import flops_per_token, mfu, run_peak
from orchestrator.build.model import build_model
from orchestrator.build.optim import build_adamw, resolve_implementation
from orchestrator.data.dataset import IGNORE, Corpus, MixtureBatches, batches_for, eval_batches
from orchestrator.evaluate.beside import EvalQueue, cpu_split, due
from orchestrator.runs import checkpoint
from orchestrator.runs.dashboard import run_names
from orchestrator.runs.eval_files import hold_live
from orchestrator.runs.metrics import MetricsLogger, NullLogger, console, fmt_count, fmt_duration, progress_line
from orchestrator.train.describe import describe_run
from orchestrator.train.faults import FaultStop, SpikeGuard, StepAgreement, StragglerWatch
from parallel.context_parallel import shard_sequence
from parallel.grad import clip_grads_
from parallel.mesh import ParallelDims, build_mesh
from parallel.pipeline_parallel import build_pipeline
from parallel.tensor_parallel import loss_context

DEFAULT_MIN_LR_RATIO = 0.1  # the floor, as a fraction of optim.lr, when neither optim.min_lr nor min_lr_ratio is set


def min_lr_of(o: DictConfig) -> float:
    """The learning rate at the end of the decay: optim.min_lr (absolute), else optim.min_lr_ratio x optim.lr.

    A ratio follows optim.lr, so a sweep over lr never gives a trial whose floor is above its peak.
    validate() refuses both set at once; here an absolute min_lr would win.
    """
    if o.get("min_lr") is not None:
        return o.min_lr
    ratio = o.get("min_lr_ratio")
    return o.lr * (DEFAULT_MIN_LR_RATIO if ratio is None else ratio)


def lr_at(step: int, o: DictConfig, steps: int) -> float:
    """Learning rate of optimizer step `step` (1-based)."""
    if step <= o.warmup_steps:
        return o.lr * step / o.warmup_steps
    if o.schedule == "constant":
        return o.lr
    progress = (step - o.warmup_steps) / max(1, steps - o.warmup_steps)
    floor = min_lr_of(o)
    if o.schedule == "linear":
        return o.lr + (floor - o.lr) * progress
    return floor + 0.5 * (o.lr - floor) * (1 + math.cos(math.pi * progress))


def _value(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor from a loss that may be a (replicated) DTensor under loss parallel."""
    return t.full_tensor() if isinstance(t, DTensor) else t


STOP_FILE = "STOP"  # in the run dir: stop at the next step boundary with a checkpoint, and end cleanly
_STOP_BY_FILE, _STOP_BY_SIGNAL = 1.0, 2.0  # the agreed flag's values; the signal (requeue) wins


def _local(p: torch.Tensor) -> torch.Tensor:
    return p.to_local() if isinstance(p, DTensor) else p


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class Trainer:
    def __init__(self, cfg: DictConfig, env: RankEnv, device: torch.device, run_dir: str, corpus: Corpus,
                 resume: Optional[str] = None, should_stop: Optional[Callable[[], bool]] = None):
        self.cfg, self.env, self.device, self.run_dir = cfg, env, device, run_dir
        par, t = cfg.parallel, cfg.train
        self.dims = ParallelDims.of(par)
        split = cpu_split(env.local_world_size, cfg.eval.tp) if t.eval_tasks and device.type == "cpu" else None
        if split:  # evaluations beside the run take their cores (orchestrator/evaluate/beside.py): the ranks share the others
            torch.set_num_threads(split[0])
        self.mesh = build_mesh(self.dims, device.type)
        self.pp_group = self.mesh["pp"].get_group()
        dp_rank, self.cp_rank = self.mesh["dp"].get_local_rank(), self.mesh["cp"].get_local_rank()

        built = build_model(cfg.model, par, self.mesh, device, t.seed, train_cfg=t)
        self.parts, self.modules, self.n_params = built.parts, built.modules, built.n_params
        self.params = [p for m in self.modules for p in m.parameters()]
        self.dp = built.dp
        # The replicas: dp x cp ranks (each cp rank computes the loss of its part of the sequences).
        self.dp_group = self.dp.dp_mesh.get_group()
        self.compiled = built.compiled
        o = cfg.optim
        self.optim_implementation = resolve_implementation(o.implementation, self.params)
        # One optimizer per model part, as checkpointing helpers take one module per optimizer.
        self.optimizers = [build_adamw(m, o, self.optim_implementation, self.dp.owns) for m in self.modules]
        mask = cfg.data.mask_across_documents  # micro-batches then carry doc_ids (orchestrator/data/dataset.py)
        self.batches = batches_for(corpus, t.seq_len, t.global_batch, t.micro_batch, t.seed, dp_rank, par.dp, mask)
        # The held-out batches: one set, or one per source of a mixture (weighed by the sources' weights).
        held_out = {s.name: (s.weight, s.corpus.eval) for s in corpus.sources} or {None: (1.0, corpus.eval)}
        total_weight = sum(w for w, _ in held_out.values())
        self.eval_data = {name: (w / total_weight, [self._cp_share(b) for b in eval_batches(
            split, t.seq_len, t.eval_sequences, t.micro_batch, dp_rank, par.dp, mask)])
            for name, (w, split) in held_out.items()}
        self.eval_by_source: dict[str, float] = {}  # the last evaluation's loss per source (a mixture)
        self.num_targets: Optional[float] = None  # the loss's divisor while a step runs (_weigh_tokens)
        self.pipeline = None
        if par.pp > 1:
            # A compiled stage leaves the loss to the schedule: compile it too (at pp=1 the model computes it).
            loss_fn = (torch.compile(self._loss_fn, backend=t.compile_backend) if self.compiled == "model"
                       else self._loss_fn)
            self.pipeline = build_pipeline(
                par.schedule, self.parts, built.stage_ids, built.n_stages,
                t.global_batch // (t.micro_batch * par.dp), loss_fn, self.pp_group, device,
            )
        self.step = 0
        ck = cfg.checkpoint
        self.saver = checkpoint.Saver(ck.dir, ck.keep, ck.async_save)
        self.resumed_from = resume
        self.should_stop = should_stop  # a preemption signal arrived on this rank
        self.stop_file = Path(run_dir) / STOP_FILE
        # The data position is step + data_offset: a spike's rollback skips batches (docs/faults.md).
        self.data_offset, self.skipped_steps, self.skipped_in_row, self.rollbacks = 0, 0, 0, 0
        self.kept_wandb_id = None  # the resumed checkpoint's W&B run, where the run dir keeps none
        if resume:
            self.step = checkpoint.load(self.modules, self.optimizers, Path(resume))
            meta = checkpoint.read_marker(Path(resume))
            self.kept_wandb_id = meta.get("wandb_id")
            self.data_offset = meta.get("data_offset", 0)
            self.skipped_steps, self.rollbacks = meta.get("skipped_steps", 0), meta.get("rollbacks", 0)
        self.agreement = StepAgreement(self.dims.world_size, env.rank, device)
        tp_rank = self.mesh["tp"].get_local_rank()
        # One rank per pipeline, dp and cp rank brings the loss to the agreement; dp=cp=tp=0 ranks the pipeline wait.
        self.owns_loss = tp_rank == 0 and (self.pipeline is None or self.pipeline.has_last)
        self.owns_pp_wait = tp_rank == 0 and dp_rank == 0 and self.cp_rank == 0
        self.spike = SpikeGuard(t.spike.factor, t.spike.window) if t.spike.factor else None
        self.stragglers = StragglerWatch(cfg.logging.straggler_factor, cfg.logging.straggler_steps,
                                         str(Path(run_dir) / "ranks"))
        self.watchdog: Optional[StepWatchdog] = None  # started by fit()
        self.first_step_times: list[float] = []

        self.flops_per_token = flops_per_token(built.args, self.n_params, t.seq_len)
        # MFU against one device's dense peak in the compute dtype (orchestrator/build/flops.py).
        self.peak, self.peak_note = run_peak(cfg.logging.peak_tflops, device, t.dtype, env.local_world_size)
        self.stop_requested = 0.0  # the agreed stop flag of the last step (_STOP_BY_*)
        self.is_logger = env.rank == 0
        self.logger = self._make_logger() if self.is_logger else NullLogger()
        if self.logger.wandb is not None:
            describe_run(self.logger.wandb, cfg, self.dims.world_size, env.local_world_size)
        # Benchmarks on checkpoints, beside the run (orchestrator/evaluate/beside.py): rank 0 queues train.eval_tasks', and
        # logs every evaluation's results that reach the run dir while it runs (trident-eval by hand's too, which
        # the live lock tells that the run logs them).
        self.evals: Optional[EvalQueue] = None
        if self.is_logger:
            self.live = hold_live(run_dir, wait_s=60.0, for_good=True)
            self.evals = EvalQueue(cfg, run_dir, env.local_world_size, device.type, self.step + 1 if resume else 0)
            if t.eval_tasks:
                self.saver.on_complete = lambda step, path: self.evals.add(step, path) if due(cfg, step) else None

    def _make_logger(self):
        name, group = run_names(self.cfg)
        # A resumed run logs from the step after its checkpoint's: the steps after it are logged again.
        return MetricsLogger(self.run_dir, self.cfg.logging.wandb, OmegaConf.to_container(self.cfg), name, group,
                             first_step=self.step + 1 if self.resumed_from else 0,
                             kept_id=self.kept_wandb_id)

    def _dp_mean(self, total: torch.Tensor, count: torch.Tensor) -> float:
        both = torch.stack([total, count]).to(torch.float64)
        dist.all_reduce(both, group=self.dp_group)
        return (both[0] / both[1]).item()

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        """A batch tensor on this rank's device: on a GPU through pinned memory, without waiting for the copy."""
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t

    def _loss_fn(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The last pipeline stage's loss (at pp=1 the model computes the same, models/llama.py cross_entropy):
        the mean over the targets, or the sum divided by `num_targets` where the step set one."""
        return token_loss(logits, targets, self.num_targets)

    def _weigh_tokens(self, micro: list) -> Optional[float]:
        """The divisor that makes each micro-batch's summed loss its share of the mean over every target of the
        global batch that counts, or None where every target counts (each micro-batch's mean is that share).

        With document masking the targets across a boundary are IGNORE, unevenly over micro-batches, dp ranks
        and cp ranks: each rank's loss (micro-batch m) is sum_m / (N / (R * M)), N the global batch's targets
        that count (one all-reduce over the R = dp x cp replicas), M micro-batches per rank. Averaged as the
        gradients are, over M and R, that is sum over all / N.
        """
        if not self.cfg.data.mask_across_documents:
            return None
        count = torch.stack([(b[1] != IGNORE).sum() for b in micro]).sum().to(self.device, torch.float64).reshape(1)
        if self.dp_group.size() > 1:
            dist.all_reduce(count, group=self.dp_group)
        # A number, not a tensor: FSDP2 would cast a float tensor argument to the compute dtype (bf16).
        return count.item() / (self.dp_group.size() * len(micro))

    def micro_batches(self, position: int) -> list[tuple]:
        """This rank's micro-batches at a data position (its dp share, and under cp its part of each sequence)."""
        return [self._cp_share(b) for b in self.batches.step(position)]

    def _cp_share(self, batch: tuple) -> tuple:
        """This cp rank's part of every sequence of a micro-batch (inputs, targets[, doc_ids]): its two chunks."""
        if self.dims.cp == 1:
            return batch
        return tuple(shard_sequence(t, self.dims.cp, self.cp_rank) for t in batch)

    def _loss(self, inputs: torch.Tensor, targets: torch.Tensor, doc_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The loss of one micro-batch (its mean, or its sum / num_targets): the part's forward computes it (so a
        compiled part includes it)."""
        kwargs = {} if doc_ids is None else {"doc_ids": self._to_device(doc_ids)}
        if self.num_targets is not None:
            kwargs["num_targets"] = self.num_targets
        return self.parts[0](self._to_device(inputs), self._to_device(targets), **kwargs)

    def _pp_sum(self, value: torch.Tensor) -> torch.Tensor:
        """The loss lives on the last stage: share it with every pp rank (the others add zero)."""
        if self.pipeline is not None:
            dist.all_reduce(value, group=self.pp_group)
        return value

    def zero_grad(self) -> None:
        for p in self.params:  # all of them: a ZeRO-1 optimizer knows only the ones it owns
            p.grad = None

    def forward_backward(self, micro: list) -> torch.Tensor:
        """Accumulate the gradient of the mean loss over the micro-batches, averaged over dp; return the summed
        loss (on the ranks that hold the last pipeline stage; zero on the others)."""
        loss_sum = self._forward_backward(micro)
        self.dp.after_backward()
        return loss_sum

    def _forward_backward(self, micro: list) -> torch.Tensor:
        loss_sum = torch.zeros((), device=self.device)
        self.num_targets = self._weigh_tokens(micro)
        if self.pipeline is not None:
            inputs, targets, *doc_ids = (self._to_device(torch.cat(column)) for column in zip(*micro))
            with loss_context(self.dims.tp):
                losses = self.pipeline.step(inputs, targets, *doc_ids)
            for loss in losses:
                loss_sum += _value(loss.detach())
            return loss_sum
        model = self.parts[0]
        for i, batch in enumerate(micro):  # (inputs, targets[, doc_ids])
            with self.dp.micro_batch(model, last=i == len(micro) - 1), loss_context(self.dims.tp):
                loss = self._loss(*batch)
                (loss / len(micro)).backward()
            loss_sum += _value(loss.detach())
        return loss_sum

    def _phase(self, phase: str) -> None:
        if self.watchdog is not None:
            self.watchdog.phase = phase

    def train_step(self) -> dict:
        """One optimizer step, agreed by every rank: applied, or skipped (non-finite, a spike) on all alike."""
        start = time.perf_counter()
        self.step += 1
        self._phase(f"forward/backward of step {self.step}")
        micro = self.micro_batches(self.step + self.data_offset)
        lr = lr_at(self.step, self.cfg.optim, self.cfg.train.steps)
        loss_sum = self._forward_backward(micro)
        waited = time.perf_counter()
        self.dp.after_backward()
        self._phase(f"the gradient norm of step {self.step}")
        grad_norm = clip_grads_(self.params, self.cfg.optim.grad_clip, self.pp_group)
        pp_wait = self.pipeline.last_wait_s if self.pipeline is not None else None
        arrived = time.perf_counter()
        self._phase(BOUNDARY)
        v = self.agreement.agree(
            stop=self._stop_flag(), loss_sum=loss_sum, grad_norm=grad_norm,
            owns_loss=self.owns_loss, pp_wait_s=pp_wait, owns_pp_wait=self.owns_pp_wait,
            work_s=arrived - start, wait_s=arrived - waited + (pp_wait or 0.0),
            mem_gb=peak_memory_gb(self.device))
        self._phase(f"the optimizer step of step {self.step}")
        self.stop_requested = v.stop
        loss = v.loss_sum / (self.dims.dp * self.dims.cp * len(micro))
        row = {"step": self.step, "loss": loss, "lr": lr, "grad_norm": grad_norm.item()}
        spike_median = None if v.nonfinite or self.spike is None else self.spike.is_spike(loss)
        if v.nonfinite or spike_median is not None:
            # Every rank saw the same vector: all skip this update alike (no weight or AdamW state changes).
            self.zero_grad()
            if v.nonfinite:
                self.skipped_steps += 1
                self.skipped_in_row += 1
                row["skipped"] = True
            else:
                row["spike_median"] = spike_median
        else:
            for opt in self.optimizers:
                for group in opt.param_groups:
                    group["lr"] = lr
                opt.step()
            self.dp.after_step()
            self.zero_grad()
            self.skipped_in_row = 0
            if self.spike is not None:
                self.spike.add(loss)
        row["skipped_steps"] = self.skipped_steps
        if self.rollbacks:
            row["rollbacks"] = self.rollbacks
        if self.pipeline is not None and pp_wait is not None:
            row["pp_wait_s"] = v.pp_wait_s / self.dims.pp  # mean over the pipeline's ranks
            # A rank's step starts when it leaves the last agreement, so the waiting ranks' steps can be longer
            # than rank 0's: the bubble is taken against the longest one (each rank's wait is inside its own step).
            self._slowest_step_s = max(v.work_s)
        stats, message = self.stragglers.update(v)
        row.update(stats)
        if message and self.is_logger:
            console(message)
        return row

    def _eval_loss(self, inputs: torch.Tensor, targets: torch.Tensor, doc_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.pipeline is None:
            return _value(self._loss(inputs, targets, doc_ids))
        t, m = self.cfg.train, self.cfg.model
        sp = self.dims.tp > 1 and self.cfg.parallel.sequence_parallel
        seq = t.seq_len // self.dims.cp
        shape = (inputs.shape[0], seq // self.dims.tp if sp else seq, m.dim)
        doc_ids = self._to_device(doc_ids) if doc_ids is not None else None
        logits = self.pipeline.forward_only(self._to_device(inputs), shape, torch.float32, doc_ids)
        loss = _value(self._loss_fn(logits, self._to_device(targets))) if logits is not None else torch.zeros((), device=self.device)
        return self._pp_sum(loss)

    @torch.no_grad()
    def evaluate(self) -> float:
        """The held-out loss; for a mixture, the sources' losses weighed by their weights (each in
        self.eval_by_source)."""
        losses = {name: (weight, self._evaluate(batches)) for name, (weight, batches) in self.eval_data.items()}
        self.eval_by_source = {name: loss for name, (_, loss) in losses.items() if name is not None}
        return sum(weight * loss for weight, loss in losses.values())

    def _evaluate(self, batches: list) -> float:
        for part in self.parts:
            part.eval()
        total = torch.zeros((), device=self.device, dtype=torch.float64)
        count = torch.zeros((), device=self.device, dtype=torch.float64)
        # Where targets may be IGNORE (document masking), the mean over the targets that count: each batch's
        # loss is its sum (divided by 1); else every sequence weighs the same (the mean of batch means).
        by_token = self.cfg.data.mask_across_documents
        self.num_targets = 1.0 if by_token else None
        for batch in batches:  # (inputs, targets[, doc_ids])
            with loss_context(self.dims.tp):
                loss = self._eval_loss(*batch)
            weight = (batch[1] != IGNORE).sum().item() if by_token else batch[0].shape[0]
            total += loss.double() * (1 if by_token else weight)
            count += weight
        self.num_targets = None
        for part in self.parts:
            part.train()
        return self._dp_mean(total, count)

    def _deadlines(self) -> tuple[float, float]:
        """(a step's deadline, the deadline of evaluation, checkpoints and start-up), in seconds."""
        t = self.cfg.train
        slow = self.cfg.parallel.timeout_s + 30  # collectives there fail by the process-group timeout first
        if t.step_timeout_s is not None:
            return t.step_timeout_s, max(slow, t.step_timeout_s)
        if len(self.first_step_times) < 5:
            return slow, slow
        step = max(60.0, 10 * max(self.first_step_times))
        return step, max(slow, step)

    def _arm(self, phase: str, slow: bool = False) -> None:
        if self.watchdog is not None:
            step, slow_s = self._deadlines()
            self.watchdog.arm(slow_s if slow else step, phase, self.step)

    def _start_watchdog(self) -> None:
        t = self.cfg.train
        setting = (f"train.step_timeout_s={t.step_timeout_s:g}s" if t.step_timeout_s is not None
                   else "the step deadline (train.step_timeout_s=null: 10x the slowest of the first 5 steps, >= 60s)")
        nccl = dist.get_backend() == "nccl"
        self.watchdog = StepWatchdog(self.env.rank, self.dims.world_size, str(Path(self.run_dir) / "ranks"), setting,
                                     on_hang=(lambda: dump_nccl_trace(self.env.rank)) if nccl else None,
                                     announce=self.env.source != "local")
        self._arm("start-up (the first evaluation)", slow=True)

    def fit(self) -> dict:
        self._start_watchdog()
        try:
            return self._fit()
        finally:
            self.watchdog.stop()

    def _can_save(self, row: dict) -> bool:
        """After a skipped (non-finite) step, save only if every weight is still finite: a checkpoint is never
        poisoned. One collective, at such checkpoints only."""
        if not row.get("skipped"):
            return True
        bad = torch.tensor(float(any(not torch.isfinite(_local(p)).all() for p in self.params)), device=self.device)
        dist.all_reduce(bad)
        if bad.item() and self.is_logger:
            console(f"trident: checkpoint of step {self.step} not written: non-finite weights (the newest "
                    "checkpoint stays the last good one)")
        return not bad.item()

    def _fault_stop(self, message: str, row: Optional[dict] = None) -> None:
        """End the run on every rank alike (they all took the same decision); the newest good checkpoint stays."""
        if row is not None:
            self.logger.log(row)
        self.saver.wait()
        if self.is_logger:
            console(f"trident: {message}")
            Path(self.run_dir, "fault.json").write_text(json.dumps({"step": self.step, "message": message,
                                                                    "restart": False}))
        self._leave()
        raise FaultStop(message)

    def _rollback(self, row: dict) -> None:
        """A spike at this step: back to the newest checkpoint before it, skipping batches from there on."""
        sp, spiked = self.cfg.train.spike, self.step
        what = (f"loss spike at step {spiked}: {row['loss']:.4f} > train.spike.factor={sp.factor:g} x the median "
                f"{row['spike_median']:.4f} of the last {sp.window} steps")
        if self.rollbacks >= sp.max_rollbacks:
            self._fault_stop(f"{what}; train.spike.max_rollbacks={sp.max_rollbacks} rollbacks already done", row)
        self.saver.wait()
        before = [p for p in checkpoint.complete_checkpoints(self.cfg.checkpoint.dir)
                  if checkpoint.read_marker(p)["step"] < spiked]
        self.rollbacks += 1
        row["rollbacks"] = self.rollbacks
        if not before:
            self.skipped_steps += 1
            row.update(skipped=True, skipped_steps=self.skipped_steps)
            self.logger.log(row)
            if self.is_logger:
                console(f"trident: {what}; no checkpoint before it to roll back to: the step is skipped")
            return
        self.logger.log(row)
        self._arm(f"rolling back to {before[-1]}", slow=True)
        back_to = checkpoint.load(self.modules, self.optimizers, before[-1])
        self.logger.rewind(back_to + 1)  # the steps after it are logged again, W&B's rows replaced
        if self.evals is not None:
            self.evals.rewind(back_to + 1)
        skip = max(sp.skip_batches, spiked - back_to)  # the batches since the checkpoint, at least
        self.data_offset += skip
        self.step = back_to
        if self.is_logger:
            console(f"trident: {what}; rolled back to {before[-1]} (step {back_to}) and skipped {skip} batches "
                    f"(rollback {self.rollbacks} of at most {sp.max_rollbacks})")

    def _fit(self) -> dict:
        t, lg = self.cfg.train, self.cfg.logging
        tokens_per_step = t.global_batch * t.seq_len
        first_eval = None
        if self.resumed_from is None:
            first_eval = self.evaluate()
            self.logger.log({"step": self.step, "eval_loss": first_eval, **self._by_source()})
        if self.is_logger:
            console(self._banner(first_eval))
        start = time.perf_counter()
        train_time, row, steps_run = 0.0, {}, 0
        if self.step >= t.steps:
            if self.is_logger:
                console(f"trident: nothing to do, the checkpoint is at step {self.step} of train.steps={t.steps}")
            if self.evals is not None and self.evals.busy():  # evaluations an earlier attempt left: waited for
                return {"steps": self.step, AFTER_RANKS: lambda: self._after_evaluations({"steps": self.step})}
            self._leave()
            return {"steps": self.step}
        while self.step < t.steps:
            self._arm(f"step {self.step + 1}")
            t0 = time.perf_counter()
            row = self.train_step()
            dt = time.perf_counter() - t0
            if len(self.first_step_times) < 5:
                self.first_step_times.append(dt)
            train_time += dt
            steps_run += 1
            tokens_per_s = tokens_per_step / dt
            row.update(
                tokens_per_s=tokens_per_s,
                mfu=mfu(self.flops_per_token, tokens_per_s, self.peak, self.dims.world_size),
                mem_peak_gb=peak_memory_gb(self.device),
                step_time_s=dt,
            )
            if isinstance(self.batches, MixtureBatches):  # what each source gave so far, and its epochs
                position = self.step + self.data_offset
                row.update({f"tokens/{n}": v for n, v in self.batches.tokens_seen(position).items()})
                row.update({f"epochs/{n}": v for n, v in self.batches.epochs(position).items()})
            if "pp_wait_s" in row:
                # The measured bubble: time blocked on pipeline p2p against the step.
                row["pp_bubble"] = row["pp_wait_s"] / max(dt, self._slowest_step_s)
            if row.get("skipped"):
                bad = f"non-finite loss ({row['loss']}) or gradient norm ({row['grad_norm']}) at step {self.step}"
                if t.nonfinite == "stop":
                    self._fault_stop(f"{bad} (train.nonfinite=stop); the newest checkpoint is the last good one", row)
                if self.skipped_in_row > t.max_skipped_steps:
                    self._fault_stop(f"{bad}: {self.skipped_in_row} steps in a row skipped, more than "
                                     f"train.max_skipped_steps={t.max_skipped_steps}", row)
                if self.is_logger:
                    console(f"trident: {bad}: step skipped on every rank ({self.skipped_steps} so far, "
                            f"{self.skipped_in_row} in a row; train.nonfinite=skip)")
            if "spike_median" in row:
                self._rollback(row)
                continue
            last = self.step == t.steps
            if (t.eval_every and self.step % t.eval_every == 0) or last:
                self._arm(f"evaluation after step {self.step}", slow=True)
                row["eval_loss"] = self.evaluate()
                row.update(self._by_source())
            ckpt = self.cfg.checkpoint
            if ((ckpt.every and self.step % ckpt.every == 0) or (last and ckpt.at_end)) and self._can_save(row):
                self._arm(f"the checkpoint of step {self.step}", slow=True)
                t0 = time.perf_counter()
                self.last_checkpoint = self.saver.save(self.modules, self.optimizers, self.step, self._checkpoint_meta())
                # What the loop waited for: the whole write, or only the staging of an async save.
                row["checkpoint_blocked_s"] = time.perf_counter() - t0
            evaluated = self.evals.take(self.step) if self.evals is not None else {}
            row.update(evaluated)  # an evaluation's results that came in since the last row
            if self.step % lg.every == 0 or last or "eval_loss" in row or "checkpoint_blocked_s" in row \
                    or row.get("skipped") or "straggler_rank" in row or evaluated:
                self.logger.log(row)
            if self.is_logger and (self.step % lg.console_every == 0 or last or self.step == 1):
                console(progress_line(self.step, t.steps, row, time.perf_counter() - start))
            why = 0.0 if last else (_STOP_BY_SIGNAL if self.stop_requested >= _STOP_BY_SIGNAL
                                    else _STOP_BY_FILE if self.stop_requested > 0 else 0.0)
            if why:
                if "checkpoint_blocked_s" not in row:
                    self._arm(f"the preemption checkpoint of step {self.step}", slow=True)
                    self.last_checkpoint = self.saver.save(self.modules, self.optimizers, self.step,
                                                           self._checkpoint_meta())
                self.saver.wait()
                preempted = why == _STOP_BY_SIGNAL
                if self.is_logger:
                    cause = "preempted" if preempted else f"stopped ({self.stop_file} exists)"
                    console(f"trident: {cause} at step {self.step}; checkpoint {self.last_checkpoint}")
                self._leave()
                return {"steps": self.step, "preempted" if preempted else "stopped": True,
                        "checkpoint": self.last_checkpoint}
        self._arm("the last checkpoint's write", slow=True)
        self.saver.wait()
        summary = {
            "steps": self.step,
            "train_loss": row.get("loss"),
            "eval_loss_start": first_eval,
            "eval_loss": row.get("eval_loss"),
            "tokens_per_s": tokens_per_step * steps_run / train_time if train_time else 0.0,
            "wall_s": time.perf_counter() - start,
            "checkpoint": getattr(self, "last_checkpoint", None),
            "skipped_steps": self.skipped_steps,
            "rollbacks": self.rollbacks,
        }
        summary["mfu"] = mfu(self.flops_per_token, summary["tokens_per_s"], self.peak, self.dims.world_size)
        if self.logger.wandb is not None:  # beside the planner's planner/* fields
            self.logger.wandb.summary({"measured/step_s": train_time / max(steps_run, 1), "measured/mfu": summary["mfu"],
                                       "measured/tokens_per_s": summary["tokens_per_s"],
                                       "measured/mem_gb_max": row.get("rank_mem_gb_max")})
        if self.is_logger:
            console(self._summary(summary))
        if self.evals is not None and self.evals.busy():
            # The evaluations left are waited for once every rank is done (launch/rank.py AFTER_RANKS): no rank
            # waits in a collective meanwhile.
            return {**summary, AFTER_RANKS: lambda: self._after_evaluations(summary)}
        return self._after_evaluations(summary) if self.evals is not None else self._leave() or summary

    def _after_evaluations(self, summary: dict) -> dict:
        """The logging rank, after the run: the training's memory let go, wait for the evaluations left and log
        their results after the last step's row."""
        if self.evals.busy():
            self.parts = self.modules = self.optimizers = self.params = self.pipeline = None
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        self.evals.finish()
        step = self.step + 1
        while fields := self.evals.take(step):  # each evaluation's row after the last step's
            self.logger.log({"step": step, **fields})
            step += 1
        self.logger.finish()
        return summary

    def _leave(self) -> None:
        """The run ends early: the evaluations go on (or wait) by themselves; the logs close."""
        if self.evals is not None:
            self.evals.leave()
        self.logger.finish()

    def _stop_flag(self) -> float:
        """This rank's wish to stop: 0 none, by the stop file (rank 0 looks), by a signal (which wins)."""
        if self.should_stop is not None and self.should_stop():
            return _STOP_BY_SIGNAL
        if self.is_logger and self.stop_file.exists():  # one rank looks: the all-reduce tells the others
            return _STOP_BY_FILE
        return 0.0

    def _checkpoint_meta(self) -> dict:
        d, t = self.dims, self.cfg.train
        return {
            "samples_seen": (self.step + self.data_offset) * t.global_batch,  # the data position, layout-independent
            "data_offset": self.data_offset,  # batches skipped by spike rollbacks: step s reads batch s + data_offset
            "skipped_steps": self.skipped_steps,
            "rollbacks": self.rollbacks,
            "layout": {"tp": d.tp, "pp": d.pp, "dp": d.dp, "cp": d.cp, "schedule": self.cfg.parallel.schedule},
            "config": OmegaConf.to_container(self.cfg),
            "wandb_id": self.logger.wandb_id,  # rank 0's: it writes this marker
        }

    def _by_source(self) -> dict:
        return {f"eval_loss/{name}": loss for name, loss in self.eval_by_source.items()}

    def _banner(self, first_eval: Optional[float]) -> str:
        d = self.dims
        start = (
            f"resumed from {self.resumed_from} at step {self.step}" if first_eval is None
            else f"eval loss at step 0: {first_eval:.4f}"
        )
        t = self.cfg.train
        levers = [t.dtype]
        if t.activation_checkpointing != "none":
            levers.append(f"activation checkpointing {t.activation_checkpointing}")
        if t.compile:
            levers.append(f"compiled: {self.compiled}" if self.compiled else "eager (compile failed)")
        if t.loss_chunks > 1:
            levers.append(f"loss in {t.loss_chunks} chunks")
        levers.append(f"AdamW {self.optim_implementation}")
        return (
            f"trident: {self.cfg.model.name} ({fmt_count(self.n_params)} parameters) on {d.world_size} rank(s) "
            f"tp={d.tp} pp={d.pp} dp={d.dp}{f' cp={d.cp}' if d.cp > 1 else ''} ({self.cfg.parallel.dp_shard}), "
            f"{self.device.type}, "
            f"{', '.join(levers)}; {start}"
        )

    def _summary(self, s: dict) -> str:
        lines = [
            f"trident: done, {s['steps']} steps in {fmt_duration(s['wall_s'])}",
            f"  loss        train {s['train_loss']:.4f} | eval "
            + (f"{s['eval_loss_start']:.4f} -> " if s["eval_loss_start"] is not None else "")
            + f"{s['eval_loss']:.4f} (nats per token)",
            f"  throughput  {fmt_count(s['tokens_per_s'])} tokens/s, MFU {100 * s['mfu']:.2f}% "
            f"(peak {self.peak / 1e9:.0f} GFLOP/s per rank: {self.peak_note})",
            f"  run dir     {self.run_dir}",
            f"  metrics     {Path(self.run_dir) / 'metrics.jsonl'}",
        ]
        if s["checkpoint"]:
            lines.append(f"  checkpoint  {s['checkpoint']}")
        if s["skipped_steps"] or s["rollbacks"]:
            lines.append(f"  faults      {s['skipped_steps']} step(s) skipped (non-finite), "
                         f"{s['rollbacks']} rollback(s) after loss spikes")
        if self.logger.wandb is not None:
            w = self.logger.wandb
            hint = f" (offline: `wandb sync {w.folder}/offline-run-*-{w.id}*`)" \
                if self.cfg.logging.wandb.mode == "offline" else ""
            lines.append(f"  W&B run     {w.id} in {w.folder}{hint}")
        return "\n".join(lines)


def run_worker(env: RankEnv, device: torch.device, cfg_dict: dict, run_dir: str, corpus: Corpus,
               resume: Optional[str] = None, should_stop: Optional[Callable[[], bool]] = None) -> dict:
    """The per-rank entry point the launchers call; returns the run's summary."""
    return Trainer(OmegaConf.create(cfg_dict), env, device, run_dir, corpus, resume, should_stop).fit()
