"""Data parallelism on real gloo processes: dp=2 and dp=4 train exactly like one process."""

import json
import time

import pytest
import torch
from omegaconf import OmegaConf

from launch.local import RankFailed, spawn
from orchestrator.data import prepare
from orchestrator.trainer import Trainer
from tests.conftest import make_cfg

pytestmark = pytest.mark.dist

STEPS = 10


def _train_and_dump_init(env, device, cfg_dict, run_dir, corpus):
    """Record the initial weights (gathered from their shards), then train."""
    trainer = Trainer(OmegaConf.create(cfg_dict), env, device, run_dir, corpus)
    full = {}
    for name, p in trainer.module.named_parameters():
        full[name] = p.full_tensor() if hasattr(p, "full_tensor") else p.detach().clone()
    if env.rank == 0:
        torch.save(full, f"{run_dir}/init.pt")
    trainer.fit()


def train(tmp_path, name, dp, *overrides):
    cfg = make_cfg(f"parallel.dp={dp}", f"train.steps={STEPS}", "checkpoint.at_end=false", *overrides, tmp=tmp_path)
    run_dir = tmp_path / name
    run_dir.mkdir()
    corpus = prepare(cfg.data)
    spawn(_train_and_dump_init, dp, OmegaConf.to_container(cfg, resolve=True), str(run_dir), corpus, timeout_s=60)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows}, torch.load(run_dir / "init.pt")


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return train(tmp_path_factory.mktemp("dp1"), "dp1", 1)


@pytest.mark.parametrize("dp, dp_shard", [(2, "full"), (4, "full"), (2, "replicate")])
def test_dp_loss_curve_and_init_match_single_process(single, tmp_path, dp, dp_shard):
    ref_rows, ref_init = single
    rows, init = train(tmp_path, f"dp{dp}", dp, f"parallel.dp_shard={dp_shard}")
    assert set(init) == set(ref_init)
    for name in ref_init:
        assert torch.equal(init[name], ref_init[name]), name
    train_steps = [s for s in range(1, STEPS + 1)]
    assert [s for s in sorted(rows) if "loss" in rows[s]] == train_steps
    for s in train_steps:
        for key in ("loss", "grad_norm"):
            assert rows[s][key] == pytest.approx(ref_rows[s][key], rel=1e-5), (s, key)
    for s in (0, 5, 10):
        assert rows[s]["eval_loss"] == pytest.approx(ref_rows[s]["eval_loss"], rel=1e-5)
    # It learned something: the curve is not flat.
    assert rows[STEPS]["loss"] < rows[1]["loss"] - 0.3


def _fail_on_rank_one(env, device):
    import torch.distributed as dist

    if env.rank == 1:
        raise ValueError("boom from rank 1")
    dist.barrier()  # rank 0 would wait here forever without the launcher's watch


def test_a_crashing_rank_fails_the_whole_run_with_its_error():
    start = time.monotonic()
    with pytest.raises(RankFailed) as e:
        spawn(_fail_on_rank_one, 2, timeout_s=600)
    assert "rank 1 failed" in str(e.value) and "boom from rank 1" in str(e.value)
    assert time.monotonic() - start < 60
