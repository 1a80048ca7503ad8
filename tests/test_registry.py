"""The plugin registry: built-ins, extras, entry points, and the errors that name a bad plugin."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest

from surgery.hookspecs import hookimpl
from surgery.mixer import Mixer
from surgery.registry import DEFAULT_PLUGINS, PluginError, UnknownNameError, load_registry

PLUGINS = Path(__file__).parent / "plugins"


def _plugin(name: str, mixers=(), maps=(), raises: Exception | None = None) -> types.ModuleType:
    mod = types.ModuleType(name)

    @hookimpl
    def surgery_mixers():
        if raises:
            raise raises
        return list(mixers)

    @hookimpl
    def surgery_weight_maps():
        return list(maps)

    mod.surgery_mixers, mod.surgery_weight_maps = surgery_mixers, surgery_weight_maps
    return mod


def _mixer(name: str, **attrs: object) -> type[Mixer]:
    return type("M", (Mixer,), {"name": name, "default_weights": "copy_qkvo", **attrs})


def test_a_mixer_must_name_its_default_weight_map() -> None:
    bare = type("Bare", (Mixer,), {"name": "bare"})
    with pytest.raises(PluginError, match="mixer Bare sets no default_weights"):
        load_registry(autoload=False, extra=[_plugin("nodefault", [bare])])


def test_stages_register_like_mixers() -> None:
    from surgery.recovery.stage import Stage

    stage = type("S", (Stage,), {"name": "my_stage"})
    mod = types.ModuleType("stageplugin")
    mod.surgery_stages = hookimpl(lambda: [stage])
    registry = load_registry(autoload=False, extra=[mod])
    assert registry.stage("my_stage") is stage and {"lora", "attention_transfer"} <= set(registry.stages)
    with pytest.raises(UnknownNameError, match="did you mean 'my_stage'"):
        registry.stage("my_stag")
    row = next(r for r in registry.plugins() if r.plugin == "stageplugin")
    assert row.stages == ("my_stage",)


def test_builtins_are_registered_like_plugins(registry) -> None:
    names = {p.plugin for p in registry.plugins()}
    assert names == set(DEFAULT_PLUGINS)
    assert "softmax" in registry.mixers and "copy_qkvo" in registry.weight_maps


def test_registry_is_fresh_each_time() -> None:
    a, b = load_registry(autoload=False), load_registry(autoload=False, extra=[_plugin("p", [_mixer("zzz")])])
    assert "zzz" in b.mixers and "zzz" not in a.mixers


def test_unknown_name_suggests(registry) -> None:
    with pytest.raises(UnknownNameError, match="did you mean 'softmax'"):
        registry.mixer("sofmax")


def test_duplicate_name_names_both_plugins() -> None:
    with pytest.raises(PluginError, match=r"duplicate mixer name 'softmax'.*surgery.plugins.softmax.*dupe"):
        load_registry(autoload=False, extra=[_plugin("dupe", [_mixer("softmax")])])


@pytest.mark.parametrize("bad", ["Gla", "2fast", "with-dash", ""])
def test_bad_name_form(bad: str) -> None:
    with pytest.raises(PluginError, match="names must match"):
        load_registry(autoload=False, extra=[_plugin("badname", [_mixer(bad)])])


def test_wrong_class_kind() -> None:
    with pytest.raises(PluginError, match="expected a subclass of WeightMap"):
        load_registry(autoload=False, extra=[_plugin("kinds", maps=[_mixer("x")])])


def test_plugin_raising_in_hook_is_named() -> None:
    with pytest.raises(PluginError, match="plugin 'angry'.*raised in surgery_mixers"):
        load_registry(autoload=False, extra=[_plugin("angry", raises=RuntimeError("boom"))])


def _install(pkg: str, target: Path) -> None:
    # Build from a copy: setuptools writes build/ and *.egg-info next to the sources it builds.
    src = target.parent / f"{target.name}-src"
    shutil.copytree(PLUGINS / pkg, src)
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
           "--target", str(target), str(src)]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def example_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The third-party example plugin, installed (pip) into its own directory for this test run."""
    target = tmp_path_factory.mktemp("site-example")
    _install("surgery_example", target)
    return target


def _surgery(args: list[str], *paths: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, paths))}
    env.pop("SURGERY_DISABLE_PLUGIN_AUTOLOAD", None)
    return subprocess.run([sys.executable, "-m", "surgery.cli", *args], capture_output=True, text=True, env=env)


def test_entry_point_plugin_is_listed(example_site: Path) -> None:
    out = _surgery(["plugins", "list"], example_site)
    assert out.returncode == 0, out.stderr
    line = next(x for x in out.stdout.splitlines() if x.startswith("example"))
    assert "surgery-example 1.2.3" in line and "causal_mean" in line and "copy_vo" in line


def test_entry_point_plugin_works_from_a_plan(example_site: Path, tiny_dir: str, tmp_path: Path) -> None:
    plan = tmp_path / "plan.yaml"
    plan.write_text(f"version: 2\nmodel: {tiny_dir}\noutput: {tmp_path / 'out'}\nconvert:\n"
                    "  - layers: '1'\n    mixer: causal_mean\n    options: {damping: 0.5}\n")  # fmt: skip
    out = _surgery(["check", str(plan)], example_site)
    assert out.returncode == 0, out.stderr
    assert "causal_mean" in out.stdout and "copy_vo" in out.stdout
    out = _surgery(["convert", str(plan)], example_site)
    assert out.returncode == 0, out.stderr
    assert "created new" in out.stdout and (tmp_path / "out" / "convert" / "model.safetensors").exists()


def test_plugin_that_raises_on_load_is_named(example_site: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    broken = tmp_path_factory.mktemp("site-broken")
    _install("surgery_broken", broken)
    out = _surgery(["plugins", "list"], example_site, broken)
    assert out.returncode == 0, out.stderr  # the others are listed; the broken one is shown with its error
    assert any(x.startswith("example") and "causal_mean" in x for x in out.stdout.splitlines())
    assert "BROKEN broken (surgery-broken 0.0.1): plugin 'broken' (distribution surgery-broken 0.0.1) failed to load" \
        in out.stdout
    assert "Traceback" not in out.stderr + out.stdout


def test_copies_of_a_plan_share_its_registry(registry) -> None:
    """A plan keeps the registry it was validated against; deep copies (FSDP's skeleton of a converted model, which
    holds the plan) share it rather than copying plugin modules."""
    import copy

    from surgery.plan import load_plan

    plan = load_plan({"version": 2, "model": "x/y", "convert": [{"mixer": "gla"}], "recover": {"stages": ["lora"]}},
                     registry)  # fmt: skip
    again = copy.deepcopy(plan)
    assert again.registry is registry and again == plan
    assert copy.deepcopy(plan.recover).stage_objects()[0].name == "lora"
