"""benchmarks/train_step.py --tiny: one row per model (base and every converted mixer), ratios to the base."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from benchmarks import train_step


def test_tiny_run_prints_a_row_per_model(capsys: pytest.CaptureFixture[str]) -> None:
    rows = train_step.main(["--tiny", "--steps", "1", "--stored"])
    out = capsys.readouterr().out
    names = [*train_step.MIXERS, "memory"]  # the default rows: the mixers and the main job's memory recipe
    assert [r["model"] for r in rows] == ["base", *names, *(m + "/stored" for m in names)]
    memory = next(r for r in rows if r["model"] == "memory")
    plan = yaml.safe_load((Path(__file__).resolve().parents[2] / "examples" / "demo.yaml").read_text())
    assert memory["convert"][0]["options"] == plan["convert"][0]["options"]  # read from the main job's plan
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


def test_a_rule_and_a_plan_are_rows(capsys: pytest.CaptureFixture[str]) -> None:
    """``--mixers`` takes inline rules (labelled or not) and example plans besides mixer names."""
    rows = train_step.main(["--tiny", "--steps", "1", "--mixers", "gla",
                            "small={mixer: liger_attention, options: {window: 8, sinks: 2, memory: 16, "
                            "memory_chunk: 8, w_swa: 1.0, w_rec: 0.0}}",
                            '{"mixer": "liger_attention", "options": {"window": 16}}', "examples/liger-gla.yaml"])
    assert [r["model"] for r in rows] == ["base", "gla", "small", "liger_attention{window:16}", "liger-gla"]
    for r in rows:
        assert "error" not in r, r
    assert rows[2]["convert"] == [{"layers": "all", "mixer": "liger_attention", "options": {
        "window": 8, "sinks": 2, "memory": 16, "memory_chunk": 8, "w_swa": 1.0, "w_rec": 0.0}}]


@pytest.mark.parametrize("spec,match", [("glaa", "not a registered mixer"), ("{options: {window: 4}}", "'mixer' key")])
def test_a_bad_conversion_is_named(spec: str, match: str) -> None:
    with pytest.raises(SystemExit, match=match):
        train_step.main(["--tiny", "--steps", "1", "--mixers", spec])
