# Two entry points (see README): `make demo` and `make test`. Both set up .venv on a fresh machine.
# torch is installed first and pinned: an unpinned torch pulls a multi-GB CUDA build here.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0

export HF_HUB_OFFLINE := 1
export HF_EVALUATE_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1
export HF_UPDATE_DOWNLOAD_COUNTS := 0
export PYTHONUNBUFFERED := 1

.PHONY: install test test-fast demo bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python setup.cfg pyproject.toml
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

test: install
	$(BIN)/python -m pytest -q tests

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow" tests

demo: install
	$(BIN)/python scripts/demo.py --output_dir outputs/demo

bench: install
	$(BIN)/python benchmarks/fotf_overhead.py
	$(BIN)/python benchmarks/metrics_speed.py
	$(BIN)/python benchmarks/data_throughput.py
	$(BIN)/python benchmarks/step_overhead.py
	$(BIN)/python benchmarks/latency.py

clean:
	rm -rf $(VENV) outputs .pytest_cache
