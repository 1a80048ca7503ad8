"""benchmarks/cpu_forward.py --tiny: the base and each plan's conversion timed in one run, ratios to the base."""

from __future__ import annotations

import pytest

from benchmarks import cpu_forward

pytestmark = pytest.mark.usefixtures("one_thread")


def test_tiny_run_times_base_and_each_plan(capsys: pytest.CaptureFixture[str]) -> None:
    rows = cpu_forward.main(["--tiny", "--batch", "2", "--length", "96", "--reps", "2"])
    out = capsys.readouterr().out
    assert [r["model"] for r in rows] == ["base", "demo", "demo-lora"]
    for r in rows:
        assert len(r["all_s"]) == 2 and r["median_s"] > 0
        assert r["x_base"] == pytest.approx(r["median_s"] / rows[0]["median_s"], rel=1e-2)
        per_turn = sorted(v / b for v, b in zip(r["all_s"], rows[0]["all_s"]))
        assert r["x_base_turns"] == pytest.approx(sum(per_turn) / 2, rel=1e-2)  # the median of 2 turns
        assert f"| {r['model']} |" in out
    assert rows[0]["x_base"] == rows[0]["x_base_turns"] == 1.0
