"""benchmarks/train_step.py --tiny: one row per model (base and every converted mixer), ratios to the base."""

from __future__ import annotations

import pytest

from benchmarks import train_step


def test_tiny_run_prints_a_row_per_model(capsys: pytest.CaptureFixture[str]) -> None:
    rows = train_step.main(["--tiny", "--steps", "1", "--stored"])
    out = capsys.readouterr().out
    assert [r["model"] for r in rows] == ["base", *train_step.MIXERS, *(m + "/stored" for m in train_step.MIXERS)]
    for r in rows:
        assert "error" not in r, r
        assert r["T"] == 64 and r["step_ms"] > 0 and r["tok_s"] > 0
        assert r["tok_s_vs_base"] == pytest.approx(r["tok_s"] / rows[0]["tok_s"])
        assert f"| {r['model']} | 64 |" in out  # the Markdown table has the row
    assert rows[0]["tok_s_vs_base"] == 1.0


def test_profile_prints_the_top_kernels(capsys: pytest.CaptureFixture[str]) -> None:
    train_step.main(["--tiny", "--steps", "1", "--mixers", "gla", "--profile"])
    out = capsys.readouterr().out
    assert "gla T=64:" in out and "kernel time" in out and " ms " in out
