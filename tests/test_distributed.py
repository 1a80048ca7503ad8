"""Recovery under torchrun (CPU, gloo, 2 processes), under DDP and under FSDP2: the same run as one process with
the same global batch, a model that loads and generates, a checkpoint written by 2 processes that 1 process resumes
after SIGKILL, no pickle in any checkpoint file; FSDP2's gather and re-shard of the trainable state."""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from surgery.recovery.distributed import split_batch
from tests.test_recover import char_tokenizer, converted, make_spec, pickled_files, write_data

ROOT = Path(__file__).resolve().parents[1]
#: Loss curves of 2 processes and of 1 process with the same global batch agree to this (relative) tolerance:
#: the same chunks per step, only the order of the float sums differs (DDP averages two half-batch gradients).
LOSS_RTOL = 1e-4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path, "HF_HUB_OFFLINE": "1",
            "SURGERY_DISABLE_PLUGIN_AUTOLOAD": "1", "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip


def torchrun(nproc: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1",
            f"--master-port={free_port()}", *args]  # fmt: skip


def child(**job: Any) -> list[str]:
    return [str(Path(__file__).resolve()), json.dumps(job)]


def run_child(nproc: int, **job: Any) -> None:
    cmd = torchrun(nproc, *child(**job)) if nproc > 1 else [sys.executable, *child(**job)]
    done = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]


def curve(out: Path) -> list[tuple[int, float]]:
    return [(int(r["step"]), float(r["loss"])) for r in csv.DictReader((out / "lora" / "loss.csv").open())]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_data(tmp_path_factory.mktemp("dist-data") / "train.jsonl")


def test_the_global_batch_is_split_over_processes() -> None:
    assert split_batch(2, 1, 1) == (2, 1)
    assert split_batch(2, 1, 2) == (1, 1)
    assert split_batch(2, 4, 2) == (2, 2)
    assert split_batch(4, 2, 8) == (1, 1)
    assert split_batch(3, 4, 4) == (3, 1)
    with pytest.raises(ValueError, match=r"batch_size \* grad_accum = 2 \* 1 = 2 chunks cannot be split over 4 "
                                         r"processes.*grad_accum: 2"):  # fmt: skip
        split_batch(2, 1, 4)


def test_the_process_group_recovery_starts_is_destroyed_at_exit(tmp_path: Path) -> None:
    """A gloo group left alive at interpreter exit can abort a finished rank (SIGABRT), failing the run."""
    run_child(2, exit_probe=str(tmp_path))
    assert [json.loads((tmp_path / f"alive_{r}.json").read_text()) for r in (0, 1)] == [False, False]


@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
def test_two_processes_train_like_one_and_one_resumes_what_two_checkpointed(engine: str, data: Path,
                                                                            tmp_path: Path) -> None:  # fmt: skip
    """DDP or FSDP2 on 2 processes = 1 process with the same global batch; SIGKILL of one rank, then 1 process
    resumes the checkpoint the 2 wrote."""
    one, two, killed = tmp_path / "one", tmp_path / "two", tmp_path / "killed"
    job = dict(data=str(data), max_steps=6, save_steps=2, batch_size=2, grad_accum=2)
    run_child(1, out=str(one), **job)
    run_child(2, out=str(two), distributed=engine, **job)
    # The engine really ran: FSDP2 sharded the parameters (DTensors), DDP did not.
    assert json.loads((two / "engine.json").read_text()) == {"sharded": engine == "fsdp", "world": 2}
    a, b = curve(one), curve(two)
    assert [s for s, _ in a] == [s for s, _ in b] == list(range(1, 7))
    for (_, x), (_, y) in zip(a, b):
        assert abs(x - y) <= LOSS_RTOL * abs(x), (a, b)
    assert pickled_files(two) == []
    ckpt = two / "lora" / "checkpoints" / "checkpoint-6"
    assert {"rng_state_0.json", "rng_state_1.json", "optimizer.json", "adapter_model.safetensors",
            "mixer_params.safetensors", "training_args.json"} <= {p.name for p in ckpt.iterdir()}  # fmt: skip
    w1, w2 = _adapter(one), _adapter(two)
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], rtol=1e-3, atol=1e-5)

    # Kill one of two processes at step 5 (checkpoint-4 written), then finish with ONE process.
    ready = tmp_path / "ready"
    proc = subprocess.Popen(torchrun(2, *child(out=str(killed), hang_at=5, ready=str(ready), distributed=engine,
                                               **job)), env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while not ready.exists():
            if proc.poll() is not None:
                pytest.fail(f"torchrun exited early:\n{proc.stderr.read().decode()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail("the two processes did not reach step 5 in 240 s")
            time.sleep(0.1)
        os.kill(int(ready.read_text()), signal.SIGKILL)  # rank 1; torchrun then stops rank 0
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode != 0
    ckpts = sorted(p.name for p in (killed / "lora" / "checkpoints").iterdir())
    assert ckpts == ["checkpoint-2", "checkpoint-4"] and not (killed / "lora" / "done.json").exists()
    assert pickled_files(killed) == []
    run_child(1, out=str(killed), forbid_pickle=True, **job)
    c = curve(killed)
    assert [s for s, _ in c] == list(range(1, 7))
    for (_, x), (_, y) in zip(a, c):
        assert abs(x - y) <= LOSS_RTOL * abs(x), (a, c)
    w3 = _adapter(killed)
    for k in w1:
        torch.testing.assert_close(w1[k], w3[k], rtol=1e-3, atol=1e-5)
    assert pickled_files(killed) == []


@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
def test_attention_transfer_then_lora_on_two_processes_equals_one(engine: str, data: Path, tmp_path: Path) -> None:
    """The recommended recipe on two processes: the teacher-forced stage's loss leaves the forward in its output, so
    DDP finds the adapters it trains (it marked them ready twice before), and under FSDP2 its backward passes every
    layer's output, where FSDP2 gathers the layer's parameters (a zero path); both stages match one process."""
    one, two = tmp_path / "one", tmp_path / "two"
    job = dict(data=str(data), max_steps=3, save_steps=100, batch_size=2, grad_accum=1, transfer=True)
    run_child(1, out=str(one), **job)
    run_child(2, out=str(two), distributed=engine, **job)
    for stage in ("attention_transfer", "lora"):
        a = [(int(r["step"]), float(r["loss"])) for r in csv.DictReader((one / stage / "loss.csv").open())]
        b = [(int(r["step"]), float(r["loss"])) for r in csv.DictReader((two / stage / "loss.csv").open())]
        assert [s for s, _ in a] == [s for s, _ in b] == [1, 2, 3], (stage, a, b)
        for (_, x), (_, y) in zip(a, b):
            assert abs(x - y) <= 1e-3 * abs(x) + 1e-7, (stage, a, b)
    w1, w2 = _adapter(one), _adapter(two)
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], rtol=1e-3, atol=1e-5)


def _adapter(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {**load_file(str(out / "adapter" / "adapter_model.safetensors")),
            **load_file(str(out / "adapter" / "mixer_params.safetensors"))}  # fmt: skip


@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
def test_surgery_recover_under_torchrun_saves_a_model_that_loads_and_generates(engine: str, tiny_dir: str,
                                                                                 tmp_path: Path, data: Path) -> None:  # fmt: skip
    import surgery

    tok = char_tokenizer()
    tok.save_pretrained(tiny_dir)
    plan = tmp_path / "plan.yaml"
    plan.write_text(yaml.safe_dump({
        "version": 2, "model": tiny_dir, "output": str(tmp_path / "run"),
        "convert": [{"layers": "all", "mixer": "gla"}],
        "recover": {"data": {"source": str(data), "seq_len": 64}, "distributed": engine,
                    "stages": {"lora": {"max_steps": 3, "save_steps": 2, "batch_size": 2}}},
    }))  # fmt: skip
    done = subprocess.run(torchrun(2, "-m", "surgery.cli", "recover", str(plan)), env=env(), capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.count("recovered model saved to") == 2
    assert f"recover lora: 2 processes over gloo, {'FSDP2' if engine == 'fsdp' else 'DDP'}" in done.stdout
    out = tmp_path / "run"
    assert pickled_files(out) == []
    assert [r["step"] for r in csv.DictReader((out / "recover" / "loss.csv").open())] == ["1", "2", "3"]
    loaded = surgery.load(out / "model")
    with torch.no_grad():
        gen = loaded.generate(torch.tensor([[5, 6, 7, 8]]), max_new_tokens=3, do_sample=False)
    assert gen.shape == (1, 7)


def test_fsdp2_state_is_gathered_whole_and_sharded_back(tmp_path: Path) -> None:
    """FSDP2 (``fully_shard``, gloo): the trainable state and its optimizer state gathered to full tensors on rank 0,
    written without pickle, loaded back into the shards and into a one-process optimizer; the whole model rebuilt
    on rank 0 computes what the sharded one does."""
    from safetensors.torch import load_file

    from surgery.recovery.adapters import inject_lora
    from surgery.recovery.distributed import load_optimizer_state
    from surgery.recovery.spec import LoraSpec
    from surgery.recovery.state import load_state

    run_child(2, fsdp_parts=str(tmp_path))
    assert pickled_files(tmp_path) == []
    assert json.loads((tmp_path / "checks.json").read_text()) == {"reloaded_0": True, "reloaded_1": True,
                                                                   "whole_logits_match": True}  # fmt: skip
    state = load_state(tmp_path, "optimizer")
    full = load_file(str(tmp_path / "trainable.safetensors"))
    model, _ = converted()
    peft, _ = inject_lora(model, LoraSpec(), seed=0)
    trainable = {n: p for n, p in peft.named_parameters() if p.requires_grad}
    assert sorted(full) == sorted(trainable) == sorted(state["state"])
    assert all(full[n].shape == p.shape for n, p in trainable.items())
    optim = torch.optim.AdamW(list(trainable.values()), lr=1e-2)
    load_optimizer_state(peft, optim, state)  # an FSDP checkpoint resumes in one process
    names = list(trainable)
    for i, s in optim.state_dict()["state"].items():
        torch.testing.assert_close(s["exp_avg"], state["state"][names[i]]["exp_avg"])


@pytest.mark.gpu
@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
def test_one_gpu_recovers_under_the_launchers_with_nccl(launcher: str, engine: str, tiny_dir: str, tmp_path: Path,
                                                        data: Path) -> None:  # fmt: skip
    """The multi-GPU entry points on one GPU: torchrun starts an NCCL process group (FSDP2 then shards over one
    process); accelerate launch runs one process without a group; either way the model saved by rank 0 loads and
    generates on the GPU."""
    import surgery

    char_tokenizer().save_pretrained(tiny_dir)
    plan = tmp_path / "plan.yaml"
    plan.write_text(yaml.safe_dump({
        "version": 2, "model": tiny_dir, "output": str(tmp_path / "run"),
        "convert": [{"layers": "all", "mixer": "liger_attention", "options": {"window": 16}}],
        "recover": {"data": {"source": str(data), "seq_len": 64}, "distributed": engine,
                    "stages": {"lora": {"max_steps": 4, "save_steps": 2, "batch_size": 2}}},
    }))  # fmt: skip
    port = str(free_port())
    launch = (torchrun(1) if launcher == "torchrun" else
              [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", port])  # fmt: skip
    done = subprocess.run([*launch, "-m", "surgery.cli", "recover", str(plan)], env=env(), capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    expect = (f"1 process over nccl{', FSDP2' if engine == 'fsdp' else ''}" if launcher == "torchrun" else
              "1 process")  # fmt: skip
    assert f"recover lora: {expect}\n" in done.stdout, done.stdout[-2000:]
    out = tmp_path / "run"
    assert pickled_files(out) == []
    assert [r["step"] for r in csv.DictReader((out / "recover" / "loss.csv").open())] == ["1", "2", "3", "4"]
    loaded = surgery.load(out / "model").cuda()
    with torch.no_grad():
        gen = loaded.generate(torch.tensor([[5, 6, 7, 8]], device="cuda"), max_new_tokens=3, do_sample=False)
    assert gen.shape == (1, 7)


def _fsdp_parts(out: Path) -> None:
    import torch.distributed as dist
    from safetensors.torch import save_file
    from torch.distributed.fsdp import fully_shard

    from surgery.recovery.adapters import inject_lora
    from surgery.recovery.distributed import full_tensors, is_main, load_optimizer_state, optimizer_state, skeleton
    from surgery.recovery.distributed import unsharded
    from surgery.recovery.spec import LoraSpec
    from surgery.recovery.state import load_state, save_state

    dist.init_process_group("gloo")
    model, _ = converted()
    peft, _ = inject_lora(model, LoraSpec(), seed=0)
    shell = skeleton(peft) if is_main() else None
    for layer in peft.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(peft)
    params = [p for p in peft.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=1e-2)
    gen = torch.Generator().manual_seed(dist.get_rank())
    ids = torch.randint(3, 40, (2, 16), generator=gen)
    peft(input_ids=ids, labels=ids).loss.backward()
    optim.step()
    optim.zero_grad()
    state = optimizer_state(peft, optim)
    full = full_tensors([(n, p) for n, p in peft.named_parameters() if p.requires_grad])
    if is_main():
        save_state(state, out, "optimizer")
        save_file(full, str(out / "trainable.safetensors"))
    dist.barrier()
    again = torch.optim.AdamW(params, lr=1e-2)
    load_optimizer_state(peft, again, load_state(out, "optimizer"))
    a, b = optim.state_dict()["state"], again.state_dict()["state"]
    reloaded = all(torch.equal(a[k][s].to_local(), b[k][s].to_local()) for k in a for s in ("exp_avg", "exp_avg_sq"))
    flags = [None, None]
    dist.all_gather_object(flags, reloaded)
    probe = torch.arange(3, 19).view(1, 16)
    with torch.no_grad():
        sharded_logits = peft(input_ids=probe).logits
    whole = unsharded(peft, shell)
    if whole is not None:
        with torch.no_grad():
            match = torch.allclose(whole.merge_and_unload()(input_ids=probe).logits, sharded_logits, atol=1e-5)
        checks = {"reloaded_0": flags[0], "reloaded_1": flags[1], "whole_logits_match": match}
        (out / "checks.json").write_text(json.dumps(checks))
    dist.barrier()
    dist.destroy_process_group()


def _exit_probe(out: Path) -> None:
    """Start the group as recovery does, and record at exit (after ``init``'s own handler: atexit runs last in,
    first out) whether it is still alive."""
    import atexit

    from surgery.recovery.distributed import barrier, init, rank

    def record() -> None:
        (out / f"alive_{rank()}.json").write_text(json.dumps(torch.distributed.is_initialized()))

    atexit.register(record)
    init()
    barrier()


def _main(job: dict[str, Any]) -> None:
    """One process of a test run (under torchrun, or alone)."""
    torch.set_num_threads(1)
    if "fsdp_parts" in job:
        return _fsdp_parts(Path(job["fsdp_parts"]))
    if "exit_probe" in job:
        return _exit_probe(Path(job["exit_probe"]))
    from transformers import TrainerCallback

    from surgery.recovery import recover
    from surgery.recovery.distributed import is_sharded

    class Hang(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step == 1 and os.environ.get("RANK", "0") == "0":
                engine = {"sharded": is_sharded(kwargs["model"]), "world": args.world_size}
                (Path(job["out"]) / "engine.json").write_text(json.dumps(engine))
            if state.global_step == job.get("hang_at") and os.environ.get("RANK") == "1":
                Path(job["ready"]).write_text(str(os.getpid()))
                time.sleep(600)

    if job.get("forbid_pickle"):  # resume reads and writes no pickle (this process has no process group)
        import pickle

        def refuse(*args: Any, **kwargs: Any) -> None:
            raise AssertionError(f"pickle used: {args[:1]}")

        for module, names in ((torch, ("save", "load")), (pickle, ("dump", "dumps", "load", "loads"))):
            for name in names:
                setattr(module, name, refuse)
    spec = make_spec(job["data"], max_steps=job["max_steps"], save_steps=job["save_steps"],
                     batch_size=job["batch_size"], grad_accum=job["grad_accum"])  # fmt: skip
    spec = spec.model_copy(update={"distributed": job.get("distributed", "ddp")})
    teacher = None
    if job.get("transfer"):  # attention transfer, then LoRA (examples/demo-large.yaml's recipe)
        raw = spec.model_dump(mode="json")
        lora = raw["stages"]["lora"]
        train = {k: lora[k] for k in ("max_steps", "save_steps", "batch_size", "grad_accum")}
        raw["stages"] = {"attention_transfer": {**train, "lr": 1e-3}, "lora": lora}
        spec = type(spec).model_validate(raw)
    model, teacher = converted()
    recover(model, spec=spec, tokenizer=char_tokenizer(), out=job["out"], callbacks=[Hang()],
            teacher=teacher if job.get("transfer") else None)  # fmt: skip


if __name__ == "__main__":
    _main(json.loads(sys.argv[1]))
