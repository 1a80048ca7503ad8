"""LoRA on converted layers: targets derived from the mixers, a coverage check, and the mixers' own parameters.

peft matches ``target_modules`` by exact name or suffix and complains only when *nothing* matches (peers.md §6,
peft #1959/#3554), so a plan whose targets miss some converted layers would train silently with those layers
frozen. Here targets are full module paths built from the mixers themselves, and ``check_coverage`` refuses to
start when any converted layer would get no adapter.

Parameters a mixer adds beyond the pretrained ones (q/k/v/o projections, the model's q/k norms) - routers, gates,
feature maps - are trained in full. peft's adapter file does not hold them, so they travel next to it in
``mixer_params.safetensors`` (full parameter names of the base model).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import check_target_module_exists
from safetensors.torch import load_file, save_file
from torch import nn

from surgery.errors import ArtifactError, PlanError
from surgery.mixer import Mixer
from surgery.recovery.spec import LoraSpec

#: Children of a mixer that hold pretrained tensors (``surgery.sites.attention.CANONICAL``): adapted by LoRA or frozen.
#: The extras (``surgery.sites.attention_extras``: sink logits, output gate, pre-output norm, output bias) are pretrained.
PRETRAINED_CHILDREN = frozenset({
    "q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm",
    "sink_logits", "out_gate", "out_gate_head_bias", "o_norm", "o_bias",
})  # fmt: skip
ADAPTER_FILE = "adapter_model.safetensors"
MIXER_PARAMS_FILE = "mixer_params.safetensors"


def find_mixers(model: nn.Module) -> list[tuple[str, Mixer]]:
    """The outermost ``Mixer`` modules of ``model`` with their paths, in module order."""
    found: list[tuple[str, Mixer]] = []
    for name, module in model.named_modules():
        if isinstance(module, Mixer) and not any(name.startswith(p + ".") for p, _ in found):
            found.append((name, module))
    return found


def _layer_list(paths: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(paths[:limit])
    return shown + (f", ... ({len(paths)} in all)" if len(paths) > limit else "")


def target_modules(model: nn.Module, mixers: Sequence[tuple[str, Mixer]], lora: LoraSpec) -> list[str] | str:
    """peft ``target_modules`` for ``lora``: full module paths ``<mixer path>.<target>`` (or ``lora.modules``).

    Raises:
        ValueError: a converted layer lacks one of ``lora.targets`` (the message lists the layers).
    """
    if lora.modules is not None:
        return lora.modules if isinstance(lora.modules, str) else list(lora.modules)
    names = dict(model.named_modules())
    out: list[str] = []
    for target in lora.targets:
        missing = [f"{p} ({type(m).__name__})" for p, m in mixers if f"{p}.{target}" not in names]
        if missing:
            raise PlanError(
                f"recover.lora.targets: converted layers have no module '{target}', so they would get no "
                f"adapter: {_layer_list(missing)}"
            )
        out.extend(f"{p}.{target}" for p, _ in mixers)
    return out


def check_coverage(model: nn.Module, mixers: Sequence[tuple[str, Mixer]], config: LoraConfig) -> None:
    """Refuse a LoRA config that leaves some converted layer without an adapter (checked before injection).

    Raises:
        ValueError: naming every converted layer that no target module falls inside.
    """
    matched = [name for name, _ in model.named_modules() if name and check_target_module_exists(config, name)]
    bare = [p for p, _ in mixers if not any(name.startswith(p + ".") for name in matched)]
    if bare:
        raise PlanError(
            f"recover.lora: the LoRA targets ({config.target_modules}) give no adapter to {len(bare)} of "
            f"{len(mixers)} converted layers: {_layer_list(bare)}. Every converted layer must be adapted."
        )


def mixer_params(model: nn.Module) -> dict[str, nn.Parameter]:
    """Parameters the mixers add beyond the pretrained children, by full name in ``model``.

    ``model`` is the model without peft wrapping, so the names are those of the saved base model.
    """
    out: dict[str, nn.Parameter] = {}
    for path, mixer in find_mixers(model):
        # A module that LoRA adapts keeps its base weight frozen, whatever its name.
        adapted = [n for n, m in mixer.named_modules() if n and isinstance(m, LoraLayer)]
        for name, param in mixer.named_parameters():
            child = name.split(".", 1)[0]
            # A latent site's copied sub-graph (q_a_proj, kv_b_proj...) is pretrained too.
            pretrained = child in PRETRAINED_CHILDREN or child in mixer.site.modules
            if pretrained or any(name.startswith(a + ".") for a in adapted):
                continue
            out[f"{path}.{name}"] = param
    return out


def lora_config(model: nn.Module, lora: LoraSpec) -> LoraConfig:
    """The peft config for ``lora`` on ``model``, checked to adapt every converted layer (nothing is changed).

    Raises:
        ValueError: the model has no converted layer, is already a peft model, or a converted layer would get
            no adapter.
    """
    if isinstance(model, PeftModel):
        raise ValueError("recover() takes a converted model without adapters; got a peft model")
    mixers = find_mixers(model)
    if not mixers:
        raise ValueError("recover(): the model has no converted layer (no surgery.mixer.Mixer module)")
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=target_modules(model, mixers, lora),
        bias="none",
        task_type="CAUSAL_LM",
    )
    check_coverage(model, mixers, config)
    return config


def inject_lora(model: nn.Module, lora: LoraSpec, seed: int) -> tuple[PeftModel, dict[str, nn.Parameter]]:
    """Wrap ``model`` with LoRA on its converted layers; make the mixers' own parameters trainable.

    Returns:
        The peft model and the mixers' own parameters (empty when ``lora.train_mixer_params`` is off).

    Raises:
        ValueError: as ``lora_config``.
    """
    config = lora_config(model, lora)
    mixers = find_mixers(model)
    torch.manual_seed(seed)  # LoRA A matrices are random: the seed makes two runs start from the same adapters
    peft_model = get_peft_model(model, config)
    bare = [p for p, m in mixers if not any(isinstance(sub, LoraLayer) for sub in m.modules())]
    if bare:  # peft skipped a matched module (e.g. an unsupported layer type): still a silent partial match
        raise ValueError(f"recover.lora: peft attached no adapter inside {_layer_list(bare)}")
    extra = mixer_params(model) if lora.train_mixer_params else {}
    for param in extra.values():  # get_peft_model froze everything but the adapters
        param.requires_grad_(True)
    return peft_model, extra


def save_mixer_params(params: dict[str, nn.Parameter], directory: str | Path) -> None:
    """Write the mixers' own parameters to ``directory/mixer_params.safetensors`` (nothing when there are none)."""
    if params:
        tensors = {name: p.detach().to("cpu").contiguous() for name, p in params.items()}
        from surgery.outputs import temporary_file

        with temporary_file(Path(directory) / MIXER_PARAMS_FILE) as tmp:
            save_file(tensors, str(tmp), metadata={"format": "pt"})


def load_mixer_params(model: nn.Module, directory: str | Path, expected: Sequence[str] = ()) -> None:
    """Copy ``directory/mixer_params.safetensors`` into ``model`` (unwrapped names).

    Raises:
        ValueError: the file is missing although ``expected`` names parameters, or it names a parameter the model
            lacks or gives it another shape.
    """
    file = Path(directory) / MIXER_PARAMS_FILE
    if not file.exists():
        if expected:
            raise ArtifactError(f"{file} is missing; it should hold {_layer_list(list(expected))}")
        return
    own = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in load_file(str(file)).items():
            if name not in own or own[name].shape != tensor.shape:
                raise ArtifactError(f"{file}: parameter '{name}' {tuple(tensor.shape)} does not fit the model")
            own[name].copy_(tensor)


def save_adapter(peft_model: PeftModel, params: dict[str, nn.Parameter], directory: str | Path) -> None:
    """Write the adapter (peft's safetensors and config) and the mixers' own parameters to ``directory``."""
    peft_model.save_pretrained(str(directory), safe_serialization=True)
    save_mixer_params(params, directory)


def refuse_pickles(directory: str | Path) -> None:
    """Refuse a directory holding pickled weights (``*.bin``, ``*.pt``, ``*.pth``): they are never loaded.

    Raises:
        ValueError: naming the file.
    """
    for pattern in ("*.bin", "*.pt", "*.pth", "*.pkl"):
        for f in sorted(Path(directory).glob(pattern)):
            raise ArtifactError(f"{f}: pickled weights are not loaded (they can run code); surgery reads safetensors only")


def wrap_for_adapter(model: nn.Module, directory: str | Path) -> PeftModel:
    """Wrap ``model`` with the LoRA layout of a saved adapter (its ``adapter_config.json``), weights not loaded."""
    import json

    directory = Path(directory)
    refuse_pickles(directory)
    try:
        config = LoraConfig(**{k: v for k, v in json.loads((directory / "adapter_config.json").read_text()).items()
                               if k in LoraConfig.__dataclass_fields__})  # fmt: skip
    except (OSError, ValueError, TypeError) as exc:
        raise ArtifactError(f"{directory / 'adapter_config.json'}: not a readable LoRA adapter config ({exc})") from None
    config.inference_mode = False
    return get_peft_model(model, config)


def load_adapter_weights(peft_model: PeftModel, directory: str | Path) -> None:
    """Load a saved adapter (LoRA tensors and mixer parameters) into an already wrapped model, in place.

    Only ``adapter_model.safetensors`` is read, by this code path: a directory with pickled weights is refused.
    """
    refuse_pickles(directory)
    file = Path(directory) / ADAPTER_FILE
    if not file.is_file():
        raise ArtifactError(f"{directory} holds no {ADAPTER_FILE}")
    state = load_file(str(file))
    result = set_peft_model_state_dict(peft_model, state)
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    if unexpected:
        raise ArtifactError(f"{directory}: adapter tensors the model has no place for: {_layer_list(unexpected)}")
    load_mixer_params(peft_model.get_base_model(), directory)
