"""Writing results so that nothing good is ever lost, and deleting them when asked.

Every file a stage writes goes to a temporary name in the same folder first and is renamed into
place when complete, so a crash or a Colab disconnect leaves either the old file or the new one,
never half of one. `purge` deletes a subject's uploads, datasets, weights and outputs when they
are done, and nothing outside the folders it is given.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator

from .config import ConfigError
from .layout import EXPERIMENTS, MARKER  # the stage folders' finishing files

# The file that marks a folder as made by the workbench (a pack, a sweep, a work folder), and
# the lock file that lets one writer at a time into a folder (.headshot-kit.<what>.lock for
# a folder with several).
WORKBENCH_MARKER = ".headshot-kit"
LOCK_FILE = ".headshot-kit.lock"


def is_lock_file(name: str) -> bool:
    return name.startswith(".headshot-kit") and name.endswith(".lock")


class FolderLock:
    """One writer per folder: a lock file (filelock, which the hub client uses for its own
    cache) held while a stage writes. A second writer is refused in one sentence (`wait=0`) or
    waits up to `wait` seconds; the lock goes with the process that held it, however it ends.

    Re-entrant: code that already holds it may take it again (a checkpoint saved during a run).
    """

    def __init__(self, folder: str | Path, what: str, lock_file: str | Path | None = None):
        self.folder, self.what = Path(folder), what
        self.path = Path(lock_file) if lock_file else self.folder / LOCK_FILE
        self._lock = None

    @contextmanager
    def held(self, wait: float = 0) -> Iterator[None]:
        from filelock import FileLock, Timeout

        if self._lock is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._lock = FileLock(str(self.path))
        try:
            self._lock.acquire(timeout=wait)
        except Timeout:
            raise ConfigError(f"{self.folder} is in use: another {self.what} is writing to it "
                              f"(it holds {self.path}). Wait for that one to finish, or use "
                              "another folder.") from None
        try:
            yield
        finally:
            self._lock.release()


@contextmanager
def atomic_path(path: str | Path,
                same: Callable[[Path, Path], bool] | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path` in one rename.

    With `same`, an existing `path` for which `same(new, old)` holds is kept as it is.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        if same is None or not (path.is_file() and same(tmp, path)):
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def read_record(path: str | Path) -> dict:
    """A stage's JSON record (a config.json) as a dict; {} when there is none, and a DataError
    naming the file when it is damaged (cut short, edited by hand, not JSON)."""
    from .config import DataError

    path = Path(path)
    if not path.is_file():
        return {}
    try:
        record = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise DataError(f"{path} is damaged ({exc}); run the stage that wrote it again.") from None
    if not isinstance(record, dict):
        raise DataError(f"{path} holds no record of settings; run the stage that wrote it again.")
    return record


def mark_folder(folder: str | Path, stage: str) -> Path:
    """Mark `folder` as the output of a workbench stage (what purge and the stages look for)."""
    marker = Path(folder) / WORKBENCH_MARKER
    marker.write_text(json.dumps({"made_by": f"headshot-kit {stage}"}) + "\n")
    return marker


def made_by(folder: str | Path) -> str:
    """The stage whose marker `folder` carries ("" when it carries none)."""
    try:
        record = json.loads((Path(folder) / WORKBENCH_MARKER).read_text())
    except (OSError, ValueError):
        return ""
    return str(record.get("made_by", "")).removeprefix("headshot-kit ") if isinstance(
        record, dict) else ""


def check_own_folder(folder: str | Path, stage: str, own: Iterable[str], what: str) -> None:
    """Refuse an out folder that holds files and is not this stage's: not marked as made by
    it, and holding none of the files it writes (`own`). An empty or new folder is fine."""
    folder = Path(folder)
    if not folder.exists():
        return
    if not folder.is_dir():
        raise ConfigError(f"out_dir {folder} is a file; give a folder name.")
    held = sorted(p.name for p in folder.iterdir() if not is_lock_file(p.name))
    if not held or made_by(folder) == stage or any((folder / name).exists() for name in own):
        return
    raise ConfigError(f"out_dir {folder} already holds files that are not {what} "
                      f"({', '.join(held[:3])}{', ...' if len(held) > 3 else ''}), which the "
                      f"{stage} stage could write over; choose an empty or new folder.")


@contextmanager
def atomic_dir(path: str | Path, links: Iterable[str] = ()) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; on success it becomes `path`.

    An existing `path` is replaced only after the new folder is complete. The files named in
    `links` (lock files) are hard-linked from the old folder into the new one first: the same
    file stays at the same path throughout, so a lock held in it holds across the swap.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        for name in links:
            if (path / name).is_file() and not (tmp / name).exists():
                try:
                    os.link(path / name, tmp / name)
                except OSError:  # a filesystem without hard links: a new lock file then
                    pass
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def safetensors_digest(path: str | Path) -> str:
    """A fingerprint of a .safetensors file's content: tensor names, dtypes, shapes, values
    and metadata, in sorted order.

    The file's bytes are no fingerprint: safetensors writes its metadata header in hash-map
    order, which changes from one write to the next, so the same weights saved twice differ.
    """
    import torch
    from safetensors import safe_open

    digest = hashlib.sha256()
    with safe_open(str(path), "pt") as f:
        digest.update(json.dumps(f.metadata() or {}, sort_keys=True).encode())
        for key in sorted(f.keys()):
            tensor = f.get_tensor(key).contiguous()
            digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def same_safetensors(new: Path, old: Path) -> bool:
    """For `atomic_path(..., same=...)`: a re-run that trained nothing rewrites no weights."""
    return safetensors_digest(new) == safetensors_digest(old)


def copy_ranked(table, column: str, out_dir: Path, folder: str) -> Path:
    """Copy the images a table (pandas) names in `column`, in its order, into out_dir/folder
    (replaced whole), with the table as <folder>.csv: the best images, the favourites."""
    dest = out_dir / folder
    with atomic_dir(dest) as tmp:
        names = []
        for rank, rel in enumerate(table[column], start=1):
            source = out_dir / rel
            if not source.is_file():
                raise FileNotFoundError(f"{source} does not exist; pass the generate stage's "
                                        "folder (the one holding manifest.csv) as out_dir.")
            # The rank prefix keeps the order in any file browser.
            names.append(f"{rank:02d}_{Path(rel).name}")
            shutil.copy2(source, tmp / names[-1])
        table.assign(rank=range(1, len(names) + 1), copy=names).to_csv(tmp / f"{folder}.csv",
                                                                       index=False)
    return dest


# ---------------------------------------------------------------------------------------------
# Purging


def purge(root_or_paths: str | Path | Iterable[str | Path], older_than_days: float | None = None,
          *, dry_run: bool = False) -> list[Path]:
    """Delete a subject's data: everything under each given folder (or file), and the folder.

    With `older_than_days`, only files last changed longer ago than that go, and folders left
    empty by them; the given folders stay, with the marker that shows the workbench made
    them. Links are deleted, never followed, so nothing outside the given roots is touched.
    Only folders the workbench made are deleted (see `is_workbench_folder`); folders that hold
    your home, the current folder or the headshot-kit checkout are refused. Returns (and prints a summary of) what was deleted, or
    would be with `dry_run`.
    """
    roots = ([root_or_paths] if isinstance(root_or_paths, (str, os.PathLike))
             else list(root_or_paths))
    cutoff = None if older_than_days is None else time.time() - older_than_days * 86400
    deleted: list[Path] = []
    for given in roots:
        root = Path(given).expanduser().absolute()
        if not root.exists() and not root.is_symlink():
            continue
        _refuse_broad_root(root)
        _refuse_foreign_root(root)
        if root.is_symlink() or root.is_file():
            if cutoff is None or root.lstat().st_mtime < cutoff:
                deleted.append(_delete(root, dry_run))
            continue
        deleted += _purge_tree(root, cutoff, dry_run)
    size_note = "would delete" if dry_run else "deleted"
    print(f"purge: {size_note} {len(deleted)} paths under {', '.join(str(r) for r in roots)}"
          + (":" if dry_run and deleted else ""))
    if dry_run:  # the list to check before deleting for real
        for line in _outline(deleted, {Path(r).expanduser().absolute() for r in roots}):
            print(f"  {line}")
    return deleted


def _outline(paths: list[Path], roots: set[Path]) -> list[str]:
    """The paths of a dry run, one level into each given folder; a folder that would go whole
    is one line with its file count."""
    gone = set(paths) - roots
    files = [p for p in paths if not p.is_dir() or p.is_symlink()]
    lines = []
    for path in sorted(paths):
        if path.parent in gone or path in roots:
            continue  # listed with its folder, or the given folder itself
        if path in files:
            lines.append(str(path))
        else:
            n = sum(path in f.parents for f in files)
            lines.append(f"{path}/ ({n} file{'s' * (n != 1)})")
    return lines


def is_workbench_folder(folder: Path) -> bool:
    """Whether the workbench made `folder`: it carries the workbench's marker file, or a
    stage's finishing file (a dataset's metadata.jsonl, a LoRA's weights, a pack's
    manifest.csv, the scores), or it is a work folder holding such a stage folder."""
    if (folder / WORKBENCH_MARKER).is_file():
        return True
    finishing = {*MARKER.values(), EXPERIMENTS}
    if any((folder / name).is_file() for name in finishing):
        return True
    return any((folder / stage / name).is_file() for stage, name in MARKER.items())


def _refuse_foreign_root(root: Path) -> None:
    """Refuse a root the workbench did not make (nor a folder the workbench made holds)."""
    real = root.resolve()
    start = real if real.is_dir() else real.parent
    if is_workbench_folder(start) or any((p / WORKBENCH_MARKER).is_file() or
                                         is_workbench_folder(p) and p != Path(p.anchor)
                                         for p in start.parents):
        return
    raise ConfigError(f"Refusing to purge {root}: the workbench did not make it (no "
                      f"{WORKBENCH_MARKER} marker, prepared dataset, LoRA, pack or scores in it "
                      "or above it). Give the subject's work folder or a stage folder; delete "
                      "other files yourself.")


def _refuse_broad_root(root: Path) -> None:
    real = root.resolve()
    checkout = Path(__file__).resolve().parents[1]
    if (checkout / "pyproject.toml").is_file() and (real == checkout
                                                   or real in checkout.parents):
        raise ConfigError(f"Refusing to purge {root}: it holds the headshot-kit checkout "
                          f"{checkout}. Give the subject's own folder (its uploads, dataset, "
                          "LoRA and outputs).")
    for precious in (Path.home().resolve(), Path.cwd().resolve()):
        if real == precious or real in precious.parents:
            raise ConfigError(f"Refusing to purge {root}: it holds {precious}. Give the "
                              "subject's own folder (its uploads, dataset, LoRA and outputs).")
    if real == Path(real.anchor):
        raise ConfigError(f"Refusing to purge {root}: it is a filesystem root.")


def _delete(path: Path, dry_run: bool) -> Path:
    if dry_run:
        return path
    if path.is_dir() and not path.is_symlink():
        path.rmdir()
    else:
        path.unlink()
    return path


def _purge_tree(root: Path, cutoff: float | None, dry_run: bool) -> list[Path]:
    deleted: list[Path] = []
    gone: set[Path] = set()  # what is deleted (or would be, in a dry run), to spot empty folders
    touched: set[Path] = set()  # folders this purge deleted something from
    real = root.resolve()
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):  # links never entered
        here = Path(dirpath)
        if not here.resolve().is_relative_to(real):  # a folder swapped for a link meanwhile
            raise ConfigError(f"Refusing to purge {here}: it leads outside {root}.")
        links = [d for d in dirnames if (here / d).is_symlink()]
        for name in filenames + links:
            path = here / name
            if cutoff is not None and path == root / WORKBENCH_MARKER:
                continue  # the given folder stays, and so does the mark of whose it is
            if cutoff is None or path.lstat().st_mtime < cutoff:
                deleted.append(_delete(path, dry_run))
                gone.add(path)
                touched.add(here)
        # With a cutoff the given folder stays, and sub-folders go only when this purge
        # emptied them (a folder a running stage just made is not touched).
        emptied = all(c in gone for c in here.iterdir()) and (cutoff is None or here in touched)
        if emptied and (here != root or cutoff is None):
            deleted.append(_delete(here, dry_run))
            gone.add(here)
            touched.add(here.parent)
    return deleted
