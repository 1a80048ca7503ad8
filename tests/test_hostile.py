"""Bad inputs, tried as a careless user and as an attacker would: each gives one located line and exit 2 at the
command line (never a traceback), and none loses or corrupts a user's data. Table-driven, so none regresses.

Each case builds its inputs in a fresh directory next to a tiny 2-layer Llama (with a tokenizer) and returns
the ``surgery`` arguments; ``check`` (optional) then verifies that nothing of the user's was touched.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from surgery.cli import main
from surgery.outputs import OutputLock, claim_dir
from tests.models import tiny_model
from tests.test_evaluate import _offline_tokenizer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny-hostile")
    tok = _offline_tokenizer()
    tiny_model("llama", num_hidden_layers=2, vocab_size=len(tok)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def plan(d: Path, tiny: Path, **over: Any) -> Path:
    data = d / "train.jsonl"
    if not data.exists():
        data.write_text("".join(json.dumps({"text": f"the quick brown fox {i} jumps over the lazy dog. " * 8}) + "\n"
                                for i in range(12)))  # fmt: skip
    raw = {"version": 2, "model": str(tiny), "output": str(d / "run"),
           "convert": [{"layers": "all", "mixer": "gla"}],
           "recover": {"data": {"source": str(data), "seq_len": 32}, "stages": {"lora": {"max_steps": 2}}}}
    raw.update(over)
    path = d / "plan.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def text_plan(d: Path, text: str | bytes) -> Path:
    path = d / "plan.yaml"
    (path.write_bytes if isinstance(text, bytes) else path.write_text)(text)
    return path


@dataclass
class Case:
    id: str
    setup: Callable[[Path, Path], list[str]]
    message: str  # a regex the one-line error must match
    check: Callable[[Path], None] | None = None


def _user_files(d: Path) -> None:
    (d / "mine").mkdir()
    (d / "mine" / "precious.txt").write_text("keep me")
    (d / "mine" / "sub").mkdir()


def _untouched(d: Path) -> None:
    assert (d / "mine" / "precious.txt").read_text() == "keep me" and (d / "mine" / "sub").is_dir()


def _foreign_output(d: Path, tiny: Path) -> list[str]:
    _user_files(d)
    return ["convert", str(plan(d, tiny)), "-o", str(d / "mine")]


def _file_output(d: Path, tiny: Path) -> list[str]:
    (d / "afile.txt").write_text("a file")
    return ["convert", str(plan(d, tiny)), "-o", str(d / "afile.txt")]


def _run_into_foreign(d: Path, tiny: Path) -> list[str]:
    _user_files(d)
    return ["run", str(plan(d, tiny, output=str(d / "mine")))]


def _binary_data(d: Path, tiny: Path) -> list[str]:
    p = plan(d, tiny)
    (d / "train.jsonl").write_bytes(b"\x00\xff\xfe binary \x80\x81")
    return ["recover", str(p)]


def _locked(d: Path, tiny: Path) -> list[str]:
    p = plan(d, tiny)
    lock = OutputLock(claim_dir(d / "run"))
    lock.__enter__()  # another process holds the run (flock is per open file, so this counts as another)
    _locked.lock = lock  # type: ignore[attr-defined]
    return ["recover", str(p)]


CASES = [
    Case("unknown-mixer", lambda d, t: ["check", str(plan(d, t, convert=[{"mixer": "glaa"}]))],
         r"convert.0.mixer: unknown mixer 'glaa'; did you mean 'gla'"),
    Case("unknown-option", lambda d, t: ["check", str(plan(d, t, convert=[{"mixer": "gla", "options": {"gate_norm": 1}}]))],
         r"convert.0.options.gate_norm: unknown key 'gate_norm'; did you mean 'gate_normalizer'"),
    Case("missing-plan", lambda d, t: ["check", str(d / "nope.yaml")], r"plan file '.*nope.yaml' does not exist"),
    Case("non-utf8", lambda d, t: ["check", str(text_plan(d, b"version: 2\nmodel: x\n# caf\xe9\n"))],
         r"plan.yaml: not UTF-8 text: byte 0xe9 on line 3"),
    Case("layers-true", lambda d, t: ["check", str(plan(d, t, convert=[{"layers": True, "mixer": "gla"}]))],
         r"convert.0.layers: true/false is not a layer selector"),
    Case("layers-huge", lambda d, t: ["check", str(plan(d, t, convert=[{"layers": "0-99999999", "mixer": "gla"}]))],
         r"99999999 is beyond any model"),
    Case("plan-50mb", lambda d, t: ["check", str(text_plan(d, "[" + "1," * (1 << 20) + "1]"))],
         r"a plan is a small YAML file"),
    Case("duplicate-key", lambda d, t: ["check", str(text_plan(d, f"version: 2\nmodel: {t}\nmodel: {t}\nconvert: []\n"))],
         r"key 'model' appears twice \(first on line 2\)"),
    Case("yaml-python-tag", lambda d, t: ["check", str(text_plan(d, "version: !!python/object/apply:os.system ['echo pwned']\n"))],
         r"broken YAML"),
    Case("bad-stage", lambda d, t: ["check", str(plan(d, t, recover={"stages": ["lorra"]}))],
         r"unknown stage 'lorra'; did you mean 'lora'"),
    Case("stage-order", lambda d, t: ["check", str(plan(d, t, recover={"stages": ["lora", "attention_transfer"]}))],
         r"attention_transfer must come before lora"),
    Case("offline-hub-id", lambda d, t: ["check", str(plan(d, t, model="some-org/not-cached-model"))],
         r"model: 'some-org/not-cached-model' is not a local path and not in the Hugging Face cache, and HF_HUB_OFFLINE"),
    Case("convert-into-foreign-dir", _foreign_output, r"did not create|not written by surgery|non-empty", _untouched),
    Case("convert-onto-a-file", _file_output, r"afile.txt.* a file",
         lambda d: (d / "afile.txt").read_text() == "a file" or pytest.fail("the user's file changed")),
    Case("run-into-foreign-dir", _run_into_foreign, r"non-empty directory that surgery did not create", _untouched),
    Case("recover-missing-data", lambda d, t: ["recover", str(plan(d, t, recover={"data": {"source": str(d / "no.jsonl")}}))],
         r"recover.data.source: .*no.jsonl does not exist"),
    Case("recover-binary-data", _binary_data, r"train.jsonl: not UTF-8 text"),
    Case("recover-while-locked", _locked, r"in use by another surgery process \(pid \d+\)"),
    Case("eval-without-section", lambda d, t: ["eval", str(plan(d, t))], r"the plan has no eval: section"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_gives_one_located_line(case: Case, tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    args = case.setup(tmp_path, tiny)
    try:
        code = main(args)
    finally:
        lock = getattr(_locked, "lock", None)
        if lock is not None:
            lock.__exit__(None, None, None)
            del _locked.lock  # type: ignore[attr-defined]
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [x for x in err.splitlines() if x.startswith("surgery ")]  # progress bars may share stderr
    assert "Traceback" not in err and len(lines) == 1, err
    import re

    assert re.search(case.message, err), err
    if case.check is not None:
        case.check(tmp_path)


def test_a_diverging_run_stops_and_keeps_finite_checkpoints(tiny: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    plan(tmp_path, tiny)  # writes the data file
    p = plan(tmp_path, tiny, recover={"data": {"source": str(tmp_path / "train.jsonl"), "seq_len": 32},
                                      "stages": {"lora": {"max_steps": 6, "lr": 1.0e9, "save_steps": 1}}})  # fmt: skip
    assert main(["recover", str(p)]) == 2
    err = capsys.readouterr().err
    assert re_search(r"training diverged at step \d: the (loss|gradient norm) is not finite .*lower the stage's lr", err)
    stage = tmp_path / "run" / "recover" / "lora"
    from safetensors.torch import load_file

    ckpts = sorted((stage / "checkpoints").glob("checkpoint-*"))
    for ckpt in ckpts:
        for name, t in load_file(str(ckpt / "adapter_model.safetensors")).items():
            assert torch.isfinite(t).all(), f"{ckpt.name}: {name} is not finite"
    rows = (stage / "loss.csv").read_text().splitlines()[1:]
    assert all(math.isfinite(float(r.split(",")[2])) for r in rows)  # never a NaN logged as 0.0
    assert not (tmp_path / "run" / "model").exists()  # nothing saved as if it were fine


def re_search(pattern: str, text: str) -> bool:
    import re

    return re.search(pattern, text) is not None


def test_a_run_that_never_trained_does_not_block_a_corrected_plan(tiny: Path, tmp_path: Path) -> None:
    bad = plan(tmp_path, tiny, recover={"data": {"source": str(tmp_path / "missing.jsonl")}})
    assert main(["recover", str(bad)]) == 2
    good = plan(tmp_path, tiny)
    assert main(["recover", str(good)]) == 0  # no "differs in data.source ... resume=False"
    changed = plan(tmp_path, tiny, recover={"data": {"source": str(tmp_path / "train.jsonl"), "seq_len": 32},
                                            "stages": {"lora": {"max_steps": 2, "lr": 5e-4}}})  # fmt: skip
    assert main(["recover", str(changed)]) == 2  # a trained run with another lr is refused...
    assert main(["recover", "--restart", str(changed)]) == 0  # ...unless restarted; the old run is kept aside
    assert list((tmp_path / "run" / "recover").glob("previous-*/lora/done.json"))


def test_a_plugin_mixer_of_the_wrong_shape_is_named_at_convert(registry: Any) -> None:
    import types

    import surgery
    from surgery.hookspecs import hookimpl
    from surgery.mixer import Mixer
    from surgery.plan import PlanError
    from surgery.registry import load_registry

    class Broken(Mixer):
        name = "broken_shape"
        default_weights = "copy_qkvo"

        def mix(self, x: torch.Tensor, ctx: Any) -> torch.Tensor:
            return x[:, :, : x.shape[-1] // 2]

    mod = types.ModuleType("shapeplugin")
    mod.surgery_mixers = hookimpl(lambda: [Broken])
    reg = load_registry(autoload=False, extra=[mod])
    p = surgery.load_plan({"version": 2, "model": "unused/hub", "convert": [{"mixer": "broken_shape"}]}, reg)
    with pytest.raises(PlanError, match=r"layer 0: mixer 'broken_shape' \(plugin 'shapeplugin' .*\) returned "
                                        r"\(1, 3, 32\) for an input \[1, 3, 64\]"):  # fmt: skip
        surgery.convert(p, tiny_model("llama"))


# ------------------------------------------------------------------ issue 26: writes, ownership, trust, numbers


def _victim(d: Path) -> Path:
    victim = d / "victim.txt"
    victim.write_text("keep me")
    return victim


@pytest.mark.parametrize("name", [".surgery.lock", ".surgery"])
def test_a_planted_lock_or_marker_link_is_refused_not_followed(name: str, tmp_path: Path) -> None:
    from surgery.outputs import OutputError

    out = tmp_path / "run"
    out.mkdir()
    victim = _victim(tmp_path)
    (out / name).symlink_to(victim)
    with pytest.raises(OutputError, match="symbolic link"):
        with OutputLock(claim_dir(out)):
            pass
    assert victim.read_text() == "keep me"


def test_every_file_write_refuses_a_link_and_leaves_no_temporary(tmp_path: Path) -> None:
    from surgery.outputs import OutputError, write_file, write_owned

    victim = _victim(tmp_path)
    (tmp_path / "results.md").symlink_to(victim)
    with pytest.raises(OutputError, match="symbolic link"):
        write_file(tmp_path / "results.md", "x")
    out = claim_dir(tmp_path / "eval")
    (out / "results.json").symlink_to(victim)
    with pytest.raises(OutputError, match="symbolic link"):
        write_owned(out, "results.json", "{}")
    assert victim.read_text() == "keep me"
    assert not [p for p in tmp_path.rglob("*.tmp")]


def test_the_lock_is_removed_on_exit_and_a_second_holder_is_refused(tmp_path: Path) -> None:
    from surgery.outputs import LOCK, OutputError

    out = claim_dir(tmp_path / "run")
    with OutputLock(out):
        assert (out / LOCK).read_text() == str(__import__("os").getpid())
        with pytest.raises(OutputError, match="in use by another surgery process"):
            OutputLock(out).__enter__()
    assert not (out / LOCK).exists()


def test_results_are_written_only_into_a_surgery_directory(tmp_path: Path) -> None:
    from surgery.evaluate import write_results
    from surgery.outputs import OutputError

    mine = tmp_path / "eval"
    mine.mkdir()
    (mine / "results.md").write_text("my table")
    with pytest.raises(OutputError, match="did not create"):
        write_results({"tasks": {}, "settings": {}}, mine)
    assert (mine / "results.md").read_text() == "my table" and sorted(p.name for p in mine.iterdir()) == ["results.md"]
    victim = _victim(tmp_path)
    link = tmp_path / "linked"
    link.mkdir()
    (link / "eval").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    with pytest.raises(OutputError, match="symbolic link"):
        write_results({"tasks": {}, "settings": {}}, link / "eval")
    assert victim.read_text() == "keep me"


def test_the_eval_command_refuses_a_directory_surgery_did_not_create(tiny: Path, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    out = tmp_path / "run"
    (out / "model").mkdir(parents=True)
    (out / "model" / "config.json").write_text("{}")  # no marker: the user's
    (out / "eval").mkdir()
    (out / "eval" / "results.json").write_text("mine")
    p = plan(tmp_path, tiny, eval={"tasks": ["piqa"]})
    assert main(["eval", str(p)]) == 2
    assert "did not create" in capsys.readouterr().err
    assert (out / "eval" / "results.json").read_text() == "mine"


def test_convert_refuses_the_plans_own_model_directory(tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    before = sorted(p.name for p in tiny.iterdir())
    assert main(["convert", str(plan(tmp_path, tiny)), "-o", str(tiny), "--force"]) == 2
    assert "the plan's own model directory" in capsys.readouterr().err
    assert sorted(p.name for p in tiny.iterdir()) == before


def test_force_keeps_every_user_file_in_convert_and_model(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "convert").mkdir()
    (out / "convert" / "draft.txt").write_text("mine too")
    assert main(["convert", str(plan(tmp_path, tiny, output=str(out))), "--force"]) == 0
    assert (out / "notes.txt").read_text() == "mine" and (out / "convert" / "draft.txt").read_text() == "mine too"
    assert (out / "convert" / "config.json").is_file() and not list(out.glob(".convert*"))


def test_a_changed_mixer_does_not_reuse_the_converted_model_or_the_adapter(tiny: Path, tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    assert main(["convert", str(plan(tmp_path, tiny))]) == 0
    assert main(["recover", str(plan(tmp_path, tiny))]) == 0
    hgrn2 = plan(tmp_path, tiny, convert=[{"layers": "all", "mixer": "hgrn2"}])
    assert main(["recover", str(hgrn2)]) == 2
    assert "converted by a different plan (differs in: convert)" in capsys.readouterr().err
    assert main(["convert", str(hgrn2)]) == 0  # converted again: now the recovery run is the stale part
    assert main(["recover", str(hgrn2)]) == 2
    assert "differs in: converted_by.convert" in capsys.readouterr().err


def test_a_falsified_checkpoint_step_is_refused(tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    p = plan(tmp_path, tiny, recover={"data": {"source": str(tmp_path / "train.jsonl"), "seq_len": 32},
                                      "stages": {"lora": {"max_steps": 4, "save_steps": 2}}})  # fmt: skip
    plan(tmp_path, tiny)  # the data file
    assert main(["recover", str(p)]) == 0
    stage = tmp_path / "run" / "recover" / "lora"
    (stage / "done.json").unlink()  # as if killed after checkpoint-4
    ckpt = sorted((stage / "checkpoints").glob("checkpoint-*"))[-1]
    state = json.loads((ckpt / "trainer_state.json").read_text())
    (ckpt / "trainer_state.json").write_text(json.dumps(state | {"global_step": 10**6}))
    assert main(["recover", str(p)]) == 2
    assert "global_step is 1000000, but the checkpoint is checkpoint-" in capsys.readouterr().err


@pytest.mark.parametrize("env", [{"RANK": "1"}, {"RANK": "1", "WORLD_SIZE": "2"},
                                 {"RANK": "3", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "x",
                                  "MASTER_PORT": "1"}])  # fmt: skip
def test_rank_is_trusted_only_under_a_launcher(env: dict, tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert main(["recover", str(plan(tmp_path, tiny))]) == 2
    assert re_search(r"RANK|inconsistent", capsys.readouterr().err)
    assert not (tmp_path / "run" / ".surgery.lock").exists()


def test_local_task_code_needs_trust_except_surgerys_own_helpers(tmp_path: Path) -> None:
    from surgery.demo.tasks import TEMPLATE_DIR
    from surgery.evaluate import EvalSpec

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "evil.yaml").write_text("task: evil\nprocess_results: !function helpers.run\n")
    (tasks / "helpers.py").write_text("import os\ndef run(doc, results): os.system('echo pwned')\n")
    with pytest.raises(ValueError, match=r"local task files are code: .*evil.yaml: !function helpers.run .*"
                                         r"eval.trust_code: true"):  # fmt: skip
        EvalSpec(tasks=("evil",), include=(tasks,))
    assert EvalSpec(tasks=("evil",), include=(tasks,), trust_code=True).trust_code
    ours = tmp_path / "ours"
    ours.mkdir()
    (ours / "wiki_long.yaml").write_text((TEMPLATE_DIR / "wiki_long.yaml").read_text())
    (ours / "long_ppl.py").write_bytes((TEMPLATE_DIR / "long_ppl.py").read_bytes())
    EvalSpec(tasks=("wiki_long",), include=(ours,))  # surgery's own helper, byte for byte: no trust needed
    (ours / "long_ppl.py").write_text((TEMPLATE_DIR / "long_ppl.py").read_text() + "\nimport os\n")
    with pytest.raises(ValueError, match="local task files are code"):
        EvalSpec(tasks=("wiki_long",), include=(ours,))
    (ours / "long_ppl.py").unlink()
    (ours / "wiki_long.yaml").write_text("task: wiki_long\nprocess_results: !function ../tasks/helpers.run\n")
    with pytest.raises(ValueError, match="local task files are code"):  # a path out of the directory
        EvalSpec(tasks=("wiki_long",), include=(ours,))


@pytest.mark.parametrize("section, where", [
    ({"recover": {"stages": {"lora": {"max_grad_norm": float("inf")}}}}, "max_grad_norm"),
    ({"recover": {"stages": {"lora": {"lr": float("nan")}}}}, "lr"),
    ({"recover": {"stages": {"lora": {"warmup_steps": 1e20}}}}, "warmup_steps"),
    ({"recover": {"stages": {"lora": {"seed": 2**60}}}}, "seed"),
    ({"convert": [{"mixer": "liger_attention", "options": {"w_swa": -1.0}}]}, "w_swa"),
    ({"convert": [{"mixer": "liger_attention", "options": {"w_rec": float("nan")}}]}, "w_rec"),
    ({"convert": [{"mixer": "gla", "options": {"gate_normalizer": float("inf")}}]}, "gate_normalizer"),
    ({"eval": {"tasks": ["wiki_ppl"], "limits": {"wiki_pll": 3}}}, "did you mean 'wiki_ppl'"),
])  # fmt: skip
def test_non_finite_absurd_or_misspelt_numbers_are_located_errors(section: dict, where: str, tiny: Path,
                                                                  tmp_path: Path, capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    assert main(["check", str(plan(tmp_path, tiny, **section))]) == 2
    err = capsys.readouterr().err
    assert where in err and "Traceback" not in err, err


def test_yaml_merge_keys_work_and_deep_nesting_is_a_located_error(tiny: Path, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    text = (f"version: 2\nmodel: {tiny}\nbase: &b {{mixer: gla, layers: all}}\n"
            "convert:\n  - <<: *b\n    options: {gate_rank: 8}\n")  # fmt: skip
    # 'base' is not a plan key: the error is about it, not about the merge key
    assert main(["check", str(text_plan(tmp_path, text))]) == 2
    assert "unknown key 'base'" in capsys.readouterr().err
    text = f"version: 2\nmodel: {tiny}\nx: &b {{mixer: gla, layers: all}}\n"
    text = f"version: 2\nmodel: {tiny}\nconvert:\n  - &b {{mixer: gla, layers: all}}\n  - <<: *b\n    mixer: hgrn2\n"
    assert main(["check", str(text_plan(tmp_path, text))]) == 2  # both rules match every layer: overlap, not YAML
    assert "broken YAML" not in capsys.readouterr().err
    assert main(["check", str(text_plan(tmp_path, "a: " + "[" * 5000 + "]" * 5000 + "\n"))]) == 2
    err = capsys.readouterr().err
    assert "nested too deeply" in err or "broken YAML" in err, err


def test_generate_refuses_zero_or_negative_new_tokens(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    for n in ("0", "-5"):
        assert main(["generate", str(tmp_path), "--prompt", "hi", "--max-new-tokens", n]) == 2
        assert "--max-new-tokens" in capsys.readouterr().err


def test_merge_false_is_refused_before_any_work(tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    p = plan(tmp_path, tiny, recover={"data": {"source": str(tmp_path / "train.jsonl"), "seq_len": 32},
                                      "merge": False, "stages": {"lora": {"max_steps": 1}}})  # fmt: skip
    assert main(["run", str(p)]) == 2
    assert "recover.merge: false" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_pickled_adapter_exits_2(tmp_path: Path) -> None:
    from surgery.errors import SurgeryError
    from surgery.recovery.adapters import refuse_pickles

    (tmp_path / "adapter_model.bin").write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(SurgeryError, match="pickled weights are not loaded"):
        refuse_pickles(tmp_path)


def test_fetch_demo_replaces_only_a_directory_that_is_all_its_own(tmp_path: Path) -> None:
    from surgery.demo import _replace_ours
    from surgery.outputs import OutputError

    def build() -> Path:
        tmp = tmp_path / ".data-build"
        (tmp / "tasks").mkdir(parents=True)
        (tmp / "train.jsonl").write_text("new")
        (tmp / "tasks" / "wiki_ppl.yaml").write_text("new")
        return tmp

    data = tmp_path / "data"
    (data / "tasks").mkdir(parents=True)
    (data / "train.jsonl").write_text("old")  # an older demo build: every file is one the demo writes
    _replace_ours(build(), data)
    assert (data / "train.jsonl").read_text() == "new" and (data / ".surgery").is_file()
    (data / "tasks" / "my_task.yaml").write_text("mine")  # the user's file inside
    (data / "train.jsonl").write_text("stale")
    with pytest.raises(OutputError, match=r"holds 'tasks/my_task.yaml', which surgery fetch-demo did not write"):
        _replace_ours(build(), data)
    assert (data / "tasks" / "my_task.yaml").read_text() == "mine"


def test_fetch_demo_root_that_is_a_file_or_holds_a_link_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "afile").write_text("x")
    assert main(["fetch-demo", "--root", str(tmp_path / "afile")]) == 2
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "data").symlink_to(tmp_path, target_is_directory=True)
    assert main(["fetch-demo", "--root", str(tmp_path / "root")]) == 2
    assert "symbolic link" in capsys.readouterr().err
