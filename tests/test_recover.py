"""Recovery: LoRA on converted layers lowers the loss, resumes exactly after kill -9, refuses bare layers,
trains the mixers' own parameters, attention transfer pulls each layer towards the attention it replaced, and no
checkpoint or output file is a pickle (nor is one read on resume)."""

from __future__ import annotations

import copy
import csv
import json
import os
import pickle
import random
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from torch import Tensor, nn
from transformers import PreTrainedTokenizerFast, TrainerCallback

import surgery
from surgery.mixer import Mixer, MixContext
from surgery.recovery import load_adapter
from surgery.recovery import recover as recover_result
from surgery.recovery.data import ALPACA_NO_INPUT, IGNORE, tokenize_records
from surgery.recovery.spec import RecoverSpec
from surgery.recovery.stage import TrainOptions
from surgery.recovery.state import load_state, rng_states, save_state, set_rng_states
from surgery.sites.attention import AttentionDims, AttentionSite
from tests.models import tiny_model

ROOT = Path(__file__).resolve().parents[1]
CHARS = "abcdefghijklmnopqrstuvwxyz .,\n"
WORDS = ["the", "cat", "sat", "on", "mat", "a", "dog", "ran", "to", "park", "and", "then", "slept"]


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character (ids < 40, inside the tiny models' vocabulary of 160); EOS is id 2 as in them."""
    vocab = {"<unk>": 0, "<pad>": 1, "<eos>": 2, **{c: i + 3 for i, c in enumerate(CHARS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>", pad_token="<pad>")


class GatedLinearMixer(Mixer):
    """Normalised causal linear attention (softmax features) with two parameters of its own: a per-head gain
    held by the mixer itself and a router module that gates each head per token."""

    name = "gated_linear_test"

    def __init__(self, site: AttentionSite, options: Mixer.Options, config: object) -> None:
        super().__init__(site, options, config)
        self.router = nn.Linear(site.dims.hidden_size, self.num_heads)
        nn.init.zeros_(self.router.weight)
        nn.init.zeros_(self.router.bias)
        self.head_gain = nn.Parameter(torch.full((self.num_heads,), 2.0))  # 2 * sigmoid(0) = 1 at the start

    def mix(self, x: Tensor, ctx: MixContext) -> Tensor:
        B, T, _ = x.shape
        q, k, v = self.project(x)  # [B, T, H, D], k/v with the kv heads
        g = self.num_key_value_groups
        q, k, v = q.softmax(-1), k.repeat_interleave(g, 2).softmax(-1), v.repeat_interleave(g, 2)
        num = torch.einsum("bthd,bthde->bthe", q, torch.einsum("bthd,bthe->bthde", k, v).cumsum(1))
        den = torch.einsum("bthd,bthd->bth", q, k.cumsum(1)).unsqueeze(-1)
        gate = self.head_gain * torch.sigmoid(self.router(x))  # [B, T, H]
        return self.o_proj((num / den * gate.unsqueeze(-1)).reshape(B, T, -1))


def converted(layers: int = 2) -> tuple[nn.Module, nn.Module]:
    """A tiny Llama with every attention swapped for ``GatedLinearMixer`` (q/k/v/o copied), and its original."""
    model = tiny_model("llama", num_hidden_layers=layers)
    teacher = copy.deepcopy(model)
    c = model.config
    d = c.hidden_size // c.num_attention_heads
    for i, layer in enumerate(model.model.layers):
        dims = AttentionDims(c.hidden_size, c.num_attention_heads, c.num_key_value_heads, d, False, False, d**-0.5)
        site = AttentionSite(i, f"model.layers.{i}.self_attn", type(layer.self_attn).__name__, dims, "separate")
        mixer = GatedLinearMixer(site, GatedLinearMixer.Options(), c)
        missing, _ = mixer.load_state_dict(layer.self_attn.state_dict(), strict=False)
        assert sorted(missing) == ["head_gain", "router.bias", "router.weight"]
        layer.self_attn = mixer
    return model, teacher


def write_data(path: Path, n: int = 40) -> Path:
    rng = random.Random(0)
    with path.open("w") as f:
        for _ in range(n):
            f.write(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 60))) + "."}) + "\n")
    return path


def make_spec(data: Path | str, **train: object) -> RecoverSpec:
    return RecoverSpec.model_validate(
        {"data": {"source": str(data), "seq_len": 64}, "stages": {"lora": {"lr": 1e-2, "save_steps": 100, **train}}}
    )


def recover(*args: Any, **kwargs: Any) -> nn.Module:
    """The recovered model of ``surgery.recovery.recover`` (most tests inspect only the model)."""
    return recover_result(*args, **kwargs).model


def chunk_loss(model: nn.Module, ids: Tensor) -> float:
    with torch.no_grad():
        return float(model(input_ids=ids, labels=ids).loss)


def layer_mse(model: nn.Module, teacher: nn.Module, ids: Tensor) -> list[float]:
    """MSE between each converted layer and the original attention on the original model's hidden states."""
    found: list[float] = []
    hooks = []
    for i, layer in enumerate(model.model.layers):
        original = teacher.model.layers[i].self_attn

        def hook(_m: nn.Module, args: tuple, kwargs: dict, out: tuple, original: nn.Module = original) -> tuple:
            ref = original(*args, **kwargs)[0]
            found.append(F.mse_loss(out[0], ref).item())
            return (ref, None)

        hooks.append(layer.self_attn.register_forward_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        for h in hooks:
            h.remove()
    return found


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_data(tmp_path_factory.mktemp("recover-data") / "train.jsonl")


@pytest.fixture(scope="module")
def probe() -> Tensor:
    """Two sequences of the training distribution that the run never sees as such (other seed)."""
    rng = random.Random(1)
    tok = char_tokenizer()
    texts = [" ".join(rng.choice(WORDS) for _ in range(30))[:64] for _ in range(2)]
    return torch.tensor([tok(t)["input_ids"] for t in texts])


@pytest.fixture(scope="module")
def trained(data: Path, probe: Tensor, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One 12-step LoRA run, shared by the tests that inspect its result."""
    model, _ = converted()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss_before = chunk_loss(model, probe)
    out = tmp_path_factory.mktemp("recover-run")
    result = recover_result(model, spec=make_spec(data, max_steps=12), tokenizer=char_tokenizer(), out=out)
    return {"model": result.model, "result": result, "before": before, "loss_before": loss_before, "out": out}


def test_loss_falls_and_outputs_are_written(trained: dict, probe: Tensor) -> None:
    model, out = trained["model"], trained["out"]
    assert chunk_loss(model, probe) < trained["loss_before"] - 0.05
    rows = list(csv.DictReader((out / "lora" / "loss.csv").open()))
    assert [int(r["step"]) for r in rows] == list(range(1, 13))
    assert [int(r["tokens"]) for r in rows][-1] == 12 * 2 * 64
    losses = [float(r["loss"]) for r in rows]
    assert sum(losses[-3:]) < sum(losses[:3])
    assert (out / "lora" / "loss.png").stat().st_size > 1000
    assert (out / "loss.csv").read_text() == (out / "lora" / "loss.csv").read_text()
    result = trained["result"]
    assert (result.steps, result.tokens) == (12, 12 * 2 * 64)
    assert result.stages["lora"].steps == 12 and result.adapter == out / "adapter"
    assert not hasattr(model, "surgery_recover_report")  # results are returned, never attached to the model
    assert {"adapter_model.safetensors", "adapter_config.json"} <= {p.name for p in (out / "adapter").iterdir()}
    # Returned merged: plain Linear layers again, mixers still in place, q/k/v changed, MLPs untouched.
    assert not any("lora_" in n for n, _ in model.named_parameters())
    assert all(isinstance(layer.self_attn, GatedLinearMixer) for layer in model.model.layers)
    params, before = dict(model.named_parameters()), trained["before"]
    for name in ("layers.0.self_attn.q_proj", "layers.1.self_attn.k_proj", "layers.1.self_attn.v_proj"):
        assert not torch.equal(params[f"model.{name}.weight"], before[f"model.{name}.weight"]), name
    for name in ("layers.1.self_attn.o_proj", "layers.0.mlp.up_proj", "layers.1.mlp.down_proj"):
        assert torch.equal(params[f"model.{name}.weight"], before[f"model.{name}.weight"]), name


def test_mixer_params_are_trained_saved_and_reloaded(trained: dict, probe: Tensor) -> None:
    model, before, out = trained["model"], trained["before"], trained["out"]
    params = dict(model.named_parameters())
    own = [f"model.layers.{i}.self_attn.{n}" for i in range(2) for n in ("head_gain", "router.weight", "router.bias")]
    for name in own:
        assert not torch.equal(params[name], before[name]), f"{name} was not trained"
    saved = load_file(str(out / "adapter" / "mixer_params.safetensors"))
    assert sorted(saved) == sorted(own)
    # A fresh converted model plus the saved adapter is the returned model.
    fresh, _ = converted()
    reloaded = load_adapter(fresh, out / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=probe).logits, model(input_ids=probe).logits)


def test_resume_with_another_spec_is_refused(trained: dict, data: Path) -> None:
    model, _ = converted()
    with pytest.raises(ValueError, match="differs in: stages.lora.lr"):
        recover(model, spec=make_spec(data, max_steps=12, lr=5e-3), tokenizer=char_tokenizer(), out=trained["out"])


class StepCounter(TrainerCallback):
    def __init__(self) -> None:
        self.steps = 0

    def on_step_end(self, args: object, state: object, control: object, **kwargs: object) -> None:
        self.steps += 1


def test_finished_run_is_reloaded_not_retrained(trained: dict, data: Path, probe: Tensor) -> None:
    model, _ = converted()
    counter = StepCounter()
    spec = make_spec(data, max_steps=12, save_steps=6)  # checkpoint spacing may change between runs
    again = recover(model, spec=spec, tokenizer=char_tokenizer(), out=trained["out"], callbacks=[counter])
    assert counter.steps == 0
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=probe).logits, trained["model"](input_ids=probe).logits)


_CHILD = """
import sys, time, torch
sys.path.insert(0, {root!r})
torch.set_num_threads({threads})
from transformers import TrainerCallback
from tests.test_recover import char_tokenizer, converted, make_spec
from surgery.recovery import recover

class Hang(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == {hang_at}:
            open({ready!r}, "w").close()
            time.sleep(600)

model, _ = converted()
recover(model, spec=make_spec({data!r}, max_steps=8, save_steps=2), tokenizer=char_tokenizer(), out={out!r},
        callbacks=[Hang()])
"""


def test_kill_9_then_resume_ends_like_an_uninterrupted_run(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    killed, clean, ready = tmp_path / "killed", tmp_path / "clean", tmp_path / "ready"
    code = _CHILD.format(root=str(ROOT), threads=torch.get_num_threads(), hang_at=5, ready=str(ready),
                         data=str(data), out=str(killed))  # fmt: skip
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            if child.poll() is not None:
                pytest.fail(f"the training subprocess exited early:\n{child.stderr.read().decode()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail("the training subprocess did not reach step 5 in 120 s")
            time.sleep(0.05)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    ckpts = sorted(p.name for p in (killed / "lora" / "checkpoints").iterdir())
    assert ckpts == ["checkpoint-2", "checkpoint-4"] and not (killed / "lora" / "done.json").exists()
    assert pickled_files(killed) == []
    for ckpt in ckpts:
        saved_args = json.loads((killed / "lora" / "checkpoints" / ckpt / "training_args.json").read_text())
        assert (saved_args["seed"], saved_args["save_steps"]) == (0, 2)

    spec = make_spec(data, max_steps=8, save_steps=2)
    with monkeypatch.context() as m:  # resume and train again without a single pickle read or written
        forbid_pickle(m)
        model, _ = converted()
        resumed = recover(model, spec=spec, tokenizer=char_tokenizer(), out=killed)
        model, _ = converted()
        reference = recover(model, spec=spec, tokenizer=char_tokenizer(), out=clean)
    assert pickled_files(killed) == [] and pickled_files(clean) == []

    a, b = resumed.state_dict(), reference.state_dict()
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"resumed run ends with other weights in {different[:5]}"
    curve = [(r["step"], r["loss"]) for r in csv.DictReader((killed / "lora" / "loss.csv").open())]
    assert curve == [(r["step"], r["loss"]) for r in csv.DictReader((clean / "lora" / "loss.csv").open())]



def _is_safetensors(data: bytes) -> bool:
    """An 8-byte little-endian header length, then that many bytes of JSON (its first byte may well be 0x80)."""
    if len(data) < 10:
        return False
    n = int.from_bytes(data[:8], "little")
    try:
        return 8 + n <= len(data) and isinstance(json.loads(data[8 : 8 + n]), dict)
    except ValueError:
        return False


def pickled_files(root: Path) -> list[str]:
    """Files under ``root`` that are pickles (protocol 2+: 0x80 then the protocol) or torch.save zip archives."""
    found = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        data = path.read_bytes()
        if _is_safetensors(data):
            continue
        if data[:1] == b"\x80" and data[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
            found.append(str(path.relative_to(root)))
        elif zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                if any(n.endswith(".pkl") for n in z.namelist()):
                    found.append(str(path.relative_to(root)))
    return found


def forbid_pickle(m: pytest.MonkeyPatch) -> None:
    """Make every torch / pickle (de)serialisation entry point raise while ``m`` is active."""

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError(f"pickle used: {args[:1]}")

    for module, names in ((torch, ("save", "load")), (torch.serialization, ("save", "load")),
                          (pickle, ("dump", "dumps", "load", "loads"))):  # fmt: skip
        for name in names:
            m.setattr(module, name, refuse)


def test_the_pickle_detector_finds_pickles_and_passes_safetensors(tmp_path: Path) -> None:
    torch.save({"w": torch.ones(2)}, tmp_path / "optimizer.pt")
    (tmp_path / "args.bin").write_bytes(pickle.dumps({"lr": 1e-3}, protocol=2))
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "rng.pth").write_bytes(pickle.dumps((1, 2)))
    # A safetensors file starts with its header's length: a 640-byte header reads as 0x80 0x02, a pickle's start.
    ok = tmp_path / "sub" / "ok.safetensors"
    for n in range(500, 700):
        save_file({"x" * n: torch.zeros(1)}, str(ok))
        if ok.read_bytes()[:2] == b"\x80\x02":
            break
    assert ok.read_bytes()[:2] == b"\x80\x02"
    assert pickled_files(tmp_path) == ["args.bin", "optimizer.pt", "sub/rng.pth"]
    with pytest.MonkeyPatch.context() as m:
        forbid_pickle(m)
        with pytest.raises(AssertionError, match="pickle used"):
            torch.load(tmp_path / "optimizer.pt")


def test_training_state_round_trips_without_pickle(tmp_path: Path) -> None:
    layer = nn.Linear(3, 2)
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-2, betas=(0.8, 0.95))
    layer(torch.randn(4, 3)).sum().backward()
    opt.step()
    state = {"opt": opt.state_dict(), "np": np.random.get_state(), "py": random.getstate(), "x": [np.float64(0.1)]}
    with pytest.MonkeyPatch.context() as m:
        forbid_pickle(m)
        save_state(state, tmp_path, "s")
        back = load_state(tmp_path, "s")
    assert pickled_files(tmp_path) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["s.json", "s.safetensors"]
    opt_back = back["opt"]
    assert opt_back["param_groups"] == state["opt"]["param_groups"]  # betas a tuple again, params by index
    assert isinstance(opt_back["param_groups"][0]["betas"], tuple) and sorted(opt_back["state"]) == [0, 1]
    for i in (0, 1):
        for key, value in state["opt"]["state"][i].items():
            assert torch.equal(opt_back["state"][i][key], value) and opt_back["state"][i][key].dtype == value.dtype
    assert back["np"][0] == "MT19937" and np.array_equal(back["np"][1], state["np"][1])
    assert back["np"][1].dtype == np.uint32 and back["np"][2:] == state["np"][2:]
    assert back["py"] == state["py"] and back["x"] == [0.1]
    fresh = torch.optim.AdamW(layer.parameters(), lr=1.0)
    fresh.load_state_dict(opt_back)  # torch accepts it as an optimizer state
    with pytest.raises(TypeError, match=r"at opt\.extra: a value of type object"):
        save_state({"opt": {"extra": object()}}, tmp_path, "bad")


def test_rng_states_round_trip(tmp_path: Path) -> None:
    save_state(rng_states(distributed=False), tmp_path, "rng")
    first = (random.random(), float(np.random.rand()), torch.rand(3))
    set_rng_states(load_state(tmp_path, "rng"), distributed=False)
    second = (random.random(), float(np.random.rand()), torch.rand(3))
    assert first[:2] == second[:2] and torch.equal(first[2], second[2])
    assert load_file(str(tmp_path / "rng.safetensors"))["cpu"].dtype == torch.uint8


class Crashed(RuntimeError):
    pass


class Crash(TrainerCallback):
    def on_step_end(self, args: object, state: Any, control: object, **kwargs: object) -> None:
        if state.global_step == 3:
            raise Crashed


def test_a_checkpoint_with_pickled_state_is_refused_not_unpickled(data: Path, tmp_path: Path) -> None:
    spec = make_spec(data, max_steps=4, save_steps=2)
    with pytest.raises(Crashed):
        recover(converted()[0], spec=spec, tokenizer=char_tokenizer(), out=tmp_path, callbacks=[Crash()])
    ckpt = tmp_path / "lora" / "checkpoints" / "checkpoint-2"
    assert {"optimizer.json", "optimizer.safetensors", "scheduler.json", "rng_state.json"} <= set(os.listdir(ckpt))
    # What a stock Trainer leaves: the optimizer pickled in its place.
    torch.save(load_state(ckpt, "optimizer"), ckpt / "optimizer.pt")
    (ckpt / "optimizer.json").unlink()
    with pytest.MonkeyPatch.context() as m:
        forbid_pickle(m)
        with pytest.raises(ValueError, match=r"checkpoint-2/optimizer\.pt: pickled weights are not loaded"):
            recover(converted()[0], spec=spec, tokenizer=char_tokenizer(), out=tmp_path)
        (ckpt / "optimizer.pt").unlink()
        with pytest.raises(ValueError, match=r"checkpoint-2 holds no optimizer\.json"):
            recover(converted()[0], spec=spec, tokenizer=char_tokenizer(), out=tmp_path)
        # An adapter_model.bin (what peft would torch.load) is refused by our own loading path, never unpickled.
        (ckpt / "adapter_model.bin").write_bytes(b"\x80\x04N.")  # a pickle; its content never matters
        with pytest.raises(ValueError, match=r"adapter_model\.bin: pickled weights are not loaded"):
            recover(converted()[0], spec=spec, tokenizer=char_tokenizer(), out=tmp_path)


def test_layers_without_adapter_are_refused(data: Path, tmp_path: Path) -> None:
    model, _ = converted()
    spec = RecoverSpec.model_validate(
        {"data": {"source": str(data)}, "lora": {"modules": ["model.layers.0.self_attn.q_proj"]}}
    )
    with pytest.raises(ValueError, match=r"no adapter to 1 of 2 converted layers: model\.layers\.1\.self_attn\. "):
        recover(model, spec=spec, tokenizer=char_tokenizer(), out=tmp_path / "a")
    spec = RecoverSpec.model_validate({"data": {"source": str(data)}, "lora": {"targets": ["q_proj", "gate"]}})
    with pytest.raises(ValueError, match=r"no module 'gate'.*layers\.0\.self_attn.*layers\.1\.self_attn"):
        recover(model, spec=spec, tokenizer=char_tokenizer(), out=tmp_path / "b")
    with pytest.raises(ValueError, match="no converted layer"):
        recover(tiny_model("llama", num_hidden_layers=1), spec=spec, tokenizer=char_tokenizer(), out=tmp_path)
    assert not (tmp_path / "a" / "lora").exists()  # refused before any training


def test_attention_transfer_lowers_each_layers_mse(data: Path, probe: Tensor, tmp_path: Path) -> None:
    model, teacher = converted()
    before = layer_mse(model, teacher, probe)
    spec = RecoverSpec.model_validate(
        {"stages": {"attention_transfer": {"max_steps": 20, "lr": 3e-3, "save_steps": 100}},
         "data": {"source": str(data), "seq_len": 64}}
    )  # fmt: skip
    out = recover(model, spec=spec, tokenizer=char_tokenizer(), out=tmp_path, teacher=teacher)
    after = layer_mse(out, teacher, probe)
    assert all(a < 0.9 * b for a, b in zip(after, before, strict=True)), (before, after)
    rows = list(csv.DictReader((tmp_path / "attention_transfer" / "loss.csv").open()))
    assert len(rows) == 20 and json.loads((tmp_path / "attention_transfer" / "done.json").read_text())["steps"] == 20


def next_token_kl(model: nn.Module, teacher: nn.Module, ids: Tensor) -> float:
    """Mean KL(teacher || model) of the next-token distributions on ``ids``."""
    with torch.no_grad():
        t = teacher(input_ids=ids).logits.log_softmax(-1)
        s = model(input_ids=ids).logits.log_softmax(-1)
    return float((t.exp() * (t - s)).sum(-1).mean())


def test_distill_loss_pulls_the_model_towards_its_teacher(data: Path, probe: Tensor, tmp_path: Path) -> None:
    model, teacher = converted()
    before = next_token_kl(model, teacher, probe)
    spec = make_spec(data, max_steps=12, loss="distill")
    out = recover(model, spec=spec, tokenizer=char_tokenizer(), out=tmp_path, teacher=teacher)
    after = next_token_kl(out, teacher, probe)
    assert after < 0.9 * before, (before, after)
    losses = [float(r["loss"]) for r in csv.DictReader((tmp_path / "lora" / "loss.csv").open())]
    assert len(losses) == 12 and losses[-1] < losses[0]
    assert all(not p.requires_grad for p in teacher.parameters())  # the teacher is never trained


def test_distill_without_a_teacher_is_refused(data: Path, tmp_path: Path) -> None:
    model, _ = converted(layers=1)
    with pytest.raises(ValueError, match="teacher"):
        recover(model, spec=make_spec(data, max_steps=2, loss="distill"), tokenizer=char_tokenizer(),
                out=tmp_path)


def test_instruction_records_learn_the_response_only() -> None:
    tok = char_tokenizer()
    ids, labels = tokenize_records([("mem", {"instruction": "say cat", "input": "", "output": "cat"})], tok)
    response = tok("cat", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    n = len(ids) - len(response)
    assert ids[n:] == response and labels[n:] == response
    assert labels[:n] == [IGNORE] * n
    assert ids[:n] == tok(ALPACA_NO_INPUT.format(instruction="say cat"))["input_ids"]
    with pytest.raises(ValueError, match=r"mem2: a record needs 'text'.*\['body'\]"):
        tokenize_records([("mem2", {"body": "x"})], tok)


def test_plan_recover_section_with_a_registered_mixer(data: Path, probe: Tensor, tmp_path: Path, registry) -> None:
    import surgery

    plan = surgery.load_plan(
        {"version": 2, "model": "unused/hub-id", "output": str(tmp_path), "convert": [{"mixer": "gla"}],
         "recover": {"data": {"source": str(data), "seq_len": 64}, "stages": {"lora": {"max_steps": 6, "lr": 1e-2}}}},
        registry,
    )  # fmt: skip
    model = surgery.convert(plan, tiny_model("llama", num_hidden_layers=2))
    loss_before = chunk_loss(model, probe)
    out = surgery.recover(model, plan, tokenizer=char_tokenizer()).model  # the plan resolves spec, out and teacher
    assert chunk_loss(out, probe) < loss_before - 0.05
    assert (tmp_path / "recover" / "lora" / "done.json").is_file()  # <output>/recover, as run_paths says


def test_bf16_on_a_cpu_without_native_bf16_warns(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    import sys

    recover_train = sys.modules["surgery.recovery.trainer"]

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(recover_train, "cpu_has_bf16", lambda: False)
    with caplog.at_level("WARNING", logger="surgery.recover"):
        assert recover_train.use_bf16(TrainOptions(precision="bf16"))
        assert not recover_train.use_bf16(TrainOptions())  # auto: fp32 on CPU, no warning
    assert [r.message for r in caplog.records if "emulated" in r.message] and len(caplog.records) == 1
    monkeypatch.setattr(recover_train, "cpu_has_bf16", lambda: True)
    caplog.clear()
    assert recover_train.use_bf16(TrainOptions(precision="bf16")) and not caplog.records


@pytest.mark.parametrize("combine", ["fixed", "shared"])
def test_recovery_with_the_memory_evicting_pulls_towards_the_teacher(data: Path, probe: Tensor, tmp_path: Path,
                                                                     combine: str) -> None:
    """The main job's recipe on a tiny model: window + sinks + a retrieval memory that evicts within the training
    chunks (4 + 1 + 8 keys of 64). Attention transfer with the memory and sinks in place lowers each layer's MSE,
    then LoRA distillation lowers the KL; with ``combine: shared`` the recurrent term's gains train too."""
    teacher = tiny_model("llama", num_hidden_layers=2)
    options = {"window": 4, "sinks": 1, "memory": 8, "memory_chunk": 4}
    options.update({"combine": "shared", "shared_bias": 0.0} if combine == "shared" else {"w_swa": 1.0, "w_rec": 0.0})
    rule = {"layers": "all", "mixer": "liger_attention", "options": options}
    plan = surgery.load_plan({"version": 2, "model": "unused/hub-id", "convert": [rule]})
    model = surgery.convert(plan, copy.deepcopy(teacher))
    mse0, kl0 = layer_mse(model, teacher, probe), next_token_kl(model, teacher, probe)
    gains0 = [m.null_bias.detach().clone() for m in model.modules() if hasattr(m, "null_bias")]
    spec = RecoverSpec.model_validate(
        {"stages": {"attention_transfer": {"max_steps": 12, "lr": 3e-3, "save_steps": 100},
                    "lora": {"max_steps": 12, "lr": 3e-3, "loss": "distill", "save_steps": 100}},
         "data": {"source": str(data), "seq_len": 64}, "lora": {"targets": ["q_proj", "k_proj", "v_proj", "o_proj"]}}
    )  # fmt: skip
    out = recover(model, spec=spec, tokenizer=char_tokenizer(), out=tmp_path, teacher=teacher)
    mse1, kl1 = layer_mse(out, teacher, probe), next_token_kl(out, teacher, probe)
    assert all(a < b for a, b in zip(mse1, mse0, strict=True)), (mse0, mse1)
    assert kl1 < 0.9 * kl0, (kl0, kl1)
    gains1 = [m.null_bias.detach() for m in out.modules() if hasattr(m, "null_bias")]
    assert len(gains1) == (2 if combine == "shared" else 0)
    assert all(not torch.equal(a, b) for a, b in zip(gains0, gains1, strict=True))
