"""Data parallelism on real gloo processes: dp=2 and dp=4 train exactly like one process."""

import time

import pytest

from launch.local import RankFailed, spawn
from tests.dist.harness import assert_same_run, run_layout

pytestmark = pytest.mark.dist


def test_single_process_learns_and_matches_a_plain_model(single):
    losses = single.losses()
    assert losses[10] < losses[1] - 0.3
    assert max(single.grad_errors.values()) < 1e-6


@pytest.mark.parametrize("dp, pp, dp_shard", [(2, 1, "full"), (4, 1, "full"), (2, 1, "replicate"), (2, 2, "replicate")])
def test_dp_loss_curve_grads_and_init_match_single_process(single, tmp_path, dp, pp, dp_shard):
    """replicate is DDP at pp=1; under a pipeline schedule (pp=2) the loop all-reduces instead."""
    assert_same_run(run_layout(tmp_path, f"dp{dp}", 1, dp, f"parallel.dp_shard={dp_shard}", pp=pp), single)


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
