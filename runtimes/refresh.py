"""Refresh the runtime snapshots of this folder from their public sources (`make runtimes`).

For each runtimes/<runtime>/runtime.json: every file of "sources" is downloaded from
raw.githubusercontent.com at the named commit (edit the commit there to move a snapshot on),
then requires.jsonl is rewritten: the Requires-Dist of the runtime's packages named in
REQUIRES_OF, at the runtime's versions, as PyPI publishes them (`pip install --dry-run
--report`, metadata only), and google-colab's from colabtools' setup.py at the named commit.
Needs the network; the tests only read what this leaves in the folder.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
from replica import Runtime, canonical  # noqa: E402

RAW = "https://raw.githubusercontent.com/{repo}/{commit}/{path}"

# The runtime packages whose requirements reach what the install can change (numpy, pandas,
# pillow, the kernel's stack, torch, the Hugging Face libraries, protobuf and ml-dtypes, which
# onnx requires): their stand-ins carry their Requires-Dist, so that `pip check` sees a change
# that breaks them. The other stand-ins carry none: nothing the install touches is theirs.
REQUIRES_OF = """
albucore albumentations altair anywidget arviz bigframes bokeh bottleneck bqplot cmdstanpy
cudf-cu12 cuml-cu12 cupy-cuda12x dask datasets db-dtypes easydict fastai geopandas gradio h5py
holoviews hyperopt imageio ipyfilechooser ipyleaflet ipyparallel ipytree jax jaxlib
grpcio-status google-ai-generativelanguage googleapis-common-protos proto-plus google-api-core
tensorflow-metadata onnx
jupyter-console jupyter-kernel-gateway jupyter-server jupyterlab jupyterlab-widgets jupytext
keras kagglehub librosa lightgbm mizani mlxtend moviepy nbclient nbconvert nbformat notebook
numba numexpr opencv-contrib-python opencv-python opencv-python-headless pandas-datareader
pandas-gbq pandas-stubs panel plotly plotnine prophet pymc pytensor qtconsole scikit-image
scikit-learn seaborn sentence-transformers shap sklearn-pandas spacy statsmodels tables
tensorboard tensorflow tensorflow-probability tf-keras thinc timm torchdata torchsummary
torchtune tsfresh umap-learn widgetsnbextension xarray xgboost yfinance
""".split()


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=60) as response:
        return response.read()


def colab_requires(commit: str) -> list[str]:
    """google-colab's install_requires, read from colabtools' setup.py."""
    setup = fetch(RAW.format(repo="googlecolab/colabtools", commit=commit,
                             path="setup.py")).decode()
    block = re.search(r"DEPENDENCIES = \((.*?)\)", setup, re.S).group(1)
    return re.findall(r"'([^']+)'", block)


def published_requires(name: str, version: str, python: str) -> list[str] | None:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--dry-run", "--no-deps",
             "--ignore-installed", "--only-binary=:all:", "--python-version", python,
             "--target", str(Path(tmp) / "t"), "--report", str(report),
             f"{name}=={version.split('+')[0]}"], capture_output=True, text=True)
        if proc.returncode:
            return None
        (item,) = json.loads(report.read_text())["install"]
        return item["metadata"].get("requires_dist") or []


def refresh(folder: Path) -> None:
    spec = json.loads((folder / "runtime.json").read_text())
    for source in spec["sources"]:
        (folder / source["path"]).write_bytes(fetch(RAW.format(**source)))
        print(f"{folder.name}/{source['path']} <- {source['repo']}@{source['commit'][:7]}")
    runtime = Runtime.load(folder)
    lines = []
    for key, (name, version) in sorted(runtime.packages.items()):
        if key == "google-colab":
            requires = colab_requires(spec["colabtools"]["commit"])
        elif key in {canonical(n) for n in REQUIRES_OF}:
            requires = published_requires(name, version, spec["python"])
            if requires is None:
                print(f"  {name}=={version}: no published metadata for Python "
                      f"{spec['python']}; its stand-in declares no requirements")
                continue
        else:
            continue
        lines.append(json.dumps([name, version, requires]))
    (folder / "requires.jsonl").write_text("\n".join(lines) + "\n")
    print(f"{folder.name}/requires.jsonl: {len(lines)} packages")


if __name__ == "__main__":
    for runtime_json in sorted(HERE.glob("*/runtime.json")):
        refresh(runtime_json.parent)
