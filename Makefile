# peftkern: `make install` then `make test` (README). PYTHON may name another interpreter (a venv).
PYTHON ?= python3
PIP := $(PYTHON) -m pip
# Triton runs on CPU only through its interpreter, which must be switched on before triton is imported.
HAS_GPU := $(shell $(PYTHON) -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
ifeq ($(HAS_GPU),1)
TEST_ENV :=
else
TEST_ENV := TRITON_INTERPRET=1
endif

.PHONY: install test gpu-test demo bench lint

install:
	@# Never let a dependency pull a multi-GB CUDA torch: install the CPU build first where none exists.
	$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install "torch==2.13.0"
	$(PIP) install -e ".[test]"

test:
	$(TEST_ENV) $(PYTHON) -m pytest -q tests

gpu-test:
	$(PYTHON) -m pytest -q -m gpu tests

demo:
	$(PYTHON) -m peftkern.demo

bench:
	$(PYTHON) benchmarks/bench_lora.py

lint:
	$(PYTHON) -m ruff check .
