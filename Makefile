# The two commands a new user needs: `make demo` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
# The CPU build of torch is installed first, so no other package pulls a multi-GB CUDA build.
# On a machine with a GPU: make TORCH=torch
TORCH ?= torch==2.13.0

.PHONY: demo test lab bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

demo: $(VENV)/.installed
	$(PY) -m headshot_kit demo --out results/demo --notebooks

test: $(VENV)/.installed
	$(PY) -m pytest

lab: $(VENV)/.installed
	$(VENV)/bin/jupyter lab notebooks/

bench: $(VENV)/.installed
	@for b in bench/[a-z]*.py; do case $$b in bench/common.py) continue;; esac; \
		echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) results/demo results/bench models/tiny-*
