# The two commands a new user needs: `make demo` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
# The CPU build of torch is installed first, so no other package pulls a multi-GB CUDA build.
# On a machine with a GPU: make TORCH=torch
TORCH ?= torch==2.13.0
# Every other package at the exact version the tests ran with (`make lock` re-resolves it).
LOCK := requirements.lock
# notebooks: a kernel, JupyterLab and papermill; dlib: dlib's prebuilt wheel (dlib-bin).
EXTRAS := dev,cluster,notebooks,dlib
# The lock less what Colab and Kaggle keep as they have it (torch, numpy, the kernel...): what
# the notebooks' setup cell installs under there (`make runtime-constraints` derives it).
RUNTIME_CONSTRAINTS := runtime-constraints.txt
# `make test` leaves out the tests marked slow (minutes each: the wheel installed in a fresh
# venv, the browser, the Colab and Kaggle replicas, the Ray cluster); CI=true (as .ci/run
# sets) runs all.
PYTEST_ARGS ?= $(if $(filter true,$(CI)),,-m "not slow")

.PHONY: demo test test-all lab bench lock runtime-constraints clean

$(VENV)/.installed: pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "pip==26.3"
	$(PY) -m pip install -q -c $(LOCK) "$(TORCH)"
	$(PY) -m pip install -q -c $(LOCK) -e ".[$(EXTRAS)]"
	$(PY) -m pip check
	touch $@

demo: $(VENV)/.installed
	$(PY) -m headshot_kit demo --out results/demo --notebooks

test: $(VENV)/.installed
	$(PY) -m pytest $(PYTEST_ARGS)

test-all: $(VENV)/.installed
	$(PY) -m pytest

# Working copies in results/notebooks/ (git-ignored): JupyterLab saves outputs into what it runs.
lab: $(VENV)/.installed
	$(PY) -m headshot_kit lab

bench: $(VENV)/.installed
	@for b in bench/[a-z]*.py; do case $$b in bench/common.py) continue;; esac; \
		echo "== $$b"; $(PY) $$b || exit 1; done

# Re-resolve the lock on purpose: the newest releases that pyproject.toml's ranges allow, for
# Linux x86-64 and this Python, resolved beside torch's CPU build (pip must find it, e.g.
# PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu) and left out of the lock, so
# Colab keeps its own CUDA build. Then run `make test CI=true` before committing the lock.
lock: $(VENV)/.installed
	$(PY) -m pip install -q "pip-tools==7.6.2"
	echo "$(TORCH)" > $(VENV)/torch-constraint.txt
	CUSTOM_COMPILE_COMMAND="make lock" $(VENV)/bin/pip-compile --quiet --upgrade --extra dev --extra cluster --extra notebooks --extra dlib \
		--strip-extras --unsafe-package torch --unsafe-package pip --unsafe-package setuptools --no-emit-index-url \
		--no-emit-find-links \
		-c $(VENV)/torch-constraint.txt -o $(LOCK) pyproject.toml
	rm -f $(VENV)/.installed
	$(MAKE) runtime-constraints

# setuptools is left out of the lock (--unsafe-package): torch declares a setuptools ceiling on
# Python 3.12+, and a pin above it would make pip replace a runtime's torch to honour the lock.
runtime-constraints:
	$(PYTHON) headshot_kit/runtime.py --derive $(LOCK) > $(RUNTIME_CONSTRAINTS).tmp
	mv $(RUNTIME_CONSTRAINTS).tmp $(RUNTIME_CONSTRAINTS)

clean:
	rm -rf $(VENV) results/demo results/bench models/tiny-*

# Refresh the runtime snapshots in runtimes/ (Colab's package lists from googlecolab/backend-info,
# Kaggle's layer from Kaggle/docker-python) at the commits each runtime.json names, and the
# requirements of their stand-ins; needs the network. The replica tests only read them.
.PHONY: runtimes
runtimes: $(VENV)/.installed
	$(PY) runtimes/refresh.py
