"""`trident-plan`: every valid layout of a model on a cluster, its per-GPU memory and predicted step time.

    trident-plan model=llama3-70b cluster.gpus=256 train.seq_len=8192 train.global_batch=1024 \\
        train.dtype=bf16 [--top K] [--json] [--sweep K]

It composes the same conf/ tree as trident-train (conf/plan.yaml = train.yaml
+ a cluster), varies parallel.tp/pp/dp, train.micro_batch and
parallel.schedule, and keeps exactly the layouts that trident-train's own
validation accepts. For each it gives the worst rank's memory (model state
measured from the real sharding code on the meta device, activations from
`orchestrator.memory`'s formula) and a step time from an analytic model:

  compute   model FLOPs (orchestrator/flops.py; + one forward of the
            recomputed blocks) / (gpus x peak x mfu)
  tp        per block and micro-batch, 2 all-reduces forward and 2 backward
            (or their all-gather / reduce-scatter halves under sequence
            parallelism, the same volume) of micro_batch x seq x dim
            activations, ring volume 2(tp-1)/tp, over NVLink while the tp
            group fits in a node
  pp        each micro-batch's activations sent across every stage boundary,
            forward and backward
  bubble    (compute + tp + pp) / (1 - bubble), the idle fraction of the
            schedule (parallel/bubble.py: analytic, or replayed from torch's
            own action lists)
  dp        FSDP2: two all-gathers per micro-batch (forward, backward) and one
            reduce-scatter per step of the rank's parameters, overlapped with
            compute (only the excess shows); ZeRO-1 and tp>1 replicate: an
            all-reduce (+ ZeRO-1's broadcast) after backward, not overlapped;
            DDP: an all-reduce overlapped with backward

The times are for ranking; `rel` is a layout's step time over the best
fitting one's.
"""

import json
import re
import sys
import time
from dataclasses import asdict, dataclass
from functools import lru_cache

from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import InterpolationResolutionError

from models.llama import ModelArgs
from orchestrator.flops import flops_per_token
from orchestrator.memory import (
    GiB, RankMemory, layout_memory, orders_microbatches, probe_shards, schedule_orders,
)
from orchestrator.validate import ConfigError, divisors, validate
from parallel.bubble import analytic_bubble, simulate
from parallel.pipeline import SCHEDULES, stages_per_rank

# Forward passes recomputed in backward, per block, by train.activation_checkpointing (levers.ac_layers).
RECOMPUTED = {"none": 0.0, "selective": 0.5, "full": 1.0}


@dataclass
class Layout:
    tp: int
    pp: int
    dp: int
    micro_batch: int
    schedule: str  # "-" without pipeline parallelism
    microbatches: int  # per dp rank and step
    worst: RankMemory  # the pp rank with the most memory
    fits: bool
    bubble: float
    compute_s: float
    tp_s: float
    pp_s: float
    dp_s: float  # the exposed part
    step_s: float
    mfu: float
    rel: float = 0.0

    def overrides(self) -> dict:
        sched = {} if self.pp == 1 else {"schedule": self.schedule}
        return {"parallel": {"tp": self.tp, "pp": self.pp, "dp": self.dp, **sched},
                "train": {"micro_batch": self.micro_batch}}


def candidates(cfg: DictConfig):
    """Every (tp, pp, dp, micro_batch, schedule) on cluster.gpus, before validation."""
    gpus, t = cfg.cluster.gpus, cfg.train
    for tp in divisors(gpus):
        for pp in divisors(gpus // tp):
            dp = gpus // (tp * pp)
            if t.global_batch % dp:
                continue
            for mb in divisors(t.global_batch // dp):
                for schedule in (SCHEDULES if pp > 1 else [cfg.parallel.schedule]):
                    yield tp, pp, dp, mb, schedule


def set_layout(c: DictConfig, tp, pp, dp, mb, schedule) -> None:
    with open_dict(c):
        c.parallel.tp, c.parallel.pp, c.parallel.dp, c.parallel.schedule = tp, pp, dp, schedule
        c.parallel.microbatches = None
        c.parallel.cut_points = None
        c.train.micro_batch = mb
        c.launcher.nprocs = None


def bubble_of(schedule: str, pp: int, m: int, per_rank) -> float:
    if pp == 1:
        return 0.0
    v = stages_per_rank(schedule, per_rank)
    exact = analytic_bubble(schedule, pp, m, v)
    if exact is not None:
        return exact
    # Replayed with at most 2 pp micro-batches: the idle time stops growing there, the busy time grows 3v per one.
    idle = _idle_units(schedule, pp, orders_microbatches(schedule, pp, m), per_rank)
    return idle / (idle + pp * 3 * v * m)


@lru_cache(maxsize=512)
def _idle_units(schedule: str, pp: int, m: int, per_rank) -> float:
    """Idle time summed over the ranks, in units of one forward of one stage (parallel/bubble.py's costs)."""
    orders, n_stages = schedule_orders(schedule, pp, m, per_rank)
    sim = simulate(orders, n_stages)
    return sim["bubble"] * sim["makespan"] * pp


def step_time(cfg: DictConfig, mem: RankMemory, n_params: int, bubble: float, args: ModelArgs) -> dict:
    cl, par, t, m_cfg = cfg.cluster, cfg.parallel, cfg.train, cfg.model
    gpus = par.tp * par.pp * par.dp
    m = t.global_batch // (t.micro_batch * par.dp)
    act = 2 if t.get("dtype", "fp32") == "bf16" else 4
    dtype_peak = cl.peak_tflops[t.get("dtype", "fp32")] * 1e12
    peak = dtype_peak * cl.mfu
    flops = flops_per_token(args, n_params, t.seq_len) * t.global_batch * t.seq_len
    recompute = RECOMPUTED[t.get("activation_checkpointing", "none")]
    block_flops = 1 - args.vocab_size * args.dim * 6 / max(1.0, flops_per_token(args, n_params, t.seq_len))
    compute_s = flops * (1 + recompute * block_flops / 3) / (gpus * peak)
    gb = 1e9
    intra, inter = cl.intra_node_gbps * gb, cl.inter_node_gbps * gb
    tokens = t.micro_batch * t.seq_len
    layers = m_cfg.n_layers / par.pp
    # 4 collectives per block (2 forward, 2 backward); a recomputed forward repeats its 2.
    tp_bytes = m * layers * (4 + 2 * recompute) * 2 * (par.tp - 1) / par.tp * tokens * args.dim * act
    tp_s = tp_bytes / (intra if par.tp <= cl.gpus_per_node else inter)
    sp = par.tp if par.tp > 1 and par.sequence_parallel else 1
    v = stages_per_rank(par.schedule, par.stages_per_rank) if par.pp > 1 else 1
    # Activations cross stage boundaries in fp32 (parallel/pipeline.py), each way.
    pp_bytes = 0 if par.pp == 1 else m * v * 2 * tokens * args.dim / sp * 4
    pp_s = pp_bytes / (inter if par.tp * par.dp >= cl.gpus_per_node else intra)
    dp_bw = intra if par.tp * par.dp <= cl.gpus_per_node else inter
    frac = (par.dp - 1) / par.dp
    # The parameters of this rank's stages, whole over dp (weights are stored fp32: 4 bytes each).
    stage_params = mem.params / 4 * (par.dp if par.dp_shard == "full" else 1)
    if par.dp_shard == "full":  # all-gathers in the compute dtype, reduce-scatter in fp32
        dp_s = max(0.0, frac * stage_params * (2 * m * act + 4) / dp_bw - compute_s)
    elif par.dp_shard == "optimizer":  # all-reduce (2 frac) + broadcast (frac), fp32
        dp_s = 3 * frac * stage_params * 4 / dp_bw
    else:  # DDP overlaps its all-reduce with backward; with tp > 1 the loop reduces after it
        dp_s = 2 * frac * stage_params * 4 / dp_bw
        dp_s = dp_s if par.tp > 1 else max(0.0, dp_s - compute_s * 2 / 3)
    if par.dp == 1:
        dp_s = 0.0
    step = (compute_s + tp_s + pp_s) / (1 - bubble) + dp_s
    return {"compute_s": compute_s, "tp_s": tp_s, "pp_s": pp_s, "dp_s": dp_s, "step_s": step,
            "mfu": flops / (step * gpus * dtype_peak)}


def n_params_of(cfg: DictConfig) -> int:
    import torch

    from models.llama import Transformer, num_params

    with torch.device("meta"):
        return num_params(Transformer(ModelArgs.from_config(cfg.model)))


def plan(cfg: DictConfig) -> tuple[list[Layout], dict]:
    """Every valid layout, best first (fitting ones first, then by predicted step time)."""
    started = time.perf_counter()
    cl = cfg.cluster
    try:  # resolved once, not per layout (${hydra:...} resolves only inside the Hydra app)
        work = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    except InterpolationResolutionError:
        work = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    rejected: dict[str, int] = {}
    valid = []
    for tp, pp, dp, mb, schedule in candidates(cfg):
        set_layout(work, tp, pp, dp, mb, schedule)
        try:
            validate(work)
        except ConfigError as e:
            reason = re.match(r"[\w.]+", str(e)).group(0)  # the setting it names
            rejected[reason] = rejected.get(reason, 0) + 1
            continue
        valid.append((tp, pp, dp, mb, schedule))
    n_params = n_params_of(cfg)
    args = ModelArgs.from_config(cfg.model)
    shards = {}
    for tp, pp, dp, _, _ in valid:
        if (tp, pp, dp) not in shards:
            set_layout(work, tp, pp, dp, 1, "1f1b")
            shards[tp, pp, dp] = probe_shards(work)
    rows = []
    budget = (cl.gpu_memory_gb - cl.memory_reserve_gb) * GiB
    for tp, pp, dp, mb, schedule in valid:
        set_layout(work, tp, pp, dp, mb, schedule)
        ranks = layout_memory(work, shards[tp, pp, dp], args)
        worst = max(ranks, key=lambda r: r.total)
        m = cfg.train.global_batch // (mb * dp)
        bubble = bubble_of(schedule, pp, m, cfg.parallel.stages_per_rank)
        times = step_time(work, worst, n_params, bubble, args)
        rows.append(Layout(tp, pp, dp, mb, schedule if pp > 1 else "-", m, worst, worst.total <= budget, bubble,
                           **times))
    rows.sort(key=lambda r: (not r.fits, r.step_s))
    best = next((r.step_s for r in rows if r.fits), rows[0].step_s if rows else 1.0)
    for r in rows:
        r.rel = r.step_s / best
    info = {"candidates": len(valid) + sum(rejected.values()), "valid": len(valid),
            "fit": sum(r.fits for r in rows), "rejected": rejected, "n_params": n_params,
            "seconds": time.perf_counter() - started}
    return rows, info


def memory_unit(totals) -> tuple[str, int]:
    """GiB, or MiB for models too small to show in GiB."""
    return ("GiB", GiB) if max(totals, default=0) >= GiB else ("MiB", 2**20)


def table(rows: list[Layout], cfg: DictConfig, info: dict, top=None) -> str:
    cl, t = cfg.cluster, cfg.train
    unit, size = memory_unit(r.worst.total for r in rows[:top])
    head = (f"trident-plan: {cfg.model.name} ({info['n_params'] / 1e9:.2f}B parameters) on {cl.gpus} x {cl.name} "
            f"({cl.gpus_per_node} per node, {cl.gpu_memory_gb:g} GiB, {cl.memory_reserve_gb:g} reserved); "
            f"seq_len={t.seq_len} global_batch={t.global_batch} dtype={t.get('dtype', 'fp32')} "
            f"dp_shard={cfg.parallel.dp_shard} ac={t.get('activation_checkpointing', 'none')}\n"
            f"{info['valid']} valid layouts of {info['candidates']} ({info['fit']} fit); "
            f"planned in {info['seconds']:.1f} s. Memory: {unit} per GPU on the fullest rank.")
    cols = ("tp", "pp", "dp", "mb", "schedule", "m", "params", "grads", "optim", "act", "other", "total", "fits",
            "bubble", "MFU", "step_s", "rel")
    lines = [head, "  ".join(f"{c:>8}" if i > 4 else f"{c:>4}" if c != "schedule" else f"{c:<16}"
                             for i, c in enumerate(cols))]
    for r in rows[:top]:
        w = r.worst
        cells = [f"{r.tp:>4}", f"{r.pp:>4}", f"{r.dp:>4}", f"{r.micro_batch:>4}", f"{r.schedule:<16}",
                 f"{r.microbatches:>8}", *(f"{x / size:>8.1f}" for x in (w.params, w.grads, w.optim, w.activations,
                                                                    w.other, w.total)),
                 f"{'yes' if r.fits else 'no':>8}", f"{r.bubble:>8.3f}", f"{100 * r.mfu:>7.1f}%",
                 f"{r.step_s:>8.3g}", f"{r.rel:>8.2f}"]
        lines.append("  ".join(cells))
    if top is not None and len(rows) > top:
        lines.append(f"... {len(rows) - top} more (--top N)")
    if not info["fit"]:
        lines.append("No layout fits: try train.dtype=bf16, train.activation_checkpointing=full, more GPUs "
                     "(cluster.gpus) or a shorter train.seq_len.")
    return "\n".join(lines)


def sweep_lines(rows: list[Layout], cfg: DictConfig, k: int) -> list[str]:
    """The best k fitting layouts as trident-train -m lines (one per micro-batch size: a sweep is a product)."""
    best = [r for r in rows if r.fits][:k]
    by_mb: dict[int, list[Layout]] = {}
    for r in best:
        by_mb.setdefault(r.micro_batch, []).append(r)
    lines = []
    for mb, group in by_mb.items():
        values = ",".join(
            "'{" + ",".join(f"{k}:{v}" for k, v in r.overrides()["parallel"].items()) + "}'" for r in group)
        # The line sets these itself: the user's own values for them would clash (Hydra refuses a key twice).
        taken = {"train.micro_batch"} | {f"parallel.{key}" for r in group for key in r.overrides()["parallel"]}
        mine = [o for o in sys_overrides() if o.partition("=")[0].lstrip("+~") not in taken]
        lines.append(" ".join(["trident-train -m", *mine, f"train.micro_batch={mb}", f"parallel={values}"]))
    return lines


def sys_overrides() -> list[str]:
    """The user's own overrides, minus the cluster's (trident-train has no cluster)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return [o for o in HydraConfig.get().overrides.task if not o.lstrip("+~").startswith("cluster")]
    except ValueError:
        return []


def as_json(rows: list[Layout], info: dict, top=None) -> str:
    out = []
    for r in rows[:top]:
        d = asdict(r)
        w = d.pop("worst")
        d["memory_gib"] = {k: w[k] / GiB for k in ("params", "grads", "optim", "activations", "other")}
        d["memory_gib"]["total"] = r.worst.total / GiB
        d["worst_pp_rank"] = w["pp_rank"]
        out.append(d)
    return json.dumps({**info, "layouts": out}, indent=1)


# ---- dry run: one layout, every pp rank's stages built whole ----

def dry_run(cfg: DictConfig) -> str:
    """Build every pp rank's stages of this layout at its full world size on the meta device; report memory."""
    from orchestrator.memory import build_meta, measured_params, state_memory

    par, t = cfg.parallel, cfg.train
    started = time.perf_counter()
    shards = probe_shards(cfg)
    ranks = layout_memory(cfg, shards)
    unit, size = memory_unit(r.total for r in ranks)
    lines = [f"trident: dry run of {cfg.model.name} at tp={par.tp} pp={par.pp} dp={par.dp} "
             f"({par.tp * par.pp * par.dp} ranks, dp_shard={par.dp_shard}, dtype={t.get('dtype', 'fp32')}, "
             f"micro_batch={t.micro_batch}, schedule={par.schedule if par.pp > 1 else '-'}): {unit} per rank"]
    lines.append(f"  {'pp rank':>7}  {'params':>8}  {'grads':>8}  {'optim':>8}  {'act':>8}  {'other':>8}  {'total':>8}")
    for r in ranks:
        # The whole stage, built as a rank would build it (dp rank 0, tp rank 0: the largest shards).
        built = build_meta(cfg, r.pp_rank * par.dp * par.tp)
        st = state_memory(measured_params(cfg, built), par.dp_shard, par.dp)
        assert (st.params, st.grads, st.optim) == (r.params, r.grads, r.optim), "probe and full build disagree"
        lines.append(f"  {r.pp_rank:>7}  " + "  ".join(f"{x / size:>8.1f}" for x in (
            r.params, r.grads, r.optim, r.activations, r.other, r.total)))
    lines.append(f"  built {par.pp} pp rank(s)' stages in {time.perf_counter() - started:.1f} s; the config passed "
                 "every check made before launch (the data is not read in a dry run). "
                 "`trident-plan` compares every layout against a GPU's memory.")
    return "\n".join(lines)


# ---- the command ----

def _flags(argv: list[str]) -> tuple[dict, list[str]]:
    """--top K, --json, --sweep K: output options, taken out before Hydra reads the overrides."""
    flags, rest, i = {"top": None, "json": False, "sweep": None}, [], 0
    while i < len(argv):
        a = argv[i]
        if a in ("--top", "--sweep"):
            if i + 1 >= len(argv) or not argv[i + 1].isdigit():
                raise SystemExit(f"trident-plan: {a} needs a number")
            flags[a[2:]] = int(argv[i + 1])
            i += 2
            continue
        if a == "--json":
            flags["json"] = True
        else:
            rest.append(a)
        i += 1
    return flags, rest


def run(cfg: DictConfig, flags: dict) -> None:
    rows, info = plan(cfg)
    if not rows:
        raise ConfigError(f"no valid layout of {cfg.model.name} on cluster.gpus={cfg.cluster.gpus}: "
                          + "; ".join(f"{n} rejected by {k}" for k, n in info["rejected"].items()))
    top = flags["top"]
    print(as_json(rows, info, top) if flags["json"] else table(rows, cfg, info, top))
    if flags["sweep"]:
        print("\n".join(sweep_lines(rows, cfg, flags["sweep"])), file=sys.stderr if flags["json"] else sys.stdout)


def _hydra_app(flags: dict):
    import hydra

    from orchestrator.train import CONF_DIR

    @hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="plan")
    def app(cfg: DictConfig) -> None:
        try:
            run(cfg, flags)
        except ConfigError as e:
            print(f"trident-plan: config error: {e}", file=sys.stderr, flush=True)
            sys.exit(2)

    return app


def main() -> None:
    from orchestrator.config import register

    flags, sys.argv[1:] = _flags(sys.argv[1:])
    register()
    _hydra_app(flags)()


if __name__ == "__main__":
    main()
