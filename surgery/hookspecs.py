"""The plugin contract: three pluggy hooks, each returning classes that carry a ``name``.

A plugin is any module (or object) with ``@hookimpl`` functions of these names. Built-ins in ``surgery.plugins`` are
registered exactly like third-party plugins, which register through the ``surgery`` entry-point group::

    [project.entry-points.surgery]
    retnet = "surgery_retnet"

The hooks name the classes they return in words rather than by import: this module imports nothing of surgery's, so
the contracts, the registry and every plugin can import it. The registry checks each class against its contract.
"""

from __future__ import annotations

import pluggy

PROJECT = "surgery"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def surgery_mixers() -> list[type]:
    """Return the token-mixer classes (subclasses of ``surgery.mixer.Mixer``) this plugin provides."""


@hookspec
def surgery_weight_maps() -> list[type]:
    """Return the weight-mapping classes (subclasses of ``surgery.mixer.WeightMap``) this plugin provides."""


@hookspec
def surgery_stages() -> list[type]:
    """Return the recovery-stage classes (subclasses of ``surgery.recovery.stage.Stage``) this plugin provides."""
