"""Save and load converted models in Hugging Face layout: safetensors, a config carrying the plan, the manifest.

The plan is the architecture: ``load`` rebuilds the base model from its stored config, re-applies the stored plan
(structure only), then loads the saved tensors. ``import surgery`` registers the ``surgery`` model type so that
``AutoModelForCausalLM.from_pretrained(dir)`` does the same, with no ``trust_remote_code``. Nothing is pickled.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from surgery.convert import DTYPES, LayerRecord, apply_plan
from surgery.plan import load_plan

MODEL_TYPE = "surgery"
MANIFEST = "manifest.json"


class SurgeryConfig(PretrainedConfig):
    """Config of a saved converted model: the base model's config, the resolved plan and package versions."""

    model_type = MODEL_TYPE

    def __init__(
        self,
        base_config: dict[str, Any] | None = None,
        plan: dict[str, Any] | None = None,
        versions: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> None:
        self.base_config = base_config or {}
        self.plan = plan or {}
        self.versions = versions or {}
        super().__init__(**kwargs)


class SurgeryForCausalLM:
    """Entry for ``AutoModelForCausalLM``: returns the base architecture with the plan re-applied.

    No class is generated per (architecture x mixer): ``from_pretrained`` hands over to ``surgery.load``, which
    returns an instance of the base model's own class (e.g. ``LlamaForCausalLM``) with mixers in place.
    """

    config_class = SurgeryConfig

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *args: Any, **kwargs: Any) -> nn.Module:
        return load(path, dtype=kwargs.get("dtype") or kwargs.get("torch_dtype"), device=kwargs.get("device_map"))


def register_auto_classes() -> None:
    AutoConfig.register(MODEL_TYPE, SurgeryConfig, exist_ok=True)
    AutoModelForCausalLM.register(SurgeryConfig, SurgeryForCausalLM, exist_ok=True)


def versions(plan: Any = None) -> dict[str, str]:
    """Versions of the packages a saved model depends on (surgery, torch, transformers, plugin distributions)."""
    names = ["surgery", "torch", "transformers", "peft", "safetensors"]
    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def save(model: nn.Module, path: str | os.PathLike, tokenizer: Any = None, extra_files: dict[str, str] | None = None) -> Path:
    """Save a converted model to ``path`` atomically (a failure leaves no half-written directory).

    Writes ``model.safetensors`` (sharded if large), ``config.json`` (a ``SurgeryConfig``), ``manifest.json``, the
    tokenizer (given, or loaded from the plan's model when it has one) and ``extra_files`` (name -> text).
    """
    info = getattr(model, "surgery", None)
    if info is None:
        raise ValueError("save() expects a model converted by surgery.convert or surgery.load")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        # transformers writes the tensors (tied weights handled, safetensors, sharding); we replace its config.
        model.save_pretrained(tmp, safe_serialization=True)
        base = model.config.to_dict()
        config = SurgeryConfig(base_config=base, plan=info.plan.to_dict(), versions=versions())
        config.architectures = ["SurgeryForCausalLM"]
        (tmp / "config.json").write_text(config.to_json_string())
        (tmp / MANIFEST).write_text(json.dumps(info.manifest_dict(), indent=1))
        if tokenizer is None:
            tokenizer = _plan_tokenizer(info.plan.model)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            path.rename(old)
        tmp.rename(path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _plan_tokenizer(model_id: str) -> Any:
    from transformers import AutoTokenizer

    try:
        # Local directories and the HF cache only: saving must never wait on the network.
        return AutoTokenizer.from_pretrained(model_id, local_files_only=True)
    except (OSError, ValueError, TypeError):
        return None


def _state_dict_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / n for n in names]
    single = path / "model.safetensors"
    if not single.exists():
        raise FileNotFoundError(f"{path} holds no model.safetensors: is it a directory written by surgery.save?")
    return [single]


def load(path: str | os.PathLike, dtype: Any = None, device: Any = None) -> nn.Module:
    """Load a model saved by ``save``: rebuild the base architecture, re-apply the plan, load the tensors."""
    from transformers.initialization import no_init_weights

    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise FileNotFoundError(f"{path} has no config.json")
    raw = json.loads(cfg_file.read_text())
    if raw.get("model_type") != MODEL_TYPE:
        raise ValueError(f"{path} is not a surgery model (model_type '{raw.get('model_type')}'); use transformers")
    plan = load_plan(raw["plan"])
    base = dict(raw["base_config"])
    base_config = AutoConfig.for_model(base.pop("model_type"), **base)
    if isinstance(dtype, str) and dtype != "auto":
        dtype = DTYPES[dtype]
    if dtype is None or dtype == "auto":
        dtype = DTYPES[plan.dtype]
    with no_init_weights():  # every parameter is overwritten below; skip the random init
        model = AutoModelForCausalLM.from_config(base_config, dtype=dtype)
        apply_plan(model, plan, map_weights=False)
    state: dict[str, torch.Tensor] = {}
    for f in _state_dict_files(path):
        state.update(load_file(f))
    missing, unexpected = model.load_state_dict(state, strict=False)
    model.tie_weights()
    if getattr(base_config, "tie_word_embeddings", False) and model.get_output_embeddings() is not None:
        # transformers stores tied output embeddings once; after tie_weights they share the input embeddings.
        out_w = model.get_output_embeddings().weight
        tied = {n for n, p in model.named_parameters(remove_duplicate=False) if p is out_w}
        missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise ValueError(f"{path}: saved tensors do not fit the plan's model: missing {missing}, unexpected {unexpected}")
    manifest = path / MANIFEST
    if manifest.exists():
        layers = json.loads(manifest.read_text())["layers"]
        model.surgery.manifest = [LayerRecord(**r) for r in layers]
    model = model.to(dtype=dtype)
    if device is not None and not isinstance(device, dict) and device != "auto":
        model = model.to(device)
    return model.eval()
