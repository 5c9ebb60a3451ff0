"""The bubble computed from each schedule's own action lists equals theory where theory has a value."""

import pytest

from orchestrator.planner.bubble import Op, analytic_bubble, pipeline_orders, simulate


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("pp, m", [(2, 2), (4, 4), (4, 8), (4, 16), (8, 3)])
def test_single_stage_schedules_match_p_minus_1_over_m_plus_p_minus_1(schedule, pp, m):
    orders, n_stages = pipeline_orders(schedule, pp, m)
    result = simulate(orders, n_stages)
    assert result["bubble"] == pytest.approx((pp - 1) / (m + pp - 1), abs=1e-12)
    assert result["bubble"] == pytest.approx(analytic_bubble(schedule, pp, m, 1), abs=1e-12)


def test_1f1b_keeps_at_most_pp_microbatches_in_flight_gpipe_keeps_all():
    for schedule, expect in (("gpipe", 8), ("1f1b", 4)):
        orders, _ = pipeline_orders(schedule, 4, 8)
        in_flight, peak = 0, 0
        for op in orders[0]:
            in_flight += 1 if op.kind == "F" else -1
            peak = max(peak, in_flight)
        assert peak == expect, schedule


def test_a_schedule_that_waits_on_itself_is_reported_not_hung():
    orders = {0: [Op("B", 0, 0), Op("F", 0, 0)], 1: [Op("F", 1, 0), Op("B", 1, 0)]}
    with pytest.raises(RuntimeError, match="deadlock"):
        simulate(orders, 2)


def test_torch_multi_stage_schedules_replayed_from_their_own_action_lists():
    """torch's own action lists for the interleaved and zero-bubble schedules, built in a fake process group."""
    for m in (8, 16):
        bubbles = {name: simulate(*pipeline_orders(name, 4, m))["bubble"]
                   for name in ("interleaved-1f1b", "zero-bubble", "zbv", "dualpipev", "1f1b")}
        # Megatron-LM's interleaved bubble, (p - 1) / (v m + p - 1) at p = 4, v = 2.
        assert bubbles["interleaved-1f1b"] == pytest.approx(3 / (2 * m + 3), abs=1e-12)
        for name in ("zero-bubble", "zbv", "dualpipev"):
            assert analytic_bubble(name, 4, m, 2) is None
            assert bubbles[name] < bubbles["interleaved-1f1b"] < bubbles["1f1b"], name
