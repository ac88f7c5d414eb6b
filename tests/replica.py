"""Replicas of the runtimes the notebooks are installed into, built from the package lists in
runtimes/ (see runtimes/README.md for where each list comes from).

A replica is a venv on the runtime's Python that holds every package of the runtime's list at
its published version, in one of two forms:

- real code, for what the install, the kernel and the notebooks import: ROOTS below and all
  they require, which pip resolves with the runtime's versions as constraints (torch probes
  `optree` through its metadata, so it is among them);
- a metadata-only stand-in for every other package: a dist-info with its name, version and,
  for the packages whose requirements reach what the install can change (`requires.jsonl`),
  its Requires-Dist; no code. pip's resolver and `pip check` see the whole runtime.

Where a replica differs from the runtime it copies:

- torch, torchvision and torchaudio are PyPI's builds of the runtime's versions (CUDA 13
  builds, with the NVIDIA libraries PyPI's torch requires, which the runtime's list does not
  name); the runtime's are the +cu128 builds of download.pytorch.org. Both run on the CPU.
- dlib has no wheel at the runtime's version: dlib-bin's code stands in under the runtime's
  dlib metadata (name dlib, its version), so both own the `dlib` folder as on the runtime.
- google-colab is a stand-in: the kernel is the runtime's ipykernel and IPython, not
  google.colab's own kernel (its shell customisations, widget manager and Drive), which this
  project does not build from colabtools' sources. The kernel imports the modules google.colab's
  kernel has loaded at start (runtime.json "preloaded", read from colabtools' imports) before
  the first cell, so a package replaced on disk under them shows as it does on the runtime.
- stand-ins outside requires.jsonl declare no requirements: a conflict only they would show
  is not seen.

A replica is built once and kept under ~/.cache/headshot-kit/replicas (HEADSHOT_KIT_REPLICAS
elsewhere), named by a hash of its inputs, and each test works on a hard-linked copy of it.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNTIMES = ROOT / "runtimes"
CACHE = Path(os.environ.get("HEADSHOT_KIT_REPLICAS",
                            Path.home() / ".cache" / "headshot-kit" / "replicas"))

# What the install must leave alone: a freeze diff may list no change among these names.
PROTECTED = re.compile(r"^(torch.*|numpy|pillow|pandas|ipython|ipykernel|jupyter.*|tornado|"
                       r"pyzmq|traitlets|ipywidgets|requests|setuptools)$")

# Real code: the project's dependency closure as far as the runtime holds it, the kernel's
# stack, torch and its companions. Whatever they require comes along at the runtime's version.
ROOTS = ("torch", "torchvision", "torchaudio", "torchao", "optree", "diffusers", "transformers",
         "peft", "accelerate", "safetensors", "huggingface-hub", "numpy", "scipy",
         "scikit-image", "pandas", "pillow", "pillow-heif", "matplotlib", "tqdm", "pyyaml",
         "packaging", "requests", "setuptools", "ipython", "ipykernel", "ipywidgets",
         "ipython-genutils", "jupyter-client", "jupyter-core", "tornado", "pyzmq", "traitlets",
         "psutil", "bitsandbytes", "brisque", "face-recognition-models", "onnx", "onnxruntime",
         "protobuf", "ml-dtypes", "flatbuffers")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _version_from_url(url: str) -> str:
    """The version in a wheel's or sdist's file name (`name-1.0.0-py3-none-any.whl`)."""
    found = re.search(r"/[A-Za-z0-9_.]+?-(\d[^-/#]*?)(?:-(?:py|cp)\d|\.tar\.gz|\.zip)", url)
    return found.group(1) if found else "0"


def parse_freeze(text: str) -> dict[str, tuple[str, str]]:
    """`pip freeze` lines as {canonical name: (name, version)}; URL installs keep the version
    their file name carries (a git URL has none: 0)."""
    packages = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if " @ " in line:
            name, url = line.split(" @ ", 1)
            version = _version_from_url(url)
        elif "==" in line:
            name, version = line.split("==", 1)
        else:
            continue
        packages[canonical(name)] = (name.strip(), version.strip())
    return packages


@dataclass
class Runtime:
    """One runtime of runtimes/: its package list (with Kaggle's layer applied), the Python it
    runs, the modules its kernel has loaded before the first cell, its environment."""

    folder: Path
    spec: dict
    packages: dict[str, tuple[str, str]]
    requires: dict[str, list[str]] = field(default_factory=dict)

    @classmethod
    def load(cls, folder: Path) -> "Runtime":
        spec = json.loads((folder / "runtime.json").read_text())
        packages = parse_freeze((folder / spec["freeze"]).read_text())
        for name, version in spec.get("layer", {}).items():
            packages[canonical(name)] = (name, version)
        for name in spec.get("layer_removed", ()):
            packages.pop(canonical(name), None)
        requires = {}
        if (folder / "requires.jsonl").is_file():
            for line in (folder / "requires.jsonl").read_text().splitlines():
                if line.strip():
                    name, _version, reqs = json.loads(line)
                    requires[canonical(name)] = reqs
        return cls(folder, spec, packages, requires)

    @property
    def name(self) -> str:
        return self.spec["name"]

    @property
    def python_version(self) -> str:
        return self.spec["python"]

    @property
    def preloaded(self) -> list[str]:
        return self.spec["preloaded"]

    def key(self) -> str:
        """A hash of everything a replica is built from: the runtime's files and the recipe
        (the functions below that build it, and ROOTS)."""
        digest = hashlib.sha256(repr(ROOTS).encode())
        for path in sorted(self.folder.iterdir()):
            if path.is_file():
                digest.update(path.name.encode() + b"\0" + path.read_bytes())
        for recipe in (parse_freeze, _version_from_url, Runtime.load, build, _write_stand_in,
                       _dlib_under_runtime_name):
            digest.update(inspect.getsource(recipe).encode())
        return digest.hexdigest()[:12]


def find_python(version: str) -> Path | None:
    """An interpreter of `version` (pyenv's, or on PATH)."""
    pyenv = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    for candidate in sorted(pyenv.glob(f"{version}.*/bin/python{version}"), reverse=True):
        return candidate
    found = shutil.which(f"python{version}")
    if found and subprocess.run([found, "-c", "pass"], capture_output=True).returncode == 0:
        return Path(found)
    return None


@dataclass
class Replica:
    venv: Path
    runtime: Runtime
    info: dict

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    @property
    def site_packages(self) -> Path:
        return self.venv / "lib" / f"python{self.runtime.python_version}" / "site-packages"

    def pip(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run([str(self.python), "-m", "pip", *args], capture_output=True,
                              text=True, env=pip_env())
        if check and proc.returncode:
            raise RuntimeError(f"pip {' '.join(args[:3])} ... in {self.venv} exited "
                               f"{proc.returncode}:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
        return proc

    def freeze(self) -> dict[str, str]:
        """{canonical name: version} of what pip sees installed."""
        listed = json.loads(self.pip("list", "--format=json").stdout)
        return {canonical(p["name"]): p["version"] for p in listed}

    def conflicts(self) -> set[str]:
        """`pip check`'s complaints, one line each."""
        out = self.pip("check", check=False).stdout
        return {line.strip() for line in out.splitlines()
                if line.strip() and "No broken requirements" not in line}

    def copy(self, target: Path) -> "Replica":
        """A copy to install into: hard links (pip replaces files, never writes into them),
        or a full copy where links cannot be made."""
        if subprocess.run(["cp", "-al", str(self.venv), str(target)]).returncode:
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(self.venv, target, symlinks=True)
        return Replica(target, self.runtime, self.info)


def pip_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME", "PIP_REQUIRE_VIRTUALENV")}
    env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", PYTHONNOUSERSITE="1")
    return env


def _write_stand_in(site: Path, name: str, version: str, requires: list[str]) -> None:
    info = site / f"{re.sub(r'[-.]+', '_', name)}-{version}.dist-info"
    info.mkdir()
    lines = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}",
             "Summary: stand-in of a runtime package (metadata only)"]
    lines += [f"Requires-Dist: {req}" for req in requires]
    (info / "METADATA").write_text("\n".join(lines) + "\n")
    (info / "INSTALLER").write_text("replica\n")
    rel = info.name
    (info / "RECORD").write_text(f"{rel}/METADATA,,\n{rel}/INSTALLER,,\n{rel}/RECORD,,\n")


def _dlib_under_runtime_name(replica: Replica, version: str) -> str:
    """dlib-bin's code under the runtime's dlib metadata; the dlib-bin version used."""
    available = [version, ""]
    for pin in available:
        spec = f"dlib-bin=={pin}" if pin else "dlib-bin"
        if replica.pip("install", "-q", "--no-deps", "--only-binary=:all:", spec,
                       check=False).returncode == 0:
            break
    else:
        raise RuntimeError("no dlib-bin wheel installs on this Python")
    site = replica.site_packages
    (bin_info,) = site.glob("dlib_bin-*.dist-info")
    used = bin_info.name.removesuffix(".dist-info").split("-")[1]
    target = site / f"dlib-{version}.dist-info"
    bin_info.rename(target)
    meta = (target / "METADATA").read_text()
    meta = re.sub(r"(?m)^Name: .*$", "Name: dlib", meta, count=1)
    meta = re.sub(r"(?m)^Version: .*$", f"Version: {version}", meta, count=1)
    (target / "METADATA").write_text(meta)
    record = (target / "RECORD").read_text().replace(bin_info.name + "/", target.name + "/")
    (target / "RECORD").write_text(record)
    return used


def build(runtime: Runtime, venv: Path) -> dict:
    """Build the replica of `runtime` at `venv`; what it holds, for the record."""
    python = find_python(runtime.python_version)
    if python is None:
        raise FileNotFoundError(f"no Python {runtime.python_version} here (pyenv install "
                                f"{runtime.python_version}) for the {runtime.name} replica")
    start = time.monotonic()
    subprocess.run([str(python), "-m", "venv", str(venv)], check=True)
    replica = Replica(venv, runtime, {})
    if "pip" in runtime.packages:  # the runtime's own pip, whose resolver the cell runs
        replica.pip("install", "-q", f"pip=={runtime.packages['pip'][1]}")
    # The runtime's versions as constraints (local labels such as +cu128 dropped: PyPI's builds),
    # except the CUDA libraries, which come at the versions PyPI's torch build names.
    pins = [f"{name}=={version.split('+')[0]}" for key, (name, version)
            in sorted(runtime.packages.items())
            if version != "0" and not re.match(r"(nvidia|cuda)-", key)]
    constraints = venv / "runtime-constraints.txt"
    constraints.write_text("\n".join(pins) + "\n")
    roots = [r for r in ROOTS if canonical(r) in runtime.packages and canonical(r) != "dlib"]
    replica.pip("install", "-q", "--only-binary=:all:", "-c", str(constraints), *roots)
    dlib_bin = None
    if "dlib" in runtime.packages:
        dlib_bin = _dlib_under_runtime_name(replica, runtime.packages["dlib"][1])
    real = replica.freeze()
    stand_ins = []
    for key, (name, version) in sorted(runtime.packages.items()):
        if key not in real:
            _write_stand_in(replica.site_packages, name, version, runtime.requires.get(key, []))
            stand_ins.append(key)
    info = {
        "runtime": runtime.name, "python": subprocess.run(
            [str(replica.python), "-c", "import sys; print(sys.version.split()[0])"],
            capture_output=True, text=True, check=True).stdout.strip(),
        "packages": len(runtime.packages),
        "real": sorted(k for k in real if k in runtime.packages),
        "real_outside_the_list": sorted(k for k in real if k not in runtime.packages),
        "stand_ins": len(stand_ins),
        "versions_differing": {k: [runtime.packages[k][1], v] for k, v in real.items()
                               if k in runtime.packages and runtime.packages[k][1] != v},
        "dlib_bin": dlib_bin,
        "build_seconds": round(time.monotonic() - start, 1),
    }
    (venv / "replica.json").write_text(json.dumps(info, indent=1))
    return info


def replica_of(name: str) -> Replica:
    """The cached replica of runtimes/<name>, built first when its inputs changed."""
    runtime = Runtime.load(RUNTIMES / name)
    venv = CACHE / f"{name}-{runtime.key()}"
    if not (venv / "replica.json").is_file():
        shutil.rmtree(venv, ignore_errors=True)  # a build that stopped half-way
        venv.parent.mkdir(parents=True, exist_ok=True)
        build(runtime, venv)
    return Replica(venv, runtime, json.loads((venv / "replica.json").read_text()))


# ---------------------------------------------------------------------------------------------
# The setup cell, served from this checkout instead of GitHub

GIT_URL = re.compile(r"git\+https://github\.com/headshot-kit/headshot-kit(?:\.git)?"
                     r"(?:@[\w.\-/]+)?")
RAW_URL = re.compile(r"https://raw\.githubusercontent\.com/headshot-kit/headshot-kit/"
                     r"[\w.\-]+")
ANY_URL = re.compile(r"(github\.com|githubusercontent\.com)/headshot-kit")


def localize(text: str, wheel: Path, served: Path, strict: bool = True) -> str:
    """`text` with the project's GitHub addresses replaced by this checkout's: the git URL by
    the built wheel, a raw.githubusercontent.com address by the same path under `served` (see
    serve_checkout). Fails, if `strict`, when an address is left that it cannot serve."""
    text = GIT_URL.sub(wheel.resolve().as_uri(), text)
    text = RAW_URL.sub(served.resolve().as_uri(), text)
    left = ANY_URL.search(text)
    if left and strict:
        raise ValueError(f"the setup code still reaches GitHub ({left.group(0)}...): the "
                         "replica tests serve only git+https://github.com/headshot-kit/"
                         "headshot-kit and raw.githubusercontent.com/headshot-kit/headshot-kit"
                         "/<ref> addresses from the checkout")
    return text


def serve_checkout(wheel: Path, served: Path) -> Path:
    """The checkout's text files (tracked and new, not ignored) copied to `served`, each with
    its GitHub addresses localized: what raw.githubusercontent.com would give the setup code."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard",
                            "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for rel in filter(None, files.decode().split("\0")):
        source = ROOT / rel
        if not source.is_file() or source.stat().st_size > 2_000_000:
            continue
        try:
            text = source.read_text()
        except UnicodeDecodeError:
            continue
        (served / rel).parent.mkdir(parents=True, exist_ok=True)
        # Other addresses (links in the docs, issue trackers) are left as they are.
        (served / rel).write_text(localize(text, wheel, served, strict=False))
    return served


def setup_cell(notebook: dict) -> dict:
    """The notebook's first code cell: the one that installs the workbench."""
    return next(c for c in notebook["cells"] if c["cell_type"] == "code")


def localized_notebook(path: Path, wheel: Path, served: Path, only_setup: bool = False) -> dict:
    nb = json.loads(path.read_text())
    if only_setup:
        nb["cells"] = [setup_cell(nb)]
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            cell["source"] = localize("".join(cell["source"]), wheel, served)
    return nb


def kernel_spec(replica: Replica, folder: Path) -> str:
    """A Jupyter kernel spec under `folder`/kernels running the replica's python, with the
    runtime's preloaded modules imported before the first cell; its name."""
    name = f"replica-{replica.runtime.name}"
    spec = folder / "kernels" / name
    spec.mkdir(parents=True, exist_ok=True)
    preload = ("import importlib; [importlib.import_module(m) for m in "
               f"{tuple(replica.runtime.preloaded)!r}]")
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [str(replica.python), "-m", "ipykernel_launcher", "-f", "{connection_file}",
                 f"--IPKernelApp.exec_lines={preload}"],
        "display_name": f"{replica.runtime.name} replica", "language": "python"}))
    return name


def freeze_diff(before: dict[str, str], after: dict[str, str]) -> list[str]:
    """Every change between two freezes, one line each: 'name old -> new'."""
    lines = []
    for key in sorted(set(before) | set(after)):
        old, new = before.get(key), after.get(key)
        if old != new:
            lines.append(f"{key} {old or '(absent)'} -> {new or '(removed)'}")
    return lines


def protected_changes(diff: list[str]) -> list[str]:
    return [line for line in diff if PROTECTED.match(line.split()[0])]


if __name__ == "__main__":  # python tests/replica.py colab-2026-08-19: build and describe it
    for arg in sys.argv[1:]:
        print(json.dumps(replica_of(arg).info, indent=1))
