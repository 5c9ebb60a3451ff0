"""trident-plan --serve: the memory arithmetic against hand figures and the real TP split, the latency model's
shape, its collective count, and its figures against gpt-fast's published tensor-parallel decode speeds."""

import json
import sys

import pytest
from omegaconf import OmegaConf

from models.llama import ModelArgs
from orchestrator.planner.memory import build_meta
from orchestrator.planner.serve import collectives_per_step, decode_step, kv_cache_bytes, serve_plan, weight_bytes
from orchestrator.validate import ConfigError
from tests.conftest import run_cmd
from tests.unit.test_plan import compose_plan

GB = 1e9


def args_of(model: str, *overrides) -> ModelArgs:
    return ModelArgs.from_config(compose_plan(f"model={model}", *overrides).model)


def test_bf16_weights_of_llama3_8b_and_70b_are_the_hand_figures_before_the_split():
    # 8.03B and 70.55B parameters x 2 bytes.
    assert weight_bytes(args_of("llama3-8b"), 1, 2) / GB == pytest.approx(16.06, abs=0.005)
    assert weight_bytes(args_of("llama3-70b"), 1, 2) / GB == pytest.approx(141.1, abs=0.05)
    # Split over 8 ranks: every matrix / 8, the (2 x 80 + 1) x 8192 norm weights on every rank.
    a = args_of("llama3-70b")
    norms = (2 * 80 + 1) * 8192 * 2
    assert weight_bytes(a, 8, 2) == pytest.approx((141.107e9 - norms) / 8 + norms, rel=1e-4)


def test_kv_cache_is_the_hand_figure_split_over_the_kv_heads():
    # llama3-70b: 80 layers x (k, v) x 8 kv heads x 128 dims x 2 bytes = 327,680 bytes per token.
    a = args_of("llama3-70b")
    assert kv_cache_bytes(a, 1, 8192, 1, 2) == 80 * 2 * 8 * 128 * 2 * 8192 == pytest.approx(2.684e9, rel=1e-3)
    assert kv_cache_bytes(a, 4, 8192, 16, 2) == kv_cache_bytes(a, 1, 8192, 1, 2) * 16 / 4


@pytest.mark.parametrize("model, tp", [("llama3-8b", 8), ("llama3-70b", 4)])
def test_weights_per_gpu_equal_the_real_tp_splits_local_shards(model, tp):
    # The training build's TP plan is the one trident-generate applies (without sequence parallelism).
    cfg = compose_plan(f"model={model}", f"parallel.tp={tp}", "parallel.pp=1", "parallel.dp=1",
                       "parallel.sequence_parallel=false")
    built = build_meta(cfg, 0)
    local = sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in built.modules[0].parameters())
    assert weight_bytes(ModelArgs.from_config(cfg.model), tp, 2) == local * 2


def test_llama3_70b_needs_tp_2_on_80gb_and_latency_falls_while_per_gpu_throughput_falls_too():
    rows, info = serve_plan(compose_plan("model=llama3-70b", "generate.batch_size=1", "generate.max_total_tokens=8192"))
    by_tp = {r.tp: r for r in rows}
    assert sorted(by_tp) == [1, 2, 4, 8] and info["dtype"] == "bf16"
    assert not by_tp[1].fits and by_tp[2].fits and by_tp[8].fits
    assert by_tp[1].token_s > by_tp[2].token_s > by_tp[4].token_s > by_tp[8].token_s  # inside one node
    per_gpu = [by_tp[t].tokens_per_s_per_gpu for t in (1, 2, 4, 8)]
    assert per_gpu == sorted(per_gpu, reverse=True)  # each collective costs more of a shorter step
    comm = [by_tp[t].comm_s for t in (1, 2, 4, 8)]
    assert comm[0] == 0 and comm == sorted(comm)
    assert all(r.bound == "memory" for r in rows)


def test_latency_grows_with_batch_and_context_and_a_tp_group_across_nodes_pays_infiniband():
    cl = compose_plan().cluster
    a = args_of("llama3-8b")
    steps = [decode_step(a, 2, b, ctx, cl, "bf16")["token_s"] for b, ctx in ((1, 1024), (8, 1024), (8, 8192))]
    assert steps == sorted(steps) and steps[0] < steps[-1]
    inside = decode_step(a, 8, 1, 1024, cl, "bf16")
    across = decode_step(a, 8, 1, 1024, OmegaConf.merge(cl, {"gpus_per_node": 4}), "bf16")
    assert inside["link"] == "NVLink" and across["link"] == "InfiniBand"
    assert across["comm_s"] > 3 * inside["comm_s"] and across["read_s"] == inside["read_s"]
    # Enough sequences make a step compute-bound: its FLOPs outgrow the bytes it reads.
    assert decode_step(a, 1, 4096, 128, cl, "bf16")["bound"] == "compute"


def test_two_all_reduces_per_layer_and_each_one_priced_as_a_ring():
    a = args_of("llama3-70b")
    assert collectives_per_step(a, 1) == {"all_reduce": 0, "all_gather": 0}
    assert collectives_per_step(a, 8) == {"all_reduce": 2 * 80 + 1, "all_gather": 1}
    cl = compose_plan().cluster
    step = decode_step(a, 8, 1, 1024, cl, "bf16")
    # By hand: 161 all-reduces of 8192 x 2 bytes and one all-gather of 128256 x 4, over NVLink (1.5 us a hop).
    lat, bw = cl.intra_node_latency_us * 1e-6, cl.intra_node_gbps * 1e9
    all_reduce = 14 * lat + 2 * 7 / 8 * 8192 * 2 / bw
    all_gather = 7 * lat + 7 / 8 * 128256 * 4 / bw
    assert step["collectives"] == 162
    assert step["comm_s"] == pytest.approx(161 * all_reduce + all_gather, rel=1e-12)


@pytest.mark.parametrize("tp, published", [(2, 21.32), (4, 38.01), (8, 62.50)])
def test_predicted_decode_speed_is_within_10_percent_of_gpt_fasts_llama2_70b_on_a100s(tp, published):
    # gpt-fast's README: Llama-2-70B bf16, batch 1, a 5-token prompt, 8 x A100-80GB (tokens/s).
    cfg = compose_plan("cluster=a100-80gb", "model=llama3-70b", "model.vocab_size=32000", "generate.batch_size=1",
                       "generate.max_total_tokens=205")
    rows, _ = serve_plan(cfg)
    predicted = {r.tp: r.tokens_per_s for r in rows}[tp]
    assert predicted == pytest.approx(published, rel=0.10)


def test_cli_serve_prints_a_row_per_tp_and_json():
    out = run_cmd([sys.executable, "-m", "orchestrator.cli.plan", "--serve", "model=llama3-70b",
                   "generate.batch_size=1", "cluster.gpus=16"], timeout=120)
    assert out.returncode == 0, out.stderr
    assert "llama3-70b (70.55B parameters, bf16 weights 141.11 GB before the split)" in out.stdout
    assert "Smallest tp that fits: 2" in out.stdout
    assert "tp=16 not possible: parallel.tp=16 does not divide model.n_kv_heads=8" in out.stdout
    doc = json.loads(run_cmd([sys.executable, "-m", "orchestrator.cli.plan", "--serve", "--json",
                              "model=llama3-8b"], timeout=120).stdout)
    assert [r["tp"] for r in doc["rows"]] == [1, 2, 4, 8] and all(r["fits"] for r in doc["rows"])


def test_serving_refuses_context_parallelism_in_one_line():
    with pytest.raises(ConfigError) as e:
        serve_plan(compose_plan("model=llama3-8b", "parallel.cp=2"))
    assert str(e.value) == ("parallel.cp=2: serving decodes at parallel.cp=1 (context parallelism splits a "
                            "training sequence; valid: parallel.cp=1)")
