# `make demo` sets up .venv with the package on first use, `make test` with the extras the tests use too; then they run.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
TEST_STAMP := $(VENV)/.installed-test-stamp
DEMO_DIR ?= runs/demo

.PHONY: setup demo test test-slow clean

WITH_EXTRAS := -e ".[test,serve,onnx,slurm,tune]"

# uv reads no pip configuration, so pip's constraints (config files or PIP_CONSTRAINT; e.g. a cap on torch) are passed on
CONSTRAINTS ?= $(shell python3 -m pip config list 2>/dev/null | sed -n "s/^[^.]*\.constraint='\(.*\)'$$/\1/p")

# $(call install,REQUIREMENT): uv installs in parallel (with every extra 52 s from a cold cache, pip 2 min 18 s;
# BENCHMARKS.md, issue 23); pip where uv cannot be had
define install
	test -x $(PY) || python3 -m venv $(VENV)
	($(PY) -m pip install --quiet uv && $(VENV)/bin/uv pip install --python $(PY) --quiet --compile-bytecode \
	  $(foreach file,$(CONSTRAINTS),--constraint $(file)) $(1)) || $(PY) -m pip install --quiet $(1)
endef

$(STAMP): pyproject.toml
	$(call install,-e .)
	touch $@

$(TEST_STAMP): $(STAMP)
	$(call install,$(WITH_EXTRAS))
	touch $@

setup: $(TEST_STAMP)

demo: $(STAMP)
	$(VENV)/bin/hclafter demo --out $(DEMO_DIR)

test: $(TEST_STAMP)
	$(PY) -m pytest -n auto --dist loadfile

test-slow: $(TEST_STAMP)
	$(PY) -m pytest -m slow

clean:
	rm -rf $(VENV) runs .pytest_cache
