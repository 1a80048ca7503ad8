"""Every error a user can cause, under one base class: ``SurgeryError``.

A user causes an error with a plan, a plugin, a path, a model the plan names, or training data; the message names
what is wrong and where (the plan line, the layer, the module class, the file). The CLI prints any ``SurgeryError``
as its message alone and exits with 2; anything else is a bug of ours or a plugin's and exits with 1 (traceback with
``-v``). A plugin raising an error its user caused subclasses ``SurgeryError`` too.

Each class also keeps the builtin base it had before (``ValueError``, ``RuntimeError``, ...), so ``except
ValueError`` written against the old classes still catches them. This module imports nothing: every layer of the
package may raise these.
"""

from __future__ import annotations

__all__ = [
    "ArtifactError", "AttentionReadError", "DataError", "InputError", "MixerDimsError", "ModelNotFoundError", "OutputError",
    "PlanError", "PluginError", "RotaryReadError", "StaticCacheError", "SurgeryError", "TrainingDiverged",
    "UnknownNameError",
]  # fmt: skip


class SurgeryError(Exception):
    """Base of every error a user can cause; ``str()`` is the located message the CLI prints."""


class PlanError(SurgeryError, ValueError):
    """A mistake in a plan. ``problems`` holds ``(location, message)`` pairs; ``str()`` is one line per problem.

    Args:
        problems: ``(location, message)`` pairs (``("convert.0.mixer", "unknown mixer 'glaa'")``), or one message.
        source: the plan file, named in the message.
    """

    def __init__(self, problems: list[tuple[str, str]] | str, source: str | None = None) -> None:
        if isinstance(problems, str):
            problems = [("", problems)]
        self.problems = problems
        self.source = source
        head = f"invalid plan {source}" if source else "invalid plan"
        lines = [f"{loc}: {msg}" if loc else msg for loc, msg in problems]
        super().__init__(head + ":\n  " + "\n  ".join(lines) if len(lines) > 1 else f"{head}: {lines[0]}")


class PluginError(SurgeryError, RuntimeError):
    """A plugin could not be loaded or breaks the contract; the message names the plugin and its distribution."""


class UnknownNameError(SurgeryError, KeyError, ValueError):
    """An unknown mixer, weight-map or stage name; the message suggests the closest names."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class AttentionReadError(SurgeryError, ValueError):
    """A module looks like attention but cannot be read; the message names the module path and class."""


class RotaryReadError(SurgeryError, ValueError):
    """The rotary call of an attention ``forward`` cannot be described; the message names the module."""


class MixerDimsError(SurgeryError, ValueError):
    """A mixer cannot take the dimensions of an attention layer (raised by ``Mixer.check_site``)."""


class OutputError(SurgeryError, ValueError):
    """An output path surgery must not write (a foreign directory, a file, a run in use); names the path."""


class ArtifactError(SurgeryError, ValueError):
    """A saved directory cannot be written or read; the message names the path and what is wrong."""


class ModelNotFoundError(SurgeryError, FileNotFoundError):
    """A directory given as a saved model holds none (no config.json, no model.safetensors); names the path."""


class DataError(SurgeryError, ValueError):
    """Unusable training data (a missing path, a bad record, too few tokens); the message names the file."""


class TrainingDiverged(SurgeryError, RuntimeError):
    """A stage met a non-finite loss or gradient: stopped before the update, the last checkpoint kept is finite."""


class StaticCacheError(SurgeryError, ValueError):
    """A layer's cache cannot live in static buffers (shape changed, batch differs, length exceeded)."""


class InputError(SurgeryError, ValueError):
    """A forward input a converted model cannot take (packed rows); the message says what to pass instead."""
