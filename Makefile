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

# ---- the GPU check that fits one short window (benchmarks/gpu_check.py, benchmarks/gpu_bundle.py) ----------
# `make gpu-bundle` (CPU, at most 30 minutes on 2 cores) writes .gpu-bundle/ (git-ignored, carried to the GPU
# machine): peftkern._C and _cpu for the GPU machines' Python (3.12) built with this machine's nvcc, every Triton
# kernel the check launches compiled for sm_90 by triton 3.6.0 (their cache, packed), manifest.json.
# `make gpu-check` (GPU machine) installs from it without building and runs every stage within GPU_CHECK_BUDGET
# seconds into $(GPU_CHECK_OUT)/<device>/. `make gpu-check-dry` (CPU, at most 10 minutes): the same plan on tiny
# shapes through the interpreter, then every launch of the real run looked up in the bundle.
.PHONY: gpu-bundle gpu-check gpu-check-dry
# The GPU machines' Python (3.12): the first candidate that runs (a pyenv shim may exist and not run).
PY312 ?= $(shell for p in python3.12 $(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python3.12); do \
	$$p -c "import sys; assert sys.version_info[:2] == (3, 12)" 2>/dev/null && { command -v $$p; break; }; done)
GPU_BUNDLE ?= .gpu-bundle
GPU_BUNDLE_BUILD := .gpu-bundle-build
GPU_BUNDLE_ARCHS ?= 90a;80
GPU_CHECK_OUT ?= benchmarks/results
GPU_CHECK_BUDGET ?= 400
TRITON_COMPAT_WHEELS := .triton-compat/wheels
COMPAT_ENV := env -u TRITON_INTERPRET PYTHONPATH=$(TRITON_COMPAT_DIR):.$${PYTHONPATH:+:$$PYTHONPATH}

gpu-bundle:
	@test -n "$(PY312)" || { echo "gpu-bundle: no python3.12 found (set PY312=/path/to/python3.12)"; exit 1; }
	@start=$$(date +%s); \
	test -d $(TRITON_COMPAT_DIR)/triton || \
		$(PIP) install --no-deps --target $(TRITON_COMPAT_DIR) "triton==$(TRITON_COMPAT)" || exit 1; \
	ls $(TRITON_COMPAT_WHEELS)/triton-$(TRITON_COMPAT)-cp312-*.whl >/dev/null 2>&1 || \
		$(PIP) download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
			--platform manylinux_2_27_x86_64 --platform manylinux_2_28_x86_64 -d $(TRITON_COMPAT_WHEELS) \
			"triton==$(TRITON_COMPAT)" || exit 1; \
	test -x $(GPU_BUNDLE_BUILD)/venv312/bin/python || { $(PY312) -m venv $(GPU_BUNDLE_BUILD)/venv312 && \
		$(GPU_BUNDLE_BUILD)/venv312/bin/python -m pip install -q pybind11 setuptools wheel ninja; } || exit 1; \
	echo "gpu-bundle: building peftkern._C for Python 3.12, sm $(GPU_BUNDLE_ARCHS)"; \
	PEFTKERN_CUDA_ARCHS="$(GPU_BUNDLE_ARCHS)" MAX_JOBS=2 $(GPU_BUNDLE_BUILD)/venv312/bin/python setup.py -q \
		build_ext --build-lib $(GPU_BUNDLE_BUILD)/lib --build-temp $(GPU_BUNDLE_BUILD)/temp || exit 1; \
	built=$$(date +%s); \
	rm -rf $(GPU_BUNDLE) && mkdir -p $(GPU_BUNDLE)/peftkern && \
	cp $(GPU_BUNDLE_BUILD)/lib/peftkern/*.so $(GPU_BUNDLE)/peftkern/ && \
	strip --strip-debug $(GPU_BUNDLE)/peftkern/*.so || exit 1; \
	echo "gpu-bundle: compiling the check's Triton kernels for sm_90 with triton $(TRITON_COMPAT)"; \
	$(COMPAT_ENV) $(PYTHON) benchmarks/gpu_bundle.py --compile --jobs 2 --cache $(GPU_BUNDLE_BUILD)/triton-cache \
		|| exit 1; \
	compiled=$$(date +%s); \
	$(COMPAT_ENV) $(PYTHON) benchmarks/gpu_bundle.py --pack --cache $(GPU_BUNDLE_BUILD)/triton-cache \
		--bundle $(GPU_BUNDLE) --py-include "$$($(PY312) -c 'import sysconfig; print(sysconfig.get_paths()["include"])')" \
		--ext-suffix "$$($(PY312) -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')" || exit 1; \
	end=$$(date +%s); \
	PEFTKERN_CUDA_ARCHS="$(GPU_BUNDLE_ARCHS)" $(COMPAT_ENV) $(PYTHON) benchmarks/gpu_bundle.py --manifest \
		--bundle $(GPU_BUNDLE) --extra "{\"seconds\": {\"extensions\": $$((built - start)), \
		\"triton\": $$((compiled - built)), \"pack\": $$((end - compiled)), \"total\": $$((end - start))}}" || exit 1; \
	du -sh $(GPU_BUNDLE); echo "gpu-bundle: $$((end - start)) s"

# On the GPU machine, from a copy of the checkout with .gpu-bundle/ beside it (RESULTS.md: one device call).
gpu-check:
	PYTHONUNBUFFERED=1 $(PYTHON) benchmarks/gpu_check.py --install --bundle $(GPU_BUNDLE) \
		--out $(GPU_CHECK_OUT) --budget $(GPU_CHECK_BUDGET)

gpu-check-dry:
	PYTHONUNBUFFERED=1 $(PYTHON) benchmarks/gpu_check.py --dry --bundle $(GPU_BUNDLE) \
		--out $${TMPDIR:-/tmp}/peftkern-gpu-check-dry
