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


# ---------------------------------------------------------------------------------------------
# What Colab's and Kaggle's runtimes hold: ipywidgets 7.7.1, an old torchao


class _Ipywidgets7:
    """A widget as ipywidgets 7.x makes it: it displays through `_ipython_display_` and has no
    `_repr_mimebundle_` (the attribute whose absence broke every panel on Colab)."""

    def __init__(self, widget):
        self._widget = widget

    def __getattr__(self, name):
        if name == "_repr_mimebundle_":
            raise AttributeError(name)
        return getattr(self._widget, name)

    def __repr__(self):
        return repr(self._widget)


def test_a_panel_shows_the_same_widget_view_under_ipywidgets_7_and_8(tmp_path):
    from headshot_kit.widgets import PhotoUpload

    panel = PhotoUpload(tmp_path)
    as_8 = panel._repr_mimebundle_()
    panel.widget = _Ipywidgets7(panel.widget)
    as_7 = panel._repr_mimebundle_()
    view = "application/vnd.jupyter.widget-view+json"
    assert as_7[view] == as_8[view] and as_7[view]["model_id"] == panel.widget._model_id
    assert as_7["text/plain"].startswith("VBox(")


def test_uploads_are_read_in_both_ipywidgets_shapes(tmp_path):
    from headshot_kit.widgets import uploaded_files

    jpeg = b"\xff\xd8\xff\xe0 not really a photo"
    as_8 = ({"name": "me.jpg", "type": "image/jpeg", "size": len(jpeg),
             "content": memoryview(jpeg)},)
    as_7 = {"me.jpg": {"metadata": {"name": "me.jpg", "type": "image/jpeg", "size": len(jpeg)},
                       "content": jpeg}}
    assert uploaded_files(as_8) == uploaded_files(as_7) == [("me.jpg", jpeg)]


@pytest.fixture
def old_torchao(tmp_path, monkeypatch):
    """Colab's torchao 0.10.0 (its metadata and an importable package) on the path."""
    import sys

    (tmp_path / "torchao").mkdir()
    (tmp_path / "torchao" / "__init__.py").write_text("")
    info = tmp_path / "torchao-0.10.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: torchao\nVersion: 0.10.0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    from peft import import_utils

    clear = getattr(import_utils.is_torchao_available, "cache_clear", lambda: None)
    forget = getattr(getattr(compat, "hide_unusable_torchao", None), "cache_clear", lambda: None)
    clear()
    forget()
    yield
    sys.modules.pop("torchao", None)
    clear()
    forget()


def test_an_old_torchao_is_left_out_so_the_lora_attaches(old_torchao, capsys):
    """peft refuses torchao 0.10 at every LoRA attach (fit check, training); the workbench
    does not use torchao, so it leaves it out of the session and says so in a sentence."""
    import torch
    from peft import import_utils

    from headshot_kit.lora import add_lora

    with pytest.raises(ImportError, match="incompatible version of torchao"):
        import_utils.is_torchao_available()  # what peft does on its own
    block = torch.nn.Module()
    block.to_q, block.to_k = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)
    from diffusers.loaders.peft import PeftAdapterMixin
    from diffusers.models.modeling_utils import ModelMixin

    class Tiny(ModelMixin, PeftAdapterMixin):
        def __init__(self):
            super().__init__()
            self.block = block

    params = add_lora(Tiny(), rank=2, targets=("to_q", "to_k"))
    assert len(params) == 4
    said = capsys.readouterr().out
    assert "torchao 0.10.0 is installed but peft" in said and said.count("\n") == 1
    assert import_utils.is_torchao_available() is False


def test_a_ceiling_reads_as_written():
    """`<=` stays one operator in the sentence (it once came out as `< =`)."""
    installed = {"peft": "0.22.0"}
    [sentence] = check_versions(installed, [Need("transformers", "5.23.0", "peft",
                                                 "<=0.21.2,>=0.17")])
    assert "needs peft <= 0.21.2, >= 0.17; installed 0.22.0" in sentence
    assert "< =" not in sentence
