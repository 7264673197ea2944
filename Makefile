# `make demo` and `make test` each set up .venv on first use, then run.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
DEMO_DIR ?= runs/demo

.PHONY: setup demo test test-slow clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/hclafter train -c configs/tiny.yaml --out $(DEMO_DIR)
	$(VENV)/bin/hclafter eval $(DEMO_DIR)
	$(VENV)/bin/hclafter predict $(DEMO_DIR) "$$(sed -n 2p $(DEMO_DIR)/splits/test.csv | cut -d, -f1)"

test: $(STAMP)
	$(PY) -m pytest

test-slow: $(STAMP)
	$(PY) -m pytest -m slow

clean:
	rm -rf $(VENV) runs .pytest_cache
