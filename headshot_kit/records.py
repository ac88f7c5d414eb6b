"""The workbench's tables on disk, each with its one reader and its one writer: a pack's
manifest (written by generate, read by generate's stars, the pack browser and evaluate), a
training run's metrics (written by train), and the experiments table (one row per evaluated
run; where it lives is decided here too). The LoRA's own record, its config.json, is
headshot_kit.lora's.

Every writer goes through a temporary file (storage.atomic_path), so a crash leaves the old
table or the new one. A table that lacks a column its readers need is refused in one sentence
that names the file and says what to do.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

from .errors import DataError
from .layout import EXPERIMENTS, MANIFEST, METRICS
from .storage import atomic_path

if TYPE_CHECKING:
    import pandas as pd

# metrics.csv: one row per step; likeness (of the validation images) and copies (of them that
# copy a training photo, train.selection) on validation steps only.
METRICS_COLUMNS = ("step", "loss", "lr", "skipped", "likeness", "copies")


def _read_table(path: Path, required: Iterable[str], fix: str, **read_csv):
    import pandas as pd

    table = pd.read_csv(path, **read_csv)
    missing = [c for c in required if c not in table.columns]
    if missing:
        raise DataError(f"{path} has no {', '.join(repr(c) for c in missing)} "
                        f"column{'s' * (len(missing) > 1)}; {fix}")
    return table


def _write_table(table: pd.DataFrame, path: Path) -> Path:
    with atomic_path(path) as tmp:
        table.to_csv(tmp, index=False)
    return path


# A pack's manifest: one row per image; `file` is the image's path relative to the pack.
def manifest_path(folder: str | Path) -> Path:
    return Path(folder) / MANIFEST


def read_manifest(folder: str | Path, required: Sequence[str] = ("file",)) -> pd.DataFrame:
    """The manifest of the pack in `folder`; `starred` as booleans. Read as text where a cell
    is empty: an empty negative prompt or LoRA name stays "" rather than NaN."""
    path = manifest_path(folder)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; run generate_pack into {folder} first.")
    manifest = _read_table(path, required, "re-run the generate stage to rewrite it.",
                           keep_default_na=False)
    if "starred" in manifest.columns:
        manifest["starred"] = manifest["starred"].astype(str).str.lower().isin(("true", "1"))
    return manifest


def write_manifest(manifest: pd.DataFrame, folder: str | Path) -> Path:
    return _write_table(manifest, manifest_path(folder))


# A training run's metrics.
def metrics_path(folder: str | Path) -> Path:
    return Path(folder) / METRICS


def write_metrics(rows: Sequence[dict], folder: str | Path) -> Path:
    """metrics.csv in `folder`: one row per step (METRICS_COLUMNS), a missing or NaN value
    left empty. Written with the csv module: a training run never needs pandas."""
    path = metrics_path(folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(METRICS_COLUMNS)
        out.writerows([_cell(row.get(c)) for c in METRICS_COLUMNS] for row in rows)
    return path


def _cell(value) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else value


def read_metrics(folder: str | Path) -> pd.DataFrame:
    """The metrics a training run in `folder` wrote (an earlier release's file may lack the
    validation columns; step and loss it always has)."""
    path = metrics_path(folder)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; train into {folder} first.")
    return _read_table(path, ("step", "loss"), "train the LoRA again to rewrite it.")


# The experiments table: one row per evaluated run, the runs compared across settings.
def experiments_table(folder: str | Path | None = None) -> Path:
    """Where the experiments table of `folder` lives: a work folder's (the notebooks') or a
    sweep's out folder's; None: results/ under the current folder."""
    return Path("results" if folder is None else folder) / EXPERIMENTS


def read_experiments(table: str | Path, missing_ok: bool = False) -> pd.DataFrame:
    """The experiments table at `table` (a path from `experiments_table`); with `missing_ok`,
    an empty table where none was written yet."""
    import pandas as pd

    table = Path(table)
    if not table.is_file():
        if missing_ok:
            return pd.DataFrame()
        raise FileNotFoundError(f"{table} does not exist; evaluate a run (or run a sweep) to "
                                "write it.")
    return _read_table(table, ("run_id",), "it is not an experiments table: give the file that "
                       "record_experiment or the sweep wrote.")


def write_experiments(table: pd.DataFrame, path: str | Path) -> Path:
    return _write_table(table, Path(path))
