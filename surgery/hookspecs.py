"""The plugin contract: three pluggy hooks, each returning classes that carry a ``name``.

A plugin is any module (or object) with ``@hookimpl`` functions of these names. Built-ins in ``surgery.plugins``
are registered exactly like third-party plugins, which register through the ``surgery`` entry-point group::

    [project.entry-points.surgery]
    retnet = "surgery_retnet"
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from surgery.mixer import Mixer, WeightMap
    from surgery.recovery.stage import Stage

PROJECT = "surgery"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def surgery_mixers() -> list[type[Mixer]]:
    """Return the token-mixer classes (subclasses of ``surgery.mixer.Mixer``) this plugin provides."""


@hookspec
def surgery_weight_maps() -> list[type[WeightMap]]:
    """Return the weight-mapping classes (subclasses of ``surgery.mixer.WeightMap``) this plugin provides."""


@hookspec
def surgery_stages() -> list[type[Stage]]:
    """Return the recovery-stage classes (subclasses of ``surgery.recovery.stage.Stage``) this plugin provides."""
