"""A cluster file read for the step-time model: its figures checked, and looked up per collective and shape.

conf/cluster/<name>.yaml holds, beside memory and the device, either
measured figures (`trident-plan --calibrate` writes them) or published ones:

  collectives  {intra|inter: {all_reduce|all_gather|reduce_scatter|send_recv:
               {ranks in the group: {alpha_us, beta_gbps}}}}: one collective of
               a `bytes` buffer (nccl-tests' "size") takes alpha + bytes / beta
  compute      the model's measured TFLOP/s by tokens per micro-batch and
               tp degree, every rank busy; per tp the fit of a micro-batch's
               time as blocks x overhead + matmul FLOPs / rate + attention
               FLOPs / rate that the model uses; and the speed-up of a rank
               while only some of its node's ranks are busy
  loop         ns_per_param: AdamW's step and the clipping, per local parameter
  comm_overlap whether the backend's collectives run beside compute (NCCL's
               streams) or on the compute thread (gloo)

A group size the file does not hold is scaled from the nearest one it does,
as a ring scales: alpha with its g - 1 steps, beta with nccl-tests' bus
factor (2(g-1)/g for all-reduce, (g-1)/g for all-gather and reduce-scatter).
A file without `collectives` gets them from its link figures (latency per
ring step, bus bandwidth); without `compute`, every micro-batch runs at
`mfu` x the device's peak.
"""

import math
from dataclasses import dataclass, field
from typing import Optional

from omegaconf import DictConfig, OmegaConf

from orchestrator.build.flops import cluster_peak
from orchestrator.validate import ConfigError


class CalibrationError(RuntimeError):
    """A calibration (`trident-plan --calibrate`) that could not run: one line saying why; nothing was written."""


KINDS = ("all_reduce", "all_gather", "reduce_scatter", "send_recv")
POSITIVE = ("gpus", "gpus_per_node", "gpu_memory_gb", "mfu", "intra_node_gbps", "inter_node_gbps", "hbm_gbps",
            "hbm_efficiency", "intra_node_latency_us", "inter_node_latency_us")


def bus_factor(kind: str, g: int) -> float:
    """nccl-tests' busbw / algbw: the share of the buffer each rank's link carries."""
    if kind == "all_reduce":
        return 2 * (g - 1) / g
    if kind in ("all_gather", "reduce_scatter"):
        return (g - 1) / g
    return 1.0


def ring_steps(kind: str, g: int) -> int:
    return 2 * (g - 1) if kind == "all_reduce" else 1 if kind == "send_recv" else g - 1


def _positive(node, key: str, where: str) -> float:
    value = node.get(key) if node is not None else None
    if value is None or value == "???":
        raise ConfigError(f"cluster file {where}: {key} is missing")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"cluster file {where}: {key}={value!r} is not a number") from None
    if not number > 0 or math.isinf(number):
        raise ConfigError(f"cluster file {where}: {key}={value!r} must be a positive number")
    return number


def check_cluster(cl: DictConfig, where: Optional[str] = None) -> None:
    """Refuse a cluster file with a missing or non-positive figure, naming its key (ConfigError)."""
    where = where or f"cluster={cl.get('name')}"
    plain = OmegaConf.to_container(cl, resolve=True) if isinstance(cl, DictConfig) else dict(cl)
    for key in POSITIVE:
        _positive(plain, key, where)
    if plain.get("memory_reserve_gb") is None or float(plain["memory_reserve_gb"]) < 0:
        raise ConfigError(f"cluster file {where}: memory_reserve_gb is missing or negative")
    for link, kinds in (plain.get("collectives") or {}).items():
        if link not in ("intra", "inter"):
            raise ConfigError(f"cluster file {where}: collectives.{link}: the links are intra, inter")
        for kind, by_g in (kinds or {}).items():
            if kind not in KINDS:
                raise ConfigError(f"cluster file {where}: collectives.{link}.{kind}: the collectives are "
                                  + ", ".join(KINDS))
            if not by_g:
                raise ConfigError(f"cluster file {where}: collectives.{link}.{kind} has no group size")
            for g, fig in by_g.items():
                if not str(g).isdigit() or int(g) < 2:
                    raise ConfigError(f"cluster file {where}: collectives.{link}.{kind}.{g}: a group size (2 or more)")
                for key in ("alpha_us", "beta_gbps"):
                    _positive(fig, key, f"{where}: collectives.{link}.{kind}.{g}")
    compute = plain.get("compute")
    if compute is not None:
        for section, keys in (("points", ("tp", "tokens", "tflops")),
                              ("fits", ("tp", "overhead_ms_per_block", "tflops", "attention_tflops")),
                              ("speedup", ("tp", "busy", "speedup"))):
            entries = compute.get(section)
            if entries is None or (section != "speedup" and not entries):
                raise ConfigError(f"cluster file {where}: compute.{section} is missing")
            for i, p in enumerate(entries):
                for key in keys:
                    _positive(p, key, f"{where}: compute.{section}[{i}]")
    for key in plain.get("overheads") or {}:
        _positive(plain["overheads"], key, f"{where}: overheads")
    if plain.get("loop") is not None:
        _positive(plain["loop"], "ns_per_param", f"{where}: loop")


@dataclass
class Links:
    """alpha + bytes / beta per (link, collective, group size)."""

    table: dict  # {link: {kind: {g: (alpha_s, beta_bps)}}}

    @classmethod
    def of(cls, cl) -> "Links":
        table: dict = {}
        given = cl.get("collectives") or {}
        for link, kinds in given.items():
            for kind, by_g in kinds.items():
                table.setdefault(link, {})[kind] = {int(g): (float(f["alpha_us"]) * 1e-6, float(f["beta_gbps"]) * 1e9)
                                                    for g, f in by_g.items()}
        intra = table.setdefault("intra", {})
        inter = table.setdefault("inter", {})
        latency = float(cl.inter_node_latency_us) / float(cl.intra_node_latency_us)
        slower = float(cl.intra_node_gbps) / float(cl.inter_node_gbps)
        for kind in KINDS:
            if kind not in intra:  # from the link figures: a latency per ring step, the bus bandwidth
                intra[kind] = cls._from_link(kind, cl.intra_node_latency_us, cl.intra_node_gbps)
            if kind not in inter:
                # Measured on one node only: its own figures at the inter-node latency and bandwidth.
                inter[kind] = ({g: (a * latency, b / slower) for g, (a, b) in intra[kind].items()}
                               if "intra" in given and "inter" not in given
                               else cls._from_link(kind, cl.inter_node_latency_us, cl.inter_node_gbps))
        return cls(table)

    @staticmethod
    def _from_link(kind: str, latency_us, gbps) -> dict:
        return {2: (ring_steps(kind, 2) * float(latency_us) * 1e-6, float(gbps) * 1e9 / bus_factor(kind, 2))}

    def time(self, kind: str, g: int, nbytes: float, link: str = "intra") -> float:
        if g < 2 or nbytes <= 0:
            return 0.0
        by_g = self.table[link][kind]
        if g in by_g:
            alpha, beta = by_g[g]
        else:
            below = [h for h in by_g if h <= g]
            g0 = max(below) if below else min(by_g)
            alpha, beta = by_g[g0]
            alpha *= ring_steps(kind, g) / ring_steps(kind, g0)
            beta *= bus_factor(kind, g0) / bus_factor(kind, g)
        return alpha + nbytes / beta


@dataclass
class Compute:
    """Seconds of a micro-batch's forward+backward: blocks x overhead + matmul FLOPs / their rate + attention FLOPs /
    theirs, per tp degree; and how much faster a rank runs while only some of its node's ranks are busy."""

    fits: dict = field(default_factory=dict)  # {tp: (overhead s per block, matmul FLOP/s, attention FLOP/s)}
    speedups: dict = field(default_factory=dict)  # {tp: [(busy ranks, speed-up)]}, all ranks busy: 1
    node: int = 1  # ranks per node
    flat: float = 0.0  # FLOP/s without measured figures: peak x mfu, no overhead

    @classmethod
    def of(cls, cl, dtype: str) -> "Compute":
        compute = cl.get("compute")
        if not compute:
            return cls(flat=cluster_peak(cl.device, dtype, cl.gpus_per_node) * cl.mfu, node=int(cl.gpus_per_node))
        fits = {int(f.tp): (float(f.overhead_ms_per_block) * 1e-3, float(f.tflops) * 1e12,
                            float(f.attention_tflops) * 1e12) for f in compute.fits}
        speedups: dict = {}
        for p in compute.get("speedup") or []:
            speedups.setdefault(int(p.tp), []).append((float(p.busy), float(p.speedup)))
        return cls(fits, {tp: sorted(v) for tp, v in speedups.items()}, int(cl.gpus_per_node))

    def _nearest(self, table: dict, tp: int):
        return table[min(table, key=lambda t: (abs(math.log(t / tp)), t))] if table else None

    def seconds(self, matmul_flops: float, attention_flops: float, blocks: float, tp: int) -> float:
        if not self.fits:
            return (matmul_flops + attention_flops) / self.flat
        overhead, rate, attention_rate = self._nearest(self.fits, tp)
        return blocks * overhead + matmul_flops / rate + attention_flops / attention_rate

    def overhead(self, blocks: float, tp: int) -> float:
        """The part of seconds() that does not grow with the tokens."""
        return blocks * self._nearest(self.fits, tp)[0] if self.fits else 0.0

    def speedup(self, busy: float, tp: int) -> float:
        """How many times faster a rank runs with `busy` ranks of its node computing (the node's all: 1),
        interpolated linearly between the measured counts."""
        points = [*(self._nearest(self.speedups, tp) or []), (float(self.node), 1.0)]
        if busy <= points[0][0]:
            return points[0][1]
        for (n0, s0), (n1, s1) in zip(points, points[1:]):
            if busy <= n1:
                return s0 + (s1 - s0) * (busy - n0) / (n1 - n0)
        return 1.0
