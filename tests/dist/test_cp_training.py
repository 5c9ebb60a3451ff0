"""Context parallelism composed with TP, PP and DP, on real gloo processes, against one process.

Every layout here trains the tiny model of tests/conftest.py with each sequence cut over the cp ranks
(head-tail chunks, K/V all-gathered in attention): the initial weights, the first step's gradients, the loss
and grad-norm curves must be one process's within fp32 summation order (tests/dist/harness.py
assert_same_run says why 1e-5). Document masking makes targets across boundaries IGNORE, unevenly over the
cp ranks: the loss is still the mean over every target of the global batch.
"""

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from launch.local import spawn
from orchestrator.data.dataset import prepare
from orchestrator.runs import checkpoint
from orchestrator.train.trainer import Trainer
from tests.conftest import make_cfg
from tests.dist.harness import DEEP, assert_same_run, run_layout
from tests.textdata import short_documents, write_jsonl

pytestmark = pytest.mark.dist



@pytest.fixture(scope="module")
def docs_gqa(tmp_path_factory) -> tuple[str, ...]:
    """Short documents (a 32-token window holds several) under document masking, with 2 kv heads: fewer kv
    heads than the cp=4 ranks (an all-to-all over heads, Ulysses, could not split them; gathering K/V along
    the sequence does not care)."""
    path = write_jsonl(tmp_path_factory.mktemp("docs") / "docs.jsonl", short_documents(30))
    return f"data.path={path}", "data.mask_across_documents=true", "model.n_kv_heads=2"


@pytest.fixture(scope="module")
def single_docs(tmp_path_factory, docs_gqa):
    return run_layout(tmp_path_factory.mktemp("single-docs"), "single-docs", 1, 1, *docs_gqa)


def test_cp2_matches_single_process(single, tmp_path):
    assert_same_run(run_layout(tmp_path, "cp2", cp=2), single)


@pytest.mark.parametrize("cp", [2, 4])
def test_cp_with_document_masks_and_fewer_kv_heads_than_ranks_matches_single_process(single_docs, docs_gqa,
                                                                                      tmp_path, cp):
    assert_same_run(run_layout(tmp_path, f"cp{cp}-docs", 1, 1, *docs_gqa, cp=cp), single_docs)


def test_tp2_cp2_with_sequence_parallelism_matches_single_process(single, tmp_path):
    got = run_layout(tmp_path, "tp2cp2", 2, 1, "parallel.sequence_parallel=true", cp=2)
    assert_same_run(got, single)


def test_pp2_cp2_1f1b_matches_single_process(single, tmp_path):
    assert_same_run(run_layout(tmp_path, "pp2cp2", 1, 1, "parallel.schedule=1f1b", pp=2, cp=2), single)


def test_pp2_cp2_interleaved_matches_single_process(single_deep, tmp_path):
    got = run_layout(tmp_path, "pp2cp2-interleaved", 1, 1, *DEEP, "parallel.schedule=interleaved-1f1b", pp=2, cp=2)
    assert_same_run(got, single_deep)


def _resume_worker(env, device, cfg_dict, corpus, out_dir, path):
    trainer = Trainer(OmegaConf.create(cfg_dict), env, device, out_dir, corpus, resume=path)
    losses = [trainer.train_step()["loss"] for _ in range(5)]
    if env.rank == 0:
        Path(out_dir, "resumed.json").write_text(json.dumps(losses))


def test_dp2_cp2_fsdp_matches_single_process_and_resumes_at_cp1_dp4(single, tmp_path):
    """FSDP2 shards over dp x cp; its checkpoint at step 5 resumes without cp, over dp=4, on the same curve."""
    got = run_layout(tmp_path, "dp2cp2", 1, 2, "parallel.dp_shard=full", "checkpoint.every=5", cp=2)
    assert_same_run(got, single)
    path = checkpoint.find_resume("auto", str(tmp_path / "checkpoints"))
    assert path is not None and path.name == "step-10"
    path = path.parent / "step-5"
    assert checkpoint.read_marker(path)["layout"]["cp"] == 2
    cfg = make_cfg("parallel.dp=4", "parallel.cp=1", "train.steps=10", tmp=tmp_path)
    spawn(_resume_worker, 4, OmegaConf.to_container(cfg, resolve=True), prepare(cfg.data), str(tmp_path),
          str(path), timeout_s=120)
    losses = json.loads((tmp_path / "resumed.json").read_text())
    for i, loss in enumerate(losses):
        assert loss == pytest.approx(single.losses()[6 + i], rel=1e-5), 6 + i
