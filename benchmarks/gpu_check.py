"""The GPU check that fits one short window: one command, every stage time-boxed, results written as it goes.

    make gpu-check        # GPU machine: = python3 benchmarks/gpu_check.py --install (with .gpu-bundle/ beside)
    make gpu-check-dry    # CPU: the same plan on tiny shapes (Triton's interpreter) + the bundle's key check

GPU windows are short (about 15 device minutes with the machine's start, at most 10 minutes a command), so
nothing is compiled there: ``make gpu-bundle`` (benchmarks/gpu_bundle.py, on a CPU machine) builds
``peftkern._C`` for the GPU machines' Python and a Triton cache holding every kernel specialization and
autotune config this plan launches. ``--install`` copies the bundled extensions in place, installs the
checkout without building (``pip install --no-build-isolation --no-deps -e .``, ``PEFTKERN_NO_CUDA=1``) and
points ``TRITON_CACHE_DIR`` at the bundled cache. Then the stages run in order, each time-boxed (a step
starts only if its estimate fits the stage's box and the run's ``--budget``), and every file is rewritten
after every step, so a run cut off still returns what it measured:

  1. correctness  every op x backend (triton, cuda) on two shapes, forward and backward against
                  ``peftkern.reference`` in float64 (relative Frobenius error), and CUDA-graph capture/replay
  2. bench        the headline rows of every ``benchmarks/bench_*.py`` (``run_all.py --headline``)
  3. sanitizer    compute-sanitizer memcheck and racecheck over a few correctness steps (a subprocess)
  4. train        the end-to-end training bench (``bench_train.py``)
  5. sweep        sweep slices, in order, while time remains

Outputs, in ``<out>/<device-slug>/`` (``--out``, default ``$GPU_CHECK_OUT`` or benchmarks/results/): at most
8 files, one folder deep: ``gpu_check.json`` (every step's result, per-stage wall time, Triton compiles on
the GPU = cache misses, host launcher builds), ``summary.json`` / ``summary.md`` (the headline keys and
rows, as run_all.py writes them), ``rows.json`` (every bench row, skips and errors), ``sanitizer.log``
and ``gpu_check.log`` (the console).

The plan is a registry: ``PLAN`` holds ``Step`` objects, each with a stage, a name and ``run(ctx)``.
A step runs in three modes, from the same code: ``gpu`` (the real run), ``dry`` (CPU, interpreter, tiny
shapes, fp32: the plumbing) and ``walk`` (CPU, real shapes, every Triton launch compiled for sm_90 or
looked up in the bundle instead of run: what ``gpu_bundle.py`` uses to build the cache and to count the
launches it lacks). So the bundle holds what the plan launches by construction. To add an op:

  - correctness: ``OP_CASES.append(OpCase("my_op", shapes={"gpu": [...2 dicts], "tiny": [...]}, make=...))``
    where ``make(shape, dtype, device)`` returns ``Inputs(args, grads, call, reference)``; one step per
    shape x backend is registered from it (see ``_lora_inputs``);
  - bench: nothing: a ``benchmarks/bench_<op>.py`` with ``--headline`` is found by run_all.py;
  - sweeps: a line in ``SWEEPS``;
  - then ``make gpu-bundle`` again (the dry run says how many launches the old bundle lacks).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BENCH_DIR = REPO / "benchmarks"
BUNDLE = REPO / ".gpu-bundle"
STAGES = ("correctness", "bench", "sanitizer", "train", "sweep")
# Seconds each stage may take on the GPU machine (None: whatever the run's budget leaves).
STAGE_BOX = {"correctness": 90, "bench": 150, "sanitizer": 130, "train": 90, "sweep": None}
DEFAULT_BUDGET = 400  # of the 8 minutes one call is boxed to: install, start-up and writing take the rest
MAX_FILES, MAX_FILE_BYTES = 8, 16 * 2**20
SAFE_NAME = re.compile(r"[A-Za-z0-9._-]+")
# Providers the bench stage times: every baseline the summary keys need, ours; not torch_compile (inductor
# compiles its own Triton kernels on the GPU, which no bundle can hold: its rows come from `make bench`).
BENCH_PROVIDERS = ("base", "base_two_gemms", "torch_unfused", "peft", "triton", "cuda", "peft_mixed_batch",
                   "torch_gather_bmm", "loop_per_adapter", "peft_style", "two_gemms", "peft", "peftkern")
# Sweep slices (op, run_all options), run in this order while time remains. Each one's launches are in the
# bundle; the rest of the sweeps stay with `make bench`.
SWEEPS = [
    ("lora", ["--tokens", "8192", "--hidden", "4096", "--rank", "8,64"]),
    ("lora", ["--tokens", "1024,4096,16384", "--hidden", "4096", "--rank", "16", "--dropout", "0.1"]),
    ("multi_lora", ["--tokens", "1,16,64,256", "--adapters", "8,64", "--rank", "16"]),
    ("adapter", ["--tokens", "1024,8192", "--hidden", "4096", "--reduction", "64"]),
]
# Correctness steps rerun under compute-sanitizer (small shapes: the sanitizer slows kernels 10-100x).
SANITIZED = ("correctness/lora/{backend}/s1", "correctness/multi_lora/{backend}/s1",
             "correctness/bottleneck_adapter/{backend}/s1")


# ---- the plan --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Step:
    name: str
    stage: str
    run: Callable[[Context], dict]
    estimate_s: float = 5.0  # GPU seconds, for the time box


@dataclasses.dataclass
class Context:
    mode: str  # "gpu", "dry" or "walk"
    device: object  # torch.device
    scratch: Path
    rows: list = dataclasses.field(default_factory=list)
    summary: dict = dataclasses.field(default_factory=dict)
    skipped: list = dataclasses.field(default_factory=list)
    errors: list = dataclasses.field(default_factory=list)
    sanitizer_log: list = dataclasses.field(default_factory=list)

    @property
    def scale(self) -> str:
        return "tiny" if self.mode == "dry" else "gpu"

    @property
    def dtype(self):
        import torch

        # The interpreter computes tl.dot on bf16 wrongly: the dry run checks fp32.
        return torch.float32 if self.mode == "dry" else torch.bfloat16


PLAN: list[Step] = []


def step(stage: str, name: str, estimate_s: float = 5.0) -> Callable:
    """Register ``run(ctx) -> result dict`` as a step of ``stage``."""
    if stage not in STAGES:
        raise ValueError(f"stage: expected one of {STAGES}, got {stage!r}")

    def register(run: Callable[[Context], dict]) -> Callable[[Context], dict]:
        if any(s.name == name for s in PLAN):
            raise ValueError(f"step {name!r} is registered twice")
        PLAN.append(Step(name, stage, run, estimate_s))
        return run

    return register


# ---- stage 1: correctness --------------------------------------------------------------------------------


@dataclasses.dataclass
class Inputs:
    args: dict  # name -> tensor or value, in the call's order
    grads: list  # names of the inputs that get gradients
    call: Callable  # (backend, args) -> output tensor
    reference: Callable  # (args upcast to float64) -> output tensor


@dataclasses.dataclass
class OpCase:
    op: str
    shapes: dict  # "gpu" / "tiny" -> two shape dicts
    make: Callable  # (shape, dtype, device) -> Inputs
    backends: tuple = ("triton", "cuda")
    estimate_s: float = 3.0


OP_CASES: list[OpCase] = []

# ||out - ref|| / ||ref|| (float64 reference on the same inputs): METHOD.md's bands, with headroom.
REL_TOLERANCE = {"bfloat16": 2e-2, "float16": 5e-3, "float32": 1e-4}


def _randn(*shape, dtype, device, scale: float = 1.0):
    import torch

    return (torch.randn(*shape) * scale).to(dtype=dtype, device=device)


def _ints(low: int, high: int, shape, device):
    import torch

    return torch.randint(low, high, shape).to(device)


def _lora_inputs(shape, dtype, device) -> Inputs:
    import peftkern
    from peftkern import reference

    m, k, n, r = shape["M"], shape["K"], shape["N"], shape["r"]
    args = {"x": _randn(m, k, dtype=dtype, device=device), "weight": _randn(n, k, dtype=dtype, device=device,
                                                                              scale=k ** -0.5),
            "bias": _randn(n, dtype=dtype, device=device), "lora_a": _randn(r, k, dtype=dtype, device=device,
                                                                            scale=k ** -0.5),
            "lora_b": _randn(n, r, dtype=dtype, device=device, scale=r ** -0.5), "scaling": 0.5}
    return Inputs(args, ["x", "lora_a", "lora_b"],
                  lambda backend, a: peftkern.lora_linear(*a.values(), backend=backend),
                  lambda a: reference.lora_linear(*a.values()))


def _multi_lora_inputs(shape, dtype, device) -> Inputs:
    import torch

    import peftkern
    from peftkern import reference

    t, k, n, adapters, r = shape["T"], shape["K"], shape["N"], shape["L"], shape["r"]
    ranks = [r if i % 2 == 0 else max(1, r // 2) for i in range(adapters)]
    args = {"x": _randn(t, k, dtype=dtype, device=device), "weight": _randn(n, k, dtype=dtype, device=device,
                                                                              scale=k ** -0.5),
            "bias": None, "lora_a": _randn(adapters, r, k, dtype=dtype, device=device, scale=k ** -0.5),
            "lora_b": _randn(adapters, n, r, dtype=dtype, device=device, scale=r ** -0.5),
            "ids": _ints(-1, adapters, (t,), device), "scalings": [0.5 + i / 4 for i in range(adapters)],
            "ranks": ranks}
    return Inputs(args, ["x", "lora_a", "lora_b"],
                  lambda backend, a: peftkern.multi_lora_linear(*a.values(), check_ids=False, backend=backend),
                  lambda a: reference.multi_lora_linear(*list(a.values())[:-1],
                                                       torch.tensor(a["ranks"], device=a["x"].device)))


def _prompt_inputs(shape, dtype, device) -> Inputs:
    import peftkern
    from peftkern import reference

    b, t, v, d, p, n = shape["B"], shape["T"], shape["V"], shape["D"], shape["P"], shape["n"]
    args = {"ids": _ints(0, v, (b, t), device), "embed": _randn(v, d, dtype=dtype, device=device),
            "prompts": _randn(p, n, d, dtype=dtype, device=device), "prompt_ids": _ints(0, p, (b,), device)}
    return Inputs(args, ["prompts"],
                  lambda backend, a: peftkern.prompt_concat(*a.values(), backend=backend)[0],
                  lambda a: reference.prompt_concat(*a.values())[0])


def _prefix_inputs(shape, dtype, device) -> Inputs:
    import peftkern
    from peftkern import reference

    p, n, layers, heads, hd, b = shape["P"], shape["n"], shape["layers"], shape["heads"], shape["hd"], shape["B"]
    args = {"prefix": _randn(p, n, layers * 2 * heads * hd, dtype=dtype, device=device),
            "prompt_ids": _ints(0, p, (b,), device), "layers": layers, "heads": heads}
    return Inputs(args, ["prefix"], lambda backend, a: peftkern.prefix_kv(*a.values(), backend=backend),
                  lambda a: reference.prefix_kv(*a.values()))


def _bottleneck_inputs(shape, dtype, device) -> Inputs:
    import peftkern
    from peftkern import reference

    m, d, bn = shape["M"], shape["D"], shape["Bn"]
    args = {"x": _randn(m, d, dtype=dtype, device=device),
            "down_weight": _randn(bn, d, dtype=dtype, device=device, scale=d ** -0.5),
            "down_bias": _randn(bn, dtype=dtype, device=device, scale=0.1),
            "up_weight": _randn(d, bn, dtype=dtype, device=device, scale=bn ** -0.5),
            "up_bias": _randn(d, dtype=dtype, device=device, scale=0.1), "activation": "relu", "scaling": 0.5}
    return Inputs(args, ["x", "down_weight", "down_bias", "up_weight", "up_bias"],
                  lambda backend, a: peftkern.bottleneck_adapter(*a.values(), backend=backend),
                  lambda a: reference.bottleneck_adapter(*a.values()))


def _serving_inputs(shape, dtype, device) -> Inputs:
    """lora_shrink then lora_expand_add onto a copy of y (forward only: serving has no backward)."""
    import torch

    import peftkern
    from peftkern import reference

    t, k, n, adapters, r = shape["T"], shape["K"], shape["N"], shape["L"], shape["r"]
    args = {"x": _randn(t, k, dtype=dtype, device=device),
            "lora_a": _randn(adapters, r, k, dtype=dtype, device=device, scale=k ** -0.5),
            "lora_b": _randn(adapters, n, r, dtype=dtype, device=device, scale=r ** -0.5),
            "y": _randn(t, n, dtype=dtype, device=device), "ids": _ints(-1, adapters, (t,), device),
            "scalings": torch.linspace(0.5, 1.5, adapters).to(device),
            "ranks": torch.tensor([r if i % 2 == 0 else max(1, r // 2) for i in range(adapters)],
                                  dtype=torch.int32).to(device)}

    def call(backend, a):
        batch = peftkern.LoRABatch(a["ids"], a["lora_a"].shape[0])
        s = peftkern.lora_shrink(a["x"], a["lora_a"], batch, a["ranks"], backend=backend)
        return peftkern.lora_expand_add(a["y"].clone(), s, a["lora_b"], batch, a["scalings"], 0, a["ranks"],
                                        backend=backend)

    def ref(a):
        s = reference.lora_shrink(a["x"], a["lora_a"], a["ids"], a["ranks"])
        return reference.lora_expand_add(a["y"].clone(), s, a["lora_b"], a["ids"], a["scalings"], 0, a["ranks"])

    return Inputs(args, [], call, ref)


def _dora_inputs(shape, dtype, device) -> Inputs:
    """DoRA with magnitudes moved off the column norms of W (so the scale m / ||W + s B A|| is not 1)."""
    import torch

    import peftkern
    from peftkern import reference

    lora = _lora_inputs(shape, dtype, device).args
    weight = lora["weight"]
    magnitude = (weight.float().norm(dim=1) * (0.5 + torch.rand(weight.shape[0]).to(device))).to(dtype)
    args = {**{k: v for k, v in lora.items() if k != "scaling"}, "magnitude": magnitude, "scaling": 0.5}
    return Inputs(args, ["x", "lora_a", "lora_b", "magnitude"],
                  lambda backend, a: peftkern.dora_linear(*a.values(), backend=backend),
                  lambda a: reference.dora_linear(*a.values()))


def _lora4bit_inputs(shape, dtype, device) -> Inputs:
    """QLoRA over an NF4 weight with double-quantized absmax (blocksize 64) built in bitsandbytes' layout
    (random codes: the kernels' work depends on the layout only); the reference dequantizes it."""
    import torch

    import peftkern
    from peftkern import reference

    m, k, n, r = shape["M"], shape["K"], shape["N"], shape["r"]
    blocks = -(-n * k // 64)
    weight = peftkern.Weight4bit(
        torch.randint(0, 256, (-(-n * k // 2),), dtype=torch.uint8).to(device),
        torch.randint(0, 256, (blocks,), dtype=torch.uint8).to(device), (n, k), "nf4", 64, dtype,
        torch.rand(-(-blocks // 256)).mul_(0.05).to(device), torch.linspace(-1, 1, 256).to(device), 256,
        torch.tensor(0.02).to(device))
    args = {"x": _randn(m, k, dtype=dtype, device=device), "weight": weight,
            "bias": _randn(n, dtype=dtype, device=device),
            "lora_a": _randn(r, k, dtype=dtype, device=device, scale=k ** -0.5),
            "lora_b": _randn(n, r, dtype=dtype, device=device, scale=r ** -0.5), "scaling": 0.5}

    def ref(a):
        w = a["weight"]
        dense = reference.dequantize_4bit(w.packed, w.absmax, w.quant_type, w.blocksize, w.shape, w.dtype,
                                          nested_absmax=w.nested_absmax, nested_code=w.nested_code,
                                          nested_blocksize=w.nested_blocksize, offset=w.offset)
        return reference.lora_linear(a["x"], dense.double(), a["bias"], a["lora_a"], a["lora_b"], a["scaling"])

    return Inputs(args, ["x", "lora_a", "lora_b"],
                  lambda backend, a: peftkern.lora_linear_4bit(*a.values(), backend=backend), ref)


OP_CASES += [
    OpCase("lora", {"gpu": [{"M": 4096, "K": 4096, "N": 4096, "r": 16}, {"M": 333, "K": 1000, "N": 77, "r": 8}],
                    "tiny": [{"M": 16, "K": 32, "N": 16, "r": 8}, {"M": 17, "K": 33, "N": 20, "r": 4}]},
           _lora_inputs),
    OpCase("multi_lora", {"gpu": [{"T": 2048, "K": 1024, "N": 1024, "L": 4, "r": 16},
                                  {"T": 64, "K": 4096, "N": 4096, "L": 8, "r": 16}],
                          "tiny": [{"T": 40, "K": 32, "N": 16, "L": 3, "r": 8},
                                   {"T": 5, "K": 33, "N": 17, "L": 2, "r": 4}]}, _multi_lora_inputs),
    OpCase("prompt_concat", {"gpu": [{"B": 8, "T": 512, "V": 32000, "D": 4096, "P": 4, "n": 32},
                                     {"B": 3, "T": 17, "V": 50, "D": 40, "P": 2, "n": 5}],
                             "tiny": [{"B": 2, "T": 7, "V": 30, "D": 16, "P": 2, "n": 4},
                                      {"B": 3, "T": 5, "V": 20, "D": 24, "P": 2, "n": 3}]}, _prompt_inputs),
    OpCase("prefix_kv", {"gpu": [{"P": 4, "n": 32, "layers": 32, "heads": 8, "hd": 128, "B": 16},
                                 {"P": 2, "n": 5, "layers": 2, "heads": 2, "hd": 8, "B": 3}],
                         "tiny": [{"P": 2, "n": 3, "layers": 2, "heads": 2, "hd": 8, "B": 3},
                                  {"P": 3, "n": 2, "layers": 1, "heads": 1, "hd": 4, "B": 2}]}, _prefix_inputs),
    OpCase("bottleneck_adapter", {"gpu": [{"M": 4096, "D": 4096, "Bn": 256}, {"M": 33, "D": 200, "Bn": 24}],
                                  "tiny": [{"M": 16, "D": 32, "Bn": 16}, {"M": 9, "D": 33, "Bn": 5}]},
           _bottleneck_inputs),
    OpCase("lora_serving", {"gpu": [{"T": 2048, "K": 1024, "N": 1024, "L": 4, "r": 16},
                                    {"T": 64, "K": 4096, "N": 4096, "L": 8, "r": 16}],
                            "tiny": [{"T": 40, "K": 32, "N": 16, "L": 3, "r": 8},
                                     {"T": 5, "K": 33, "N": 17, "L": 2, "r": 4}]}, _serving_inputs),
    # DoRA and QLoRA: Triton kernels only (the cuda backend has none of their own)
    OpCase("dora", {"gpu": [{"M": 4096, "K": 4096, "N": 4096, "r": 16}, {"M": 333, "K": 1000, "N": 77, "r": 8}],
                    "tiny": [{"M": 16, "K": 32, "N": 16, "r": 8}, {"M": 17, "K": 33, "N": 20, "r": 4}]},
           _dora_inputs, backends=("triton",)),
    OpCase("lora4bit", {"gpu": [{"M": 4096, "K": 4096, "N": 4096, "r": 16}, {"M": 333, "K": 1024, "N": 80, "r": 8}],
                        "tiny": [{"M": 16, "K": 64, "N": 16, "r": 8}, {"M": 17, "K": 128, "N": 20, "r": 4}]},
           _lora4bit_inputs, backends=("triton",)),
]


def rel_error(actual, expected) -> float:
    """||actual - expected|| / ||expected|| in float64 (inf for NaN or a shape mismatch)."""
    import torch

    if actual.shape != expected.shape:
        return math.inf
    a, e = actual.detach().double(), expected.detach().double()
    if not bool(torch.isfinite(a).all()):
        return math.inf
    return float((a - e).norm() / e.norm().clamp_min(1e-30))


def _upcast(args: dict, grads: list) -> dict:
    import torch

    out = {}
    for name, value in args.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            value = value.detach().double().requires_grad_(name in grads)
        out[name] = value
    return out


class CudaKernelMissing(RuntimeError):
    """The built CUDA backend has no kernel for this op: a skip, not a failure."""


def check_case(ctx: Context, case: OpCase, shape: dict, backend: str) -> dict:
    """One op x backend x shape: forward and (where the op has one) backward against the float64 reference.
    In walk mode only the op runs (every launch compiled or looked up, nothing computed)."""
    import torch

    if backend == "cuda" and ctx.device.type != "cuda":
        return {"status": "skipped", "reason": "the cuda backend needs a GPU (it launches no Triton kernel)"}
    torch.manual_seed(0)
    inputs = case.make(shape, ctx.dtype, ctx.device)
    args = {n: (v.requires_grad_(True) if n in inputs.grads else v) for n, v in inputs.args.items()}
    try:
        y = inputs.call(backend, args)
        upstream = torch.randn(y.shape).to(dtype=y.dtype, device=y.device)
        if inputs.grads:
            y.backward(upstream)
    except RuntimeError as error:  # the built CUDA backend has no kernel for this op or pass
        if backend == "cuda" and "backend 'cuda'" in str(error):
            raise CudaKernelMissing(str(error)) from error
        raise
    if ctx.mode == "walk":
        return {"status": "walked"}
    tolerance = REL_TOLERANCE[str(ctx.dtype).removeprefix("torch.")]
    wide = _upcast(args, inputs.grads)
    expected = inputs.reference(wide)
    result = {"shape": shape, "dtype": str(ctx.dtype).removeprefix("torch."), "tolerance": tolerance,
              "forward": rel_error(y, expected)}
    if inputs.grads:
        expected.backward(upstream.double())
        result["backward"] = {n: rel_error(args[n].grad, wide[n].grad) for n in inputs.grads}
    errors = [result["forward"], *result.get("backward", {}).values()]
    result["status"] = "pass" if all(e <= tolerance for e in errors) else "fail"
    return result


def _register_correctness() -> None:
    for case in OP_CASES:
        for index in range(2):
            for backend in case.backends:
                def run(ctx, case=case, index=index, backend=backend):
                    return check_case(ctx, case, case.shapes[ctx.scale][index], backend)

                step("correctness", f"correctness/{case.op}/{backend}/s{index}", case.estimate_s)(run)


_register_correctness()


def _graph_step(case_name: str, backend: str) -> Callable[[Context], dict]:
    """Capture the op's forward in a CUDA graph, replay it on new inputs, compare with eager (same kernels:
    equal up to the order of atomics). Off the GPU the eager call alone runs (the launches captured)."""

    def run(ctx: Context) -> dict:
        import torch

        case = next(c for c in OP_CASES if c.op == case_name)
        if backend == "cuda" and ctx.device.type != "cuda":
            return {"status": "skipped", "reason": "the cuda backend needs a GPU (it launches no Triton kernel)"}
        torch.manual_seed(0)
        inputs = case.make(case.shapes[ctx.scale][1], ctx.dtype, ctx.device)
        with torch.no_grad():
            eager = inputs.call(backend, inputs.args)
            if ctx.mode != "gpu":
                return {"status": "walked" if ctx.mode == "walk" else "eager only (no CUDA graph off the GPU)"}
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    inputs.call(backend, inputs.args)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                captured = inputs.call(backend, inputs.args)
            x = inputs.args["x"]
            x.copy_(torch.randn(x.shape).to(x))
            graph.replay()
            torch.cuda.synchronize()
            eager = inputs.call(backend, inputs.args)
        error = rel_error(captured, eager)
        return {"status": "pass" if error <= 1e-5 else "fail", "replay_vs_eager": error}

    return run


for _op, _backend in [("lora", "triton"), ("lora", "cuda"), ("multi_lora", "triton"), ("multi_lora", "cuda")]:
    step("correctness", f"graph/{_op}/{_backend}", 3.0)(_graph_step(_op, _backend))


# ---- stages 2, 4, 5: benches through run_all.py -----------------------------------------------------------


def _bench_argv(ctx: Context, op: str, options: list[str]) -> list[str]:
    argv = ["--only", op, "--providers", ",".join(dict.fromkeys(BENCH_PROVIDERS)), *options]
    return argv + (["--smoke"] if ctx.mode == "dry" else [])


def run_bench(ctx: Context, op: str, options: list[str]) -> dict:
    """``run_all.py --only op <options>`` into a scratch folder; its rows, summary keys, skips and errors
    join the run's. In walk mode the bench module runs on CPU tensors with every timing replaced by one call
    and only ours' providers built (their launches are what the bundle needs)."""
    if BENCH_DIR.as_posix() not in sys.path:
        sys.path.insert(0, BENCH_DIR.as_posix())
    if ctx.mode == "walk":
        return _walk_bench(ctx, op, options)
    import run_all

    out = Path(tempfile.mkdtemp(prefix=f"{op}-", dir=ctx.scratch))
    argv = _bench_argv(ctx, op, options)
    code = run_all.main([*argv, "--out", str(out)])
    (folder,) = [p for p in out.iterdir() if p.is_dir()]
    rows = []
    for path in sorted(folder.glob("*.json")):
        document = json.loads(path.read_text())
        if path.name == "summary.json":
            ctx.summary.update(document)
        elif path.name == "run.json":
            ctx.skipped += document["skipped"]
            ctx.errors += document["errors"]
        elif path.name != "limits.json" or not any(r["provider"] == "d2d_copy" for r in ctx.rows):
            rows += document.get("rows", [])
    ctx.rows += rows
    shutil.rmtree(out, ignore_errors=True)
    return {"status": "pass" if code == 0 else "fail", "argv": argv, "rows": len(rows)}


def _walk_bench(ctx: Context, op: str, options: list[str]) -> dict:
    """The bench module's ``run(bench)`` on CPU tensors: ours' providers only, each mode called once (no
    timing, no rows), no output checks (nothing was computed). Train: one step of one layer (every layer and
    step launches the same kernels), on the backend peftkern picks on CUDA tensors."""
    import contextlib
    import importlib

    import harness
    import torch

    from peftkern.backends import resolve_backend, use_backend

    module = importlib.import_module(f"bench_{op}")
    parser = argparse.ArgumentParser()
    harness.common_arguments(parser)
    if hasattr(module, "add_arguments"):
        module.add_arguments(parser)
    opts = parser.parse_args(options)
    bench = harness.Bench(module.OP, ctx.device, False, harness.MODES, ("triton", "cuda", "peftkern"),
                          memory=False, options=opts)
    bench.env = {**bench.env, "smoke": True}  # rows of this walk are never written

    def time_provider(provider, build, shapes, dtype, params=None, modes=None, bytes_moved=None, expected=None,
                      tolerance=None):
        if not bench.wants(provider):
            return []
        try:
            forward, grads = build()
            if expected is not None:  # the output check's no-grad call
                with torch.no_grad():
                    forward()
            for fn in harness.mode_callables(forward, [m for m in (modes or bench.modes)], grads).values():
                harness._reset_grads(grads)
                fn()
        except harness.ProviderUnavailable as error:
            bench.skip(provider, str(error), shapes)
        except Exception as error:
            bench.fail(provider, error, shapes, params)
        return []

    bench.time_provider = time_provider
    patched = {harness: {"time_fn": lambda fn, device, grads=(), **_: (fn(), (1.0, 1.0, 1.0))[1],
                         "check_close": lambda *_, **__: None}}
    if hasattr(module, "_check_mask_and_labels"):  # bench_prompt's output check: nothing was computed
        patched[module] = {"_check_mask_and_labels": lambda *_, **__: None}
    backend = contextlib.nullcontext()
    if op == "train":
        opts.steps, opts.warmup_steps = 1, 0
        patched[module] = {"FULL": {**module.FULL, "layers": 1}}
        backend = use_backend(resolve_backend(torch.device("cuda"), "lora_linear"))
    saved = {m: {k: getattr(m, k) for k in values} for m, values in patched.items()}
    for target, values in patched.items():
        for key, value in values.items():
            setattr(target, key, value)
    try:
        with backend:
            module.run(bench)
    finally:
        for target, values in saved.items():
            for key, value in values.items():
                setattr(target, key, value)
    errors = [f"{e['provider']}: {e['error'][:300]}" for e in bench.errors if e["provider"] != "cuda"]
    return {"status": "error" if errors else "walked", "error": "; ".join(errors)} if errors else \
        {"status": "walked"}


def _register_benches() -> None:
    names = sorted(p.stem.removeprefix("bench_") for p in BENCH_DIR.glob("bench_*.py"))
    order = {"lora": 0, "multi_lora": 1, "prompt": 2, "adapter": 3}
    for op in sorted((n for n in names if n != "train"), key=lambda n: (order.get(n, len(order)), n)):
        step("bench", f"bench/{op}", 30.0)(lambda ctx, op=op: run_bench(ctx, op, ["--headline"]))
    step("train", "train/e2e", 60.0)(lambda ctx: run_bench(ctx, "train", []))
    for index, (op, options) in enumerate(SWEEPS):
        step("sweep", f"sweep/{index}-{op}", 60.0)(lambda ctx, op=op, options=options: run_bench(ctx, op, options))


_register_benches()


# ---- stage 3: compute-sanitizer ---------------------------------------------------------------------------


def _sanitizer_step(tool: str) -> Callable[[Context], dict]:
    def run(ctx: Context) -> dict:
        names = [name.format(backend=b) for name in SANITIZED for b in ("triton", "cuda")]
        if ctx.mode == "walk":  # the same launches as those correctness steps
            for name in names:
                _run_step(ctx, next(s for s in PLAN if s.name == name))
            return {"status": "walked"}
        report = ctx.scratch / f"sanitize-{tool}.json"
        command = [sys.executable, str(Path(__file__).resolve()), "--worker", *names, "--report", str(report)]
        command += ["--dry"] if ctx.mode == "dry" else []
        sanitizer = shutil.which("compute-sanitizer")
        env = dict(os.environ, PYTORCH_NO_CUDA_MEMORY_CACHING="1")
        if ctx.mode == "gpu":
            if sanitizer is None:
                return {"status": "skipped", "reason": "compute-sanitizer is not on the PATH"}
            command = [sanitizer, "--tool", tool, "--error-exitcode", "9", "--print-limit", "20", *command]
        box = 60 if ctx.mode == "gpu" else 300
        start = time.perf_counter()
        try:
            done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=box)
            code, text = done.returncode, done.stdout + done.stderr
        except subprocess.TimeoutExpired as error:
            code = "timeout"
            text = (error.stdout or b"").decode(errors="replace") + (error.stderr or b"").decode(errors="replace")
        ctx.sanitizer_log.append(f"==== {tool} ({'compute-sanitizer' if ctx.mode == 'gpu' else 'no sanitizer: dry'})"
                                 f", exit {code}, {time.perf_counter() - start:.0f} s\n{text[-20000:]}")
        worker = json.loads(report.read_text()) if report.is_file() else {}
        failed = [n for n, r in worker.get("steps", {}).items() if r.get("status") not in ("pass", "skipped")]
        status = "pass" if code == 0 and not failed else ("timeout" if code == "timeout" else "fail")
        return {"status": status, "exit": code, "steps": worker.get("steps", {}),
                "compiles": worker.get("compiles", 0)}

    return run


for _tool in ("memcheck", "racecheck"):
    step("sanitizer", f"sanitizer/{_tool}", 60.0)(_sanitizer_step(_tool))


# ---- running ---------------------------------------------------------------------------------------------


class Compiles:
    """Triton compiles (cache misses) and cache hits seen through ``knobs.compilation.listener``, and host
    launcher builds (``triton.runtime.build._build``: a C compiler run per new kernel signature)."""

    def __init__(self) -> None:
        self.misses: list[str] = []
        self.hits = 0
        self.launcher_builds = 0
        self.launcher_seconds = 0.0

    def install(self) -> None:
        import triton
        from triton.runtime import build

        if not hasattr(triton, "knobs"):
            return

        def listener(src, metadata, metadata_group, times, cache_hit, **_):
            if cache_hit:
                self.hits += 1
            else:
                self.misses.append(getattr(src, "name", str(src)))

        triton.knobs.compilation.listener = listener
        original = build._build

        def counted(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.launcher_builds += 1
                self.launcher_seconds += time.perf_counter() - start

        build._build = counted


def _run_step(ctx: Context, item: Step) -> dict:
    try:
        return item.run(ctx)
    except CudaKernelMissing as error:
        return {"status": "skipped", "reason": str(error)[:300]}
    except Exception as error:  # one broken step must not lose the others
        import harness

        if isinstance(error, harness.ProviderUnavailable):
            return {"status": "skipped", "reason": str(error)[:300]}
        return {"status": "error", "error": f"{type(error).__name__}: {error}"[:2000],
                "traceback": traceback.format_exc()[-3000:]}


class Runner:
    """Runs the plan stage by stage within the budget and rewrites every output file after each step."""

    def __init__(self, ctx: Context, out: Path, budget: float, only: list[str] | None, quick: bool) -> None:
        self.ctx, self.budget, self.only, self.quick = ctx, budget, only, quick
        self.start = time.perf_counter()
        self.compiles = Compiles()
        self.results: dict[str, dict] = {}
        self.stages: list[dict] = []
        self.log_lines: list[str] = []
        self.env = _environment(ctx)
        self.folder = out / self.env["device_slug"]
        self.extra: dict = {}

    def log(self, text: str) -> None:
        line = f"[gpu-check {time.perf_counter() - self.start:6.1f}s] {text}"
        print(line, flush=True)
        self.log_lines.append(line)

    def steps(self) -> list[Step]:
        chosen = [s for s in PLAN if self.only is None or any(s.name.startswith(p) for p in self.only)]
        if self.quick:  # the first step of each stage
            chosen = [s for i, s in enumerate(chosen) if all(t.stage != s.stage for t in chosen[:i])]
        return chosen

    def run(self) -> int:
        if self.ctx.mode == "gpu":
            self.compiles.install()
        chosen = self.steps()
        deadline = self.start + self.budget
        for stage in STAGES:
            items = [s for s in chosen if s.stage == stage]
            if not items:
                continue
            stage_start, misses = time.perf_counter(), len(self.compiles.misses)
            box = STAGE_BOX[stage]
            stage_deadline = deadline if box is None else min(deadline, stage_start + box)
            entry = {"stage": stage, "steps": len(items), "ran": 0}
            self.stages.append(entry)
            for item in items:
                if self.ctx.mode == "gpu" and time.perf_counter() + item.estimate_s > stage_deadline:
                    self.results[item.name] = {"status": "not run", "reason": "stage time box reached"}
                    continue
                step_start, step_misses = time.perf_counter(), len(self.compiles.misses)
                result = _run_step(self.ctx, item)
                result["wall_s"] = round(time.perf_counter() - step_start, 2)
                result["compiles"] = result.get("compiles", 0) + len(self.compiles.misses) - step_misses
                self.results[item.name] = result
                entry["ran"] += 1
                compiled = f", {result['compiles']} GPU compiles" if result["compiles"] else ""
                why = result.get("error", result.get("reason", ""))[:160] if result["status"] in ("error", "skipped") \
                    else ""
                self.log(f"{item.name}: {result['status']} ({result['wall_s']:.1f} s{compiled}) {why}".rstrip())
                entry["wall_s"] = round(time.perf_counter() - stage_start, 2)
                entry["compiles"] = len(self.compiles.misses) - misses
                self.write()
            self.log(f"stage {stage}: {entry['ran']}/{entry['steps']} steps, {entry.get('wall_s', 0):.1f} s, "
                     f"{entry.get('compiles', 0)} Triton compiles on this machine (bundle cache misses)")
        self.log(f"total: {time.perf_counter() - self.start:.1f} s, {len(self.compiles.misses)} Triton compiles "
                 f"(misses), {self.compiles.hits} cache hits, {self.compiles.launcher_builds} launcher builds "
                 f"({self.compiles.launcher_seconds:.1f} s)")
        self.write()
        bad = [n for n, r in self.results.items() if r["status"] in ("fail", "error", "timeout")]
        for name in bad:
            self.log(f"FAILED {name}: {self.results[name].get('error', self.results[name])}"[:400])
        return 1 if bad else 0

    def write(self) -> None:
        """Every output file, whole, each time (a run cut off keeps what it had measured)."""
        import run_all

        folder = self.folder
        folder.mkdir(parents=True, exist_ok=True)
        ctx = self.ctx
        ordered = {k: ctx.summary[k] for k in run_all.TARGETS if k in ctx.summary}
        ordered |= {k: v for k, v in ctx.summary.items() if k not in ordered}
        manifest = {"skipped": ctx.skipped, "errors": ctx.errors}
        document = {
            "env": self.env, "mode": ctx.mode, "budget_s": self.budget, "bundle": self.extra.get("bundle"),
            "setup": self.extra.get("setup"), "stages": self.stages,
            "compiles": {"misses": len(self.compiles.misses), "missed_kernels": sorted(set(self.compiles.misses)),
                         "hits": self.compiles.hits, "launcher_builds": self.compiles.launcher_builds,
                         "launcher_seconds": round(self.compiles.launcher_seconds, 1)},
            "steps": self.results,
        }
        files = {
            "gpu_check.json": json.dumps(document, indent=1, default=str),
            "summary.json": json.dumps(ordered, indent=1),
            "summary.md": run_all.markdown(ordered, ctx.rows, self.env, manifest),
            "rows.json": json.dumps({"rows": ctx.rows, **manifest}, indent=1, default=str),
            "sanitizer.log": "\n".join(ctx.sanitizer_log) or "(the sanitizer stage did not run)\n",
            "gpu_check.log": "\n".join(self.log_lines) + "\n",
        }
        for name, text in files.items():
            data = text.encode()[-MAX_FILE_BYTES:]
            tmp = folder / f".{name}.tmp"
            tmp.write_bytes(data)
            os.replace(tmp, folder / name)


def _environment(ctx: Context) -> dict:
    import harness

    env = harness.environment(ctx.device, smoke=ctx.mode == "dry")
    if ctx.mode == "dry":
        env["device_slug"] = "cpu-dry"
    return env


def check_outputs(out: Path) -> list[str]:
    """What breaks the device tool's rules for files coming back (at most 8 files of at most 16 MiB, at
    most two folders deep, names of letters, digits, '.', '_', '-')."""
    problems, files = [], [p for p in out.rglob("*") if p.is_file()]
    if len(files) > MAX_FILES:
        problems.append(f"{len(files)} files, at most {MAX_FILES}")
    for path in out.rglob("*"):
        parts = path.relative_to(out).parts
        if path.is_file() and len(parts) > 3:
            problems.append(f"{path}: more than two folders deep")
        if not SAFE_NAME.fullmatch(path.name):
            problems.append(f"{path}: name has characters other than letters, digits, '.', '_', '-'")
        if path.is_file() and path.stat().st_size > MAX_FILE_BYTES:
            problems.append(f"{path}: {path.stat().st_size} bytes, at most {MAX_FILE_BYTES}")
    return problems


# ---- setup on the GPU machine -------------------------------------------------------------------------------


def unpack_cache(bundle: Path) -> Path | None:
    """The bundle's Triton cache unpacked into ``<bundle>/triton-cache`` with its paths relocated, or None."""
    archive, cache = bundle / "triton-cache.tar.xz", bundle / "triton-cache"
    if not archive.is_file():
        return None
    shutil.rmtree(cache, ignore_errors=True)
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if m.isfile() and SAFE_NAME.fullmatch(m.name.replace("/", ""))]
        tar.extractall(cache, members=members)
    relocate_cache(cache)
    return cache


def relocate_cache(cache: Path) -> int:
    """Triton's cache groups name their files by absolute path: point them at where the cache is now.
    Returns the number of compiled kernels (metadata groups) in it."""
    groups = 0
    for group in cache.glob("*/__grp__*.json"):
        data = json.loads(group.read_text())
        children = {name: str(group.parent / name) for name in data.get("child_paths", {})
                    if (group.parent / name).is_file()}
        group.write_text(json.dumps({"child_paths": children}))
        groups += 1
    return groups


def install(bundle: Path) -> dict:
    """Copy the bundled extensions into peftkern/, install the checkout without building, point Triton at
    the bundled cache. Returns what it did (gpu_check.json's "setup")."""
    start, info = time.perf_counter(), {}
    tag = f"cpython-{sys.version_info.major}{sys.version_info.minor}"
    built = sorted((bundle / "peftkern").glob("*.so")) if bundle.is_dir() else []
    matching = [p for p in built if tag in p.name]
    for path in matching:
        shutil.copy2(path, REPO / "peftkern" / path.name)
    info["extensions"] = [p.name for p in matching]
    env = dict(os.environ, PEFTKERN_NO_CUDA="1")
    if not matching:  # degrade: build here, Hopper only, with every core (a minute or two of the window)
        info["extensions_problem"] = (f"no bundled extension for {tag} ({[p.name for p in built]}): building "
                                      "_C here for sm_90a with MAX_JOBS=16")
        print(f"gpu-check: {info['extensions_problem']}", flush=True)
        env = dict(os.environ, PEFTKERN_CUDA_ARCHS="90a", MAX_JOBS="16")
    done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps",
                           "--no-index", "-e", str(REPO)], env=env, capture_output=True, text=True, timeout=300)
    info["pip"] = "ok" if done.returncode == 0 else f"exit {done.returncode}: {(done.stdout + done.stderr)[-600:]}"
    if done.returncode != 0:  # the checkout still imports from its root, triton_kernels through a link
        link = REPO / "peftkern" / "triton_kernels"
        if not link.exists():
            link.symlink_to("../triton_kernels")
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    cache = unpack_cache(bundle)
    info["bundled_kernels"] = 0 if cache is None else relocate_cache(cache)
    if cache is not None:
        os.environ["TRITON_CACHE_DIR"] = str(cache)
    manifest = bundle / "manifest.json"
    info["manifest"] = json.loads(manifest.read_text()) if manifest.is_file() else None
    info["seconds"] = round(time.perf_counter() - start, 1)
    return info


def _bundle_agrees(info: dict) -> list[str]:
    """Why the bundled cache's keys will not match this machine's Triton (empty: they should)."""
    manifest = info.get("manifest") or {}
    if not manifest:
        return ["no .gpu-bundle/manifest.json: every kernel compiles here"]
    import triton
    from triton.runtime.cache import triton_key

    problems = []
    import hashlib

    mine = hashlib.sha256(triton_key().encode()).hexdigest()
    if manifest.get("triton_key_sha256") != mine:
        problems.append(f"triton {triton.__version__} here has key {mine[:12]}, the bundle was made for "
                        f"{str(manifest.get('triton_key_sha256'))[:12]} (triton {manifest.get('triton')})")
    return problems


# ---- command line ---------------------------------------------------------------------------------------


def dry_key_check(bundle: Path, quick: bool) -> dict:
    """The launches the real run makes, looked up in the bundle (gpu_bundle.py --keys, triton 3.6, a
    separate process: this one runs the interpreter)."""
    compat = REPO / ".triton-compat" / "3.6.0"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(compat), str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "keys.json"
        command = [sys.executable, str(BENCH_DIR / "gpu_bundle.py"), "--keys", "--bundle", str(bundle),
                   "--report", str(report)] + (["--only", "correctness/lora/"] if quick else [])
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
        if done.returncode != 0 or not report.is_file():
            raise SystemExit(f"gpu-check dry run: the key check failed (exit {done.returncode}):\n"
                             f"{(done.stdout + done.stderr)[-4000:]}")
        return json.loads(report.read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default_out = Path(os.environ.get("GPU_CHECK_OUT") or REPO / "benchmarks" / "results")
    parser.add_argument("--out", type=Path, default=default_out, help="results root ($GPU_CHECK_OUT)")
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET, help="seconds for all stages")
    parser.add_argument("--install", action="store_true", help="install from .gpu-bundle/ first (GPU machine)")
    parser.add_argument("--bundle", type=Path, default=BUNDLE)
    parser.add_argument("--dry", action="store_true", help="CPU: tiny shapes, interpreter, and the key check")
    parser.add_argument("--quick", action="store_true", help="with --dry: one step per stage (make test)")
    parser.add_argument("--only", nargs="+", default=None, help="step name prefixes")
    parser.add_argument("--worker", nargs="+", default=None, help=argparse.SUPPRESS)  # the sanitizer's child
    parser.add_argument("--report", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--setup-info", type=Path, default=None, help=argparse.SUPPRESS)  # after --install
    args = parser.parse_args(argv)
    args.bundle = args.bundle.resolve()  # the cache's groups name absolute paths

    setup = None
    if args.install:  # then start again, so that this process sees the editable install
        setup = install(args.bundle)
        info = Path(tempfile.mkstemp(prefix="gpu-check-setup-", suffix=".json")[1])
        info.write_text(json.dumps(setup, default=str))
        argv = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--install"]
        os.execv(sys.executable, [sys.executable, str(Path(__file__).resolve()), *argv, "--setup-info", str(info)])
    if args.setup_info:
        setup = json.loads(args.setup_info.read_text())
    elif not args.dry and "TRITON_CACHE_DIR" not in os.environ:
        cache = unpack_cache(args.bundle)
        if cache is not None:
            os.environ["TRITON_CACHE_DIR"] = str(cache)
    if args.dry:
        os.environ["TRITON_INTERPRET"] = "1"
    sys.path[:0] = [str(BENCH_DIR)]
    import torch

    gpu = torch.cuda.is_available() and not args.dry
    if not gpu and not args.dry:
        raise SystemExit("gpu-check: no CUDA GPU visible; on a CPU machine run `make gpu-check-dry`")
    device = torch.device("cuda" if gpu else "cpu")
    scratch = Path(tempfile.mkdtemp(prefix="peftkern-gpu-check-"))
    ctx = Context("gpu" if gpu else "dry", device, scratch)

    if args.worker:  # compute-sanitizer's child: a few correctness steps, a JSON report
        compiles = Compiles()
        if gpu:
            compiles.install()
        results = {name: _run_step(ctx, next(s for s in PLAN if s.name == name)) for name in args.worker}
        args.report.write_text(json.dumps({"steps": results, "compiles": len(compiles.misses)}, default=str))
        return 0

    runner = Runner(ctx, args.out, args.budget, args.only, args.quick)
    runner.extra["setup"] = setup
    if gpu:
        runner.log(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, "
                   f"triton cache {os.environ.get('TRITON_CACHE_DIR', '(default: none bundled)')}")
        if setup:
            runner.log(f"setup: {json.dumps({k: v for k, v in setup.items() if k != 'manifest'})}")
        problems = _bundle_agrees(setup or {"manifest": _read_manifest(args.bundle)})
        for problem in problems:
            runner.log(f"BUNDLE: {problem}")
        runner.extra["bundle"] = {"agrees": not problems, "problems": problems}
        import peftkern

        runner.log(f"cuda backend: {peftkern.cuda_backend_status()}")
    code = runner.run()
    shutil.rmtree(scratch, ignore_errors=True)
    if not args.dry:
        runner.log(f"results in {runner.folder}")
        return code
    problems = check_outputs(args.out)
    for problem in problems:
        print(f"gpu-check dry run: output rule broken: {problem}")
    keys = dry_key_check(args.bundle, args.quick)
    for miss in keys["missing"][:10]:
        print(f"not covered: {miss}")
    steps = len(runner.steps()) if args.quick else len(PLAN)
    print(f"gpu-check dry run: {steps} steps, {keys['bundle_compiles']} compiles in the bundle, "
          f"{len(keys['missing'])} not covered")
    # The full dry run fails when the bundle lacks a launch; the quick one (make test: no bundle) reports it.
    return 1 if code or problems or (keys["missing"] and not args.quick) else 0


def _read_manifest(bundle: Path) -> dict | None:
    path = bundle / "manifest.json"
    return json.loads(path.read_text()) if path.is_file() else None


if __name__ == "__main__":
    sys.exit(main())
