"""The work folder: where each stage looks, on Colab (Drive) and locally (results/)."""

from __future__ import annotations

import re
import subprocess

import pytest

from conftest import ROOT
from headshot_kit import workspace as wsm
from headshot_kit.workspace import StageMissing, workspace


@pytest.fixture
def local(monkeypatch):
    monkeypatch.delenv(wsm.DRIVE_ENV, raising=False)


def test_locally_everything_lands_in_a_git_ignored_folder(local):
    ws = workspace()
    assert ws.root == ROOT / "results" / "work" and ws.photos == ws.root / "photos"
    assert not wsm.is_colab()
    if (ROOT / ".git").exists():
        check = subprocess.run(["git", "check-ignore", "-q", str(ws.photos / "me.jpg")],
                               cwd=ROOT)
        assert check.returncode == 0, "uploads would show up in git status"


def test_the_local_work_folder_is_not_the_demos(local):
    """A first real run must not mix its photos, LoRA and scores with `make demo`'s."""
    import inspect

    from headshot_kit.demo import run_demo

    demo = ROOT / inspect.signature(run_demo).parameters["out"].default
    assert workspace().root.resolve() != demo.resolve()
    assert not workspace().root.resolve().is_relative_to(demo.resolve())


def test_on_colab_the_defaults_are_on_drive(tmp_path, monkeypatch):
    monkeypatch.setenv(wsm.DRIVE_ENV, str(tmp_path / "MyDrive"))
    (tmp_path / "MyDrive").mkdir()
    ws = workspace()
    assert wsm.is_colab() and wsm.mount_drive() == tmp_path / "MyDrive"
    assert ws.root == tmp_path / "MyDrive" / "headshot-kit"
    assert ws.photos == ws.root / "photos" and ws.lora == ws.root / "lora"


def test_a_drive_path_without_drive_mounted_is_refused(local):
    with pytest.raises(StageMissing, match="not mounted.*setup cell"):
        workspace("/content/drive/MyDrive/headshots")


def test_a_missing_stage_says_where_it_looked_and_what_makes_it(tmp_path, local):
    ws = workspace(tmp_path)
    with pytest.raises(StageMissing, match=f"No metadata.jsonl in {tmp_path}/prepared: run "
                       "notebook 01_prepare"):
        ws.input("prepared")
    with pytest.raises(StageMissing, match="No photos in .*upload cell"):
        ws.input("photos")
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "me.jpg").write_bytes(b"")
    assert ws.input("photos") == tmp_path / "photos"


def test_notebook_errors_the_workbench_explains_are_one_line(local, capfd):
    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()
    try:
        wsm.notebook_setup()
        result = shell.run_cell("from headshot_kit.config import ConfigError\n"
                                "raise ConfigError('steps is 0; train for at least 1 step.')")
        assert result.error_in_exec is not None  # the cell still fails: Run All stops there
        out = re.sub(r"\x1b\[[0-9;]*m", "", "".join(capfd.readouterr()))  # IPython's colours
        assert out.strip() == "ConfigError: steps is 0; train for at least 1 step."
        # Through IPython's public showtraceback, in %xmode Minimal for that error only: other
        # errors keep their traceback.
        assert shell.InteractiveTB.mode == "Context"
        assert shell.run_cell("1 / 0").error_in_exec is not None
        assert "Traceback" in "".join(capfd.readouterr())
    finally:
        InteractiveShell.clear_instance()


@pytest.fixture
def kaggle(tmp_path, monkeypatch):
    """A Kaggle notebook: its environment, its working folder, and google.colab loaded (Kaggle's
    image is Colab's) whose Drive and widget manager refuse to work there."""
    import sys
    import types

    monkeypatch.delenv(wsm.DRIVE_ENV, raising=False)
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Interactive")
    monkeypatch.setattr(wsm, "KAGGLE_WORKING", tmp_path / "kaggle" / "working")

    def unsupported(*args, **kwargs):
        raise NotImplementedError("Mounting drive is unsupported in this environment")

    colab = types.ModuleType("google.colab")
    colab.drive = types.SimpleNamespace(mount=unsupported)
    colab.output = types.SimpleNamespace(enable_custom_widget_manager=unsupported)
    colab.files = types.SimpleNamespace(upload=unsupported)
    google = types.ModuleType("google")
    google.colab = colab
    monkeypatch.setitem(sys.modules, "google", google)
    monkeypatch.setitem(sys.modules, "google.colab", colab)
    return tmp_path / "kaggle" / "working"


def test_kaggle_is_its_own_home_not_colab(kaggle):
    assert wsm.is_kaggle() and not wsm.is_colab()
    ws = workspace()
    assert ws.root == kaggle / "headshot-kit" and ws.photos == ws.root / "photos"
    # The setup cell neither mounts Drive nor turns on Colab's widget manager there.
    assert wsm.mount_drive() is None
    wsm.notebook_setup()
    with pytest.raises(StageMissing, match="On Kaggle a new session"):
        ws.input("prepared")


def test_a_kaggle_upload_uses_the_panel_not_colabs_picker(kaggle):
    from headshot_kit.widgets import PhotoUpload, upload_photos

    assert isinstance(upload_photos(kaggle / "headshot-kit" / "photos"), PhotoUpload)


def test_lab_runs_working_copies_and_keeps_the_users(tmp_path, capsys):
    """`make lab` serves copies of the notebooks in a git-ignored folder; a copy the user has
    run or edited is never overwritten, and one that differs from the shipped notebook is
    named."""
    from headshot_kit.demo import lab_dir, notebook_dir, working_notebooks

    if (ROOT / ".git").exists():
        check = subprocess.run(["git", "check-ignore", "-q", str(lab_dir() / "x.ipynb")],
                               cwd=ROOT)
        assert check.returncode == 0, "saved notebooks would show up in git status"
    folder = working_notebooks(tmp_path / "lab")
    shipped = sorted(p.name for p in notebook_dir().glob("[0-9]*.ipynb"))
    assert sorted(p.name for p in folder.iterdir()) == shipped
    mine = folder / "00_quickstart.ipynb"
    mine.write_text(mine.read_text().replace('preset = \\"tiny\\"', 'preset = \\"sd15-t4\\"'))
    edited = mine.read_text()
    assert 'preset = \\"sd15-t4\\"' in edited
    working_notebooks(folder)
    assert mine.read_text() == edited
    assert f"Kept your copy {mine}" in capsys.readouterr().out
