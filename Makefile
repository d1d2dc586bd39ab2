# Two commands a newcomer needs: `make train` and `make test`.
# Each creates .venv when missing, installs torch first when absent (the CPU wheel this
# project pins, override with TORCH_SPEC=...), then the package with its test extras.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
ARGS ?=

.PHONY: install train test test-gpu clean

$(VENV)/.installed: pyproject.toml setup.py $(wildcard csrc/*)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "$(TORCH_SPEC)"
	$(PY) -m pip install -e ".[test]"
	@touch $@

install: $(VENV)/.installed

train: install
	$(PY) -m engine.train $(ARGS)

test: install
	$(PY) -m pytest -q $(ARGS)

test-gpu: install
	$(PY) -m pytest -q -m gpu $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info engine/_C*.so
