"""The start-of-run version check: a mismatched pair is named in one sentence with its fix,
before any model loads; the tested set passes it."""

from __future__ import annotations

import pytest

from headshot_kit import compat
from headshot_kit.compat import IncompatibleVersions, Need, check_versions


def test_a_bad_pair_is_named_with_the_command_that_fixes_it():
    installed = {"transformers": "5.24.0", "peft": "0.21.2"}
    problems = check_versions(installed, [Need("transformers", "5.24.0", "peft", ">=0.22.0")])
    assert len(problems) == 1
    sentence = problems[0]
    assert sentence.startswith("transformers 5.24.0 needs peft >= 0.22.0; installed 0.21.2: "
                               "pip install -U 'peft>=0.22.0', or install the tested set: pip "
                               "install -c ")
    assert "requirements.lock" in sentence and "\n" not in sentence


def test_met_needs_and_absent_packages_are_no_problem():
    installed = {"transformers": "5.23.0", "peft": "0.21.2", "torch": "2.13.0+cpu"}
    needs = [Need("transformers", "5.23.0", "peft", ">=0.20.0"),
             Need("bitsandbytes", "0.50.2", "torch", "<3,>=2.4"),
             Need("diffusers", "0.42.1", "not-installed", ">=1.0")]
    assert check_versions(installed, needs) == []


def test_the_installed_set_is_consistent():
    installed = compat.installed_versions()
    assert {"diffusers", "transformers", "peft", "accelerate"} <= set(installed)
    assert check_versions(installed, compat.library_needs(installed)) == []


def test_transformers_runtime_peft_floor_is_read_from_transformers(monkeypatch):
    """The floor transformers checks only when a text encoder gets an adapter, raised as
    transformers 5.24 raised it: the check reports it before the run starts."""
    from transformers.integrations import peft as tf_peft

    monkeypatch.setattr(tf_peft, "MIN_PEFT_VERSION", "99.0.0")
    installed = compat.installed_versions()
    problems = check_versions(installed, compat.library_needs(installed))
    assert [p for p in problems if p.startswith(f"transformers {installed['transformers']} "
                                                "needs peft >= 99.0.0; installed ")]


def test_loading_a_model_stops_at_a_bad_pair(monkeypatch):
    from transformers.integrations import peft as tf_peft

    from headshot_kit.models import load_pipeline

    monkeypatch.setattr(tf_peft, "MIN_PEFT_VERSION", "99.0.0")
    compat._checked.cache_clear()
    try:
        with pytest.raises(IncompatibleVersions, match=r"needs peft >= 99\.0\.0.*restart"):
            load_pipeline("tiny-sd15")
    finally:
        compat._checked.cache_clear()


def test_a_ceiling_reads_as_written():
    """`<=` stays one operator in the sentence (it once came out as `< =`)."""
    installed = {"peft": "0.22.0"}
    [sentence] = check_versions(installed, [Need("transformers", "5.23.0", "peft",
                                                 "<=0.21.2,>=0.17")])
    assert "needs peft <= 0.21.2, >= 0.17; installed 0.22.0" in sentence
    assert "< =" not in sentence
