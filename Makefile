# `make demo` and `make test` each set up .venv on first use, then run.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
DEMO_DIR ?= runs/demo

.PHONY: setup demo test test-slow clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet -e ".[test,serve,onnx,slurm,tune]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/hclafter demo --out $(DEMO_DIR)

test: $(STAMP)
	$(PY) -m pytest -n auto --dist loadfile

test-slow: $(STAMP)
	$(PY) -m pytest -m slow

clean:
	rm -rf $(VENV) runs .pytest_cache
