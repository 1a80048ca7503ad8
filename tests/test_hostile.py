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
