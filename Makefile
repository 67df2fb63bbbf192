# Fresh machine: `make demo` runs the pipeline on the bundled sample; `make test` runs the test suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
WORKSPACE ?= demo/curated

.PHONY: demo test clean-demo

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/classify models --load
	$(VENV)/bin/curator clean data/sample --out $(WORKSPACE) --group-pattern '^([^_]+)_' --export demo/clean-set
	$(VENV)/bin/curator split --workspace $(WORKSPACE)
	@echo
	@echo "Reports:"
	@echo "  report:    $(WORKSPACE)/report.html"
	@echo "  manifest:  $(WORKSPACE)/manifest.parquet"
	@echo "  settings:  $(WORKSPACE)/settings.json"
	@echo "  splits:    $(WORKSPACE)/splits.parquet, $(WORKSPACE)/split_report.json"
	@echo "  clean set: demo/clean-set/"

test: $(VENV)/.installed
	$(PY) -m pytest -q

clean-demo:
	rm -rf demo
