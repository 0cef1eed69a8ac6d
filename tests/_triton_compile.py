"""Compile every Triton kernel for a real GPU target on a machine without a GPU.

Triton's CPU interpreter (what the CPU tests run) is lenient where the compiler is strict: a loop-carried
value that changes type, a ``tl.dot`` shape or dtype the hardware lacks, a tile that needs more shared
memory than an SM has. This tool runs the ops' forward and backward on CPU tensors with backend "triton"
while Triton believes it drives an sm_90 (or sm_80) device: every launch is compiled by the real compiler
and ``ptxas`` and never run (the outputs are left unwritten), and every autotune config the autotuner would
time (after its pruning: the register budgets of triton_kernels/_common.py) is compiled instead of timed.
It needs neither a GPU nor a CUDA driver, only triton's bundled ``ptxas``.

    python tests/_triton_compile.py [--arch 90 80] [--quick] [--report FILE]

It must run with TRITON_INTERPRET unset (decided when triton is imported). It fails (exit 1) when a kernel
does not compile, or when a launch has no config that fits the target's shared memory; ``--report`` adds
each kernel's registers and spills from ``ptxas -v``. ``--quick`` (what ``tests/test_triton_compile.py``
runs in CI) compiles only each autotuned kernel's first config, for bf16 and fp32 with TF32;
``make triton-compile-check`` runs the full form.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    raise SystemExit("tests/_triton_compile.py: unset TRITON_INTERPRET (the interpreter compiles nothing)")

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime import driver
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction

import peftkern
import peftkern.backends
from peftkern.triton_kernels import multi_lora as triton_multi_lora

# Shared memory one block may use (opt-in maximum), and SMs, per target.
MAX_SHARED = {80: 166912, 90: 232448}
SMS = {80: 108, 90: 132}


@dataclasses.dataclass
class Compiled:
    kernel: str
    case: str
    config: str
    shared: int
    seconds: float
    ptx: str


class _FakeDriver:
    """Just enough of a Triton driver for compiling: a target, device 0, stream 0; nothing launches."""

    def __init__(self, arch: int):
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_benchmarker(self):
        raise RuntimeError("compile-only: nothing is timed")


@contextlib.contextmanager
def compile_only(arch: int, first_config: bool, record: Callable[[str, object, str, float], None],
                 launched: Callable[[JITFunction, dict, int], None] | None = None) -> Iterator[None]:
    """Inside: Triton compiles for sm_<arch> and launches nothing; autotuned kernels compile every config
    that the autotuner would time for the launch's arguments, after its pruning (or only the first of those);
    ``record(kernel name, compiled kernel, config, seconds)`` sees each compile, and
    ``launched(jit function, {parameter name: argument}, programs in its grid)`` each launch it stands for
    (benchmarks/perf_report.py counts them)."""
    jit_run, tuner_run = JITFunction.run, Autotuner.run
    interpreting, programs = peftkern.backends.triton_interpreting, triton_multi_lora._device_programs
    config_text, later_config = [""], [False]

    def run(self, *args, grid, warmup, **kwargs):
        start = time.perf_counter()
        kernel = jit_run(self, *args, grid=grid, warmup=True, **kwargs)
        record(self.fn.__name__, kernel, config_text[0], time.perf_counter() - start)
        if launched is not None and not later_config[0]:  # an autotuned launch is one launch
            bound = {**dict(zip(self.arg_names, args)), **kwargs}
            launched(self, bound, math.prod(grid(bound) if callable(grid) else grid))
        return kernel

    def tuned_run(self, *args, **kwargs):
        # The configs the autotuner would time for these arguments: its own pruning (the register budgets
        # of triton_kernels/_common.py), which it skips when there is a single config.
        configs = self.configs
        if len(configs) > 1:
            self.nargs = dict(zip(self.arg_names, args))
            try:
                configs = self.prune_configs(kwargs)
            finally:
                self.nargs = None
        for index, config in enumerate(configs[:1] if first_config else configs):
            config_text[0], later_config[0] = str(config), index > 0
            try:
                self.fn.run(*args, **kwargs, **config.all_kwargs())
            finally:
                config_text[0], later_config[0] = "", False

    active = driver._active  # reset_active() would look for a real driver, and there is none
    driver.set_active(_FakeDriver(arch))
    JITFunction.run, Autotuner.run = run, tuned_run
    # The ops accept CPU tensors for backend "triton" only under the interpreter; the multi-LoRA launcher
    # asks torch.cuda for the SM count.
    peftkern.backends.triton_interpreting = lambda: True
    triton_multi_lora._device_programs = lambda device_index: 4 * SMS[arch]
    try:
        yield
    finally:
        JITFunction.run, Autotuner.run = jit_run, tuner_run
        peftkern.backends.triton_interpreting = interpreting
        triton_multi_lora._device_programs = programs
        driver._active = active


# ---- the workload: each op forward + backward over the variants that change what is compiled ------------

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
# (activation dtype, adapter dtype, TF32 allowed): the three native dtypes, fp32 adapters beside 16-bit
# activations, and fp32 with TF32 on (tl.dot's input precision follows torch.backends.cuda.matmul).
DTYPES = [(F32, F32, False), (F32, F32, True), (F16, F16, False), (BF16, BF16, False), (BF16, F32, False)]
QUICK_DTYPES = [(BF16, BF16, False), (F32, F32, True)]


def _param(*shape, dtype):
    return torch.randn(*shape, dtype=dtype).mul_(0.1).requires_grad_()


def _backward(y):
    y.float().sum().backward()


def _lora(act, ad):
    # (rows, in, out, bias, dropout, transposed x, rank): sizes divisible by 16 and odd ones, one row, a strided
    # x; rank 64, over what the dX kernel's single read of dY takes (the dy kernel's path and dX from its dS).
    for rows, k, n, bias, dropout, transposed, rank in [
            (99, 96, 80, True, 0.1, False, 16), (1, 33, 17, False, 0.0, False, 16),
            (40, 48, 32, False, 0.1, True, 16), (64, 64, 64, False, 0.1, False, 64)]:
        x = _param(k, rows, dtype=act).t() if transposed else _param(rows, k, dtype=act)
        weight = _param(n, k, dtype=act)
        b = _param(n, dtype=act) if bias else None
        y = peftkern.lora_linear(x, weight, b, _param(rank, k, dtype=ad), _param(n, rank, dtype=ad), 0.5, dropout,
                                 backend="triton")
        _backward(y)
    # The torch backend's keep-mask on CUDA tensors (the fused kernels above draw theirs inline).
    from peftkern.triton_kernels.dropout import dropout_keep_mask

    for mask_dtype in (torch.bool, act):
        dropout_keep_mask(torch.tensor([3]), (99, 96), 0.1, mask_dtype)


def _multi_lora(act, ad):
    for tokens, k, n in [(24, 96, 80), (1, 33, 17), (200, 96, 80)]:  # decode (also one row, odd sizes), prefill
        x = _param(tokens, k, dtype=act)
        ids = torch.randint(-1, 4, (tokens,))
        y = peftkern.multi_lora_linear(x, _param(n, k, dtype=act), _param(n, dtype=act),
                                       _param(4, 16, k, dtype=ad), _param(4, n, 16, dtype=ad), ids,
                                       [0.5, 1.0, 2.0, 0.25], [16, 8, 4, 16], backend="triton")
        _backward(y)


def _prompts(act, ad):
    ids = torch.randint(0, 50, (3, 17))
    mask = torch.ones(3, 17, dtype=torch.int64)
    for extras in [(mask, ids.clone()), (None, None)]:
        embeds, _, _ = peftkern.prompt_concat(ids, _param(50, 40, dtype=act), _param(2, 5, 40, dtype=ad),
                                              torch.tensor([0, 1, 1]), *extras, backend="triton")
        _backward(embeds)
    long_ids = torch.zeros(8, 40, dtype=torch.int64)  # a padding id over 320 positions: the chunked dEMBED
    embeds, _, _ = peftkern.prompt_concat(long_ids, _param(50, 40, dtype=act), _param(2, 5, 40, dtype=ad),
                                          torch.zeros(8, dtype=torch.int64), backend="triton")
    _backward(embeds)
    kv = peftkern.prefix_kv(_param(2, 5, 2 * 2 * 2 * 8, dtype=ad), torch.tensor([1, 0, 1]), 2, 2,
                            backend="triton")
    _backward(kv)


def _bottleneck(act, ad):
    for activation in ("relu", "gelu", "gelu_tanh", "silu", "tanh"):
        x = _param(40, 48, dtype=act)
        y = peftkern.bottleneck_adapter(x, _param(24, 48, dtype=ad), _param(24, dtype=ad),
                                        _param(48, 24, dtype=ad), _param(48, dtype=ad), activation, 0.5,
                                        backend="triton")
        _backward(y)
    x = _param(1, 33, dtype=act)  # one row, odd sizes
    _backward(peftkern.bottleneck_adapter(x, _param(9, 33, dtype=ad), None, _param(33, 9, dtype=ad), None,
                                          "relu", 1.0, backend="triton"))
    x = _param(40, 64, dtype=act)
    # Several adapters: a down bias (HAS_IDS with HAS_BIAS) and no up bias (HAS_IDS without); sizes that are
    # multiples of 16 (what Triton specializes on, and what models use).
    y = peftkern.bottleneck_adapter(x, _param(3, 32, 64, dtype=ad), _param(3, 32, dtype=ad),
                                    _param(3, 64, 32, dtype=ad), None,
                                    "silu", 1.0, _param(40, 64, dtype=act), torch.randint(-1, 3, (40,)),
                                    backend="triton")
    _backward(y)


def _lora_serving(act, ad):
    # decode (one slice, and three of different widths), prefill (64- and 128-row segment tiles); one row, odd
    # sizes, a strided x.
    for tokens, k, widths, transposed in [(24, 96, [80], False), (1, 33, [17, 9, 9], False),
                                          (200, 96, [64, 32, 32], True), (2100, 64, [64, 32], False)]:
        x = torch.randn(k, tokens, dtype=act).t() if transposed else torch.randn(tokens, k, dtype=act)
        batch = peftkern.LoRABatch(torch.randint(-1, 4, (tokens,)), 4)
        ranks = torch.tensor([16, 8, 4, 16], dtype=torch.int32)
        lora_a = [torch.randn(4, 16, k, dtype=ad) for _ in widths]
        s = peftkern.lora_shrink(x, lora_a, batch, ranks, backend="triton")
        y = torch.zeros(tokens, sum(widths) + 8, dtype=act)
        peftkern.lora_expand_add(y, s, [torch.randn(4, n, 16, dtype=ad) for n in widths], batch,
                                 torch.ones(4), 8, ranks, backend="triton")


def _dora(act, ad):
    # The norm kernel, the fused forward with its column scale, dY * g with dm, and the LoRA backward on it:
    # with and without dropout and bias, odd sizes and one row.
    for rows, k, n, bias, dropout in [(99, 96, 80, True, 0.1), (1, 33, 17, False, 0.0)]:
        x = _param(rows, k, dtype=act)
        weight = _param(n, k, dtype=act)
        b = _param(n, dtype=act) if bias else None
        y = peftkern.dora_linear(x, weight, b, _param(16, k, dtype=ad), _param(n, 16, dtype=ad),
                                 _param(n, dtype=ad), 0.5, dropout, backend="triton")
        _backward(y)


def _lora4bit(act, ad):
    # bitsandbytes' storage built by hand (the layout is all the kernels see): (rows, in, out, blocksize, double
    # quant, dropout, compute dtype): the common case (K even, row-aligned blocks), odd sizes (blocks across rows,
    # K odd, one row), and a base GEMM in another dtype than x's.
    from peftkern.ops.lora4bit import Weight4bit

    for rows, k, n, blocksize, nested, dropout, compute in [(99, 128, 80, 64, True, 0.1, None),
                                                            (1, 33, 17, 32, False, 0.0, None),
                                                            (40, 64, 48, 64, False, 0.0, torch.float32)]:
        blocks = -(-n * k // blocksize)
        packed = torch.randint(0, 256, (-(-n * k // 2),), dtype=torch.uint8)
        if nested:
            weight = Weight4bit(packed, torch.randint(0, 256, (blocks,), dtype=torch.uint8), (n, k), "nf4",
                                blocksize, act, torch.rand(-(-blocks // 256)), torch.linspace(-1, 1, 256), 256,
                                torch.tensor(0.1))
        else:
            weight = Weight4bit(packed, torch.rand(blocks), (n, k), "fp4", blocksize, act)
        x = _param(rows, k, dtype=act)
        y = peftkern.lora_linear_4bit(x, weight, _param(n, dtype=compute or act), _param(16, k, dtype=ad),
                                      _param(n, 16, dtype=ad), 0.5, dropout, compute_dtype=compute, backend="triton")
        _backward(y)


WORKLOADS = {"lora": _lora, "lora4bit": _lora4bit, "multi_lora": _multi_lora, "prompt": _prompts,
             "bottleneck": _bottleneck, "lora_serving": _lora_serving, "dora": _dora}


def ptxas_counts(ptx: str, arch: int) -> tuple[int, int, int] | str:
    """(registers, spill store bytes, spill load bytes) from triton's own ``ptxas -v`` on this PTX, or
    what ptxas said when it gave no such figures."""
    from triton.backends.nvidia.compiler import get_ptxas

    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.ptx"
        path.write_text(ptx)
        done = subprocess.run([get_ptxas(arch).path, "-v", f"--gpu-name={gpu}", str(path), "-o", os.devnull],
                              capture_output=True, text=True, timeout=600)
    text = done.stdout + done.stderr
    registers = re.search(r"Used (\d+) registers", text)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    if registers is None or spills is None:
        return f"ptxas -v said: {text.strip()[:200]}"
    return int(registers.group(1)), int(spills.group(1)), int(spills.group(2))


def ptxas_usage(ptx: str, arch: int) -> str:
    """'N registers, S B spill stores, L B spill loads' from triton's own ptxas on this PTX."""
    counts = ptxas_counts(ptx, arch)
    if isinstance(counts, str):
        return counts
    return f"{counts[0]} registers, {counts[1]} B spill stores, {counts[2]} B spill loads"


def check(arch: int, quick: bool, ops: list[str]) -> tuple[list[Compiled], list[str]]:
    """Compile every kernel the ops launch for sm_<arch>; returns (what compiled, the problems)."""
    compiled: list[Compiled] = []
    problems: list[str] = []
    case = [""]

    def record(name, kernel, config, seconds):
        compiled.append(Compiled(name, case[0], config, kernel.metadata.shared, seconds, kernel.asm["ptx"]))

    torch.manual_seed(0)
    with compile_only(arch, quick, record):
        for op in ops:
            for act, ad, tf32 in QUICK_DTYPES if quick else DTYPES:
                case[0] = f"{op} x {str(act)[6:]} adapters {str(ad)[6:]}{' tf32' if tf32 else ''}"
                start = len(compiled)
                allow_tf32 = torch.backends.cuda.matmul.allow_tf32
                torch.backends.cuda.matmul.allow_tf32 = tf32
                try:
                    WORKLOADS[op](act, ad)
                except Exception as error:  # report and go on: one message per failing case
                    problems.append(f"sm_{arch} {case[0]}: {type(error).__name__}: {error}")
                    continue
                finally:
                    torch.backends.cuda.matmul.allow_tf32 = allow_tf32
                print(f"  {case[0]}: {len(compiled) - start} compiles, "
                      f"{sum(c.seconds for c in compiled[start:]):.0f} s", flush=True)
                if len(compiled) == start:
                    problems.append(f"sm_{arch} {case[0]}: no kernel was compiled (did the op reach Triton?)")
    # A launch fails on the device only when none of its configs fits: the autotuner skips the others (so
    # with only first configs compiled, only kernels that are not autotuned can be judged).
    launches: dict[tuple[str, str], list[Compiled]] = {}
    for item in compiled:
        if not (quick and item.config):
            launches.setdefault((item.kernel, item.case), []).append(item)
    for (kernel, where), items in launches.items():
        if all(item.shared > MAX_SHARED[arch] for item in items):
            problems.append(f"sm_{arch} {where}: {kernel} needs {min(i.shared for i in items)} B of shared "
                            f"memory in every config; the target has {MAX_SHARED[arch]} B")
    return compiled, problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90], choices=sorted(MAX_SHARED))
    parser.add_argument("--quick", action="store_true",
                        help="only each autotuned kernel's first config, and only bf16 and fp32 with TF32")
    parser.add_argument("--ops", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--report", type=Path, help="write a Markdown table (with ptxas -v usage) here")
    args = parser.parse_args(argv)
    print(f"triton {triton.__version__}, torch {torch.__version__}", flush=True)

    rows, all_problems = [], []
    for arch in args.arch:
        start = time.perf_counter()
        compiled, problems = check(arch, args.quick, args.ops)
        all_problems += problems
        kernels = sorted({item.kernel for item in compiled})
        print(f"sm_{arch}: {len(compiled)} compiles of {len(kernels)} kernels in "
              f"{time.perf_counter() - start:.0f} s; {len(problems)} problem(s)", flush=True)
        if args.report:
            seen = set()
            for item in compiled:
                # A kernel launched again with the same specialization comes back from Triton's cache:
                # report each distinct compile once (dropout on and off are two, with one config).
                key = (item.kernel, item.case, item.config, item.ptx)
                if key in seen:
                    continue
                seen.add(key)
                over = " (over the limit: skipped by the autotuner)" if item.shared > MAX_SHARED[arch] else ""
                rows.append(f"| sm_{arch} | {item.case} | {item.kernel} | {item.config or '-'} | "
                            f"{item.shared}{over} | {ptxas_usage(item.ptx, arch)} |")
    for problem in all_problems:
        print("PROBLEM", problem, flush=True)
    if args.report:
        header = ["# Triton kernels compiled without a GPU (tests/_triton_compile.py)", "",
                  f"triton {triton.__version__}; every autotune config compiled"
                  f"{' (first only; --quick)' if args.quick else ''}; shared memory in bytes.", "",
                  "| target | case | kernel | config | shared | ptxas -v |", "|---|---|---|---|---|---|"]
        args.report.write_text("\n".join(header + rows) + "\n")
        print(f"report: {args.report}")
    return 1 if all_problems else 0


if __name__ == "__main__":
    sys.exit(main())
