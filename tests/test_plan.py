"""Plan parsing: every invalid plan in tests/plans/invalid gives the one message its first line announces."""

from __future__ import annotations

from pathlib import Path

import pytest

import surgery
from surgery.plan import PlanError, load_plan, plan_json_schema, select_layers, Every

PLANS = Path(__file__).parent / "plans"
INVALID = sorted((PLANS / "invalid").glob("*.yaml"))


def _materialise(src: Path, tmp_path: Path, tiny_dir: str) -> Path:
    text = src.read_text().replace("{tiny}", tiny_dir).replace("{out}", str(tmp_path / "out"))
    dst = tmp_path / src.name
    dst.write_text(text)
    return dst


def test_there_are_enough_invalid_plans() -> None:
    assert len(INVALID) >= 12


@pytest.mark.parametrize("path", INVALID, ids=[p.stem for p in INVALID])
def test_invalid_plan_gives_its_message(path: Path, tmp_path: Path, tiny_dir: str, registry) -> None:
    first = path.read_text().splitlines()[0]
    assert first.startswith("# error: "), f"{path.name} must start with '# error: <message>'"
    expected = first.removeprefix("# error: ")
    with pytest.raises(PlanError) as err:
        plan = load_plan(_materialise(path, tmp_path, tiny_dir), registry)
        surgery.check(plan)
    assert expected in str(err.value)
    # One clear message: exactly one problem is reported for each of these plans.
    assert len(err.value.problems) == 1, err.value.problems


def test_valid_plan_resolves_defaults(tmp_path: Path, tiny_dir: str, registry) -> None:
    plan = load_plan(_materialise(PLANS / "valid" / "identity.yaml", tmp_path, tiny_dir), registry)
    assert plan.convert[0].weights == "copy_qkvo"
    assert plan.dtype == "float32"
    # The resolved plan is a fixed point: re-loading its dict gives the same plan.
    assert load_plan(plan.to_dict(), registry) == plan


def test_default_weight_map_and_options_are_filled(registry) -> None:
    plan = load_plan({"version": 2, "model": "some/hub-id", "convert": [{"mixer": "swa"}]}, registry)
    rule = plan.convert[0]
    assert rule.weights == registry.mixer("swa").default_weights
    assert rule.options == registry.mixer("swa").Options()  # validated once, into the mixer's own class
    assert plan.to_dict()["convert"][0]["options"] == {"window": 64, "sinks": 0}


def test_all_problems_are_reported_together(registry) -> None:
    data = {"version": 2, "model": "x/y", "convert": [{"mixer": "softmx"}, {"mixer": "softmax", "weights": "nope"}]}
    with pytest.raises(PlanError) as err:
        load_plan(data, registry)
    locs = [loc for loc, _ in err.value.problems]
    assert locs == ["convert.0.mixer", "convert.1.weights"]


@pytest.mark.parametrize(
    "selector, expected",
    [("all", [0, 1, 2, 3, 4, 5, 6, 7]), ("2-4", [2, 3, 4]), (3, [3]), ([0, "5-6", 2], [0, 2, 5, 6]),
     (Every(every=4, offset=3), [3, 7]), (Every(every=3), [0, 3, 6])],
)  # fmt: skip
def test_select_layers(selector, expected) -> None:
    assert select_layers(selector, 8) == expected


def test_schema_exports_plan_fields() -> None:
    schema = plan_json_schema()
    assert {"version", "model", "dtype", "output", "convert"} <= set(schema["properties"])
    assert schema["additionalProperties"] is False


def test_schema_has_every_mixers_and_stages_options(registry) -> None:
    schema = plan_json_schema(registry)
    defs = schema["$defs"]
    rule = defs["Rule"]
    assert set(rule["properties"]["mixer"]["enum"]) == set(registry.mixers)
    branches = {b["if"]["properties"]["mixer"]["const"]: b["then"]["properties"]["options"]["$ref"] for b in rule["allOf"]}
    assert set(branches) == set(registry.mixers)
    assert "window" in defs["mixer.liger_attention"]["properties"]
    assert "gate_normalizer" in defs["mixer.gla"]["properties"]
    stages = defs["RecoverSpec"]["properties"]["stages"]["anyOf"][1]["properties"]
    assert set(stages) == set(registry.stages)
    assert "loss" in defs["stage.lora"]["properties"] and "train" in defs["stage.attention_transfer"]["properties"]


def test_recover_stages_are_checked_against_the_registry(registry) -> None:
    base = {"version": 2, "model": "x/y", "convert": [{"mixer": "gla"}]}
    with pytest.raises(PlanError, match=r"recover.stages.lorra: unknown stage 'lorra'; did you mean 'lora'"):
        load_plan({**base, "recover": {"stages": ["lorra"]}}, registry)
    with pytest.raises(PlanError, match=r"recover.stages.lora.lrr: unknown key 'lrr'; did you mean 'lr'"):
        load_plan({**base, "recover": {"stages": {"lora": {"lrr": 1}}}}, registry)
    with pytest.raises(PlanError, match="recover.stages.attention_transfer: attention_transfer must come before lora"):
        load_plan({**base, "recover": {"stages": ["lora", "attention_transfer"]}}, registry)
    with pytest.raises(PlanError, match=r"recover.train is no longer a key; its settings now live under "
                                        r"recover.stages.lora"):  # fmt: skip
        load_plan({**base, "recover": {"train": {"lr": 1}}}, registry)
    plan = load_plan({**base, "recover": {"stages": {"attention_transfer": {"lr": 5e-3}, "lora": None}}}, registry)
    stages = plan.recover.stage_objects()
    assert [s.name for s in stages] == ["attention_transfer", "lora"]
    assert stages[0].options.lr == 5e-3 and stages[0].needs_teacher() and not stages[1].needs_teacher()
    assert load_plan(plan.to_dict(), registry) == plan


def test_a_version_1_plan_is_migrated_to_the_one_spelling_of_a_nested_mixer(registry) -> None:
    """Version 1's spellings (MoM's recurrence/recurrence_options, a branch's options beside Liger's own) load as
    version 2's ``recurrent: {mixer, options}``; in a version 2 plan the same keys are located errors."""
    from surgery.plan import PLAN_VERSION, PlanError, load_plan

    v1 = {"version": 1, "model": "unused/hub-id", "convert": [
        {"layers": [0], "mixer": "liger_attention", "options": {"recurrent": "gsa", "num_slots": 8, "window": 4}},
        {"layers": [1], "mixer": "mom", "options": {"recurrence": "gsa", "recurrence_options": {"num_slots": 4}}}]}
    plan = load_plan(v1, registry)
    assert plan.version == PLAN_VERSION == 2
    liger, mom = (rule.options for rule in plan.convert)
    assert liger.recurrent.mixer == "gsa" and liger.recurrent.options.num_slots == 8 and liger.window == 4
    assert mom.recurrent.mixer == "gsa" and mom.recurrent.options.num_slots == 4
    with pytest.raises(PlanError, match="convert.0.options.num_slots: unknown key 'num_slots'"):
        load_plan({**v1, "version": 2}, registry)
