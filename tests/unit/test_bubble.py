"""The bubble computed from each schedule's own action lists equals theory where theory has a value."""

import json
import subprocess
import sys

import pytest

from parallel.bubble import Op, analytic_bubble, pipeline_orders, simulate
from tests.conftest import ROOT


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


def test_torch_multi_stage_schedules_simulated_in_a_fake_world():
    """torch's own action lists for the interleaved and zero-bubble schedules (fake process group, own process)."""
    code = """
import json
from parallel.bubble import analytic_bubble, ensure_fake_world, pipeline_orders, simulate
ensure_fake_world(4)
out = {}
for name in ("interleaved-1f1b", "zero-bubble", "zbv", "dualpipev", "1f1b"):
    for m in (8, 16):
        orders, n = pipeline_orders(name, 4, m)
        out[f"{name}/{m}"] = [simulate(orders, n)["bubble"], analytic_bubble(name, 4, m, n // 4)]
print(json.dumps(out))
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    for m in (8, 16):
        simulated, theory = got[f"interleaved-1f1b/{m}"]
        assert simulated == pytest.approx(theory, abs=1e-12) == pytest.approx(3 / (2 * m + 3))
        for name in ("zero-bubble", "zbv", "dualpipev"):
            assert got[f"{name}/{m}"][1] is None
            assert got[f"{name}/{m}"][0] < got[f"interleaved-1f1b/{m}"][0] < got[f"1f1b/{m}"][0]
