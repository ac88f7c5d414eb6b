"""The notebooks' first cell on replicas of the runtimes they run on (runtimes/; how a replica
is made, and where it differs from its runtime: tests/replica.py).

Per runtime: the notebook's setup cell, as the notebook has it (only the project's GitHub
addresses served from this checkout: the built wheel, the checkout's files), runs in a kernel
of the replica that has the runtime's preloaded modules imported. Then: no protected package
changed (the freeze diff lists every change), `pip check` gains no conflict, the cell ran to its
end (after the restart it may do itself); and the journey runs to its end on the tiny preset,
each notebook in a fresh kernel of the installed replica, driven by papermill from this
project's venv: on Colab the four stage notebooks, each in a runtime of its own with Drive
carrying the work, then the quickstart on the same Drive; on Kaggle the quickstart.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, SAMPLES, clean_env
from replica import (PROTECTED, RUNTIMES, Runtime, freeze_diff, kernel_spec, localize,
                     localized_notebook, protected_changes, replica_of, serve_checkout,
                     setup_cell)


NOTEBOOKS = ROOT / "notebooks"
STAGES = ("01_prepare", "02_finetune", "03_generate", "04_evaluate")
# The user's own photos: three of one person and one of someone else.
PHOTOS = ("obama.jpg", "obama2.jpg", "obama3.jpg", "biden.jpg")
# What the setup cell prints before it restarts the runtime (headshot_kit/runtime.py).
RESTART_LINE = "Restarting the runtime: pip updated"
RUNTIME_NAMES = sorted(p.parent.name for p in RUNTIMES.glob("*/runtime.json"))


def outputs(nb: dict) -> list[dict]:
    return [o for c in nb["cells"] if c["cell_type"] == "code" for o in c.get("outputs", [])]


def text_of(nb: dict) -> str:
    parts = []
    for o in outputs(nb):
        parts += o.get("text", []) if "text" in o else o.get("data", {}).get("text/plain", [])
        parts += o.get("traceback", [])
    return "".join(parts)


def test_every_runtime_snapshot_names_its_source_and_holds_its_list():
    for name in RUNTIME_NAMES:
        runtime = Runtime.load(RUNTIMES / name)
        for source in runtime.spec["sources"]:
            assert len(source["commit"]) == 40 and (runtime.folder / source["path"]).is_file()
        info = (runtime.folder / "os-info-gpu.txt").read_text()
        assert f"Python {runtime.spec['python_exact']}" in info, name
        # Every protected package a runtime holds has a version the replica can pin.
        held = [k for k in runtime.packages if PROTECTED.match(k)]
        assert {"torch", "numpy", "ipython", "ipykernel", "tornado"} <= set(held), name
    colab = Runtime.load(RUNTIMES / "colab-2026-08-19")
    assert colab.packages["torch"][1] == "2.11.0+cu128" and len(colab.packages) > 690


def test_the_setup_cell_is_served_from_the_checkout(tmp_path):
    """What the replicas run: each notebook's first code cell, and every file of the checkout
    it could fetch, with no GitHub address of the project left."""
    wheel = tmp_path / "headshot_kit-0.1.0-py3-none-any.whl"
    served = serve_checkout(wheel, tmp_path / "served")
    assert (served / "pyproject.toml").is_file() and (served / "requirements.lock").is_file()
    for path in sorted(NOTEBOOKS.glob("[0-9]*.ipynb")):
        source = "".join(setup_cell(json.loads(path.read_text()))["source"])
        assert "headshot-kit/headshot-kit" in source, f"{path.name}: no install in its first cell"
        local = localize(source, wheel, served)
        assert "headshot-kit/headshot-kit" not in local and served.as_uri() in local


# ---------------------------------------------------------------------------------------------
# The replicas (slow: a replica is built once, in minutes, then reused from its cache)


class Session:
    """A replica copied for one test run, its kernel spec, its Drive or work folder."""

    def __init__(self, runtime: str, wheel: Path, root: Path):
        start = time.monotonic()
        cached = replica_of(runtime)
        self.ready_seconds = time.monotonic() - start
        self.replica = cached.copy(root / "venv")
        self.wheel, self.root = wheel, root
        self.served = serve_checkout(wheel, root / "served")
        self.kernel = kernel_spec(self.replica, root / "jupyter")
        self.content = root / "content"
        self.executed = root / "executed"
        for folder in (self.content, self.executed):
            folder.mkdir()
        runtime_env = dict(self.replica.runtime.spec.get("env", {}))
        if self.replica.runtime.name == "colab":
            # Drive stands in as a folder; it also makes the workbench behave as on Colab.
            self.workdir_root = root / "drive" / "MyDrive"
            runtime_env["HEADSHOT_KIT_DRIVE"] = str(self.workdir_root)
            self.parameters = []
        else:
            # The workbench has no stand-in for /kaggle/working: the notebooks are told the
            # folder it would use there (their `workdir` setting).
            self.workdir_root = root / "kaggle" / "working"
            self.parameters = ["-p", "workdir", str(self.workdir_root / "headshot-kit")]
        self.workdir_root.mkdir(parents=True)
        self.env = clean_env(PATH=f"{self.replica.venv / 'bin'}{os.pathsep}{os.environ['PATH']}",
                             HEADSHOT_KIT_CACHE=str(root / "cache"),
                             JUPYTER_DATA_DIR=str(root / "jupyter"),
                             IPYTHONDIR=str(root / "ipython"), **runtime_env)

    def execute(self, nb: dict, name: str, parameters=()) -> tuple[dict, str, float]:
        """Run a notebook with papermill from this venv in the replica's kernel: the executed
        notebook, papermill's stderr, the seconds it took."""
        source, target = self.executed / f"in-{name}", self.executed / name
        source.write_text(json.dumps(nb))
        start = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "papermill", source, target, "--cwd",
                               self.content, "-k", self.kernel, "--no-progress-bar",
                               *parameters],
                              cwd=self.content, env=self.env, capture_output=True, text=True)
        seconds = time.monotonic() - start
        executed = json.loads(target.read_text()) if target.is_file() else {"cells": []}
        return executed, proc.stderr if proc.returncode else "", seconds


@pytest.fixture(scope="module", params=RUNTIME_NAMES)
def installed(request, built_wheel, tmp_path_factory):
    """A copy of the runtime's replica after the quickstart's setup cell: what it changed."""
    session = Session(request.param, built_wheel, tmp_path_factory.mktemp(request.param))
    replica = session.replica
    probe = {"cells": [{"cell_type": "code", "metadata": {}, "outputs": [], "source":
                        "import sys, json; print(json.dumps(sorted(sys.modules)))"}],
             "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
    probed, error, _ = session.execute(probe, "probe.ipynb")
    assert not error, error[-3000:]
    loaded = set(json.loads(text_of(probed)))
    missing = set(replica.runtime.preloaded) - loaded
    assert not missing, f"the replica's kernel did not preload {sorted(missing)}"
    before, conflicts_before = replica.freeze(), replica.conflicts()
    cell = localized_notebook(NOTEBOOKS / "00_quickstart.ipynb", built_wheel, session.served,
                              only_setup=True)
    ran, error, seconds = session.execute(cell, "setup.ipynb")
    said = text_of(ran)
    restarted = "DeadKernelError" in error and RESTART_LINE in said
    if restarted:  # the cell restarted the runtime itself; the user runs the notebook again
        again, error, _ = session.execute(cell, "setup-again.ipynb")
        said += "\n[run again after the restart]\n" + text_of(again)
    after, conflicts_after = replica.freeze(), replica.conflicts()
    session.result = {"runtime": request.param, "diff": freeze_diff(before, after),
                      "new_conflicts": sorted(conflicts_after - conflicts_before),
                      "cell_error": error, "cell_output": said, "restarted": restarted,
                      "install_seconds": round(seconds, 1), "packages_before": len(before),
                      "replica_ready_seconds": round(session.ready_seconds, 1),
                      "replica": replica.info}
    report = tmp_path_factory.getbasetemp() / f"replica-{request.param}.json"
    report.write_text(json.dumps(session.result, indent=1))
    print(f"\n{request.param} replica: {len(before)} packages before the setup cell; it took "
          f"{seconds:.0f} s and changed {len(session.result['diff'])}: "
          + "; ".join(session.result["diff"]))
    return session


@pytest.mark.slow
def test_the_setup_cell_leaves_the_runtime_whole(installed):
    result = installed.result
    diff = "\n".join(result["diff"]) or "(nothing)"
    changed = protected_changes(result["diff"])
    assert not changed, (f"the setup cell changed {len(changed)} protected packages "
                         f"({', '.join(changed)}) on the {result['runtime']} replica; every "
                         f"change:\n{diff}")
    assert not result["new_conflicts"], (
        "pip check found new conflicts after the setup cell:\n"
        + "\n".join(result["new_conflicts"]) + f"\nevery change:\n{diff}")
    assert not result["cell_error"], (f"the setup cell failed:\n{result['cell_output'][-3000:]}"
                                      f"\n{result['cell_error'][-3000:]}")
    if result["restarted"]:  # only for a module the kernel had loaded, and only once
        assert result["cell_output"].count(RESTART_LINE) == 1, result["cell_output"][-3000:]
    assert "headshot-kit" in result["diff"][0] or any(
        line.startswith("headshot-kit ") for line in result["diff"])


@pytest.mark.slow
def test_the_journey_runs_on_the_tiny_preset(installed):
    """Colab: the four stage notebooks, each in a fresh kernel, on one Drive, then the
    quickstart on the same Drive (a user coming back to the whole journey): every step finds its
    work done and says so, and a star set in between survives. Kaggle: the quickstart alone,
    the whole journey in one session, as the README's Kaggle section runs it."""
    session = installed
    colab = session.replica.runtime.name == "colab"
    work = session.workdir_root / "headshot-kit"
    (work / "photos").mkdir(parents=True, exist_ok=True)
    for name in PHOTOS:
        (work / "photos" / name).write_bytes((SAMPLES / name).read_bytes())
    failures, said = [], {}

    def run(name: str) -> None:
        nb = localized_notebook(NOTEBOOKS / f"{name}.ipynb", session.wheel, session.served)
        ran, error, seconds = session.execute(nb, f"{name}.ipynb", session.parameters)
        errors = [o for o in outputs(ran) if o["output_type"] == "error"]
        said[name] = text_of(ran)
        if error or errors or "Traceback" in said[name]:
            failures.append(f"{name} ({seconds:.0f} s):\n"
                            + "\n".join(f"{e['ename']}: {e['evalue']}" for e in errors)
                            + f"\n{error[-2500:]}")

    for name in STAGES if colab else ():
        run(name)
    assert not failures, (f"on the {session.replica.runtime.name} replica:\n"
                          + "\n\n".join(failures))
    weights = work / "lora" / "pytorch_lora_weights.safetensors"
    if colab:
        # Everything went to Drive: nothing on the runtime's own disk, which a disconnect wipes.
        assert not any(session.content.iterdir())
        assert "biden.jpg (different person)" in said["01_prepare"]
        subprocess.run([session.replica.python, "-c",
                        "from headshot_kit.generate import set_starred; "
                        f"set_starred({str(work / 'headshots')!r}, 'images/corporate_seed1.png')"],
                       env=session.env, check=True, capture_output=True)
        before = weights.read_bytes()
    run("00_quickstart")
    assert not failures, (f"on the {session.replica.runtime.name} replica:\n"
                          + "\n\n".join(failures))
    for expected in ("prepared/metadata.jsonl", "lora/pytorch_lora_weights.safetensors",
                     "headshots/manifest.csv", "scores/scores.csv"):
        assert (work / expected).is_file(), expected
    if colab:
        assert weights.read_bytes() == before, "re-running a finished training changed its LoRA"
        assert "already holds all 30 steps: nothing left to train" in said["00_quickstart"]
        assert ("6 unchanged since the last run are kept, with their stars; nothing to render"
                in said["00_quickstart"])
        starred = (work / "headshots" / "manifest.csv").read_text()
        assert "images/corporate_seed1.png" in starred and ",True" in starred
