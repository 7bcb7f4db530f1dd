# Quickstart: `make demo` (train + evaluate on the embedded synthetic data) and `make test`.
# The first Python >= 3.12 that runs: python3, python3.13, python3.12 (a pyenv shim of an unselected version
# does not run, so those are tried too), then pyenv's own installs. `make test PYTHON=/path/to/python` overrides.
FIND_PYTHON := for p in python3 python3.12 python3.13 $$(ls -d "$$(pyenv root 2>/dev/null)"/versions/3.* 2>/dev/null \
  | sort -V | sed 's|$$|/bin/python|'); do "$$p" -c 'import sys; sys.exit(sys.version_info < (3, 12))' \
  >/dev/null 2>&1 && { command -v "$$p" || echo "$$p"; } && break; done
PYTHON ?= $(shell $(FIND_PYTHON))
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.requirements-installed

DEMO_WORKDIR ?= runs/demo

.PHONY: install test demo ensemble-demo bench clean

$(STAMP): requirements.txt
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null || { echo "error: no Python >= 3.12 found (PYTHON='$(PYTHON)'); install Python 3.12 or newer, or run make PYTHON=/path/to/python3.12" >&2; exit 1; }
	@$(PY) -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null || { rm -rf $(VENV); $(PYTHON) -m venv $(VENV); }
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $(STAMP)

install: $(STAMP)

# The whole suite on 8 CPU-emulated devices (tests/conftest.py sets the XLA flag before JAX loads).
test: $(STAMP)
	$(PY) -m pytest tests -q --durations=15

# Train and evaluate on synthetic lesions drawn on the real ISIC 2020 metadata (CPU, a few minutes).
demo: $(STAMP)
	$(PY) main.py --config=configs/demo.py --workdir=$(DEMO_WORKDIR)
	@echo "demo outputs: $(DEMO_WORKDIR)/results.json submission.csv oof.csv roc.png data/contact_sheet.png tensorboard/"

# The patient-level ensemble on an ugly-duckling synthetic set: every fold's image model, image context,
# fusion with the metadata, calibration (CPU).
ENSEMBLE_DEMO_WORKDIR ?= runs/ensemble_demo
ensemble-demo: $(STAMP)
	$(PY) main.py --config=configs/ensemble_demo.py --workdir=$(ENSEMBLE_DEMO_WORKDIR)
	@echo "ensemble demo outputs: $(ENSEMBLE_DEMO_WORKDIR)/results.json oof.csv submission.csv report.html fold_*/"

# Speed, not correctness (not part of `make test`): each script prints one JSON line, also kept in $(BENCH_DIR).
BENCH_DIR ?= runs/bench
bench: $(STAMP)
	mkdir -p $(BENCH_DIR)
	$(PY) benchmarks/train_step.py --out $(BENCH_DIR)/train_step.json
	$(PY) benchmarks/input_pipeline.py --out $(BENCH_DIR)/input_pipeline.json
	$(PY) benchmarks/eval_step.py --out $(BENCH_DIR)/eval_step.json
	$(PY) benchmarks/conv_layers.py --out $(BENCH_DIR)/conv_layers.json
	$(PY) benchmarks/synthetic_throughput.py > $(BENCH_DIR)/synthetic_throughput.json
	$(PY) benchmarks/tabular_cv.py --workdir=$(BENCH_DIR)/tabular --baselines

clean:
	rm -rf $(VENV) .pytest_cache
