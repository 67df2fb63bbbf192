# Fresh machine: `make demo` runs the pipeline on the bundled sample; `make test` runs the whole test suite (what CI
# runs); `make test-fast` leaves out the tests marked slow (pytest -m "not slow"), for the inner loop.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
WORKSPACE ?= demo/curated

.PHONY: demo test test-fast clean-demo

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,serve,ray]'
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/classify models --load
	$(VENV)/bin/curator ingest folder data/sample --out demo/raw --group-pattern '^([^_]+)_'
	$(VENV)/bin/curator clean demo/raw --out $(WORKSPACE) --export demo/clean-set
	$(VENV)/bin/curator split --workspace $(WORKSPACE)
	$(VENV)/bin/classify train --splits $(WORKSPACE)/splits.parquet --out demo/runs/styles
	$(VENV)/bin/classify eval --run demo/runs/styles
	rm -rf demo/predictions.parquet demo/predictions.parquet.parts
	$(VENV)/bin/classify dir data/sample --out demo/predictions.parquet --run demo/runs/styles
	@echo
	@echo "Reports:"
	@echo "  ingest:    demo/raw/catalog.parquet"
	@echo "  report:    $(WORKSPACE)/report.html"
	@echo "  manifest:  $(WORKSPACE)/manifest.parquet"
	@echo "  settings:  $(WORKSPACE)/settings.json"
	@echo "  splits:    $(WORKSPACE)/splits.parquet, $(WORKSPACE)/split_report.json"
	@echo "  clean set: demo/clean-set/"
	@echo "  model:     demo/runs/styles/model.safetensors, model.json, history.csv"
	@echo "  eval:      demo/runs/styles/eval-test/metrics.json, confusion_matrix.png, curves.png, errors.html"
	@echo "  dir:       demo/predictions.parquet"

test: $(VENV)/.installed
	$(PY) -m pytest -q

test-fast: $(VENV)/.installed
	$(PY) -m pytest -q -m "not slow"

clean-demo:
	rm -rf demo
