"""LoRA linear: ``x @ W.T + scaling * (dropout(x) @ A.T) @ B.T`` against the baselines a user would run.

Providers (all on the same x [tokens, hidden], W [hidden, hidden], A [rank, hidden], B [hidden, rank]):
  base            F.linear(x, W) alone, the floor (x requires grad, W frozen: backward is dY @ W only)
  base_two_gemms  x @ W.T and dY @ W without autograd: the frozen base's two GEMMs in training (full mode)
  torch_unfused   the PEFT-style module computation written out: dropout, lora_A, lora_B, scaling, add
  peft            peft.tuners.lora.Linear itself (when peft is importable)
  torch_compile   torch.compile of peftkern.reference.lora_linear (static shapes, compiled per case)
  triton          peftkern.lora_linear(..., backend="triton")
  cuda            peftkern.lora_linear(..., backend="cuda") when the CUDA C++ extension is built
DoRA rows (the same shapes, a magnitude vector m [hidden] moved off its initial norms):
  peft_dora       peft.tuners.lora.Linear with use_dora=True (it forms the dense [hidden, hidden] B @ A per call)
  dora_torch      peftkern.dora_linear(..., backend="torch")
  dora_triton     peftkern.dora_linear(..., backend="triton")
  ratios: vs_peft_dora, and for dora_triton vs_lora (over the triton LoRA row of the same case)

QLoRA rows (op "lora", params ``quant_type="nf4"``, double-quantized absmax, blocksize 64, bf16 compute dtype),
at rank 16 (and the smoke case) unless ``--no-4bit``; W is bitsandbytes' 4-bit storage of the same weight:
  peft_4bit           peft.tuners.lora.bnb.Linear4bit over bitsandbytes.nn.Linear4bit (peft + bitsandbytes)
  torch_unfused_4bit  bitsandbytes.functional.dequantize_4bit, F.linear, then the unfused LoRA branch
  torch_4bit          peftkern.lora_linear_4bit(..., backend="torch") (dequantize for the matmul, never kept)
  triton_4bit         peftkern.lora_linear_4bit(..., backend="triton") (W decoded inside the GEMM main loops)

Sweep: tokens {1024, 4096, 8192, 16384} x hidden {4096, 8192} x rank {8, 16, 64} x dropout {0, 0.1} x
adapters {fp32 (peft's default beside a bf16 model), bf16}, bf16 activations and weights. With fp32 adapters
the PEFT-style providers cast x to the adapters' dtype for the low-rank path and the sum back, as peft does.
``--smoke``: one tiny shape on CPU (Triton through its interpreter; torch.compile left out unless
``--smoke-compile``, its CPU compile alone takes minutes).

    python3 benchmarks/bench_lora.py                     # the full sweep (GPU)
    python3 benchmarks/bench_lora.py --headline          # 8192 x 4096 x r16 only
    python3 benchmarks/bench_lora.py --smoke --out /tmp/bench
"""

from __future__ import annotations

import argparse
import inspect
import itertools

import harness
import torch
import torch.nn as nn
import torch.nn.functional as F

OP = "lora"
TOKENS = (1024, 4096, 8192, 16384)
HIDDEN = (4096, 8192)
RANKS = (8, 16, 64)
DROPOUTS = (0.0, 0.1)
ADAPTER_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
HEADLINE = {"tokens": 8192, "hidden": 4096, "rank": 16}
SMOKE = {"tokens": 32, "hidden": 32, "rank": 8}
ALPHA_OVER_RANK = 2.0  # lora_alpha = 2 * r, a common choice; the scaling value does not change the timing
# (atol, rtol) of the output check at dropout 0, against the fp32 reference: bf16 outputs of O(1) values
# round by up to 2**-9 relative at each of a few steps; a dropped or mis-scaled low-rank term (std 0.3) is
# far outside it.
CHECK_TOLERANCE = (5e-2, 2e-2)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--headline", action="store_true", help=f"only the headline shape {HEADLINE}")
    parser.add_argument("--tokens", default=None, help="comma-separated subset of the token counts")
    parser.add_argument("--hidden", default=None, help="comma-separated subset of the hidden sizes")
    parser.add_argument("--rank", default=None, help="comma-separated subset of the ranks")
    parser.add_argument("--dropout", default=None, help="comma-separated subset of the dropout values")
    parser.add_argument("--adapters", default=None, help="comma-separated subset of the adapter dtypes (fp32,bf16)")
    parser.add_argument("--smoke-compile", action="store_true", help="time torch.compile in --smoke too")
    parser.add_argument("--no-4bit", action="store_true", help="leave out the QLoRA (bitsandbytes 4-bit) rows")


def cases(bench: harness.Bench) -> list[tuple[int, int, int, float, str]]:
    """(tokens, hidden, rank, dropout_p, adapters) in run order: all ranks, dropouts and adapter dtypes of one
    (tokens, hidden) together, so that its base rows serve them all."""
    adapters = harness.pick(getattr(bench.options, "adapters", None), tuple(ADAPTER_DTYPES), str)
    if bench.smoke:
        return [(SMOKE["tokens"], SMOKE["hidden"], SMOKE["rank"], p, a) for p in DROPOUTS for a in adapters]
    opts = bench.options
    if getattr(opts, "headline", False):
        return [(HEADLINE["tokens"], HEADLINE["hidden"], HEADLINE["rank"], p, a) for p in DROPOUTS for a in adapters]
    tokens = harness.pick(getattr(opts, "tokens", None), TOKENS, int)
    hidden = harness.pick(getattr(opts, "hidden", None), HIDDEN, int)
    ranks = harness.pick(getattr(opts, "rank", None), RANKS, int)
    dropouts = harness.pick(getattr(opts, "dropout", None), DROPOUTS, float)
    return list(itertools.product(tokens, hidden, ranks, dropouts, adapters))


def _unfused(weight, lora_a, lora_b, scaling, dropout_p):
    """The PEFT-style computation: an nn.Dropout (Identity at p=0, as peft), two bias-free nn.Linear, a
    scaled add onto the base output."""
    rank, hidden = lora_a.shape
    dropout = nn.Dropout(dropout_p) if dropout_p > 0 else nn.Identity()
    down = nn.Linear(hidden, rank, bias=False, device=weight.device, dtype=lora_a.dtype)
    up = nn.Linear(rank, weight.shape[0], bias=False, device=weight.device, dtype=lora_b.dtype)
    with torch.no_grad():
        down.weight.copy_(lora_a)
        up.weight.copy_(lora_b)
    dropout.train()

    def forward(x):
        if lora_a.dtype == x.dtype:
            return F.linear(x, weight) + up(down(dropout(x))) * scaling
        # fp32 adapters beside bf16 x, as peft computes: x cast to the adapters' dtype, the sum cast back.
        return (F.linear(x, weight) + up(down(dropout(x).to(lora_a.dtype))) * scaling).to(x.dtype)

    return forward, [down.weight, up.weight]


def _peft_layer(weight, lora_a, lora_b, alpha, dropout_p, magnitude=None):
    try:
        from peft import LoraConfig
        from peft.tuners.lora import Linear as PeftLinear
    except ImportError as error:
        raise harness.ProviderUnavailable(f"peft is not importable: {error}") from error
    rank, hidden = lora_a.shape
    base = nn.Linear(hidden, weight.shape[0], bias=False, device=weight.device, dtype=weight.dtype)
    base.weight = nn.Parameter(weight.detach(), requires_grad=False)
    dora = magnitude is not None
    kwargs = {"r": rank, "lora_alpha": alpha, "lora_dropout": dropout_p, "use_dora": dora}
    if "config" in inspect.signature(PeftLinear.__init__).parameters:  # peft >= 0.15 takes the config too
        kwargs["config"] = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout_p, use_dora=dora)
    layer = PeftLinear(base, "default", **kwargs)
    layer.to(device=weight.device)
    # peft moves a new adapter to the base layer's dtype; fp32 adapters (what peft's LoraModel keeps beside a
    # bf16 model, autocast_adapter_dtype=True) are cast back up.
    layer.lora_A["default"].to(lora_a.dtype)
    layer.lora_B["default"].to(lora_b.dtype)
    grads = [layer.lora_A["default"].weight, layer.lora_B["default"].weight]
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(lora_a)
        layer.lora_B["default"].weight.copy_(lora_b)
        if dora:
            grads.append(layer.lora_magnitude_vector["default"].weight)
            grads[-1].copy_(magnitude)
    layer.train()
    return layer, grads


def run(bench: harness.Bench) -> None:
    torch.manual_seed(0)
    timed_base = None
    for tokens, hidden, rank, dropout_p, adapters in cases(bench):
        if timed_base != (tokens, hidden):  # the base does not depend on rank or dropout: time it once
            timed_base = (tokens, hidden)
            _run_base(bench, tokens, hidden)
        _run_case(bench, tokens, hidden, rank, dropout_p, adapters)
        # QLoRA rows once per case (bf16 adapters, as their inputs), at rank 16 (and the smoke case)
        if adapters == "bf16" and (bench.smoke or rank == QLORA_RANK) and not getattr(bench.options, "no_4bit", False):
            _run_case_4bit(bench, tokens, hidden, rank, dropout_p)
    bench.add_ratios("base")
    bench.add_ratios("peft_4bit", providers=_QLORA_PROVIDERS)
    bench.add_ratios("torch_unfused_4bit", providers=_QLORA_PROVIDERS)
    bench.add_ratios("base_two_gemms", providers=_LORA_PROVIDERS, modes=("full",))
    bench.add_ratios("torch_unfused", providers=_LORA_PROVIDERS)
    bench.add_ratios("peft", providers=_LORA_PROVIDERS)
    bench.add_ratios("peft_dora", providers=_DORA_PROVIDERS)
    bench.add_ratios("triton", name="vs_lora", providers=("dora_triton",))


def _inputs(device: torch.device, tokens: int, hidden: int, rank: int, dtype: torch.dtype,
            adapter_dtype: torch.dtype | None = None):
    """x [tokens, hidden] (requires grad), frozen W [hidden, hidden], A [rank, hidden], B [hidden, rank]
    (in ``adapter_dtype``, default ``dtype``).

    Scaled so that the base output has unit variance and the low-rank term (times the scaling) a standard
    deviation of about 0.3: small beside the base, as a trained adapter's, yet far above bf16 rounding,
    so that the output check catches a provider that drops or mis-scales it."""
    x = torch.randn(tokens, hidden, device=device, dtype=dtype).requires_grad_(True)
    weight = torch.randn(hidden, hidden, device=device, dtype=dtype) / hidden**0.5
    adapter_dtype = adapter_dtype or dtype
    lora_a = (torch.randn(rank, hidden, device=device, dtype=adapter_dtype) / hidden**0.5).requires_grad_(True)
    lora_b = torch.randn(hidden, rank, device=device, dtype=adapter_dtype) * (0.3 / ALPHA_OVER_RANK / rank**0.5)
    lora_b.requires_grad_(True)
    return x, weight, lora_a, lora_b


def _run_base(bench: harness.Bench, tokens: int, hidden: int) -> None:
    dtype, shapes = torch.bfloat16, {"tokens": tokens, "hidden": hidden}
    x, weight, _, _ = _inputs(bench.device, tokens, hidden, 1, dtype)
    bench.time_modes("base", lambda: F.linear(x, weight), shapes, dtype, grads=[x])
    if bench.wants("base_two_gemms") and "full" in bench.modes:
        x_frozen, grad_y = x.detach(), torch.randn_like(x)
        two_gemms = lambda: (F.linear(x_frozen, weight), grad_y @ weight)
        try:
            bench.time("base_two_gemms", "full", two_gemms, shapes, dtype)
        except Exception as error:  # e.g. out of memory: recorded, the sweep goes on
            bench.fail("base_two_gemms", error, shapes, {})


def _mixed_reference(x, weight, lora_a, lora_b, scaling, dropout_p):
    """reference.lora_linear's formula with the low-rank path in the adapters' dtype (fp32 adapters beside
    bf16 x: the reference itself multiplies in one dtype)."""
    dropped = F.dropout(x, dropout_p, training=True).to(lora_a.dtype)
    return (F.linear(x, weight) + scaling * ((dropped @ lora_a.T) @ lora_b.T)).to(x.dtype)


def _run_case(bench: harness.Bench, tokens: int, hidden: int, rank: int, dropout_p: float,
              adapters: str = "bf16") -> None:
    import peftkern
    from peftkern import reference
    from peftkern.backends import cuda_backend_available, cuda_backend_status, triton_interpreting

    device, dtype = bench.device, torch.bfloat16
    shapes = {"tokens": tokens, "hidden": hidden, "rank": rank}
    params = {"dropout_p": dropout_p, "adapter_dtype": adapters}
    alpha = ALPHA_OVER_RANK * rank
    scaling = alpha / rank
    x, weight, lora_a, lora_b = _inputs(device, tokens, hidden, rank, dtype, ADAPTER_DTYPES[adapters])
    expected = None
    if dropout_p == 0.0:  # deterministic: every provider's output is checked before it is timed
        fp32 = [t.detach().float() for t in (x, weight, lora_a, lora_b)]
        expected = reference.lora_linear(fp32[0], fp32[1], None, fp32[2], fp32[3], scaling)
        del fp32  # up to 0.75 GiB at the largest shape: not to be held while timing

    def build_unfused():
        forward, grads = _unfused(weight, lora_a.detach(), lora_b.detach(), scaling, dropout_p)
        return (lambda: forward(x)), [x, *grads]

    def build_peft():
        layer, grads = _peft_layer(weight, lora_a.detach(), lora_b.detach(), alpha, dropout_p)
        return (lambda: layer(x)), [x, *grads]

    def build_compile():
        if bench.smoke and device.type != "cuda" and not getattr(bench.options, "smoke_compile", False):
            raise harness.ProviderUnavailable(
                "left out of --smoke on CPU (inductor's CPU compile takes minutes); add --smoke-compile"
            )
        torch._dynamo.reset()  # one static-shape compile per case, never a silent eager fallback
        if lora_a.dtype == x.dtype:
            compiled = torch.compile(reference.lora_linear, fullgraph=True)
            forward = lambda: compiled(x, weight, None, lora_a, lora_b, scaling, dropout_p, True)
        else:
            compiled = torch.compile(_mixed_reference, fullgraph=True)
            forward = lambda: compiled(x, weight, lora_a, lora_b, scaling, dropout_p)
        return forward, [x, lora_a, lora_b]

    def build_ours(backend: str):
        def build():
            if backend == "triton" and device.type != "cuda" and not triton_interpreting():
                raise harness.ProviderUnavailable("triton needs a GPU or TRITON_INTERPRET=1")
            if backend == "cuda" and not cuda_backend_available():
                raise harness.ProviderUnavailable(cuda_backend_status())
            forward = lambda: peftkern.lora_linear(
                x, weight, None, lora_a, lora_b, scaling, dropout_p, True, backend=backend
            )
            return forward, [x, lora_a, lora_b]

        return build

    for provider, build in (
        ("torch_unfused", build_unfused),
        ("peft", build_peft),
        ("torch_compile", build_compile),
        ("triton", build_ours("triton")),
        ("cuda", build_ours("cuda")),
    ):
        bench.time_provider(provider, build, shapes, dtype, params, expected=expected, tolerance=CHECK_TOLERANCE)
    _run_dora_case(bench, x, weight, lora_a, lora_b, alpha, shapes, params)


def _run_dora_case(bench, x, weight, lora_a, lora_b, alpha, shapes, params) -> None:
    """peft's DoRA layer and ours on the LoRA case's tensors, with a magnitude 0.5-1.5x its initial norms."""
    import peftkern
    from peftkern import reference
    from peftkern.backends import triton_interpreting

    dtype, dropout_p = torch.bfloat16, params["dropout_p"]
    scaling = alpha / lora_a.shape[0]
    with torch.no_grad():
        fp32 = [t.detach().float() for t in (weight, lora_a, lora_b)]
        norm = reference.dora_weight_norm(fp32[0], fp32[1], fp32[2], scaling)
        spread = torch.rand(norm.shape, device=norm.device, generator=torch.Generator(norm.device).manual_seed(0))
        magnitude = (norm * (0.5 + spread)).to(lora_a.dtype).requires_grad_(True)
        expected = None
        if dropout_p == 0.0:
            expected = reference.dora_linear(x.detach().float(), fp32[0], None, fp32[1], fp32[2], magnitude.float(),
                                             scaling)
        del fp32

    def build_peft():
        layer, grads = _peft_layer(weight, lora_a.detach(), lora_b.detach(), alpha, dropout_p, magnitude.detach())
        return (lambda: layer(x)), [x, *grads]

    def build_ours(backend: str):
        def build():
            if backend == "triton" and x.device.type != "cuda" and not triton_interpreting():
                raise harness.ProviderUnavailable("triton needs a GPU or TRITON_INTERPRET=1")
            forward = lambda: peftkern.dora_linear(
                x, weight, None, lora_a, lora_b, magnitude, scaling, dropout_p, True, backend=backend
            )
            return forward, [x, lora_a, lora_b, magnitude]

        return build

    for provider, build in (("peft_dora", build_peft), ("dora_torch", build_ours("torch")),
                            ("dora_triton", build_ours("triton"))):
        bench.time_provider(provider, build, shapes, dtype, params, expected=expected, tolerance=CHECK_TOLERANCE)


_LORA_PROVIDERS = ("torch_unfused", "peft", "torch_compile", "triton", "cuda")
_DORA_PROVIDERS = ("dora_torch", "dora_triton")


# ---- QLoRA: the same case over bitsandbytes' 4-bit storage of W ------------------------------------------------

QLORA_RANK = 16
# bitsandbytes' AVX-512 CPU kernel (0.50) reads absmax per row when a row is shorter than a block: the smoke case's
# hidden 32 would make peft + bitsandbytes compute a wrong output on the CPU, so its QLoRA rows use 64.
QLORA_SMOKE_HIDDEN = 64
_QLORA_PROVIDERS = ("peft_4bit", "torch_unfused_4bit", "torch_4bit", "triton_4bit")


def _linear_4bit(weight: torch.Tensor, dtype: torch.dtype):
    """bitsandbytes.nn.Linear4bit holding ``weight`` as NF4 (double-quantized absmax, blocksize 64), computing in
    ``dtype``: quantized by bitsandbytes itself when moved to the device."""
    try:
        import bitsandbytes as bnb
    except ImportError as error:
        raise harness.ProviderUnavailable(f"bitsandbytes is not importable: {error}") from error
    out_features, in_features = weight.shape
    layer = bnb.nn.Linear4bit(in_features, out_features, bias=False, compute_dtype=dtype, compress_statistics=True,
                              quant_type="nf4")
    layer.load_state_dict({"weight": weight.detach().float().cpu()})
    return layer.to(weight.device)


def _unfused_4bit(base, lora_a, lora_b, scaling, dropout_p, dtype):
    """bitsandbytes' dequantize_4bit of the base weight in ``dtype`` (every call), F.linear, then the PEFT-style
    low-rank branch (copies of lora_a and lora_b, trainable): (forward(x), the adapter weights)."""
    import bitsandbytes.functional as bnb_functional

    dropout = nn.Dropout(dropout_p) if dropout_p > 0 else nn.Identity()
    a, b = (t.detach().clone().requires_grad_(True) for t in (lora_a, lora_b))

    def forward(x):
        dense = bnb_functional.dequantize_4bit(base.weight.data, base.weight.quant_state).to(dtype)
        return F.linear(x, dense) + F.linear(F.linear(dropout(x), a), b) * scaling

    return forward, [a, b]


def _peft_layer_4bit(base, lora_a, lora_b, alpha, dropout_p):
    try:
        from peft import LoraConfig
        from peft.tuners.lora.bnb import Linear4bit as PeftLinear4bit
    except ImportError as error:
        raise harness.ProviderUnavailable(f"peft's bitsandbytes layer is not importable: {error}") from error
    rank = lora_a.shape[0]
    kwargs = {"r": rank, "lora_alpha": alpha, "lora_dropout": dropout_p}
    if "config" in inspect.signature(PeftLinear4bit.__init__).parameters:
        kwargs["config"] = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout_p)
    layer = PeftLinear4bit(base, "default", **kwargs)
    adapters = [layer.lora_A["default"], layer.lora_B["default"]]
    for module, value in zip(adapters, (lora_a, lora_b)):
        module.to(device=value.device, dtype=value.dtype)
        with torch.no_grad():
            module.weight.copy_(value)
    layer.train()
    return layer, [module.weight for module in adapters]


def _run_case_4bit(bench: harness.Bench, tokens: int, hidden: int, rank: int, dropout_p: float) -> None:
    import peftkern
    from peftkern import reference
    from peftkern.backends import triton_interpreting

    device, dtype = bench.device, torch.bfloat16
    hidden = QLORA_SMOKE_HIDDEN if bench.smoke else hidden
    shapes = {"tokens": tokens, "hidden": hidden, "rank": rank}
    params = {"dropout_p": dropout_p, "adapter_dtype": "bf16", "quant_type": "nf4"}
    alpha = ALPHA_OVER_RANK * rank
    scaling = alpha / rank
    x, weight, lora_a, lora_b = _inputs(device, tokens, hidden, rank, dtype)
    try:
        base = _linear_4bit(weight, dtype)
    except harness.ProviderUnavailable as error:
        for provider in _QLORA_PROVIDERS:
            bench.skip(provider, str(error), shapes)
        return
    del weight  # only the 4-bit storage from here on
    weight4 = peftkern.Weight4bit.from_bnb(base.weight)
    expected = None
    if dropout_p == 0.0:
        dense = reference.dequantize_4bit(weight4.packed, weight4.absmax, "nf4", weight4.blocksize, weight4.shape,
                                          weight4.dtype, nested_absmax=weight4.nested_absmax,
                                          nested_code=weight4.nested_code, nested_blocksize=weight4.nested_blocksize,
                                          offset=weight4.offset).float()
        fp32 = [t.detach().float() for t in (x, lora_a, lora_b)]
        expected = reference.lora_linear(fp32[0], dense, None, fp32[1], fp32[2], scaling)
        del dense, fp32

    def build_peft():
        layer, grads = _peft_layer_4bit(base, lora_a.detach(), lora_b.detach(), alpha, dropout_p)
        return (lambda: layer(x)), [x, *grads]

    def build_unfused():
        forward, grads = _unfused_4bit(base, lora_a.detach(), lora_b.detach(), scaling, dropout_p, dtype)
        return (lambda: forward(x)), [x, *grads]

    def build_ours(backend: str):
        def build():
            if backend == "triton" and device.type != "cuda" and not triton_interpreting():
                raise harness.ProviderUnavailable("triton needs a GPU or TRITON_INTERPRET=1")
            forward = lambda: peftkern.lora_linear_4bit(x, weight4, None, lora_a, lora_b, scaling, dropout_p, True,
                                                        compute_dtype=dtype, backend=backend)
            return forward, [x, lora_a, lora_b]

        return build

    for provider, build in (
        ("peft_4bit", build_peft),
        ("torch_unfused_4bit", build_unfused),
        ("torch_4bit", build_ours("torch")),
        ("triton_4bit", build_ours("triton")),
    ):
        bench.time_provider(provider, build, shapes, dtype, params, expected=expected, tolerance=CHECK_TOLERANCE)


def ours(rows: list[dict]) -> str:
    """The backend peftkern picks for lora_linear on CUDA tensors, where it was measured."""
    from peftkern.backends import DEFAULT_CUDA_BACKEND, DEFAULT_CUDA_BACKEND_PER_OP

    default = DEFAULT_CUDA_BACKEND_PER_OP.get("lora_linear", DEFAULT_CUDA_BACKEND)
    measured = {row["provider"] for row in rows}
    return default if default in measured else "triton"


def summarize(rows: list[dict], smoke: bool) -> dict[str, float]:
    """issue 8's LoRA keys, at the headline shape (the smoke case in --smoke), from this run's rows: with fp32
    adapters (peft's default beside a bf16 model; issue 18's goals), and the same keys with bf16 adapters
    suffixed ``_bf16_adapters``."""
    shapes = SMOKE if smoke else HEADLINE
    base_shapes = {"tokens": shapes["tokens"], "hidden": shapes["hidden"]}
    rows = harness.find_rows(rows, op=OP, dtype="bfloat16")
    ours_provider = ours(rows)
    summary = {}
    for adapters, suffix in (("fp32", ""), ("bf16", "_bf16_adapters")):

        def sel(provider: str, mode: str, dropout_p: float | None = None, adapters: str = adapters) -> dict:
            if provider in ("base", "base_two_gemms"):
                return {"provider": provider, "mode": mode, "shapes": base_shapes}
            if provider in _QLORA_PROVIDERS:
                qlora_shapes = {**shapes, "hidden": QLORA_SMOKE_HIDDEN} if smoke else shapes
                return {"provider": provider, "mode": mode, "shapes": qlora_shapes,
                        "params": {"dropout_p": dropout_p, "adapter_dtype": "bf16"}}
            return {"provider": provider, "mode": mode, "shapes": shapes,
                    "params": {"dropout_p": dropout_p, "adapter_dtype": adapters}}

        summary |= {
            f"lora_fwd_vs_base{suffix}": harness.ratio_of(
                rows, sel(ours_provider, "forward", 0.0), sel("base", "forward")
            ),
            f"lora_train_speedup_vs_peft{suffix}": harness.ratio_of(
                rows, sel("torch_unfused", "full", 0.1), sel(ours_provider, "full", 0.1)
            ),
            f"lora_train_vs_base{suffix}": harness.ratio_of(
                rows, sel(ours_provider, "full", 0.1), sel("base_two_gemms", "full")
            ),
            f"lora_memory_ratio_vs_peft{suffix}": harness.ratio_of(
                rows, sel(ours_provider, "full", 0.1), sel("torch_unfused", "full", 0.1), field="peak_mem_bytes"
            ),
        }
        if adapters == "fp32":  # DoRA against our LoRA and peft's DoRA, both with peft's default fp32 adapters
            summary |= {
                "dora_train_vs_lora": harness.ratio_of(
                    rows, sel("dora_triton", "full", 0.1), sel(ours_provider, "full", 0.1)
                ),
                "dora_train_speedup_vs_peft": harness.ratio_of(
                    rows, sel("peft_dora", "full", 0.1), sel("dora_triton", "full", 0.1)
                ),
                "dora_memory_ratio_vs_peft": harness.ratio_of(
                    rows, sel("dora_triton", "full", 0.1), sel("peft_dora", "full", 0.1), field="peak_mem_bytes"
                ),
                # QLoRA (rank 16, bf16 adapters; the smoke case in --smoke): the fused 4-bit kernels against
                # peft + bitsandbytes.
                "qlora_train_speedup_vs_peft": harness.ratio_of(
                    rows, sel("peft_4bit", "full", 0.1), sel("triton_4bit", "full", 0.1)
                ),
                "qlora_fwd_speedup_vs_peft": harness.ratio_of(
                    rows, sel("peft_4bit", "forward", 0.0), sel("triton_4bit", "forward", 0.0)
                ),
                "qlora_memory_ratio_vs_peft": harness.ratio_of(
                    rows, sel("triton_4bit", "full", 0.1), sel("peft_4bit", "full", 0.1), field="peak_mem_bytes"
                ),
            }
    return harness.drop_missing(summary)


if __name__ == "__main__":
    harness.main(OP, run, summarize, add_arguments)
