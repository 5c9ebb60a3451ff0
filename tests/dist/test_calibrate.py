"""`trident-plan --calibrate` on real gloo ranks, at reduced sizes: it writes a cluster file the planner takes."""

import sys
import time

import pytest
import yaml
from omegaconf import OmegaConf

from orchestrator.planner.cluster import Compute, Links, check_cluster
from tests.conftest import TINY, run_cmd

pytestmark = pytest.mark.dist


def test_calibrate_at_reduced_sizes_writes_a_valid_cluster_file_in_well_under_a_minute(tmp_path):
    target = tmp_path / "tiny.yaml"
    started = time.perf_counter()
    out = run_cmd([sys.executable, "-m", "orchestrator.cli.plan", "--calibrate", "--calibrate-out", str(target),
                   "cluster.gpus=4", "calibrate.name=tiny", "calibrate.sizes_kib=[4,256]",
                   "calibrate.seconds_per_point=0.01", "calibrate.max_reps=3", "calibrate.microbatches=[1,2]",
                   "train.seq_len=32", "train.global_batch=4", *[o for o in TINY if not o.startswith("parallel.")],
                   f"checkpoint.dir={tmp_path}"], timeout=120)
    elapsed = time.perf_counter() - started
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    # Under a minute, as the issue asks: ~12 s alone here, slower beside the other pytest worker's launches.
    assert elapsed < 60, elapsed
    assert "residual" in out.stdout and f"wrote {target}" in out.stdout
    doc = yaml.safe_load(target.read_text())
    cl = OmegaConf.create(doc)
    check_cluster(cl, str(target))
    assert cl.name == "tiny" and cl.gpus == 4 and cl.gpus_per_node == 4 and cl.comm_overlap is False
    # Every collective at every group size of 4 ranks, fitted; send/recv between pairs.
    coll = doc["collectives"]["intra"]
    assert {k: sorted(v) for k, v in coll.items()} == {"all_reduce": [2, 4], "all_gather": [2, 4],
                                                        "reduce_scatter": [2, 4], "send_recv": [2]}
    links = Links.of(cl)
    assert 0 < links.time("all_reduce", 2, 4096) < 1.0 and 0 < links.time("all_reduce", 4, 2**20) < 1.0, coll
    # TINY has 8 heads and 4 kv heads: tp 1, 2 and 4 divide them and the node. Micro-batches of 1 and 2
    # sequences of 32 tokens, and one of a 4x longer sequence.
    points = doc["compute"]["points"]
    assert {(p["tp"], p["tokens"], p["seq"]) for p in points} == {
        (tp, tokens, seq) for tp in (1, 2, 4) for tokens, seq in ((32, 32), (64, 32), (128, 128))}
    assert sorted(f["tp"] for f in doc["compute"]["fits"]) == [1, 2, 4]
    # With 2 of 4 ranks busy (one tp=2 group, half the node), and 1 at tp=1.
    assert {(p["tp"], p["busy"]) for p in doc["compute"]["speedup"]} == {(1, 1), (1, 2), (2, 2)}
    assert Compute.of(cl, "fp32").seconds(1e6, 1e5, 1, 2) > 0 and doc["loop"]["ns_per_param"] > 0
    # The reference steps (FSDP2 over the 4 ranks; a 2-stage pipeline) were run and left their figures.
    assert doc["overheads"]["fsdp_comm_factor"] >= 1 and doc["overheads"]["pipeline_ms_per_stage_microbatch"] > 0
    assert "#   fsdp: tp=1 pp=1 dp=4 full micro-batch 1: measured" in target.read_text()
    text = target.read_text()
    assert "# Calibrated by `trident-plan --calibrate`" in text and f"torch {__import__('torch').__version__}" in text
