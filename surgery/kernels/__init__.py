"""The kernel family every mixer uses (``gla``, ``gsa``, ``liger``), and one switch they share.

``transient_saves()``: inside it, whatever a kernel saves for its backward lives only until that backward runs
right after it, as in a forward recomputed by ``torch.utils.checkpoint`` (``Mixer.recomputed``). Kernels that
otherwise recompute intermediates in the backward to save memory (GLA's per-chunk states) keep them there instead.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

_TRANSIENT: contextvars.ContextVar[bool] = contextvars.ContextVar("surgery_transient_saves", default=False)


@contextlib.contextmanager
def transient_saves() -> Iterator[None]:
    """Declare the tensors saved for backward in this block short-lived (see the module docstring)."""
    token = _TRANSIENT.set(True)
    try:
        yield
    finally:
        _TRANSIENT.reset(token)


def saves_are_transient() -> bool:
    """Whether the current code runs inside ``transient_saves()``."""
    return _TRANSIENT.get()
