# The README's two commands: `make demo` and `make test`. Both build .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch is pinned to the CPU build that CI has on disk; a GPU user installs a CUDA build
# into the venv first (see README), and this pin is then already satisfied or skipped.
TORCH ?= torch==2.13.0

.PHONY: venv demo test test-all bench clean

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(VENV)/bin/gisaxs-bluesky demo --workdir demo_output

test: venv
	$(PY) -m pytest -q -m "not slow" tests

test-all: venv
	$(PY) -m pytest -q tests

bench: venv
	$(PY) benchmarks/bench_sim.py
	$(PY) benchmarks/bench_encode.py
	$(PY) benchmarks/bench_callback.py
	$(PY) benchmarks/bench_replay.py
	$(PY) benchmarks/bench_adaptive.py --seeds 5

clean:
	rm -rf $(VENV) demo_output .pytest_cache
