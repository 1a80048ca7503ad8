"""The example plugin's own tests, as a third party writes them: surgery's conformance suite on this distribution's
mixers (``causal_mean``, ``retention``), found through the installed ``surgery`` entry point."""

from __future__ import annotations

from surgery.testing import RecurrentMixer, conformance_suite

TestSurgeryConformance = conformance_suite()


def test_the_suite_checks_this_distributions_mixers() -> None:
    names = {case.values[0] for case in TestSurgeryConformance.test_save_load_round_trip.pytestmark[0].args[1]}
    assert names == {"causal_mean", "retention"}
    assert issubclass(TestSurgeryConformance.registry.mixer("retention"), RecurrentMixer)
