"""The planner's calibration and step-time model in one process: the alpha/beta fit, the cluster file (written,
read back, refused when a figure is missing), the latency a collective pays, --tune-spread's choice."""

import random
import sys

import pytest
import yaml
from omegaconf import OmegaConf

from orchestrator.planner.cluster import Compute, Links, check_cluster
from orchestrator.planner.layouts import plan
from orchestrator.planner.render import table
from orchestrator.search.calibrate import cluster_yaml, fit_alpha_beta
from orchestrator.search.tune import median_relative_error, spread
from orchestrator.validate import ConfigError
from tests.conftest import run_cmd
from tests.unit.test_plan import compose_plan

SIZES = [4 * 2**10, 64 * 2**10, 2**20, 8 * 2**20, 64 * 2**20]


@pytest.mark.parametrize("alpha_us, beta_gbps", [(1200.0, 0.35), (15.0, 450.0), (40.0, 48.0)])
def test_the_fit_recovers_known_alpha_and_beta_within_5_percent_from_noisy_timings(alpha_us, beta_gbps):
    rng = random.Random(0)
    for _ in range(20):
        sizes = [s for s in SIZES for _ in range(3)]
        # 3% multiplicative noise per timing: what repeated medians of one collective vary by here.
        times = [(alpha_us * 1e-6 + b / (beta_gbps * 1e9)) * (1 + rng.gauss(0, 0.03)) for b in sizes]
        fit = fit_alpha_beta(sizes, times)
        assert fit.alpha_s * 1e6 == pytest.approx(alpha_us, rel=0.05)
        assert fit.beta_bps / 1e9 == pytest.approx(beta_gbps, rel=0.05)
        assert fit.residual < 0.06


def test_a_fit_without_a_bandwidth_term_keeps_both_figures_positive():
    fit = fit_alpha_beta(SIZES, [1e-3] * len(SIZES))  # the same time at every size: latency alone
    # beta is held at its floor (1 PB/s), which costs the 64 MiB point 67 ns: alpha gives up ~2e-5 of itself.
    assert fit.alpha_s == pytest.approx(1e-3, rel=1e-4) and fit.beta_bps >= 1e15 * 0.999


def _raw(world=8):
    """What the ranks of a calibration report (synthetic figures, each collective exactly alpha + bytes/beta)."""
    figures = {"all_reduce": (1000.0, 0.3), "all_gather": (800.0, 0.4), "reduce_scatter": (1500.0, 0.25),
               "send_recv": (900.0, 1.0)}
    coll = []
    for kind, (a_us, b_gbps) in figures.items():
        for g in ([2] if kind == "send_recv" else [2, 4, world]):
            for size in SIZES:
                coll.append({"link": "intra", "kind": kind, "g": g, "bytes": size,
                             "s": a_us * 1e-6 * (g - 1) + size / (b_gbps * 1e9)})
    # The model's time: 4 blocks x 2 ms + matmul FLOPs at 10 GFLOP/s + attention FLOPs at 20 GFLOP/s.
    compute = []
    for tp in (1, 2):
        for tokens, seq in ((256, 256), (1024, 256), (4096, 256), (1024, 1024)):
            mm, attn = tokens * 6e6 / tp, tokens * 1.5e3 * seq / tp
            compute.append({"tp": tp, "tokens": tokens, "seq": seq, "mm": mm, "attn": attn, "flops": mm + attn,
                            "s": 4 * 2e-3 + mm / 1e10 + attn / 2e10})
    busy = [{"tp": 1, "n": 1, "tokens": 1024, "s": (4 * 2e-3 + 1024 * 6e6 / 1e10 + 1024 * 1.5e3 * 256 / 2e10) / 4},
            {"tp": 1, "n": 4, "tokens": 1024, "s": (4 * 2e-3 + 1024 * 6e6 / 1e10 + 1024 * 1.5e3 * 256 / 2e10) / 2}]
    return {"collectives": coll, "compute": compute, "busy": busy, "loop": 2e-8, "memory_gbps": 5.0, "errors": [],
            "reference": {}}


def _spec():
    cfg = compose_plan("cluster=cpu")
    return cfg, {"sizes": SIZES, "seq_len": 256, "dtype": "float32", "layers": 4, "reference": {},
                 "model": {"dim": 128, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 256,
                           "multiple_of": 32}}


def test_a_cluster_file_round_trips_its_fitted_figures(tmp_path):
    cfg, spec = _spec()
    text = cluster_yaml(cfg, _raw(), spec, 8, 8, "gloo", "cpu", "test-host", 2.5, 30.0)
    assert "alpha_us" in text and "# " in text  # commented figures
    cl = OmegaConf.create(yaml.safe_load(text))
    check_cluster(cl, "written")
    links = Links.of(cl)
    # The fitted collective reproduces the timings it came from.
    assert links.time("all_reduce", 4, 2**20) == pytest.approx(3 * 1000e-6 + 2**20 / 0.3e9, rel=1e-3)
    assert links.time("send_recv", 2, 8 * 2**20) == pytest.approx(900e-6 + 8 * 2**20 / 1e9, rel=1e-3)
    compute = Compute.of(cl, "fp32")
    # The fit recovers the per-block overhead and both rates (TP's collectives are taken out of tp=2's points
    # first, so only tp=1 is exact).
    assert compute.seconds(6e9, 3e9, 4, 1) == pytest.approx(4 * 2e-3 + 0.6 + 0.15, rel=1e-3)
    assert compute.speedup(1, 1) == pytest.approx(4.0, rel=1e-3) and compute.speedup(4, 1) == pytest.approx(2.0)
    assert compute.speedup(6, 1) == pytest.approx(1.5) and compute.speedup(8, 1) == 1.0
    assert cl.gpus == 8 and cl.comm_overlap is False and cl.loop.ns_per_param == pytest.approx(20.0)
    # And the planner plans with it.
    with_file = OmegaConf.create({**OmegaConf.to_container(cfg), "cluster": OmegaConf.to_container(cl)})
    rows, _ = plan(with_file)
    assert rows and all(r.step_s > 0 for r in rows)


@pytest.mark.parametrize("edit, key", [
    (lambda d: d.pop("intra_node_gbps"), "intra_node_gbps is missing"),
    (lambda d: d.update(gpu_memory_gb=0), "gpu_memory_gb=0 must be a positive number"),
    (lambda d: d["collectives"]["intra"]["all_reduce"][2].update(alpha_us=-3), "collectives.intra.all_reduce.2: alpha_us"),
    (lambda d: d["collectives"]["intra"]["all_gather"][4].pop("beta_gbps"), "collectives.intra.all_gather.4: beta_gbps is missing"),
    (lambda d: d["compute"]["points"][0].update(tflops=0), "compute.points[0]: tflops=0"),
    (lambda d: d["compute"]["fits"][1].pop("attention_tflops"), "compute.fits[1]: attention_tflops is missing"),
    (lambda d: d["loop"].update(ns_per_param=None), "loop: ns_per_param is missing"),
])
def test_a_cluster_file_with_a_missing_or_non_positive_figure_is_refused_naming_the_key(edit, key):
    cfg, spec = _spec()
    doc = yaml.safe_load(cluster_yaml(cfg, _raw(), spec, 8, 8, "gloo", "cpu", "test-host", 2.5, 30.0))
    edit(doc)
    with pytest.raises(ConfigError, match="cluster file") as e:
        check_cluster(OmegaConf.create(doc), "bad.yaml")
    assert key in str(e.value)


def test_on_a_latency_bound_cluster_tp_at_micro_batch_1_is_predicted_slow_and_the_plan_says_why():
    # The shipped CPU cluster (calibrated here): TP's collectives cost milliseconds each whatever their size,
    # and DTensor's dispatch tens of milliseconds per block and micro-batch, so tp=2 pays for every extra
    # micro-batch: at micro-batch 1 it is the slowest way to step, where dp=8 is not.
    cfg = compose_plan("cluster=cpu")
    rows, info = plan(cfg)
    by = {(r.tp, r.pp, r.dp, r.micro_batch, r.schedule): r for r in rows}
    tp2_mb1, tp2_mb4, dp8 = by[2, 1, 4, 1, "-"], by[2, 1, 4, 4, "-"], by[1, 1, 8, 1, "-"]
    assert tp2_mb1.step_s > 1.5 * dp8.step_s
    # The same tokens in 4x the collectives (4 micro-batches of 1 against 1 of 4): latency, not bytes.
    assert tp2_mb1.tp_s > 2 * tp2_mb4.tp_s and tp2_mb1.overhead_s > 3 * tp2_mb4.overhead_s
    assert 0 < dp8.comm_share < 1 and tp2_mb1.why.startswith(("tp ", "dp "))
    text = table(rows, cfg, info, 3)
    assert "comm" in text.splitlines()[2] and "Best: tp=1" in text and "The best with tp=2" in text


def test_tune_spread_picks_k_distinct_layouts_from_best_to_worst():
    rows, _ = plan(compose_plan("cluster=cpu"))
    fitting = sorted((r for r in rows if r.fits), key=lambda r: r.step_s)
    chosen = spread(rows, 5)
    assert len({id(r) for r in chosen}) == 5
    assert chosen[0] is fitting[0] and chosen[-1] is fitting[-1]
    assert [r.step_s for r in chosen] == sorted(r.step_s for r in chosen)
    with pytest.raises(ValueError):
        spread(rows, len(fitting) + 1)
    assert median_relative_error([1.0, 2.0, 3.0], [1.0, 2.5, 2.0]) == pytest.approx(0.2)


def test_tune_spread_beyond_the_fitting_layouts_says_how_many_fit(tmp_path):
    out = run_cmd([sys.executable, "-m", "orchestrator.cli.plan", "cluster=cpu", "--tune-spread", "1000",
                   f"checkpoint.dir={tmp_path}"], timeout=120)
    assert out.returncode == 2 and "only 149 layouts of llama-debug fit" in out.stderr, out.stderr
    assert not (tmp_path / "multirun").exists()


def test_calibrating_one_rank_is_refused_in_one_line_and_writes_nothing(tmp_path):
    target = tmp_path / "c.yaml"
    out = run_cmd([sys.executable, "-m", "orchestrator.cli.plan", "--calibrate", "--calibrate-out", str(target),
                   "cluster.gpus=1"], timeout=120)
    assert out.returncode == 1 and not target.exists()
    assert out.stderr.strip().splitlines() == [
        "trident-plan: calibration failed, nothing written: --calibrate needs 2 or more ranks to time collectives "
        "between (it has 1: set cluster.gpus or launcher.nprocs)"]
