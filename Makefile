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

.PHONY: install test gpu-test demo bench lint fuzz triton-compile-check perf-report perf-report-check

# The triton that torch 2.11 pins (what the project's GPU machines run), beside the installed one, for the
# compile-only test: tests/test_triton_compile.py compiles every kernel with both.
TRITON_COMPAT ?= 3.6.0
TRITON_COMPAT_DIR := .triton-compat/$(TRITON_COMPAT)

install:
	@# Never let a dependency pull a multi-GB CUDA torch: install the CPU build first where none exists.
	$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install "torch==2.13.0"
	$(PIP) install -e ".[test]"
	test -d $(TRITON_COMPAT_DIR)/triton || \
		$(PIP) install --no-deps --target $(TRITON_COMPAT_DIR) "triton==$(TRITON_COMPAT)"

test:
	$(TEST_ENV) $(PYTHON) -m pytest -q tests

gpu-test:
	$(PYTHON) -m pytest -q -m gpu tests

demo:
	$(PYTHON) -m peftkern.demo

# Every benchmark, on a GPU: JSON rows, summary.json, summary.md and plots/ in benchmarks/results/<device>/.
bench:
	$(PYTHON) benchmarks/run_all.py --out benchmarks/results --plot

# The same plumbing on tiny shapes (CPU: Triton's interpreter); results go to a scratch directory.
.PHONY: bench-smoke
bench-smoke:
	$(TEST_ENV) $(PYTHON) benchmarks/run_all.py --smoke --out $${TMPDIR:-/tmp}/peftkern-bench-smoke

lint:
	$(PYTHON) -m ruff check .

fuzz:
	HYPOTHESIS_PROFILE=long $(TEST_ENV) $(PYTHON) -m pytest -q tests/test_fuzz.py

# Every Triton kernel and every autotune config compiled for sm_90 and sm_80 by the real compiler and
# ptxas, without a GPU (nothing runs), with registers and spills per kernel (CI compiles first configs only).
triton-compile-check:
	env -u TRITON_INTERPRET $(PYTHON) tests/_triton_compile.py --arch 90 80 \
		--report $${TMPDIR:-/tmp}/peftkern-triton-compile.md
	env -u TRITON_INTERPRET PYTHONPATH=$(TRITON_COMPAT_DIR) $(PYTHON) tests/_triton_compile.py --arch 90 \
		--report $${TMPDIR:-/tmp}/peftkern-triton-compile-$(TRITON_COMPAT).md

# CUDA C++: the vendoring example (header only, no Python) and the GPU tests under compute-sanitizer.
NVCC ?= nvcc
CUDA_EXAMPLE_ARCH ?= 80
.PHONY: cuda-example gpu-test-memcheck
cuda-example:
	mkdir -p build/vendor/peftkern_b
	# A second vendored copy of the headers in a folder of its own (vendored_twice_example includes both).
	for header in csrc/include/peftkern/*; do \
		{ echo "// vendored copy B of peftkern"; cat $$header; } > build/vendor/peftkern_b/$$(basename $$header); \
	done
	for example in lora_forward_example multi_lora_forward_example lora_serving_example vendored_twice_example; do \
		$(NVCC) -std=c++17 -O2 -Icsrc/include -Ibuild/vendor \
			-gencode=arch=compute_$(CUDA_EXAMPLE_ARCH),code=sm_$(CUDA_EXAMPLE_ARCH) \
			csrc/examples/$$example.cu -o build/$$example || exit 1; \
	done

# No caching allocator, so that every tensor is its own allocation and an out-of-bounds access is caught.
# memcheck over every CUDA-backend GPU test; then racecheck (shared-memory hazards), synccheck (barriers) and
# initcheck (reads of uninitialised device memory) over a small subset, each tool far slower than memcheck
# (the default path, the fused opt-in and the dropout mask at one odd shape each).
GPU_SANITIZER_SUBSET ?= tests/test_cuda_backend.py -k "17x33x17x8 or decode_and_tiled or dropout_mask_is"
gpu-test-memcheck:
	PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 1 \
		$(PYTHON) -m pytest -q -m "gpu and not slow" tests/test_cuda_*.py
	for tool in racecheck synccheck initcheck; do \
		PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool $$tool --error-exitcode 1 \
			$(PYTHON) -m pytest -q -x -m "gpu and not slow" $(GPU_SANITIZER_SUBSET) || exit 1; \
	done

# The static performance report (no GPU): every Triton kernel compiled for sm_90a with triton 3.6 (the GPU
# machines'), every op call's launches, host syncs and bytes, the bytes autograd saves; into
# benchmarks/results/static/ and the tables of benchmarks/RESULTS.md. At most 25 minutes on 2 cores.
perf-report:
	env -u TRITON_INTERPRET PYTHONPATH=$(TRITON_COMPAT_DIR)$${PYTHONPATH:+:$$PYTHONPATH} $(PYTHON) \
		benchmarks/perf_report.py $(PERF_REPORT_ARGS)

# Seconds: whether the committed report was made from the current kernel and op sources (exit 1 if not).
perf-report-check:
	$(PYTHON) benchmarks/perf_report.py --check
