"""The whole workbench on the bundled sample photos: prepare, train, generate, evaluate.

`run_demo` runs the four stages either as library calls or by executing the four stage
notebooks headless with papermill, so the notebooks a learner opens are the ones proven to run.
Each stage reads the previous stage's folder under one work folder:

    <out>/prepared/   dataset, report.csv, contact sheet        (01_prepare)
    <out>/lora/       pytorch_lora_weights.safetensors, metrics  (02_finetune)
    <out>/headshots/  images/, manifest.csv, grid.png            (03_generate)
    <out>/scores/     scores.csv, summary.csv, plots             (04_evaluate)
    <out>/notebooks/  the executed notebooks (with --notebooks)
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import TYPE_CHECKING

from .config import get_preset
from .workspace import Workspace

if TYPE_CHECKING:
    from .fitcheck.eta import Eta

PACKAGE = Path(__file__).resolve().parent
STAGE_NOTEBOOKS = ("01_prepare.ipynb", "02_finetune.ipynb", "03_generate.ipynb",
                   "04_evaluate.ipynb")


def _shipped(in_package: str, in_checkout: str) -> Path:
    """A folder that a wheel ships inside the package and a checkout keeps at its top.

    pyproject.toml maps the repository's `notebooks/` and `data/samples/` into the package, so
    `pip install` (what Colab does) carries them; an editable install reads the checkout's.
    """
    installed = PACKAGE / in_package
    return installed if installed.is_dir() else PACKAGE.parent / in_checkout


def notebook_dir() -> Path:
    """The stage notebooks, in an installed wheel or in the checkout."""
    return _shipped("notebooks", "notebooks")


def samples_dir() -> Path:
    """The bundled public-domain sample photos: photos only, their PROVENANCE.md and SHA256SUMS
    one folder up, so the demo reads no note as a photo."""
    return _shipped("data/samples", "data/samples") / "photos"


def lab_dir() -> Path:
    """Where `make lab` (`headshot-kit lab`) keeps the notebooks a user runs: the checkout's
    git-ignored results/notebooks, or ./results/notebooks for an installed workbench."""
    from .workspace import CHECKOUT

    root = CHECKOUT if (CHECKOUT / "pyproject.toml").is_file() else Path.cwd()
    return root / "results" / "notebooks"


def working_notebooks(folder: str | Path | None = None) -> Path:
    """Copies of the stage notebooks to run and save in `folder` (default `lab_dir()`).

    JupyterLab saves outputs into the notebooks it runs (every few minutes, by itself): run
    from the tracked notebooks/, a user's photos and local paths would land in files git
    tracks. A copy already there is the user's own and is never overwritten; one whose cells
    differ from the shipped notebook is named, so the user can delete it for the new one.
    """
    import json

    folder = Path(folder) if folder else lab_dir()
    folder.mkdir(parents=True, exist_ok=True)
    for shipped in sorted(notebook_dir().glob("[0-9]*.ipynb")):
        copy = folder / shipped.name
        if not copy.exists():
            copy.write_bytes(shipped.read_bytes())
            continue

        def sources(path: Path) -> list[str]:
            return ["".join(c["source"]) for c in json.loads(path.read_text())["cells"]]

        try:
            stale = sources(copy) != sources(shipped)
        except (ValueError, KeyError):
            stale = True
        if stale:
            print(f"Kept your copy {copy}: it differs from the shipped {shipped.name} (delete "
                  "it to get the shipped one).")
    return folder


def _photos(photos: str | Path | None) -> Path:
    path = Path(photos) if photos else samples_dir()
    if not path.exists():
        raise FileNotFoundError(f"{path}: no photos there. Pass --photos with a folder of "
                                "selfies.")
    return path


def run_stages(out: str | Path, preset: str = "tiny", photos: str | Path | None = None):
    """The four stages as library calls; returns the evaluate stage's result."""
    from .evaluate import evaluate_images
    from .generate import generate_pack
    from .prepare import prepare_photos
    from .train import train_lora

    p, ws = get_preset(preset), Workspace(root=Path(out), photos=_photos(photos))
    # Every likeness feature on, also where a preset leaves one off (the tiny model draws no
    # faces, so its face pass finds none and says so).
    p.generate = dataclasses.replace(p.generate, face_detail=True)
    eta = announce_eta(p)
    measured: dict[str, float] = {}
    start = time.perf_counter()
    prepared = prepare_photos(ws.photos, ws.prepared, p.prepare)
    measured["prepare"] = time.perf_counter() - start
    for line in prepared.advice:
        print(line)
    trained = train_lora(ws.prepared, ws.lora, p.train)
    generated = generate_pack(ws.lora, ws.headshots, p.generate)
    start = time.perf_counter()
    result = evaluate_images(ws.prepared / "images", ws.headshots, ws.scores, p.evaluate,
                             run_id=f"demo-{preset}")
    measured["evaluate"] = time.perf_counter() - start
    print(result.headline)
    write_measured(ws.root, eta, measured, trained.timings, generated.timings)
    return result


def announce_eta(preset) -> "Eta":
    """Print the journey's ETA on a T4 (headshot_kit.fitcheck.eta) before anything heavy."""
    from .fitcheck import journey_eta

    eta = journey_eta(preset, "t4")
    print(eta.summary())
    return eta


def write_measured(folder: Path, eta, measured: dict[str, float], train: dict[str, float],
                   generate: dict[str, float]) -> Path:
    """eta.json in the work folder: the measured phases beside the predicted ones. The
    prepare stage's time stands with caching (the ETA's "prepare + caching"); loads add up, a
    first load's download included."""
    from .fitcheck import write_eta

    phases = {"download + loads": train.get("loads", 0.0) + generate.get("loads", 0.0),
              "prepare + caching": measured.get("prepare", 0.0) + train.get("caching", 0.0)}
    phases |= {k: v for k, v in train.items() if k not in ("loads", "caching")}
    phases |= {k: v for k, v in generate.items() if k != "loads"}
    if "evaluate" in measured:  # a notebook run times its stages itself, or not at all
        phases["evaluate"] = measured["evaluate"]
    path = write_eta(folder, eta, phases)
    print(f"Predicted and measured phase times: {path}")
    return path


def run_notebooks(out: str | Path, preset: str = "tiny", photos: str | Path | None = None,
                  notebooks: tuple[str, ...] = STAGE_NOTEBOOKS,
                  folder: Path | None = None) -> list[Path]:
    """Execute the stage notebooks in order with papermill; returns the executed copies."""
    try:
        import papermill
    except ImportError:
        from .config import ConfigError

        raise ConfigError('Running the notebooks needs a kernel and papermill: pip install '
                          '"headshot-kit[notebooks]" (make installs it).') from None

    folder = folder or notebook_dir()
    out = Path(out).resolve()
    executed_dir = out / "notebooks"
    executed_dir.mkdir(parents=True, exist_ok=True)
    params = {"preset": preset, "workdir": str(out), "photos": str(_photos(photos).resolve()),
              "face_detail": True}  # as run_stages: every likeness feature on
    done = []
    for name in notebooks:
        start = time.perf_counter()
        target = executed_dir / name
        declared = papermill.inspect_notebook(str(folder / name))
        papermill.execute_notebook(str(folder / name), str(target),
                                   parameters={k: v for k, v in params.items() if k in declared},
                                   kernel_name="python3", cwd=str(folder),
                                   progress_bar=False)
        print(f"{name}: ran in {time.perf_counter() - start:.0f} s -> {target}")
        done.append(target)
    return done


def run_demo(out: str | Path = "results/demo", preset: str = "tiny",
             photos: str | Path | None = None, notebooks: bool = False):
    start = time.perf_counter()
    if notebooks:
        announce_eta(get_preset(preset))
        run_notebooks(out, preset, photos)
    else:
        run_stages(out, preset, photos)
    print(f"Demo finished in {time.perf_counter() - start:.0f} s; everything is in {out}/")
