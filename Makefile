# `make demo` and `make test` each set up .venv on first use, then run.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
DEMO_DIR ?= runs/demo

.PHONY: setup demo test test-slow clean

INSTALL := -e ".[test,serve,onnx,slurm,tune]"
# uv reads no pip configuration, so pip's constraints (config files or PIP_CONSTRAINT; e.g. a cap on torch) are passed on
CONSTRAINTS ?= $(shell python3 -m pip config list 2>/dev/null | sed -n "s/^[^.]*\.constraint='\(.*\)'$$/\1/p")

# uv installs in parallel (about 50 s here from a cold cache, pip 2 min 10 s; BENCHMARKS.md, issue 23); pip if uv cannot be had
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	($(PY) -m pip install --quiet uv && $(VENV)/bin/uv pip install --python $(PY) --quiet --compile-bytecode \
	  $(foreach file,$(CONSTRAINTS),--constraint $(file)) $(INSTALL)) || $(PY) -m pip install --quiet $(INSTALL)
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
