# Two commands a new user needs: `make demo` and `make test`. Each creates .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_OUT ?= demo_out
PYTEST_ARGS ?=
# what .venv takes once installed (7.9 GB measured), with room for pip's unpacking
VENV_GB ?= 9

.PHONY: demo demo-image test bench venv clean

venv: $(STAMP)

# Reinstalls only when requirements.txt changes.
$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@free_gb=$$(df -Pk $(VENV) | awk 'NR==2 {print int($$4 / 1048576)}'); \
	if [ "$$free_gb" -lt $(VENV_GB) ]; then \
	  echo "warning: the packages take about $(VENV_GB) GB (torch with its CUDA libraries, TensorFlow for the codec tests); $$free_gb GB free here" >&2; \
	fi
	$(PY) -m pip install --disable-pip-version-check --no-cache-dir -q -r requirements.txt
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
