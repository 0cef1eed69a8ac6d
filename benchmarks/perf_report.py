"""The static performance report: what the compiler made of every Triton kernel, and what every op call
launches, syncs and moves, measured without a GPU (``make perf-report``).

Writes three files under ``benchmarks/results/static/`` (RESULTS.md explains every column):

kernels.json  one row per Triton kernel x dtype case x autotune config (x the compile's constexpr switches),
              compiled for sm_90a (``--full``: and sm_80) by Triton's compiler and its bundled ptxas, as
              ``tests/_triton_compile.py`` does (its stand-in driver; nothing runs). The kernels are those
              the ops launch at the rows of ops.json, in each case of ``CASES``, every autotune config.
ops.json      one row per op x mode x shape x provider: every launch (Triton kernels and torch kernels),
              every host read of a device value, the bytes of each launch's tensor arguments, the floor.
              The op's own code runs as on CUDA tensors: the default CUDA backend (triton) with default
              arguments, on CPU tensors, each Triton launch compiled and counted but not run, each torch op
              counted by a dispatch mode. Matrix products are not computed (their outputs are left empty):
              no figure here depends on values.
saved_bytes.json  bytes autograd saves for backward (parameters excluded), ours vs peft, per op and for a
              small Llama (bench_train.py's, scaled down), dropout 0 and 0.1.
cuda_kernels.json  one row per CUDA C++ kernel of every ``csrc/*.cu`` unit compiled for sm_90a by nvcc
              (``benchmarks/cuda_static.py``): registers, spills, static shared memory, vector vs scalar
              global loads, async copies, tensor-core and FMA instructions (from SASS where cuobjdump is
              installed, else from the PTX); no rows where nvcc is missing.

Each file carries ``source_sha256``: ``hashlib.sha256`` over the kernel and op sources (see
:func:`source_sha256`; for cuda_kernels.json over ``csrc/``, :func:`csrc_sha256`); ``--check`` compares the
committed files' with the current sources' in seconds.

    python benchmarks/perf_report.py            # regenerate (TRITON_INTERPRET unset; at most 25 min on 2 cores)
    python benchmarks/perf_report.py --full     # also sm_80 (twice as long)
    python benchmarks/perf_report.py --check    # exit 1 when the committed report is stale
"""

from __future__ import annotations

import argparse
import ast
import concurrent.futures
import contextlib
import functools
import hashlib
import json
import multiprocessing
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "benchmarks" / "results" / "static"
FILES = ("kernels.json", "ops.json", "saved_bytes.json", "cuda_kernels.json")
CUDA_SOURCES = ("*.cu", "*.cuh", "*.h")


def _sha256(root: Path, folders: tuple[str, ...], patterns: tuple[str, ...]) -> str:
    digest = hashlib.sha256()
    for folder in folders:
        found = {p.relative_to(root) for pattern in patterns for p in (root / folder).rglob(pattern)}
        for path in sorted(found):
            digest.update(path.as_posix().encode())
            digest.update(b"\0")
            digest.update((root / path).read_bytes())
    return digest.hexdigest()


def source_sha256(root: Path = REPO) -> str:
    """sha256 fed, for each kernel and op source (sorted triton_kernels/**/*.py, then sorted
    peftkern/ops/**/*.py), its repository-relative posix path, a NUL byte and its bytes."""
    return _sha256(root, ("triton_kernels", "peftkern/ops"), ("*.py",))


def csrc_sha256(root: Path = REPO) -> str:
    """As :func:`source_sha256` over the CUDA C++ sources (csrc/**/*.cu, *.cuh, *.h)."""
    return _sha256(root, ("csrc",), CUDA_SOURCES)


def check_current(out: Path = OUT) -> list[str]:
    """Why the committed report does not describe the current sources (empty: it does)."""
    problems = []
    for name in FILES:
        current = csrc_sha256() if name == "cuda_kernels.json" else source_sha256()
        path = out / name
        if not path.is_file():
            problems.append(f"{path.relative_to(REPO)}: missing")
            continue
        recorded = json.loads(path.read_text()).get("source_sha256")
        if recorded != current:
            problems.append(f"{path.relative_to(REPO)}: made from sources {recorded}, current {current}")
    return problems


if __name__ == "__main__" and "--check" in sys.argv:  # seconds: no torch, no triton
    stale = check_current()
    print("\n".join(stale) if stale else f"static report current (source_sha256 {source_sha256()})")
    sys.exit(1 if stale else 0)

sys.path[:0] = [str(REPO), str(REPO / "tests"), str(REPO / "benchmarks")]

import _triton_compile as compile_check  # noqa: E402  (the stand-in driver; refuses TRITON_INTERPRET=1)
import cuda_static  # noqa: E402
import harness  # noqa: E402  (the benches' baselines import it; it sets TRITON_INTERPRET=1 without a GPU)

os.environ.pop("TRITON_INTERPRET", None)  # compile, never interpret (the kernels read it when launched)
import torch  # noqa: E402
import triton  # noqa: E402
from torch._library import custom_ops  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_flatten, tree_map  # noqa: E402
from torch.utils.flop_counter import flop_registry  # noqa: E402

import peftkern  # noqa: E402
from peftkern.backends import resolve_backend, use_backend  # noqa: E402
from peftkern.ops import _checks, lora_batch, lora_serving, multi_lora, prompt  # noqa: E402
from peftkern.ops.multi_lora import batch_segments  # noqa: E402

# The op modules that pick check_ids' default by device (see counting()).
_CHECK_DEFAULT_USERS = (lora_batch, lora_serving, multi_lora, prompt)

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
# (name, activation dtype, adapter dtype, TF32 allowed): torch's default is TF32 off, so "fp32" is IEEE fp32.
CASES = [
    ("x=bf16,adapters=bf16", BF16, BF16, False),
    ("x=fp16,adapters=fp16", F16, F16, False),
    ("x=bf16,adapters=fp32", BF16, F32, False),
    ("x=fp16,adapters=fp32", F16, F32, False),
    ("x=fp32,adapters=fp32", F32, F32, False),
    ("x=fp32,adapters=fp32,tf32", F32, F32, True),
]
OPS_CASE = CASES[0][0]  # ops.json: bf16 throughout, as the benches
aten = torch.ops.aten


# ---- kernels: what the compiler made of each kernel -----------------------------------------------------


def _jit_functions() -> dict[str, ast.FunctionDef]:
    """Every @triton.jit function of triton_kernels/, by name."""
    found = {}
    for path in sorted((REPO / "triton_kernels").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and any("jit" in ast.unparse(d) for d in node.decorator_list):
                found[node.name] = node
    return found


def _call_name(call: ast.Call) -> str:
    return ast.unparse(call.func)


@functools.cache
def kernel_access(name: str) -> tuple[frozenset[str], frozenset[str], bool]:
    """(parameters loaded from, parameters stored to, calls tl.dot) of a @triton.jit function, through the
    @triton.jit helpers it calls: read from the source. A parameter is read when a ``tl.load`` address (or
    a helper's read parameter) derives from it through the function's assignments; written likewise."""
    functions = _jit_functions()
    node = functions[name]
    params = [a.arg for a in node.args.args]
    derives: dict[str, set[str]] = {}
    for stmt in ast.walk(node):
        targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target] if isinstance(
            stmt, (ast.AugAssign, ast.AnnAssign, ast.For)) else []
        value = stmt.iter if isinstance(stmt, ast.For) else getattr(stmt, "value", None)
        if not targets or not isinstance(value, ast.AST):
            continue
        names = {n.id for n in ast.walk(value) if isinstance(n, ast.Name)}
        for target in targets:
            for n in ast.walk(target):
                if isinstance(n, ast.Name):
                    derives.setdefault(n.id, set()).update(names)

    def roots(expr: ast.AST) -> set[str]:
        seen, todo = set(), [n.id for n in ast.walk(expr) if isinstance(n, ast.Name)]
        while todo:
            var = todo.pop()
            if var not in seen:
                seen.add(var)
                todo += derives.get(var, ())
        return seen & set(params)

    # An address is a base pointer plus offsets (``X + rows * stride + cols``): its base is the leftmost
    # operand of the sum, followed through the local assignments that build it. Offsets (row indices, ranks
    # returned by a helper that also read tensors) are not the tensor addressed.
    values: dict[str, list[ast.AST]] = {}
    for stmt in ast.walk(node):
        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
            values.setdefault(stmt.targets[0].id, []).append(stmt.value)

    def base_roots(expr: ast.AST, seen: frozenset = frozenset()) -> set[str]:
        while isinstance(expr, ast.BinOp) and isinstance(expr.op, (ast.Add, ast.Sub)):
            expr = expr.left
        while isinstance(expr, ast.Subscript):
            expr = expr.value
        if isinstance(expr, ast.Name):
            if expr.id in params:
                return {expr.id}
            if expr.id in values and expr.id not in seen:
                return set().union(*(base_roots(v, seen | {expr.id}) for v in values[expr.id]))
        return roots(expr)  # a form this does not follow: every parameter it derives from

    reads, writes, dot = set(), set(), False
    for call in (n for n in ast.walk(node) if isinstance(n, ast.Call)):
        called = _call_name(call)
        if called == "tl.dot":
            dot = True
        elif called == "tl.load" and call.args:
            reads |= base_roots(call.args[0])
        elif (called == "tl.store" or called.startswith("tl.atomic")) and call.args:
            writes |= base_roots(call.args[0])
            if called.startswith("tl.atomic"):
                reads |= base_roots(call.args[0])
        elif called in functions and called != name:
            inner_reads, inner_writes, inner_dot = kernel_access(called)
            dot |= inner_dot
            inner_params = [a.arg for a in functions[called].args.args]
            bound = dict(zip(inner_params, call.args))
            bound.update({k.arg: k.value for k in call.keywords if k.arg})
            for param, expr in bound.items():
                if param in inner_reads:
                    reads |= roots(expr)
                if param in inner_writes:
                    writes |= roots(expr)
    return frozenset(reads), frozenset(writes), dot


_OPCODE = re.compile(r"^\s*(?:@!?%\w+\s+)?([a-z][\w.]*)", re.MULTILINE)


def ptx_counts(ptx: str) -> dict[str, int]:
    """Static instruction counts in the PTX (instructions in the code, not executions)."""
    counts = {"tensor_core_instructions": 0, "fma_instructions": 0, "global_vector_loads": 0,
              "global_scalar_loads": 0}
    for line in ptx.splitlines():
        match = _OPCODE.match(line)
        if not match:
            continue
        op = match.group(1)
        if op.startswith(("wgmma.mma_async", "mma.sync", "wmma.mma")):
            counts["tensor_core_instructions"] += 1
        elif op.startswith("fma."):
            counts["fma_instructions"] += 1
        elif op.startswith("ld.global"):
            vector = any(f".v{n}" in op for n in (2, 4, 8))
            counts["global_vector_loads" if vector else "global_scalar_loads"] += 1
        elif op.startswith("cp.async.bulk"):
            counts["global_vector_loads"] += 1
        elif op.startswith("cp.async.") and ".shared.global" in op:
            size = re.search(r",\s*(\d+)\s*(?:,|;)", line.split("]", 2)[-1])
            vector = size is not None and int(size.group(1)) >= 8
            counts["global_vector_loads" if vector else "global_scalar_loads"] += 1
    return counts


def _switches(kernel) -> dict[str, object]:
    """The constexpr arguments of a compile that are not autotune meta-parameters (HAS_BIAS, DOT_FP32, ...)."""
    fn = kernel.src.fn
    constexprs = {p.name for p in fn.params if p.is_constexpr}
    values = {fn.arg_names[key[0]]: value for key, value in kernel.src.constants.items() if len(key) == 1}
    meta = {"BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP"}
    return {k: (v if isinstance(v, (bool, int, float, str)) or v is None else str(v))
            for k, v in sorted(values.items()) if k in constexprs and k not in meta}


# ---- ops: what each call launches, syncs and moves -------------------------------------------------------

# Ops that read a device value on the host (on CUDA: a synchronisation), or whose output shape depends on
# values (data-dependent: the host waits for the count).
_SYNC_OPS = {aten._local_scalar_dense.default, aten.nonzero.default, aten._unique2.default,
             aten.unique_consecutive.default, aten.unique_dim.default, aten.masked_select.default,
             aten.equal.default, aten.bincount.default, aten.is_nonzero.default}
# Matrix products: counted (launch, bytes, FLOPs) but not computed.
_MATMULS = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default, aten.linear.default,
            aten.matmul.default}
# Allocations and metadata: no kernel.
_NO_KERNEL = {aten.empty.memory_format, aten.empty_strided.default, aten.empty_like.default,
              aten.new_empty.default, aten.new_empty_strided.default, aten.detach.default,
              aten._unsafe_view.default,
              aten.resize_.default, aten.set_.source_Storage_storage_offset, aten._local_scalar_dense.default}
# In-place ops that overwrite their destination without reading it.
_OVERWRITE = {"fill_", "zero_", "copy_", "normal_", "uniform_", "random_", "bernoulli_", "exponential_"}


def _tensors(tree) -> list[torch.Tensor]:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


def _span(t: torch.Tensor) -> tuple[int, int, int]:
    """(storage, first byte, end byte) of the memory a tensor's elements cover (its full extent)."""
    size = t.element_size()
    start = t.storage_offset() * size
    if t.numel() == 0:
        return t.untyped_storage().data_ptr(), start, start
    reach = sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride()))
    return t.untyped_storage().data_ptr(), start, start + (reach + 1) * size


def unique_bytes(tensors: list[torch.Tensor]) -> int:
    """Bytes covered by these tensors' extents, overlaps counted once."""
    spans: dict[int, list[tuple[int, int]]] = {}
    for t in tensors:
        storage, start, end = _span(t)
        spans.setdefault(storage, []).append((start, end))
    total = 0
    for ranges in spans.values():
        reach = -1
        for start, end in sorted(ranges):
            start = max(start, reach)
            if end > start:
                total += end - start
            reach = max(reach, end)
    return total


class Count(TorchDispatchMode):
    """Counts, while active, every kernel launch (torch ops and, through :func:`counting`, Triton kernels),
    every host read of a device value, the bytes of each launch (unique bytes read + bytes written, each
    the full extent of the tensor arguments) and the matrix products' FLOPs."""

    def __init__(self) -> None:
        super().__init__()
        self.launches: list[str] = []
        self.grids: dict[str, list[int]] = {}  # Triton kernel: programs in each launch's grid
        self.syncs: list[str] = []
        self.bytes = 0
        self.flops = 0

    def launch(self, name: str, reads: list[torch.Tensor], writes: list[torch.Tensor]) -> None:
        self.launches.append(name)
        self.bytes += unique_bytes(reads) + unique_bytes(writes)

    def sync(self, what: str) -> None:
        self.syncs.append(what)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if func.namespace == "peftkern":  # our custom ops launch nothing themselves: count inside them
            with self:
                return custom_ops.OPDEFS[func._schema.name]._init_fn(*args, **kwargs)
        if func in _SYNC_OPS or (func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is None):
            self.sync(name)
        if func is aten.index.Tensor and any(t.dtype == torch.bool for t in _tensors(args[1])):
            self.sync("index with a boolean mask (nonzero)")
        if func is aten.lift_fresh.default:  # torch.tensor(host data, device=...): a host-to-device copy
            self.launch("copy host to device", [], [args[0]])
            return func(*args, **kwargs)
        if func.is_view or func in _NO_KERNEL:
            return func(*args, **kwargs)
        if func in _MATMULS:
            meta = func(*tree_map(lambda t: t.to("meta") if isinstance(t, torch.Tensor) else t, args),
                        **kwargs)
            out = torch.empty_strided(meta.shape, meta.stride(), dtype=meta.dtype, device=_tensors(args)[0].device)
        else:
            out = func(*args, **kwargs)
        if func in (aten.linear.default, aten.matmul.default):  # one GEMM (mm or addmm on CUDA)
            self.flops += 2 * out.numel() * args[0].shape[-1]
        elif func.overloadpacket in flop_registry:
            self.flops += flop_registry[func.overloadpacket](*args, **kwargs, out_val=out)
        schema = func._schema
        written, read = [], []
        for argument, value in zip(schema.arguments, list(args) + [kwargs.get(a.name) for a in
                                                                    schema.arguments[len(args):]]):
            tensors = _tensors(value)
            if argument.alias_info is not None and argument.alias_info.is_write:
                written += tensors
                if not (name in _OVERWRITE and argument.name == "self"):
                    read += tensors
            else:
                read += tensors
        outputs = [t for t in _tensors(out) if not any(t is w for w in written)]
        self.launch(name, read, written + outputs)
        return out


def _host_read(method: str, original: Callable, counter: Count) -> Callable:
    def read(self, *args, **kwargs):
        counter.sync(method)
        with torch.utils._python_dispatch._disable_current_modes():
            return original(self, *args, **kwargs)

    return read


@contextlib.contextmanager
def counting(counter: Count, arch: int = 90, first_config: bool = True,
             record: Callable = lambda *_: None) -> Iterator[Count]:
    """Count inside: torch ops through the dispatch mode, Triton launches through the stand-in driver
    (compiled for sm_<arch>, not run; an autotuned launch counts once, whichever configs compile), host
    reads that skip the dispatcher (``tolist``, ``cpu``, ``numpy``) through wrappers."""

    def launched(fn, bound, programs):
        reads, writes, _ = kernel_access(fn.fn.__name__)
        counter.grids.setdefault(f"triton {fn.fn.__name__}", []).append(programs)
        tensor = lambda names: [bound[n] for n in names if isinstance(bound.get(n), torch.Tensor)]
        written = tensor(writes)
        # A launcher passes an output as the placeholder of a disabled optional input (HAS_BIAS=False):
        # a tensor written through one parameter and "read" through another counts as written only.
        read = [t for t in tensor(reads - writes) if not any(t is w for w in written)] + tensor(reads & writes)
        counter.launch(f"triton {fn.fn.__name__}", read, written)

    methods = {name: getattr(torch.Tensor, name) for name in ("tolist", "cpu", "numpy")}
    # Defaults that depend on the device (check_ids: a host check on CPU tensors, none on CUDA ones) take
    # their CUDA value: the calls run on CPU tensors standing in for CUDA ones.
    check_users = [module for module in _CHECK_DEFAULT_USERS if hasattr(module, "host_check_default")]
    cuda_default = lambda check_ids, device: _checks.host_check_default(check_ids, torch.device("cuda"))
    with compile_check.compile_only(arch, first_config, record, launched):
        for name, original in methods.items():
            setattr(torch.Tensor, name, _host_read(name, original, counter))
        for module in check_users:
            module.host_check_default = cuda_default
        try:
            with counter:
                yield counter
        finally:
            for name, original in methods.items():
                setattr(torch.Tensor, name, original)
            for module in check_users:
                module.host_check_default = _checks.host_check_default


# ---- the op calls measured -------------------------------------------------------------------------------


class Call:
    """One op call of ops.json: ``run()`` returns (outputs, the forward's tensor inputs); with ``train``
    the outputs get a backward. ``params``: the weights (left out of the saved bytes)."""

    def __init__(self, op: str, shape: dict, provider: str, run: Callable, train: bool,
                 backend: str | None = None) -> None:
        self.op, self.shape, self.provider, self.run, self.train = op, shape, provider, run, train
        self.params: list[torch.Tensor] = []
        self.backend = backend  # ours on this backend rather than the op's default on CUDA tensors


def _with_params(calls: list[Call], params) -> list[Call]:
    for call in calls:
        call.params = list(params)
    return calls


def _leaf(*shape, dtype, grad=False):
    return torch.randn(*shape, dtype=dtype).mul_(0.1).requires_grad_(grad)


def lora_calls(act, ad, decode: bool, dropout_p: float, providers: bool) -> list[Call]:
    import bench_lora

    tokens = 64 if decode else bench_lora.HEADLINE["tokens"]
    hidden, rank = bench_lora.HEADLINE["hidden"], bench_lora.HEADLINE["rank"]
    shape = {"tokens": tokens, "hidden": hidden, "rank": rank, "dropout_p": dropout_p}
    x = _leaf(tokens, hidden, dtype=act, grad=True)
    weight = _leaf(hidden, hidden, dtype=act)
    lora_a, lora_b = _leaf(rank, hidden, dtype=ad, grad=True), _leaf(hidden, rank, dtype=ad, grad=True)
    alpha = bench_lora.ALPHA_OVER_RANK * rank
    calls = [Call("lora_linear", shape, "ours", lambda: (peftkern.lora_linear(
        x, weight, None, lora_a, lora_b, alpha / rank, dropout_p), [x, weight, lora_a, lora_b]), True)]
    params = [weight, lora_a, lora_b]
    if providers:
        unfused, unfused_params = bench_lora._unfused(weight, lora_a.detach(), lora_b.detach(), alpha / rank,
                                                      dropout_p)
        layer, _ = bench_lora._peft_layer(weight, lora_a.detach(), lora_b.detach(), alpha, dropout_p)
        calls += [Call("lora_linear", shape, "torch_unfused", lambda: (unfused(x), [x, weight, lora_a, lora_b]),
                       True),
                  Call("lora_linear", shape, "peft", lambda: (layer(x), [x, weight, lora_a, lora_b]), True)]
        params += [*unfused_params, *layer.parameters()]
    return _with_params(calls, params)


def dora_calls(act, ad, dropout_p: float, providers: bool) -> list[Call]:
    """DoRA at bench_lora's headline shape: ours (dora_linear) and peft's use_dora layer."""
    import bench_lora

    tokens, hidden, rank = bench_lora.HEADLINE["tokens"], bench_lora.HEADLINE["hidden"], bench_lora.HEADLINE["rank"]
    shape = {"tokens": tokens, "hidden": hidden, "rank": rank, "dropout_p": dropout_p}
    x = _leaf(tokens, hidden, dtype=act, grad=True)
    weight = _leaf(hidden, hidden, dtype=act)
    lora_a, lora_b = _leaf(rank, hidden, dtype=ad, grad=True), _leaf(hidden, rank, dtype=ad, grad=True)
    magnitude = _leaf(hidden, dtype=ad, grad=True)
    alpha = bench_lora.ALPHA_OVER_RANK * rank
    inputs = [x, weight, lora_a, lora_b, magnitude]
    calls = [Call("dora_linear", shape, "ours", lambda: (peftkern.dora_linear(
        x, weight, None, lora_a, lora_b, magnitude, alpha / rank, dropout_p), inputs), True)]
    params = [weight, lora_a, lora_b, magnitude]
    if providers:
        layer, _ = bench_lora._peft_layer(weight, lora_a.detach(), lora_b.detach(), alpha, dropout_p,
                                          magnitude.detach())
        calls.append(Call("dora_linear", shape, "peft", lambda: (layer(x), inputs), True))
        params += list(layer.parameters())
    return _with_params(calls, params)


def multi_lora_calls(act, ad, key: str, providers: bool) -> list[Call]:
    import bench_multi_lora as bench

    tokens, adapters, rank = bench.HEADLINE[key]
    hidden = bench.HIDDEN
    torch.manual_seed(0)
    pool = bench._Pool(torch.device("cpu"), hidden, bench.slot_ranks(adapters, rank), act)
    lora_a, lora_b = pool.lora_a.to(ad), pool.lora_b.to(ad)
    ids, requests, length = bench.batch_ids(tokens, adapters)
    train = tokens >= bench.TRAIN_TOKENS
    x = _leaf(tokens, hidden, dtype=act, grad=train)
    if train:
        lora_a, lora_b = lora_a.requires_grad_(), lora_b.requires_grad_()
    inputs = [x, pool.weight, lora_a, lora_b, ids, pool.scalings, pool.ranks]
    path = "decode" if tokens <= bench.DECODE_TOKENS else "prefill"
    shape = {"path": path, "tokens": tokens, "hidden": hidden, "adapters": adapters, "rank": rank}
    calls = [Call("multi_lora_linear", shape, "ours", lambda: (peftkern.multi_lora_linear(
        x, pool.weight, None, lora_a, lora_b, ids, pool.scalings, pool.ranks), inputs), train)]
    # One layer's call with the step's LoRABatch built beforehand (once per step for every layer, as a
    # serving stack or AdapterPool.batch does): what a layer costs.
    batch = peftkern.LoRABatch(ids, adapters)
    batch_segments(batch, path, backward=train)
    calls.append(Call("multi_lora_linear", shape, "ours_prebuilt_batch", lambda: (peftkern.multi_lora_linear(
        x, pool.weight, None, lora_a, lora_b, batch, pool.scalings, pool.ranks), inputs), train))
    params = [pool.weight, lora_a, lora_b]
    if providers:
        if not train:
            model = bench._peft_model(pool)
            params += list(model.parameters())
            names = [f"a{int(i)}" for i in ids[::length]]
            batched = x.view(requests, length, hidden)
            calls.append(Call("multi_lora_linear", shape, "peft_mixed_batch", lambda: (
                model(batched, adapter_names=names).reshape(tokens, hidden), inputs), False))
            calls.append(Call("multi_lora_linear", shape, "torch_gather_bmm", lambda: (bench._gather_bmm(
                x, pool.weight, lora_a, lora_b, ids, pool.scalings), inputs), False))
        scalings = pool.scalings.tolist()
        calls.append(Call("multi_lora_linear", shape, "loop_per_adapter", lambda: (bench._loop_per_adapter(
            x, pool.weight, lora_a, lora_b, ids, pool.slot_ranks, scalings), inputs), train))
    return _with_params(calls, params)


def prompt_calls(act, ad, short: bool, providers: bool) -> list[Call]:
    import bench_prompt as bench

    shapes = {**bench.HEADLINE, "hidden": bench.HIDDEN, "vocab": bench.VOCAB, "tasks": bench.TASKS}
    if short:
        shapes.update(batch=1, tokens=128)
    input_ids, embed_weight, prompts, prompt_ids, mask, labels = bench._inputs(torch.device("cpu"), shapes, act)
    prompts = prompts.detach().to(ad).requires_grad_()
    inputs = [input_ids, embed_weight, prompts, prompt_ids, mask, labels]
    calls = [Call("prompt_concat", shapes, "ours", lambda: (tuple(peftkern.prompt_concat(
        input_ids, embed_weight, prompts, prompt_ids, mask, labels)), inputs), True)]
    if providers:
        calls.append(Call("prompt_concat", shapes, "peft_style", lambda: (bench._peft_style(
            input_ids, embed_weight, prompts, prompt_ids, mask, labels), inputs), True))
    _with_params(calls, [embed_weight, prompts])
    # prefix tuning: a Llama-7B-sized model's prefix (32 layers, 32 KV heads of 128) of n virtual tokens
    layers, heads, head_dim = 32, 32, 128
    prefix = _leaf(bench.TASKS, shapes["virtual_tokens"], layers * 2 * heads * head_dim, dtype=ad, grad=True)
    prefix_shape = {"batch": shapes["batch"], "virtual_tokens": shapes["virtual_tokens"], "layers": layers,
                    "kv_heads": heads, "head_dim": head_dim, "tasks": bench.TASKS}
    prefix_calls = [Call("prefix_kv", prefix_shape, "ours", lambda: (peftkern.prefix_kv(
        prefix, prompt_ids, layers, heads), [prefix, prompt_ids]), True)]
    if providers:
        prefix_calls.append(Call("prefix_kv", prefix_shape, "peft_style", lambda: (_peft_prefix(
            prefix, prompt_ids, layers, heads), [prefix, prompt_ids]), True))
    return calls + _with_params(prefix_calls, [prefix])


def _peft_prefix(prefix, prompt_ids, layers, heads):
    """peft's get_prompt for prefix tuning: the rows' tables gathered, then view and permute into
    [layers * 2, B, heads, n, head_dim] and split per layer (peft_model.py)."""
    batch, virtual = prompt_ids.shape[0], prefix.shape[1]
    past = prefix[prompt_ids].view(batch, virtual, layers * 2, heads, -1)
    return past.permute([2, 0, 3, 1, 4]).split(2)


def bottleneck_calls(act, ad, decode: bool, providers: bool) -> list[Call]:
    import bench_adapter as bench

    tokens = 64 if decode else bench.HEADLINE["tokens"]
    hidden, reduction = bench.HEADLINE["hidden"], bench.HEADLINE["reduction"]
    bottleneck = hidden // reduction
    shape = {"tokens": tokens, "hidden": hidden, "reduction": reduction, "bottleneck": bottleneck}
    x = _leaf(tokens, hidden, dtype=act, grad=True)
    weights = [_leaf(bottleneck, hidden, dtype=ad, grad=True), _leaf(bottleneck, dtype=ad, grad=True),
               _leaf(hidden, bottleneck, dtype=ad, grad=True), _leaf(hidden, dtype=ad, grad=True)]
    activation, scaling = bench.ACTIVATION, bench.SCALING
    calls = [Call("bottleneck_adapter", shape, "ours", lambda: (peftkern.bottleneck_adapter(
        x, *weights, activation, scaling), [x, *weights]), True)]
    if providers:
        calls.append(Call("bottleneck_adapter", shape, "torch_unfused", lambda: (bench.unfused(
            x, *weights, activation, scaling), [x, *weights]), True))
    return _with_params(calls, weights)


def serving_calls(act, ad, key: str) -> list[Call]:
    """One attention layer's LoRA around a serving stack's own GEMM: the shrink of x by merged q/k/v slices
    and the expand-add into the fused QKV output (GQA widths hidden, hidden/4, hidden/4), with the step's
    LoRABatch built beforehand (bench_multi_lora's pool sizes and batches)."""
    import bench_multi_lora as bench

    tokens, adapters, rank = {"decode1": (1, 8, 16), **bench.HEADLINE}[key]
    hidden = bench.HIDDEN
    widths = [hidden, hidden // 4, hidden // 4]
    torch.manual_seed(0)
    x = _leaf(tokens, hidden, dtype=act)
    lora_a = [_leaf(adapters, rank, hidden, dtype=ad) for _ in widths]
    lora_b = [_leaf(adapters, width, rank, dtype=ad) for width in widths]
    y = _leaf(tokens, sum(widths), dtype=act)
    ids, _, _ = bench.batch_ids(tokens, adapters)
    ranks = torch.full((adapters,), rank, dtype=torch.int32)
    scalings = torch.full((adapters,), bench.ALPHA_OVER_RANK, dtype=torch.float32)
    path = "decode" if tokens <= bench.DECODE_TOKENS else "prefill"
    batch = peftkern.LoRABatch(ids, adapters)
    batch_segments(batch, path)
    shape = {"path": path, "tokens": tokens, "hidden": hidden, "adapters": adapters, "rank": rank, "slices": 3}
    s = peftkern.lora_shrink(x, lora_a, batch, ranks, backend="torch")
    calls = [
        Call("lora_shrink", shape, "ours", lambda: (peftkern.lora_shrink(x, lora_a, batch, ranks),
                                                     [x, *lora_a, ids, ranks]), False),
        Call("lora_expand_add", shape, "ours", lambda: (peftkern.lora_expand_add(
            y, s, lora_b, batch, scalings, 0, ranks), [y, s, *lora_b, ids, ranks, scalings]), False),
    ]
    return _with_params(calls, [*lora_a, *lora_b])


def _weight_4bit(hidden: int):
    """A [hidden, hidden] NF4 weight in bitsandbytes' storage (double-quantized absmax, blocksize 64) built directly:
    the kernels' work depends on the layout, never on the values (bitsandbytes' CPU quantizer takes seconds)."""
    blocks = hidden * hidden // 64
    return peftkern.Weight4bit(torch.randint(0, 256, (hidden * hidden // 2,), dtype=torch.uint8),
                               torch.randint(0, 256, (blocks,), dtype=torch.uint8), (hidden, hidden), "nf4", 64,
                               BF16, torch.rand(blocks // 256), torch.linspace(-1, 1, 256), 256, torch.tensor(0.1))


def lora4bit_calls(act, ad, decode: bool, dropout_p: float, providers: bool) -> list[Call]:
    """lora_linear_4bit at bench_lora's QLoRA rows (NF4, double quant, blocksize 64, compute dtype = x's): ours on
    triton (the fused kernels; the op's default on CUDA is still its torch backend, whose dropout mask on these
    CPU stand-in tensors would be drawn by the CPU reference, not by the GPU's kernel), and, with ``providers``,
    peft + bitsandbytes and bitsandbytes' dequantize + the unfused LoRA branch over bitsandbytes' own storage."""
    import bench_lora

    tokens = 64 if decode else bench_lora.HEADLINE["tokens"]
    hidden, rank = bench_lora.HEADLINE["hidden"], bench_lora.QLORA_RANK
    shape = {"tokens": tokens, "hidden": hidden, "rank": rank, "dropout_p": dropout_p, "quant_type": "nf4"}
    x = _leaf(tokens, hidden, dtype=act, grad=True)
    base = bench_lora._linear_4bit(_leaf(hidden, hidden, dtype=F32), act) if providers else None
    weight = peftkern.Weight4bit.from_bnb(base.weight) if providers else _weight_4bit(hidden)
    lora_a, lora_b = _leaf(rank, hidden, dtype=ad, grad=True), _leaf(hidden, rank, dtype=ad, grad=True)
    alpha = bench_lora.ALPHA_OVER_RANK * rank
    stored = [weight.packed, weight.absmax, weight.nested_absmax, weight.nested_code]  # W's bytes, in the floor
    calls = [Call("lora_linear_4bit", shape, "ours", lambda: (peftkern.lora_linear_4bit(
        x, weight, None, lora_a, lora_b, alpha / rank, dropout_p, compute_dtype=act), [x, *stored, lora_a, lora_b]),
        True, backend="triton")]
    params = [lora_a, lora_b, *stored]
    if providers:
        unfused, unfused_params = bench_lora._unfused_4bit(base, lora_a, lora_b, alpha / rank, dropout_p, act)
        layer, _ = bench_lora._peft_layer_4bit(base, lora_a.detach(), lora_b.detach(), alpha, dropout_p)
        calls += [Call("lora_linear_4bit", shape, "torch_unfused",
                       lambda: (unfused(x), [x, *stored, *unfused_params]), True),
                  Call("lora_linear_4bit", shape, "peft", lambda: (layer(x), [x, *stored, lora_a, lora_b]), True)]
        params += [*unfused_params, *layer.parameters()]
    return _with_params(calls, params)


# The ops' calls, in groups (the units the compile phase spreads over processes).
GROUPS: dict[str, Callable[..., list[Call]]] = {
    "lora": lambda act, ad, providers: [c for decode, p in [(False, 0.0), (False, 0.1), (True, 0.0)]
                                        for c in lora_calls(act, ad, decode, p, providers)],
    "dora": lambda act, ad, providers: [c for p in (0.0, 0.1) for c in dora_calls(act, ad, p, providers)],
    "lora4bit": lambda act, ad, providers: [c for decode, p in [(False, 0.0), (False, 0.1), (True, 0.0)]
                                            for c in lora4bit_calls(act, ad, decode, p, providers)],
    "multi_lora": lambda act, ad, providers: [c for key in ("decode", "decode64", "prefill")
                                              for c in multi_lora_calls(act, ad, key, providers)],
    "serving": lambda act, ad, providers: [c for key in ("decode1", "decode64", "prefill")
                                           for c in serving_calls(act, ad, key)],
    "prompt": lambda act, ad, providers: [c for short in (False, True)
                                          for c in prompt_calls(act, ad, short, providers)],
    "bottleneck": lambda act, ad, providers: [c for decode in (False, True)
                                              for c in bottleneck_calls(act, ad, decode, providers)],
}


def all_calls(act, ad, providers: bool, groups: list[str] | None = None) -> list[Call]:
    """Every op at the benches' headline shapes and at a decode (or short) shape."""
    return [call for group in groups or GROUPS for call in GROUPS[group](act, ad, providers)]


def _measure(counter: Count) -> dict:
    return {"launches": len(counter.launches), "host_syncs": len(counter.syncs),
            "bytes_per_launch_sum": counter.bytes, "flops": counter.flops,
            "launched": _tally(counter.launches), "synced": _tally(counter.syncs), "programs": counter.grids}


def _tally(names: list[str]) -> dict[str, int]:
    tally: dict[str, int] = {}
    for name in names:
        tally[name] = tally.get(name, 0) + 1
    return tally


def measure_call(call: Call, record: Callable, first_config: bool, arch: int = 90) -> list[dict]:
    """The call's forward (and backward) rows; the FLOPs of ours from the torch backend running the same call
    (Triton kernels' FLOPs are not counted)."""
    backend = None
    if call.provider.startswith("ours"):
        backend = call.backend or resolve_backend(torch.device("cuda"), call.op)
    context = lambda: use_backend(backend) if backend else contextlib.nullcontext()
    torch.manual_seed(0)
    saved: list[torch.Tensor] = []
    with context(), counting(Count(), arch, first_config, record) as forward, \
            torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        outputs, inputs = call.run()
    rows = [{"mode": "forward", **_measure(forward),
             "floor_bytes": unique_bytes(_tensors(inputs)) + unique_bytes(_tensors(outputs))}]
    if call.train:
        grads = [torch.ones_like(t) for t in _tensors(outputs) if t.requires_grad]
        outs = [t for t in _tensors(outputs) if t.requires_grad]
        leaves = [t for t in _tensors(inputs) if t.requires_grad]
        with context(), counting(Count(), arch, first_config, record) as backward:
            torch.autograd.backward(outs, grads)
        produced = [t.grad for t in leaves if t.grad is not None]
        floor = unique_bytes(grads + saved) + unique_bytes(produced)
        rows.append({"mode": "backward", **_measure(backward), "floor_bytes": floor})
        for t in leaves:
            t.grad = None
    if backend:  # the op's FLOPs: the same call on the torch backend (its matrix products, counted)
        with use_backend("torch"), Count() as forward_flops:
            outputs, inputs = call.run()
        rows[0]["flops"] = forward_flops.flops
        if call.train:
            with use_backend("torch"), Count() as backward_flops:
                torch.autograd.backward([t for t in _tensors(outputs) if t.requires_grad],
                                        [torch.ones_like(t) for t in _tensors(outputs) if t.requires_grad])
            rows[1]["flops"] = backward_flops.flops
            for t in _tensors(inputs):
                t.grad = None
    return [{"op": call.op, "mode": row.pop("mode"), "shape": call.shape, "provider": call.provider,
             "backend": backend or "torch", **row} for row in rows]


# ---- saved for backward ----------------------------------------------------------------------------------


def saved_rows() -> list[dict]:
    rows = []
    for call in [c for decode, p in [(False, 0.0), (False, 0.1)] for c in lora_calls(BF16, BF16, decode, p, True)]:
        if call.provider in ("ours", "peft"):
            rows.append(_saved_call(call))
    for call in [c for p in (0.0, 0.1) for c in dora_calls(BF16, BF16, p, True)]:
        rows.append(_saved_call(call))
    for call in multi_lora_calls(BF16, BF16, "prefill", True) + prompt_calls(BF16, BF16, False, True) + \
            bottleneck_calls(BF16, BF16, False, True):
        if call.train:
            rows.append(_saved_call(call))
    rows += _saved_llama()
    return rows


def _saved_call(call: Call) -> dict:
    with Count(), harness.saved_bytes(call.params) as total:  # products skipped: shapes only, as on any device
        call.run()
    return {"op": call.op, "shape": call.shape, "provider": call.provider, "saved_bytes": total[0]}


# bench_train.py's Llama scaled down (hidden 2048, 16 layers, sequence 2048 there).
SMALL_LLAMA = {"hidden": 256, "intermediate": 704, "layers": 2, "heads": 4, "vocab": 1024, "seq": 256, "batch": 1}


def _saved_llama() -> list[dict]:
    import bench_train

    rows = []
    for dropout_p in (0.0, 0.1):
        for provider in ("peft", "ours"):
            model = bench_train.build_peft_model(SMALL_LLAMA, torch.device("cpu"), BF16, dropout_p)
            if provider == "ours":
                model = peftkern.from_peft(model)
            model.train()
            tokens = torch.randint(0, SMALL_LLAMA["vocab"], (SMALL_LLAMA["batch"], SMALL_LLAMA["seq"]))
            with harness.saved_bytes(list(model.parameters())) as total:
                model(input_ids=tokens, labels=tokens)
            rows.append({"op": "llama", "shape": {**SMALL_LLAMA, "dropout_p": dropout_p,
                                                  "rank": bench_train.RANK}, "provider": provider,
                         "saved_bytes": total[0]})
    return rows


# ---- the report ------------------------------------------------------------------------------------------


def compile_case(arch: int, case: str, group: str, first_config: bool) -> tuple[list[dict], list[str]]:
    """(kernels.json rows, problems) of one dtype case and op group: ours' calls of ops.json run, every
    launch compiled (every autotune config, or each kernel's first)."""
    _, act, ad, tf32 = next(c for c in CASES if c[0] == case)
    compiled, problems = [], []

    def record(name, kernel, config, seconds):
        compiled.append((arch, case, compile_check.Compiled(
            name, case, config, kernel.metadata.shared, seconds, kernel.asm["ptx"]), kernel))

    torch.backends.cuda.matmul.allow_tf32 = tf32
    for call in all_calls(act, ad, providers=False, groups=[group]):
        try:
            measure_call(call, record, first_config, arch)
        except Exception as error:  # report and go on: one message per failing call
            problems.append(f"sm_{arch} {case} {call.op} {call.shape}: {type(error).__name__}: {error}")
    return _kernel_rows(compiled), problems


def run(arches: list[int], first_only: bool, out: Path, workers: int) -> None:
    source = source_sha256()
    problems: list[str] = []
    start = time.perf_counter()
    configs = {case: "first" if first_only else "all" for case, *_ in CASES}
    jobs = [(arch, case, group, configs[case] == "first") for arch in arches for case, *_ in CASES
            for group in GROUPS]
    jobs.sort(key=lambda job: job[3])  # the long jobs (every config) first
    kernel_rows: list[dict] = []
    # Compiles run in parallel processes (each its own stand-in driver); Triton's disk cache is shared. The
    # CUDA C++ units compile (nvcc, ptxas) in a thread beside them.
    cuda_sources = csrc_sha256()
    with concurrent.futures.ThreadPoolExecutor(1) as threads:
        cuda_rows = threads.submit(cuda_static.cuda_kernel_stats)
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) \
                as pool:
            for (arch, case, group, _), (rows, job_problems) in zip(jobs, pool.map(compile_case, *zip(*jobs))):
                kernel_rows += rows
                problems += job_problems
                print(f"sm_{arch} {case} {group}: {len(rows)} distinct compiles, "
                      f"{time.perf_counter() - start:.0f} s so far", flush=True)
        try:
            cuda_rows = cuda_rows.result()
        except Exception as error:
            problems.append(f"CUDA C++ units: {type(error).__name__}: {error}")
            cuda_rows = []
    print(f"{len(cuda_rows)} CUDA C++ kernels, {time.perf_counter() - start:.0f} s so far", flush=True)
    order = {case: i for i, (case, *_) in enumerate(CASES)}
    kernel_rows.sort(key=lambda r: (r["arch"] != "sm_90a", r["kernel"], order[r["case"]]))
    op_rows = []
    for call in all_calls(BF16, BF16, providers=True):
        try:
            op_rows += measure_call(call, lambda *_: None, True)
        except Exception as error:
            problems.append(f"ops {call.op} {call.provider} {call.shape}: {type(error).__name__}: {error}")
    print(f"{len(op_rows)} op rows, {time.perf_counter() - start:.0f} s so far", flush=True)
    saved = saved_rows()
    out.mkdir(parents=True, exist_ok=True)
    versions = {"triton": triton.__version__, "torch": torch.__version__}
    _write(out / "kernels.json", {"source_sha256": source, **versions, "configs": configs, "rows": kernel_rows})
    _write(out / "ops.json", {"source_sha256": source, **versions, "case": OPS_CASE, "rows": op_rows})
    _write(out / "saved_bytes.json", {"source_sha256": source, "torch": torch.__version__, "rows": saved})
    _write(out / "cuda_kernels.json", {"source_sha256": cuda_sources, "nvcc": cuda_static.nvcc_version(),
                                       "arch": "sm_90a", "rows": cuda_rows})
    if out == OUT:
        update_results(out)
    print(f"wrote {out}/{{{','.join(FILES)}}} in {time.perf_counter() - start:.0f} s", flush=True)
    for problem in problems:
        print("PROBLEM", problem, flush=True)
    if problems:
        raise SystemExit(1)


def _kernel_rows(compiled) -> list[dict]:
    rows, seen = [], set()
    for arch, case, item, kernel in compiled:
        switches = _switches(kernel)
        key = (arch, item.kernel, case, item.config, item.ptx)
        if key in seen:
            continue
        seen.add(key)
        usage = compile_check.ptxas_counts(item.ptx, arch)
        registers, spill_stores, spill_loads = (None, None, None) if isinstance(usage, str) else usage
        rows.append({
            "kernel": item.kernel, "case": case, "config": item.config or None,
            "arch": f"sm_{arch}a" if arch >= 90 else f"sm_{arch}", "switches": switches,
            "registers": registers, "spill_bytes": None if usage is None or isinstance(usage, str)
            else spill_stores + spill_loads, "shared_bytes": item.shared,
            "fits_shared": item.shared <= compile_check.MAX_SHARED[arch],
            **ptx_counts(item.ptx), "gemm": kernel_access(item.kernel)[2],
        })
    return rows


RESULTS = REPO / "benchmarks" / "RESULTS.md"
BEGIN, END = "<!-- perf-report: tables begin -->", "<!-- perf-report: tables end -->"


def _compact(shape: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in shape.items())


def _span_text(values: list) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    low, high = min(values), max(values)
    return str(low) if low == high else f"{low}-{high}"


def markdown_tables(out: Path = OUT) -> str:
    """The three files as Markdown tables (kernels aggregated over configs and switches per kernel x case)."""
    kernels = json.loads((out / "kernels.json").read_text())
    ops = json.loads((out / "ops.json").read_text())
    saved = json.loads((out / "saved_bytes.json").read_text())
    lines = [f"source_sha256 `{kernels['source_sha256']}`; triton {kernels['triton']}, "
             "autotune configs compiled: " + ", ".join(f"{case}: {which}" for case, which in
                                                       kernels["configs"].items()) + ".", "",
             "| kernel | case | arch | gemm | compiles | registers | spill B (fits) | spilling configs | "
             "shared B | tensor-core | FMA | vector ld | scalar ld |", "|" + "---|" * 13]
    groups: dict[tuple, list[dict]] = {}
    for row in kernels["rows"]:
        groups.setdefault((row["kernel"], row["case"], row["arch"]), []).append(row)
    for (kernel, case, arch), rows in groups.items():
        fits = [r for r in rows if r["fits_shared"]]
        lines.append(
            f"| {kernel} | {case} | {arch} | {'yes' if rows[0]['gemm'] else 'no'} | {len(rows)} | "
            f"{_span_text([r['registers'] for r in rows])} | {_span_text([r['spill_bytes'] for r in fits])} | "
            f"{sum(1 for r in fits if r['spill_bytes'])} | {_span_text([r['shared_bytes'] for r in rows])} | "
            f"{_span_text([r['tensor_core_instructions'] for r in rows])} | "
            f"{_span_text([r['fma_instructions'] for r in rows])} | "
            f"{_span_text([r['global_vector_loads'] for r in rows])} | "
            f"{_span_text([r['global_scalar_loads'] for r in rows])} |")
    lines += ["", f"ops.json ({ops['case']}):", "",
              "| op | mode | shape | provider | launches | host syncs | bytes / launch sum (MB) | floor (MB) | "
              "ratio | GFLOP |", "|" + "---|" * 10]
    for row in ops["rows"]:
        lines.append(
            f"| {row['op']} | {row['mode']} | {_compact(row['shape'])} | {row['provider']} | {row['launches']} | "
            f"{row['host_syncs']} | {row['bytes_per_launch_sum'] / 1e6:.1f} | {row['floor_bytes'] / 1e6:.1f} | "
            f"{row['bytes_per_launch_sum'] / max(row['floor_bytes'], 1):.2f} | {row['flops'] / 1e9:.1f} |")
    lines += ["", "saved_bytes.json (bf16):", "", "| op | shape | provider | saved for backward (MB) |",
              "|---|---|---|---|"]
    for row in saved["rows"]:
        lines.append(f"| {row['op']} | {_compact(row['shape'])} | {row['provider']} | "
                     f"{row['saved_bytes'] / 1e6:.1f} |")
    cuda_path = out / "cuda_kernels.json"
    if cuda_path.is_file():
        cuda = json.loads(cuda_path.read_text())
        keys = ("registers", "spill_store_bytes", "spill_load_bytes", "static_smem_bytes", "global_loads_vector",
                "global_loads_scalar", "async_copies", "tensor_core", "fp32_fma")
        lines += ["", f"cuda_kernels.json ({cuda['arch']}, {cuda['nvcc']}; instruction counts from "
                      f"{', '.join(sorted({r.get('instruction_source', '-') for r in cuda['rows']})) or '-'}):", "",
                  "| unit | kernel | " + " | ".join(k.replace("_", " ") for k in keys) + " |",
                  "|" + "---|" * (len(keys) + 2)]
        for row in cuda["rows"]:
            lines.append(f"| {row['unit']} | `{row['kernel'][:100]}` | "
                         + " | ".join(str(row.get(k, "-")) for k in keys) + " |")
    return "\n".join(lines)


def update_results(out: Path = OUT, results: Path = RESULTS) -> None:
    """Replace the tables between the markers of RESULTS.md with the current files'."""
    text = results.read_text()
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    results.write_text(f"{head}{BEGIN}\n{markdown_tables(out)}\n{END}{tail}")


def _write(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=1, sort_keys=False) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help="also compile for sm_80")
    parser.add_argument("--first-config", action="store_true",
                        help="only each autotuned kernel's first config in every case (a quick partial report)")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--check", action="store_true", help="exit 1 when the committed report is stale")
    parser.add_argument("--workers", type=int, default=2, help="processes compiling dtype cases in parallel")
    args = parser.parse_args(argv)
    print(f"triton {triton.__version__}, torch {torch.__version__}", flush=True)
    run([90, 80] if args.full else [90], args.first_config, args.out, args.workers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
