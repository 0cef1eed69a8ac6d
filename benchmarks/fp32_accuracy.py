"""Accuracy of LoRA with fp32 adapters against the float64 reference, per activation dtype.

fp32 adapter products run on the tensor cores in TF32 pieces (``triton_kernels/_common.py``,
``fp32_precision`` and ``dot_fp32``): beside a 16-bit operand (exact in TF32) the fp32 one is split into a
TF32 head and tail, two products; two fp32 operands use Triton's tf32x3, three products. This script
prints, for y, dX, dA and dB, the worst ``|out - ref| / (atol + rtol * |ref|)`` over the elements with
DESIGN.md's tolerances (<= 1 passes; y and dX in x's dtype, dA and dB in fp32's, 1e-4 as on a GPU), and
the normwise ``max |out - ref| / max |ref|``, for:

  ieee         the same products in plain fp32 (what the FMA units gave before)
  tf32x3       the products as the kernels now compute them, emulated in torch on the CPU (TF32 rounding
               done bit by bit, products of exact TF32 values accumulated in fp32)
  tf32         one TF32 product (what ``torch.backends.cuda.matmul.allow_tf32 = True`` asks for)
  triton       the real kernels, on a GPU only (TF32 off)

    python3 benchmarks/fp32_accuracy.py [--tokens 256 --hidden 1024 --rank 16]
"""

from __future__ import annotations

import argparse

import torch

from peftkern import reference

# DESIGN.md: (atol, rtol) per activation dtype; fp32 on a GPU (TF32 off) is 1e-4.
TOLERANCE = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (2e-2, 2e-2), torch.float16: (1e-2, 1e-2)}
TF32_LOW_BITS = 0x1FFF  # TF32 keeps 10 of fp32's 23 stored significand bits


def _tf32_truncate(v: torch.Tensor) -> torch.Tensor:
    return (v.view(torch.int32) & ~TF32_LOW_BITS).view(torch.float32)


def _tf32_round(v: torch.Tensor) -> torch.Tensor:
    """To nearest on TF32's grid (ties away from zero, as cvt.rna.tf32.f32)."""
    return ((v.view(torch.int32) + 0x1000) & ~TF32_LOW_BITS).view(torch.float32)


def _split(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``_common._tf32_split``: head truncated, tail rounded to nearest."""
    head = _tf32_truncate(v)
    return head, _tf32_round(v - head)


def product(a: torch.Tensor, b: torch.Tensor, scheme: str) -> torch.Tensor:
    """a @ b (fp32 result) as the scheme computes it; 16-bit operands are exact in TF32."""
    a32, b32 = a.float(), b.float()
    if scheme == "ieee":
        return a32 @ b32
    if scheme == "tf32":
        return _tf32_round(a32) @ _tf32_round(b32)
    if a.dtype != torch.float32:
        head, tail = _split(b32)
        return a32 @ tail + a32 @ head
    if b.dtype != torch.float32:
        head, tail = _split(a32)
        return tail @ b32 + head @ b32
    # Triton's tf32x3: heads and tails rounded to nearest, the tail x tail product left out.
    a_head, b_head = _tf32_round(a32), _tf32_round(b32)
    a_tail, b_tail = _tf32_round(a32 - a_head), _tf32_round(b32 - b_head)
    return a_head @ b_tail + a_tail @ b_head + a_head @ b_head


def emulated(x, weight, lora_a, lora_b, grad_y, scaling, scheme):
    """(y, dX, dA, dB) of LoRA without dropout, every product that has an fp32 operand in ``scheme`` and the
    16-bit base GEMMs in fp32 from 16-bit operands (as the tensor cores do); outputs in the kernels' dtypes."""
    base = "ieee" if x.dtype != torch.float32 else scheme
    s = product(x, lora_a.T, scheme)
    y = product(s * scaling, lora_b.T, scheme) + product(x, weight.T, base)
    ds = product(grad_y, lora_b, scheme) * scaling
    grad_b = product(grad_y.T, s, scheme) * scaling
    grad_x = product(ds, lora_a, scheme) + product(grad_y, weight, base)
    grad_a = product(ds.T, x, scheme)
    return y.to(x.dtype), grad_x.to(x.dtype), grad_a, grad_b


def kernels(x, weight, lora_a, lora_b, grad_y, scaling):
    import peftkern

    x, lora_a, lora_b = (t.detach().requires_grad_() for t in (x, lora_a, lora_b))
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        y = peftkern.lora_linear(x, weight, None, lora_a, lora_b, scaling, backend="triton")
        y.backward(grad_y)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    return y.detach(), x.grad, lora_a.grad, lora_b.grad


def worst(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> str:
    """'elementwise (normwise)': the worst |out - ref| / (atol + rtol |ref|), and max |out - ref| / max |ref|."""
    atol, rtol = TOLERANCE[dtype]
    error = (out.double().cpu() - ref.cpu()).abs()
    elementwise = float((error / (atol + rtol * ref.cpu().abs())).max())
    return f"{elementwise:.3g} ({float(error.max() / ref.abs().max()):.1e})"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    M, K, r = args.tokens, args.hidden, args.rank
    scaling = 2.0
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"tokens {M}, hidden {K}, rank {r}, fp32 adapters; worst |err| / (atol + rtol |ref|) (<= 1 passes), "
          "and max |err| / max |ref| in parentheses")
    print("| x | scheme | y | dX | dA | dB |")
    print("|---|---|---|---|---|---|")
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        x = torch.randn(M, K).to(dtype)
        weight = (torch.randn(K, K) / K**0.5).to(dtype)
        lora_a = torch.randn(r, K) / K**0.5
        lora_b = torch.randn(K, r) / r**0.5
        grad_y = torch.randn(M, K).to(dtype)
        leaves = [t.double().requires_grad_() for t in (x, lora_a, lora_b)]
        ref = reference.lora_linear(leaves[0], weight.double(), None, leaves[1], leaves[2], scaling)
        ref.backward(grad_y.double())
        refs = (ref.detach(), leaves[0].grad, leaves[1].grad, leaves[2].grad)
        results = {scheme: emulated(x, weight, lora_a, lora_b, grad_y, scaling, scheme)
                   for scheme in ("ieee", "tf32x3", "tf32")}
        if device == "cuda":
            on_device = (t.to(device) for t in (x, weight, lora_a, lora_b, grad_y))
            results["triton"] = kernels(*on_device, scaling)
        for scheme, outs in results.items():
            dtypes = (dtype, dtype, torch.float32, torch.float32)
            ratios = [worst(out, ref_, kind) for out, ref_, kind in zip(outs, refs, dtypes)]
            print(f"| {str(dtype)[6:]} | {scheme} | " + " | ".join(ratios) + " |")


if __name__ == "__main__":
    main()
