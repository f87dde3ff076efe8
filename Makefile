# Two commands a new user needs: `make demo` and `make test`. Each creates .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_OUT ?= demo_out
PYTEST_ARGS ?=

.PHONY: demo demo-image test bench venv clean

venv: $(STAMP)

# Reinstalls only when requirements.txt changes.
$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -r requirements.txt
	touch $(STAMP)

demo: $(STAMP)
	OUT=$(DEMO_OUT) PY=$(PY) bash scripts/demo.sh

demo-image: $(STAMP)
	OUT=$(DEMO_OUT) PY=$(PY) bash scripts/demo_image.sh

test: $(STAMP)
	$(PY) -m pytest -q tests $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) bench/preprocess.py
	$(PY) bench/parquet_layout.py
	$(PY) bench/data_loader.py

clean:
	rm -rf $(DEMO_OUT) .pytest_cache
