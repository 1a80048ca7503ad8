"""Save and load converted models in Hugging Face layout: safetensors, a config carrying the plan, the manifest.

The plan is the architecture: ``load`` rebuilds the base model from its stored config, re-applies the stored plan
(structure only), then loads the saved tensors. ``import surgery`` registers the ``surgery`` model type so that
``AutoModelForCausalLM.from_pretrained(dir)`` does the same, with no ``trust_remote_code``. Nothing is pickled.

Tensors are stored under the model's own parameter names (``save_original_format=False``): transformers would
otherwise rename them back to the original checkpoint layout of some classes (GPT-NeoX's ``embed_out``, fused MoE
experts split again), and reading them would need that class's conversion in reverse. The directory mechanics
(atomic replace, the ownership marker, crash recovery) live in ``surgery.artifacts_fs``.
"""

from __future__ import annotations

import json
import os
import uuid
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from surgery.artifacts_fs import ArtifactError, recover_interrupted, write_atomically
from surgery.convert import DTYPES, LayerRecord, apply_plan
from surgery.errors import ModelNotFoundError
from surgery.plan import PlanError, load_plan

__all__ = ["ArtifactError", "SurgeryConfig", "SurgeryForCausalLM", "load", "register_auto_classes", "save"]

MODEL_TYPE = "surgery"
MANIFEST = "manifest.json"
INDEX = "model.safetensors.index.json"


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
    """Make ``AutoConfig``/``AutoModelForCausalLM`` read directories written by ``save`` (done by ``import surgery``)."""
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


def _absolute_model(model: str) -> str:
    """The plan's model path made absolute when it is a local path, so the saved plan names it from anywhere."""
    local = model.startswith(("/", "./", "../", "~")) or Path(model).expanduser().exists()
    return str(Path(model).expanduser().resolve()) if local else model


def save(
    model: nn.Module,
    path: str | os.PathLike,
    tokenizer: Any = None,
    extra_files: dict[str, str] | None = None,
    *,
    force: bool = False,
) -> Path:
    """Save a converted model to the directory ``path``, atomically.

    Writes ``model.safetensors`` (sharded if large), ``config.json`` (a ``SurgeryConfig``), ``manifest.json``, the
    tokenizer (given, or loaded from the plan's model when it has one) and ``extra_files`` (name -> text). A crash
    leaves the previous complete directory or the new one. An existing directory that ``save`` did not write is
    refused unless ``force``; files a user added to a directory ``save`` wrote are carried over to the new one
    (see ``surgery.artifacts_fs.write_atomically``).
    """
    info = getattr(model, "surgery", None)
    if info is None:
        raise ValueError("save() expects a model converted by surgery.convert or surgery.load")

    def write(tmp: Path) -> None:
        # transformers writes the tensors (tied weights handled, safetensors, sharding); we replace its config.
        model.save_pretrained(tmp, safe_serialization=True, save_original_format=False)
        plan = info.plan.to_dict()
        plan["model"] = _absolute_model(info.plan.model)
        config = SurgeryConfig(base_config=model.config.to_dict(), plan=plan, versions=versions())
        config.architectures = ["SurgeryForCausalLM"]
        (tmp / "config.json").write_text(config.to_json_string())
        (tmp / MANIFEST).write_text(json.dumps(info.manifest_dict(), indent=1))
        tok = tokenizer if tokenizer is not None else _plan_tokenizer(info.plan.model)
        if tok is not None:
            tok.save_pretrained(tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)

    return write_atomically(Path(path), write, force=force)


def _plan_tokenizer(model_id: str) -> Any:
    from transformers import AutoTokenizer

    try:
        # Local directories and the HF cache only: saving must never wait on the network.
        return AutoTokenizer.from_pretrained(model_id, local_files_only=True)
    except (OSError, ValueError, TypeError):
        return None


def _state_dict_files(path: Path) -> list[Path]:
    index = path / INDEX
    if index.exists():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise ArtifactError(f"{index}: not a safetensors index ({type(exc).__name__}: {exc})") from None
        for name in names:
            # A crafted index must not make us read files elsewhere on disk (absolute paths, ".."). Checked on the
            # names, not on resolved paths: the Hugging Face cache keeps shards as links to blobs outside.
            if not isinstance(name, str) or Path(name).is_absolute() or os.path.normpath(name).startswith(".."):
                raise ArtifactError(f"{index}: weight map names {name!r}, which is outside {path}")
        return [path / n for n in names]
    single = path / "model.safetensors"
    if not single.exists():
        raise ModelNotFoundError(f"{path} holds no model.safetensors: is it a directory written by surgery.save?")
    return [single]


def _read_config(cfg_file: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The stored plan and base config of ``cfg_file``; every defect is an ``ArtifactError`` naming the file."""
    try:
        raw = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{cfg_file}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    except UnicodeDecodeError as exc:
        raise ArtifactError(f"{cfg_file}: not UTF-8 text ({exc.reason})") from None
    if not isinstance(raw, dict):
        raise ArtifactError(f"{cfg_file}: expected a JSON object, found {type(raw).__name__}")
    if raw.get("model_type") != MODEL_TYPE:
        raise ArtifactError(
            f"{cfg_file}: model_type is {raw.get('model_type')!r}, not 'surgery': not a surgery model; use transformers"
        )
    plan, base = raw.get("plan"), raw.get("base_config")
    if not isinstance(plan, dict) or not plan:
        raise ArtifactError(f"{cfg_file}: no 'plan' mapping: the plan is the architecture, so the model cannot be rebuilt")
    if not isinstance(base, dict) or not base:
        raise ArtifactError(f"{cfg_file}: no 'base_config' mapping: the base architecture is unknown")
    if not isinstance(base.get("model_type"), str):
        raise ArtifactError(f"{cfg_file}: base_config has no 'model_type': the base architecture is unknown")
    return plan, base


def _stored_plan(cfg_file: Path, data: dict[str, Any], registry: Any = None) -> Any:
    """Validate the stored plan without requiring its base model: everything ``load`` needs is in the directory."""
    # load_plan checks that a local model path exists; a placeholder that is no path skips exactly that check.
    placeholder = f"surgery-saved-model-{uuid.uuid4().hex}"
    try:
        plan = load_plan({**data, "model": placeholder}, registry)
    except PlanError as exc:
        raise ArtifactError(f"{cfg_file}: the stored plan is invalid: {exc}") from None
    return plan.model_copy(update={"model": data.get("model", "")})


#: Bytes per element of the safetensors dtypes surgery may meet.
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
                "F8_E4M3": 1, "F8_E5M2": 1}  # fmt: skip
_MAX_HEADER = 100 * 2**20


def _headers(files: list[Path]) -> dict[str, tuple[str, list[int]]]:
    """``{tensor: (dtype, shape)}`` from the safetensors headers alone, each checked against its file's size before
    anything is allocated (a crafted header cannot make us read or allocate more than the file holds)."""
    out: dict[str, tuple[str, list[int]]] = {}
    for f in files:
        try:
            size = f.stat().st_size
            with f.open("rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                if n < 2 or n > min(_MAX_HEADER, size - 8):
                    raise ArtifactError(f"{f}: not a safetensors file (header of {n} bytes in a {size}-byte file)")
                header = json.loads(fh.read(n))
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            raise ArtifactError(f"{f}: cannot read the safetensors header ({type(exc).__name__}: {exc})") from None
        if not isinstance(header, dict):
            raise ArtifactError(f"{f}: the safetensors header is not a JSON object")
        body = size - 8 - n
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            try:
                dtype, shape, (start, end) = entry["dtype"], [int(d) for d in entry["shape"]], entry["data_offsets"]
                count = 1
                for d in shape:
                    count *= d
                ok = (dtype in _DTYPE_BYTES and all(d >= 0 for d in shape) and 0 <= start <= end <= body
                      and end - start == count * _DTYPE_BYTES[dtype])  # fmt: skip
            except (KeyError, TypeError, ValueError):
                ok = False
            if not ok:
                raise ArtifactError(f"{f}: tensor {name!r} has a header that does not fit the file "
                                    f"({str(entry)[:200]})")  # fmt: skip
            if name in out:
                raise ArtifactError(f"{f}: tensor {name!r} is stored twice")
            out[name] = (dtype, shape)
    return out


def _check_index(path: Path, files: list[Path]) -> None:
    """A sharded model's index must say where each tensor is, truthfully: every tensor it names is in that file."""
    index = path / INDEX
    if not index.exists():
        return
    weight_map = json.loads(index.read_text())["weight_map"]
    if not isinstance(weight_map, dict):
        raise ArtifactError(f"{index}: weight_map is not a mapping")
    stored = {name: f.name for f in files for name in _headers([f])}
    wrong = sorted(n for n, f in weight_map.items() if stored.get(n) != Path(str(f)).name)
    extra = sorted(set(stored) - set(weight_map))
    if wrong or extra:
        name = (wrong or extra)[0]
        raise ArtifactError(f"{index}: the index does not match the files: tensor {name!r} is "
                            f"{'in ' + stored[name] if name in stored else 'in no file'}, the index says "
                            f"{weight_map.get(name, 'nothing')}")  # fmt: skip


def _check_tensors(path: Path, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Refuse weights surgery never writes: a non-finite value, or an integer tensor for a floating parameter (a
    quantized checkpoint would be cast silently into garbage)."""
    params = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers())
    for name, t in state.items():
        own = params.get(name)
        if own is not None and own.is_floating_point() and not t.is_floating_point():
            raise ArtifactError(f"{path}: tensor {name!r} is stored as {t.dtype}; surgery saves floating-point "
                                "weights (a quantized or altered checkpoint?)")  # fmt: skip
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ArtifactError(f"{path}: tensor {name!r} holds NaN or infinite values; the model is damaged")


def _read_tensors(files: list[Path]) -> dict[str, torch.Tensor]:
    _headers(files)  # checked before safetensors allocates anything
    state: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            state.update(load_file(f))
        except (SafetensorError, OSError) as exc:
            # safetensors' own message ("incomplete metadata, file not fully covered") does not say which file.
            raise ArtifactError(f"{f}: cannot read tensors (truncated or damaged?): {exc}") from None
    return state


def _read_manifest(path: Path) -> list[LayerRecord] | None:
    """The saved manifest, or None with a warning when it is damaged: it is metadata, the model loads without it."""
    manifest = path / MANIFEST
    if not manifest.exists():
        return None
    try:
        return [LayerRecord(**r) for r in json.loads(manifest.read_text())["layers"]]
    except (ValueError, KeyError, TypeError) as exc:
        warnings.warn(f"{manifest}: damaged ({type(exc).__name__}: {exc}); loading without it", stacklevel=3)
        return None


def load(path: str | os.PathLike, dtype: Any = None, device: Any = None, registry: Any = None) -> nn.Module:
    """Load a model saved by ``save``: rebuild the base architecture, re-apply the plan, load the tensors.

    Needs nothing but the directory (not the base model). ``registry`` is what the stored plan's names resolve
    against (default: the built-ins and the installed plugins). Raises ``ArtifactError`` (a ``ValueError``) naming
    the file when the directory is damaged.
    """
    from transformers.initialization import no_init_weights

    path = Path(path)
    recover_interrupted(path)
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise ModelNotFoundError(f"{path} has no config.json")
    plan_data, base = _read_config(cfg_file)
    plan = _stored_plan(cfg_file, plan_data, registry)
    base = dict(base)
    base_config = AutoConfig.for_model(base.pop("model_type"), **base)
    if isinstance(dtype, str) and dtype != "auto":
        dtype = DTYPES[dtype]
    if dtype is None or dtype == "auto":
        dtype = DTYPES[plan.dtype]
    files = _state_dict_files(path)
    _check_index(path, files)
    _fits_the_files(path, base_config, plan, files)
    with no_init_weights():  # every parameter is overwritten below; skip the random init
        model = AutoModelForCausalLM.from_config(base_config, dtype=dtype)
        apply_plan(model, plan, map_weights=False)
    state = _read_tensors(files)
    _check_tensors(path, model, state)
    missing, unexpected = model.load_state_dict(state, strict=False)
    model.tie_weights()
    # transformers stores tied tensors once (output embeddings, shared layers); after tie_weights they are shared.
    stored = {id(p) for n, p in model.named_parameters(remove_duplicate=False) if n in state}
    missing = [k for k in missing if id(_param(model, k)) not in stored]
    if missing or unexpected:
        raise ArtifactError(f"{path}: saved tensors do not fit the plan's model: missing {missing}, unexpected {unexpected}")
    records = _read_manifest(path)
    if records is not None:
        built = [(r.path, r.mixer) for r in model.surgery.manifest]
        if [(r.path, r.mixer) for r in records] != built:
            raise ArtifactError(f"{path / MANIFEST}: its layers do not match the stored plan's (it lists "
                                f"{[(r.path, r.mixer) for r in records][:2]}..., the plan builds {built[:2]}...)")
        model.surgery.manifest = records
    model = model.to(dtype=dtype)
    if device is not None and not isinstance(device, dict) and device != "auto":
        model = model.to(device)
    return model.eval()


def _fits_the_files(path: Path, base_config: Any, plan: Any, files: list[Path]) -> None:
    """Build the model on the meta device (no memory) and refuse a config that describes far more parameters than
    the files hold, before the real model allocates them (a crafted config cannot ask for gigabytes)."""
    stored = 0
    for _, shape in _headers(files).values():
        count = 1
        for d in shape:
            count *= d
        stored += count
    with torch.device("meta"):
        shell = AutoModelForCausalLM.from_config(base_config)
        apply_plan(shell, plan, map_weights=False)
    wanted = sum(p.numel() for p in shell.parameters())  # tied parameters once
    if wanted > 2 * stored + 2**20:
        raise ArtifactError(f"{path}: config.json describes a model of {wanted:,} parameters, but the files hold "
                            f"{stored:,} values; the config or the files are damaged")  # fmt: skip


def _param(model: nn.Module, name: str) -> Any:
    """The parameter or buffer ``name`` of ``model`` (None when the name resolves to neither)."""
    module_path, _, leaf = name.rpartition(".")
    try:
        return getattr(model.get_submodule(module_path) if module_path else model, leaf)
    except AttributeError:
        return None
