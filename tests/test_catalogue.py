"""registry.yaml and docs stay in step with the code."""

from __future__ import annotations

from pathlib import Path

import yaml

from surgery.registry import catalogue

ROOT = Path(__file__).parent.parent


def test_registry_yaml_is_current(registry) -> None:
    committed = yaml.safe_load((ROOT / "registry.yaml").read_text())
    assert committed == catalogue(registry), "registry.yaml is stale: run `surgery plugins catalogue > registry.yaml`"


def test_every_builtin_has_a_description(registry) -> None:
    for cls in [*registry.mixers.values(), *registry.weight_maps.values()]:
        assert cls.description and "\n" not in cls.description, cls


def test_every_mixer_is_documented(registry) -> None:
    text = (ROOT / "docs" / "mixers.md").read_text()
    for name in registry.mixers:
        assert f"## `{name}`" in text, f"docs/mixers.md has no section for mixer '{name}'"
