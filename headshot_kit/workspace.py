"""Where the workbench keeps its files: one work folder, and a sub-folder per stage.

    <workdir>/photos/     your selfies (the upload cell saves here)
    <workdir>/prepared/   the dataset                 (01_prepare)
    <workdir>/lora/       the trained LoRA            (02_finetune)
    <workdir>/headshots/  the generated pack          (03_generate)
    <workdir>/scores/     likeness and quality scores (04_evaluate)

Locally the work folder is `results/work` (git-ignored, so photos of a face are never
committed; `make demo` keeps its own, `results/demo`, apart from it). On Colab it is a folder
on Google Drive: each Colab notebook gets its own runtime, and a disconnect loses the
runtime's disk, so only Drive carries one stage's output to the next.
`HEADSHOT_KIT_DRIVE` names a folder that stands in for the mounted Drive (tests, or a Drive
synced some other way); setting it also makes the workbench behave as it does on Colab.

On Kaggle the work folder is `/kaggle/working/headshot-kit`: one notebook runs the whole
journey in one session there, and the folder is kept as the notebook's output when a version
is saved. Kaggle's image is built from Colab's and carries google.colab, so Kaggle is told
apart by what it sets in the environment (`KAGGLE_KERNEL_RUN_TYPE`) or its folder, never by
that module.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from .layout import HEADSHOTS, LORA, MADE_BY, MARKER, PHOTOS, PREPARED, SCORES  # noqa: F401

DRIVE_MOUNT = Path("/content/drive")
DRIVE_ENV = "HEADSHOT_KIT_DRIVE"
# A folder of its own on Drive, so purging it never touches the user's other files.
DRIVE_FOLDER = "headshot-kit"
KAGGLE_WORKING = Path("/kaggle/working")
# The local work folder under results/: not the demo's results/demo, so a first real run does
# not mix its files with the demo's.
LOCAL_FOLDER = "work"
CHECKOUT = Path(__file__).resolve().parents[1]


class StageMissing(FileNotFoundError):
    """A stage's input is not in the work folder; the message says which notebook makes it."""


def is_kaggle() -> bool:
    """True in a Kaggle notebook, from what Kaggle sets (its image also holds google.colab)."""
    return bool(os.environ.get("KAGGLE_KERNEL_RUN_TYPE")) or KAGGLE_WORKING.is_dir()


def is_colab() -> bool:
    """True on Google Colab, or where HEADSHOT_KIT_DRIVE stands in for its Drive; never on
    Kaggle, whose kernel may have google.colab loaded but cannot mount Drive."""
    if os.environ.get(DRIVE_ENV):
        return True
    return "google.colab" in sys.modules and not is_kaggle()


def enable_colab_widgets() -> bool:
    """Let Colab show ipywidgets (its default widget manager cannot); True when on Colab.
    Kaggle's image carries google.colab too, but not Colab's frontend: left alone there."""
    if not is_colab():
        return False
    try:
        from google.colab import output
    except ImportError:
        return False
    output.enable_custom_widget_manager()
    return True


def drive_root() -> Path:
    """The folder the user's Drive files appear in once mounted ("My Drive")."""
    stand_in = os.environ.get(DRIVE_ENV)
    return Path(stand_in) if stand_in else DRIVE_MOUNT / "MyDrive"


def drive_mounted() -> bool:
    return drive_root().is_dir()


def mount_drive() -> Path | None:
    """Mount Google Drive on Colab (once: a mounted Drive is left as it is); None elsewhere."""
    if not is_colab():
        return None
    if not drive_mounted():
        print("Mounting Google Drive: each Colab notebook runs in its own runtime and a "
              "disconnect wipes the runtime's disk, so the stages keep their work on Drive.")
        from google.colab import drive

        drive.mount(str(DRIVE_MOUNT))
    return drive_root()


def notebook_setup() -> None:
    """The setup cell's work: on Colab widgets on and Drive mounted; everywhere, a mistake the
    workbench explains (a wrong setting, a stage not run yet, a GPU too old for torch) shows
    as its one-line message, not as a traceback with the useful line at the bottom."""
    from .models import check_gpu

    enable_colab_widgets()
    mount_drive()
    _short_errors()
    check_gpu()


def _short_errors() -> None:
    try:
        from IPython import get_ipython
    except ImportError:
        return
    shell = get_ipython()
    if shell is None:
        return
    from .config import ConfigError, DataError, RunFailed

    def one_line(shell, etype, value, tb, tb_offset=None):
        # IPython leaves the showing to the handler: the error as %xmode Minimal shows it, its
        # type and message on one line (IPython 7.34, Colab's, to 9). The cell still fails, so
        # Run All stops here.
        formatter = shell.InteractiveTB
        mode = formatter.mode
        formatter.set_mode("Minimal")
        try:
            shell.showtraceback((etype, value, tb), tb_offset=tb_offset)
        finally:
            formatter.set_mode(mode)

    shell.set_custom_exc((ConfigError, DataError, RunFailed, StageMissing), one_line)


def default_workdir() -> Path:
    if is_colab():
        return drive_root() / DRIVE_FOLDER
    if is_kaggle():
        return KAGGLE_WORKING / DRIVE_FOLDER
    if (CHECKOUT / "pyproject.toml").is_file():  # a checkout: its git-ignored results/
        return CHECKOUT / "results" / LOCAL_FOLDER
    return Path.cwd() / "results" / LOCAL_FOLDER


def _check_on_drive(workdir: Path) -> None:
    """Refuse a Drive path while Drive is not mounted: it would land on the runtime's disk."""
    if workdir.is_relative_to(DRIVE_MOUNT) and not drive_mounted():
        raise StageMissing(f"{workdir} is on Google Drive, but Drive is not mounted, so the "
                           "files would land on the runtime's disk and vanish with it. Run the "
                           "setup cell at the top of the notebook (it mounts Drive), then this "
                           "cell again.")


@dataclass(frozen=True)
class Workspace:
    """The work folder and its stage folders; `input` checks a stage's input is there."""

    root: Path
    photos: Path

    @property
    def prepared(self) -> Path:
        return self.root / PREPARED

    @property
    def lora(self) -> Path:
        return self.root / LORA

    @property
    def headshots(self) -> Path:
        return self.root / HEADSHOTS

    @property
    def scores(self) -> Path:
        return self.root / SCORES

    @property
    def experiments(self) -> Path:
        """The work folder's experiments table (one row per evaluated run)."""
        from .records import experiments_table

        return experiments_table(self.root)

    def input(self, stage: str) -> Path:
        """The folder a stage reads, or StageMissing saying where it looked and what makes it."""
        if stage == PHOTOS:
            if self.photos.is_file() or list_photos(self.photos):
                return self.photos
            raise StageMissing(f"No photos in {self.photos}: pick 5-20 selfies with the upload "
                               "cell above (or copy them there), then run this cell again.")
        folder = self.root / stage
        if not (folder / MARKER[stage]).is_file():
            hint = ""
            if is_colab():
                hint = (" On Colab each notebook runs in its own runtime: keep workdir on "
                        "Google Drive (the default) so the stages see each other's work.")
            elif is_kaggle():
                hint = (" On Kaggle a new session starts with an empty /kaggle/working: run "
                        "the quickstart, which does every stage in one session.")
            raise StageMissing(f"No {MARKER[stage]} in {folder}: run {MADE_BY[stage]} with the "
                               f"same workdir ({self.root}) first.{hint}")
        return folder

    def _repr_html_(self) -> str:
        rows = "".join(f"<tr><td>{name}</td><td><code>{path}</code></td></tr>"
                       for name, path in (("work folder", self.root), ("photos", self.photos)))
        return f"<table>{rows}</table>"


def list_photos(folder: Path) -> list[Path]:
    """The photo files (those the prepare stage reads, images.IMAGE_SUFFIXES) and zips
    directly in `folder`."""
    from .images import IMAGE_SUFFIXES

    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and p.suffix.lower() in (*IMAGE_SUFFIXES, ".zip")
                  and not p.name.startswith("."))


def workspace(workdir: str | Path | None = None, photos: str | Path | None = None) -> Workspace:
    """The work folder (None: on Drive on Colab, results/work locally) and the photo folder
    (None: <workdir>/photos, where the upload cell saves)."""
    root = Path(workdir).expanduser() if workdir else default_workdir()
    _check_on_drive(root.absolute())
    photo_dir = Path(photos).expanduser() if photos else root / PHOTOS
    _check_on_drive(photo_dir.absolute())
    return Workspace(root=root, photos=photo_dir)
