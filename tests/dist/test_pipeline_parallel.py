"""Pipeline parallelism and the 3-D composition on real gloo processes, exact against one process.

The layouts of {tp, pp, dp} in {1, 2}^3 without pipeline parallelism are
proved in test_data_parallel.py and test_tensor_parallel.py; here are the
ones with pp=2 (1F1B), and pp=4 with every schedule.
"""

import pytest

from tests.dist.harness import DEEP, assert_same_run, run_layout

pytestmark = pytest.mark.dist

@pytest.mark.parametrize("tp, dp", [(1, 1), (2, 1), (1, 2), (2, 2)])
def test_pp2_1f1b_loss_curve_grads_and_init_match_single_process(single, tmp_path, tp, dp):
    got = run_layout(tmp_path, f"tp{tp}pp2dp{dp}", tp, dp, "parallel.schedule=1f1b", pp=2)
    assert_same_run(got, single, exact=tp == dp == 1)
    # The measured bubble is logged every step: time blocked on pipeline p2p against the step time.
    for s in got.losses():
        assert 0 < got.rows[s]["pp_bubble"] < 1 and got.rows[s]["pp_wait_s"] > 0


# gpipe and 1f1b at dp=1 (1f1b with dp is above); the multi-stage schedules with FSDP over dp=2.
@pytest.mark.parametrize("schedule, dp", [("gpipe", 1), ("1f1b", 1), ("interleaved-1f1b", 2), ("zero-bubble", 2),
                                          ("zbv", 2), ("dualpipev", 2)])
def test_pp4_every_schedule_matches_single_process(single_deep, tmp_path, schedule, dp):
    got = run_layout(tmp_path, schedule, 1, dp, *DEEP, f"parallel.schedule={schedule}", pp=4)
    assert_same_run(got, single_deep, exact=dp == 1)


def test_explicit_cut_points_give_the_same_run_bit_for_bit(single_deep, tmp_path):
    """Stages of unequal size sum the grad norm's pieces in another grouping than one process: in fp32 that
    moved the clip coefficient by a rounding and, through a loss spike at step 7, the grad norm by 4.1e-5
    (parallel/grad.py says why). Summed in float64, the run is the one-process run exactly."""
    got = run_layout(tmp_path, "cuts", 1, 1, *DEEP, "parallel.schedule=gpipe", "parallel.cut_points=[1,3,6]", pp=4)
    assert_same_run(got, single_deep, exact=True)
