"""``surgery.testing`` as a third party uses it: the example plugin, installed with pip, runs its own tests (the
conformance suite on its mixers) under pytest in a separate process, with the plugin found through its entry point."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import surgery.testing as kit
from tests.test_registry import PLUGINS, _install


def test_one_import_gives_the_contracts() -> None:
    from surgery.mixer import Mixer, WeightMap
    from surgery.recovery.stage import Stage
    from surgery.recurrent import RecurrentMixer

    assert (kit.Mixer, kit.RecurrentMixer, kit.WeightMap, kit.Stage) == (Mixer, RecurrentMixer, WeightMap, Stage)
    assert set(kit.__all__) >= {"Mixer", "RecurrentMixer", "WeightMap", "Stage", "Options", "hookimpl",
                                "conformance_suite"}


def test_the_suite_needs_a_mixer_to_check() -> None:
    with pytest.raises(ValueError, match="no mixer to check"):
        kit.conformance_suite()  # autoload is off in this suite: only surgery's own mixers are registered


@pytest.mark.slow
def test_the_example_plugin_passes_its_own_conformance_tests(tmp_path: Path) -> None:
    site = tmp_path / "site"
    _install("surgery_example", site)
    tests = tmp_path / "example-tests"
    shutil.copytree(PLUGINS / "surgery_example" / "tests", tests)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(Path(__file__).resolve().parent.parent)])}
    env.pop("SURGERY_DISABLE_PLUGIN_AUTOLOAD", None)  # the plugin is found as installed, through its entry point
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tests)], cwd=tmp_path,
                         capture_output=True, text=True, env=env)  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    # 7 cases (causal_mean on 3 archs; retention's first option set on 3, its second on 1) x 7 checks, plus one.
    assert "50 passed" in out.stdout, out.stdout[-1000:]
