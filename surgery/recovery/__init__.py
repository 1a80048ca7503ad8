"""Recovery: train a converted model back towards its base quality, as registered stages in the plan's order.

| module | holds |
|---|---|
| ``spec`` | the plan's ``recover:`` section: data, LoRA adapters, stages -> options (validated per stage) |
| ``stage`` | the stage contract (``Stage``, ``StageContext``, ``StageResult``) |
| ``stages/`` | the built-in stages, one module each: ``attention_transfer``, ``lora`` |
| ``loop`` | ``recover``: the stage loop, resume, the typed ``RecoverResult`` |
| ``trainer`` | the HF Trainer glue: arguments, pickle-free checkpoints, divergence stop, loss curves |
| ``adapters`` | LoRA with peft: targets from the mixers, coverage check, the mixers' own parameters |
| ``data`` | training text packed into fixed-length chunks |
| ``state`` | pickle-free training state (JSON + safetensors) |

This package imports nothing heavy until ``recover`` is called: the plan parser reads ``spec`` and ``stage``.
"""

from __future__ import annotations

from typing import Any

__all__ = ["load_adapter", "recover"]


def recover(model: Any, spec: Any, tokenizer: Any, out: Any, teacher: Any = None, **kwargs: Any) -> Any:
    """See ``surgery.recovery.loop.recover`` (``surgery.recover`` resolves the arguments from a plan)."""
    from surgery.recovery.loop import recover as _recover

    return _recover(model, spec, tokenizer, out, teacher, **kwargs)


def load_adapter(model: Any, adapter_dir: Any, **kwargs: Any) -> Any:
    """See ``surgery.recovery.loop.load_adapter``."""
    from surgery.recovery.loop import load_adapter as _load_adapter

    return _load_adapter(model, adapter_dir, **kwargs)
