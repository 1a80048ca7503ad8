"""Pickle-free training state: nested Python state (optimizer, scheduler, scaler, RNGs) as JSON plus safetensors.

``torch.save`` pickles, and ``torch.load`` unpickles (``weights_only`` narrows what an unpickler may build, it is
still an unpickler). The state a Trainer checkpoint needs is small and regular - dicts, lists, tuples, numbers,
strings, tensors, numpy arrays - so it is written as two files instead:

- ``<name>.json``: the structure, with every tensor replaced by ``{"__tensor__": "<key>"}``;
- ``<name>.safetensors``: the tensors under those keys (written only when there are any).

Python types JSON lacks are tagged, so that a state comes back as the same types it left as: a tuple as
``{"__tuple__": [...]}`` (``random.setstate`` and optimizer ``betas`` need tuples), a dict with non-string keys
(the optimizer's ``state`` is keyed by parameter index) as ``{"__items__": [[key, value], ...]}``, a numpy array as
``{"__ndarray__": nested lists, "dtype": ...}``. Floats survive exactly: ``json`` writes ``repr``, which
round-trips. Anything else is refused with its path rather than stored approximately.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

log = logging.getLogger("surgery.recover")


def encode(obj: Any, tensors: dict[str, Tensor], path: str = "") -> Any:
    """``obj`` as JSON-able data; its tensors move to ``tensors`` (CPU, contiguous) under their dotted path.

    Raises:
        TypeError: ``obj`` holds a value of another type (the message names where), or two tensors would share a
            key (a dict holding both ``0`` and ``"0"``).
    """
    here = path or "<root>"
    if isinstance(obj, Tensor):
        key = path or "value"
        if key in tensors:
            raise TypeError(f"training state: two tensors would be stored under '{key}'")
        tensors[key] = obj.detach().to("cpu").contiguous()
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype)}
    if isinstance(obj, np.generic):
        return obj.item()  # a numpy scalar: its Python value is exact
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, tuple):
        return {"__tuple__": [encode(v, tensors, f"{path}.{i}".lstrip(".")) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [encode(v, tensors, f"{path}.{i}".lstrip(".")) for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: encode(v, tensors, f"{path}.{k}".lstrip(".")) for k, v in obj.items()}
        items = []
        for k, v in obj.items():
            if not (k is None or isinstance(k, (bool, int, float, str))):
                raise TypeError(f"training state at {here}: a dict key of type {type(k).__name__} cannot be stored")
            items.append([k, encode(v, tensors, f"{path}.{k}".lstrip("."))])
        return {"__items__": items}
    raise TypeError(f"training state at {here}: a value of type {type(obj).__name__} cannot be stored without pickle")


def decode(data: Any, tensors: dict[str, Tensor]) -> Any:
    """The inverse of ``encode``: ``data`` with its tags turned back into tensors, tuples, dicts and arrays."""
    if isinstance(data, list):
        return [decode(v, tensors) for v in data]
    if not isinstance(data, dict):
        return data
    if "__tensor__" in data:
        return tensors[data["__tensor__"]]
    if "__tuple__" in data:
        return tuple(decode(v, tensors) for v in data["__tuple__"])
    if "__items__" in data:
        return {k: decode(v, tensors) for k, v in data["__items__"]}
    if "__ndarray__" in data:
        return np.asarray(data["__ndarray__"], dtype=np.dtype(data["dtype"]))
    return {k: decode(v, tensors) for k, v in data.items()}


def save_state(obj: Any, directory: str | Path, name: str) -> None:
    """Write ``obj`` as ``directory/<name>.json`` and, when it holds tensors, ``directory/<name>.safetensors``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, Tensor] = {}
    data = encode(obj, tensors)
    from surgery.outputs import temporary_file, write_file

    if tensors:
        with temporary_file(directory / f"{name}.safetensors") as tmp:
            save_file(tensors, str(tmp), metadata={"format": "pt"})
    # The JSON last: it names the tensors, so its presence means the state is whole.
    write_file(directory / f"{name}.json", json.dumps({"format": 1, "state": data}))


def has_state(directory: str | Path, name: str) -> bool:
    """Whether ``save_state`` wrote ``name`` into ``directory``."""
    return (Path(directory) / f"{name}.json").is_file()


def load_state(directory: str | Path, name: str) -> Any:
    """Read back what ``save_state(obj, directory, name)`` wrote; tensors come back on the CPU.

    Raises:
        ValueError: the JSON is not ours, or it names tensors and ``<name>.safetensors`` is missing or lacks them.
    """
    directory = Path(directory)
    raw = json.loads((directory / f"{name}.json").read_text())
    if not isinstance(raw, dict) or raw.get("format") != 1 or "state" not in raw:
        raise ValueError(f"{directory / f'{name}.json'} is not a training state written by surgery")
    file = directory / f"{name}.safetensors"
    tensors = load_file(str(file), device="cpu") if file.is_file() else {}
    wanted = set(_tensor_keys(raw["state"]))
    if not wanted <= set(tensors):
        missing = sorted(wanted - set(tensors))
        raise ValueError(f"{file} lacks the tensors {missing[:5]} named in {name}.json ({len(missing)} in all)")
    return decode(raw["state"], tensors)


def _tensor_keys(data: Any) -> list[str]:
    if isinstance(data, list):
        return [k for v in data for k in _tensor_keys(v)]
    if not isinstance(data, dict):
        return []
    if "__tensor__" in data:
        return [data["__tensor__"]]
    if "__ndarray__" in data:
        return []
    values = [v for _, v in data["__items__"]] if "__items__" in data else list(data.values())
    return [k for v in values for k in _tensor_keys(v)]


def rng_states(distributed: bool) -> dict[str, Any]:
    """The random states a training step draws from: Python, numpy, torch CPU and (when present) CUDA.

    Under DDP each process keeps the states of all its visible devices (as the Trainer does); otherwise the
    current device's.
    """
    states: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(),
                              "cpu": torch.random.get_rng_state()}  # fmt: skip
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.random.get_rng_state_all() if distributed else torch.cuda.random.get_rng_state()
    return states


def set_rng_states(states: dict[str, Any], distributed: bool) -> None:
    """Restore what ``rng_states`` captured. A CUDA state missing from a checkpoint written on CPU is logged."""
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.random.set_rng_state(states["cpu"])
    if not torch.cuda.is_available():
        return
    if "cuda" not in states:
        log.warning("the checkpoint holds no CUDA random state (written without a GPU?): resume is not exact")
    elif distributed:
        torch.cuda.random.set_rng_state_all(states["cuda"])
    else:
        torch.cuda.random.set_rng_state(states["cuda"])
