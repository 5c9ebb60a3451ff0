"""The planner's output: a table for people, JSON for programs, Hydra -m lines for trident-train."""

import json
from dataclasses import asdict

from omegaconf import DictConfig

from orchestrator.planner.layouts import Layout
from orchestrator.planner.memory import GiB


def memory_unit(totals) -> tuple[str, int]:
    """GiB, or MiB for models too small to show in GiB."""
    return ("GiB", GiB) if max(totals, default=0) >= GiB else ("MiB", 2**20)


def table(rows: list[Layout], cfg: DictConfig, info: dict, top=None) -> str:
    cl, t = cfg.cluster, cfg.train
    unit, size = memory_unit(r.worst.total for r in rows[:top])
    head = (f"trident-plan: {cfg.model.name} ({info['n_params'] / 1e9:.2f}B parameters) on {cl.gpus} x {cl.name} "
            f"({cl.gpus_per_node} per node, {cl.gpu_memory_gb:g} GiB, {cl.memory_reserve_gb:g} reserved); "
            f"seq_len={t.seq_len} global_batch={t.global_batch} dtype={t.dtype} "
            f"dp_shard={cfg.parallel.dp_shard} ac={t.activation_checkpointing}\n"
            f"{info['valid']} valid layouts of {info['candidates']} ({info['fit']} fit); "
            f"planned in {info['seconds']:.1f} s. Memory: {unit} per GPU on the fullest rank.")
    cols = ("tp", "pp", "dp", "cp", "mb", "schedule", "m", "params", "grads", "optim", "act", "other", "total", "fits",
            "bubble", "comm", "MFU", "step_s", "rel")
    lines = [head, "  ".join(f"{c:>8}" if i > 5 else f"{c:>4}" if c != "schedule" else f"{c:<16}"
                             for i, c in enumerate(cols))]
    for r in rows[:top]:
        w = r.worst
        cells = [f"{r.tp:>4}", f"{r.pp:>4}", f"{r.dp:>4}", f"{r.cp:>4}", f"{r.micro_batch:>4}", f"{r.schedule:<16}",
                 f"{r.microbatches:>8}", *(f"{x / size:>8.1f}" for x in w.shown()),
                 f"{'yes' if r.fits else 'no':>8}", f"{r.bubble:>8.3f}", f"{100 * r.comm_share:>7.0f}%",
                 f"{100 * r.mfu:>7.1f}%",
                 f"{r.step_s:>8.3g}", f"{r.rel:>8.2f}"]
        lines.append("  ".join(cells))
    if top is not None and len(rows) > top:
        lines.append(f"... {len(rows) - top} more (--top N)")
    reason = why_best(rows)
    if reason:
        lines.append(reason)
    lines.append("comm: the share of the step spent in communication (tp, cp, pp, exposed dp, the loop's own); step_s from "
                 f"cluster={cl.name}'s " + ("measured figures (trident-plan --calibrate)" if cl.get("compute")
                                            else "link figures and mfu"))
    if not info["fit"]:
        lines.append("No layout fits: try train.dtype=bf16, train.activation_checkpointing=full, more GPUs "
                     "(cluster.gpus) or a shorter train.seq_len.")
    return "\n".join(lines)


def layout_name(r: Layout) -> str:
    return (f"tp={r.tp} pp={r.pp} dp={r.dp}" + (f" cp={r.cp}" if r.cp > 1 else "") + f" mb={r.micro_batch}"
            + (f" {r.schedule}" if r.pp > 1 else ""))


def why_best(rows: list[Layout]) -> str:
    """One line: why the best fitting layout wins, against the best one of another tp degree (the question a
    plan answers first: does TP pay here?), or of another pp degree: the term that costs the rival most."""
    fitting = [r for r in rows if r.fits]
    if len(fitting) < 2:
        return ""
    best = fitting[0]
    rival = next((r for r in fitting if r.tp != best.tp), None) or next((r for r in fitting if r.pp != best.pp),
                                                                      fitting[1])
    stretch = lambda r: r.step_s - (r.compute_s + r.tp_s + r.cp_s + r.pp_s + r.dp_s + r.loop_s)  # noqa: E731
    terms = {
        "compute": (rival.compute_s - rival.overhead_s) - (best.compute_s - best.overhead_s),
        f"per-block overhead (dispatch, {1e3 * rival.overhead_s / max(1, rival.microbatches):.0f} ms a micro-batch)":
            rival.overhead_s - best.overhead_s,
        "TP collectives": rival.tp_s - best.tp_s, "CP's K/V gathers": rival.cp_s - best.cp_s,
        "stage transfers": rival.pp_s - best.pp_s,
        "data-parallel collectives": rival.dp_s - best.dp_s, "the loop's own": rival.loop_s - best.loop_s,
        "the pipeline bubble": stretch(rival) - stretch(best),
    }
    term, extra = max(terms.items(), key=lambda kv: kv[1])
    dim = "tp" if rival.tp != best.tp else "pp"
    return (f"Best: {layout_name(best)}, {best.step_s:.3g} s/step ({100 * best.comm_share:.0f}% communication). "
            f"The best with {dim}={getattr(rival, dim)}, {layout_name(rival)}, is {rival.step_s / best.step_s:.2f}x "
            f"slower, most of it {term} (+{extra:.3g} s); its largest communication: {rival.why}.")


def sweep_lines(rows: list[Layout], k: int, user_overrides: list[str]) -> list[str]:
    """The best k fitting layouts as trident-train -m lines (one per micro-batch size: a sweep is a product).

    user_overrides: the user's own command-line overrides, kept on each line.
    """
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
        mine = [o for o in user_overrides if o.partition("=")[0].lstrip("+~") not in taken]
        lines.append(" ".join(["trident-train -m", *mine, f"train.micro_batch={mb}", f"parallel={values}"]))
    return lines


def as_json(rows: list[Layout], info: dict, top=None) -> str:
    out = []
    for r in rows[:top]:
        d = asdict(r)
        w = d.pop("worst")
        keys = ("params", "grads", "optim", "activations", "other", "total")
        d["memory_gib"] = {k: x / GiB for k, x in zip(keys, r.worst.shown())}  # at the fullest moment
        d["worst_pp_rank"] = w["pp_rank"]
        out.append(d)
    return json.dumps({**info, "layouts": out}, indent=1)


def serve_table(rows: list, cfg: DictConfig, info: dict) -> str:
    """trident-plan --serve: one line per tp degree."""
    cl, m = cfg.cluster, cfg.model
    gb = 1e9
    head = (f"trident-plan --serve: {m.name} ({info['n_params'] / 1e9:.2f}B parameters, {info['dtype']} weights "
            f"{info['n_params'] * (2 if info['dtype'] == 'bf16' else 4) / gb:.2f} GB before the split) on {cl.name} "
            f"({cl.gpu_memory_gb:g} GiB = {cl.gpu_memory_gb * GiB / gb:.1f} GB per GPU, "
            f"{info['budget_bytes'] / gb:.1f} GB usable; HBM {cl.hbm_gbps:g} GB/s x {cl.hbm_efficiency:g})\n"
            f"batch {info['batch']} x {info['context']} tokens (generate.batch_size x generate.max_total_tokens). "
            "Memory in GB per GPU; times per decode step (one token for every sequence) at the end of a full "
            "context: max(read, flop) + comm.")
    cols = ("tp", "weights", "kv_cache", "total", "fits", "link", "read_ms", "flop_ms", "comm_ms", "token_ms", "bound",
            "tok/s", "tok/s/GPU")
    lines = [head, "  ".join(f"{c:>9}" for c in cols)]
    for r in rows:
        cells = [f"{r.tp:>9}", *(f"{x / gb:>9.2f}" for x in (r.weights, r.kv_cache, r.total)),
                 f"{'yes' if r.fits else 'no':>9}", f"{r.link:>9}",
                 *(f"{1e3 * x:>9.2f}" for x in (r.read_s, r.compute_s, r.comm_s, r.token_s)),
                 f"{r.bound:>9}", f"{r.tokens_per_s:>9.1f}", f"{r.tokens_per_s_per_gpu:>9.1f}"]
        lines.append("  ".join(cells))
    fitting = [r for r in rows if r.fits]
    if fitting:
        best = min(fitting, key=lambda r: r.token_s)
        lines.append(f"Smallest tp that fits: {fitting[0].tp}; lowest latency: tp={best.tp} "
                     f"({1e3 * best.token_s:.2f} ms per token); most tokens/s per GPU: "
                     f"tp={max(fitting, key=lambda r: r.tokens_per_s_per_gpu).tp}.")
    else:
        lines.append("No tp fits: lower generate.batch_size or generate.max_total_tokens, or more GPUs per group.")
    for tp, why in info["rejected"].items():
        lines.append(f"tp={tp} not possible: {why}")
    return "\n".join(lines)


def serve_json(rows: list, info: dict) -> str:
    out = [{**asdict(r), "total": r.total} for r in rows]
    return json.dumps({**info, "rows": out}, indent=1)
