"""LLM.int8() kernels: row-wise int8 weights, the mixed int8/float matmul and its backward.

Weights (``quantize_rowwise``), per output row n of a float ``W[N, K]``::

    absmax_n = max_k |W[n, k]|                       # fp32
    SCB_n    = absmax_n / 127                        # fp32 row scale, W ~= q * SCB
    q[n, k]  = clamp(rint(W[n, k] * (127 / absmax_n)), -127, 127)   # int8; 0 if absmax_n == 0

so ``|W - q * SCB| <= SCB / 2`` per element. (bitsandbytes keeps ``absmax_n`` itself in its
``SCB``; ours is the scale, ``absmax_n / 127``.) Non-finite weights are refused.

Forward, ``int8_linear(x[M, K], q, SCB, bias, threshold)`` computes ``x @ W^T + bias`` with
``W = q * SCB`` in one of two ways, the same on every device:

* M <= ``DECODE_TOKENS`` (16, decoding): weight-only int8. ``out = (x @ q^T) * SCB + bias``
  with x read in float and fp32 accumulation. Activations are not quantized, so no outlier
  decomposition is needed and the result is as accurate as a float matmul against the
  dequantized weight. On CUDA a GEMV-style kernel reads the int8 weight directly (half the
  bytes of fp16).
* M > 16: the LLM.int8() mixed decomposition.

      flagged[k]  = threshold > 0 and any_m |x[m, k]| >= threshold
      outlier     = the first OUTLIER_CAP (256) flagged columns, in column order
      amax_m      = max_{k not outlier} |x[m, k]|            # fp32, NaN propagates
      xq[m, k]    = 0 if outlier[k] else rint(x[m, k] * (127 / amax_m))   # int8
      row_scale_m = amax_m / 127
      acc         = xq @ q^T                                # exact int32
      osum[m, n]  = sum over the outlier columns k, in column order, of x[m, k] * q[n, k]
                                                            # fp32, each product and sum rounded once
      out         = acc * (row_scale_m * SCB_n)             # fp32
                    + osum * SCB_n                          # fp32
                    + bias                                  # fp32, then one rounding to x's dtype

  The outlier columns (few: activations of large models have a handful of feature
  dimensions far above the rest) keep their precision, in fp32; quantizing them would
  flatten every other value of their rows to zero. Flagged columns beyond the cap (a
  threshold far too low for the data) go through the int8 path like the rest: less
  precise, never wrong. The cap lets the CUDA path find the columns on the device, so the
  forward never waits for the host (and can be captured in a CUDA graph). The outlier
  product is a plain ordered sum rather than a BLAS matmul (whose summation order and use of
  fused multiply-adds vary with the library, the CPU and the shape), so every implementation
  (the reference, the compiled CPU passes, the CUDA epilogue) computes the same bits, and the
  fast ones never write an ``M x N`` temporary for it.

Backward (straight-through): ``grad_x = grad_out @ dequantize_rowwise(q, SCB, grad.dtype)``,
the dequantized weight is a temporary of the backward call only.

Every function here is a ``torch.library`` custom op: the PyTorch reference is the default
implementation (the forward on CPU tensors takes ``_int8_linear_cpu``, the same function bit
for bit in fewer passes, with the int8 GEMM through ``torch._int_mm``), CUDA gets CuPy
kernels (``cuda/int8.cu``) plus ``torch._int_mm`` (cuBLASLt int8 GEMM with int32
accumulation), and fake implementations make meta-device
models and ``torch.compile`` work.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

if not __name__.startswith("optim8."):  # see kernels/__init__.py: a second copy of the ops would free the first
    raise ImportError(f"{__name__} is part of optim8: import optim8.kernels, not the top-level 'kernels'")

from . import _cpu, _launch

__all__ = [
    "DECODE_TOKENS",
    "OUTLIER_CAP",
    "quantize_rowwise",
    "dequantize_rowwise",
    "quantize_activations",
    "int8_linear",
    "int8_linear_grad_input",
]

DECODE_TOKENS = 16
OUTLIER_CAP = 256
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_CTYPE = {torch.float32: "float", torch.float16: "f16", torch.bfloat16: "bf16"}
_GEMV_MT = (1, 2, 4, 8, 16)
_GEMV_R = (2, 4)  # output rows per warp: 4 for wide layers, 2 to give narrow ones enough CTAs
_NAMES = _launch.register(
    "int8.cu",
    tuple(
        f"{k}<{c}>"
        for k in ("outlier_columns", "quantize_rows", "int8_epilogue", "dequantize_rows")
        for c in _CTYPE.values()
    )
    + ("select_outliers", "gather_outlier_weights")
    + tuple(f"gemv_int8<{c},{mt},{r}>" for c in _CTYPE.values() for mt in _GEMV_MT for r in _GEMV_R),
)
# Rows of W quantized per step: bounds the fp32 temporary of a weight quantization to ~64 MiB.
_QUANT_CHUNK_ELEMENTS = 1 << 24


# ---------------------------------------------------------------------------- references


def _div(a, b) -> torch.Tensor:
    """``a / b`` correctly rounded in fp32 on every device, for a tensor and a Python float.

    Neither plain form is: ``127.0 / t`` runs as ``t.reciprocal() * 127`` (two roundings), and
    on CUDA ``t / 127.0`` multiplies by the rounded reciprocal. A same-shaped tensor operand
    takes the true division, which is what the CUDA kernels compute (``__fdiv_rn``).
    """
    if isinstance(a, torch.Tensor):
        return a / torch.full_like(a, b)
    return torch.full_like(b, a) / b


def quantize_rowwise_reference(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise absmax int8 quantization of a 2-D float weight (any device); see the module docstring."""
    rows, cols = w.shape
    q = torch.empty((rows, cols), dtype=torch.int8, device=w.device)
    scb = torch.empty(rows, dtype=torch.float32, device=w.device)
    step = max(1, _QUANT_CHUNK_ELEMENTS // max(cols, 1))
    for r0 in range(0, rows, step):
        block = w[r0 : r0 + step].float()
        absmax = block.abs().amax(dim=1) if cols else torch.zeros(block.shape[0], device=w.device)
        inv = torch.where(absmax > 0, _div(127.0, absmax), torch.zeros_like(absmax))
        # nan_to_num: a row so small (absmax < 2**-128) that 127 / absmax overflows stores zeros
        scaled = torch.nan_to_num(block * inv[:, None], nan=0.0, posinf=0.0, neginf=0.0)
        q[r0 : r0 + step] = torch.round(scaled).clamp_(-127, 127).to(torch.int8)
        scb[r0 : r0 + step] = _div(absmax, 127.0)
    return q, scb


def dequantize_rowwise_reference(q: torch.Tensor, scb: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.float() * scb[:, None]).to(dtype)


def quantize_activations_reference(
    x: torch.Tensor, threshold: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(xq int8 [M, K], row_scale fp32 [M], outlier bool [K])`` of a 2-D float ``x``; see the module docstring."""
    xf = x.float()
    outlier = torch.zeros(x.shape[1], dtype=torch.bool, device=x.device)
    if threshold > 0 and x.shape[0] > 0:
        flagged = (xf.abs() >= threshold).any(dim=0)
        outlier[flagged.nonzero().flatten()[:OUTLIER_CAP]] = True
    kept = xf.masked_fill(outlier[None, :], 0.0)
    # amax propagates NaN like the kernel's nanmax; an empty row (K == 0) has amax 0.
    amax = kept.abs().amax(dim=1) if x.shape[1] else torch.zeros(x.shape[0], device=x.device)
    usable = (amax > 0) & torch.isfinite(amax)
    inv = torch.where(usable, _div(127.0, amax), torch.zeros_like(amax))
    scaled = torch.nan_to_num(kept * inv[:, None], nan=0.0, posinf=0.0, neginf=0.0)
    xq = torch.round(scaled).clamp_(-127, 127).to(torch.int8)
    return xq, _div(amax, 127.0), outlier


def _int_mm_exact(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a[M, K] @ b[N, K]^T`` of int8 matrices, exactly, in int32 (any device, any shape)."""
    try:
        return torch._int_mm(a, b.t())
    except RuntimeError:
        pass  # a backend or shape without an int8 GEMM (cuBLASLt refuses some): the exact fp32 route
    # fp32 products of int8 values are exact, and so is every partial sum of a chunk while
    # |sum| < 2**24, i.e. for chunks of at most 2**24 / 127**2 = 1040 columns.
    acc = torch.zeros(a.shape[0], b.shape[0], dtype=torch.int32, device=a.device)
    with torch.autocast(a.device.type, enabled=False):  # an autocast matmul would round to bf16
        for k0 in range(0, a.shape[1], 1024):
            acc += (a[:, k0 : k0 + 1024].float() @ b[:, k0 : k0 + 1024].float().t()).to(torch.int32)
    return acc


_DECODE_CHUNK_ROWS = 512


def _decode_matmul(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``x @ q.float()^T`` in fp32, converting 512 weight rows at a time into one reused buffer.

    Converting the whole weight at once costs a fresh 4-bytes-per-weight allocation per call,
    which on the CPU (page faults) took 8x the matmul itself (4096x14336, 1 token: 199 ms
    against 49 ms chunked).
    """
    n, k = q.shape
    out = torch.empty((x.shape[0], n), dtype=torch.float32, device=x.device)
    buf = torch.empty((min(n, _DECODE_CHUNK_ROWS), k), dtype=torch.float32, device=x.device)
    for r0 in range(0, n, _DECODE_CHUNK_ROWS):
        rows = buf[: min(_DECODE_CHUNK_ROWS, n - r0)]
        rows.copy_(q[r0 : r0 + rows.shape[0]])
        out[:, r0 : r0 + rows.shape[0]] = x @ rows.t()
    return out


def int8_linear_reference(
    x: torch.Tensor, q: torch.Tensor, scb: torch.Tensor, bias: Optional[torch.Tensor], threshold: float
) -> torch.Tensor:
    """The definition of the int8 linear forward on 2-D ``x`` (any device); see the module docstring."""
    bias32 = None if bias is None else bias.float()
    if x.shape[0] <= DECODE_TOKENS:
        out = _decode_matmul(x.float(), q) * scb
        if bias32 is not None:
            out = out + bias32
        return out.to(x.dtype)
    xq, row_scale, outlier = quantize_activations_reference(x, threshold)
    acc = _int_mm_exact(xq, q)
    out = acc.float() * (row_scale[:, None] * scb[None, :])
    cols = outlier.nonzero().flatten()
    if cols.numel():
        out = out + _outlier_sum(x[:, cols].float(), q[:, cols].float()) * scb
    if bias32 is not None:
        out = out + bias32
    return out.to(x.dtype)


def _outlier_sum(xo: torch.Tensor, qo: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``xo[M, C] @ qo[N, C]^T`` as the ordered fp32 sum over c (each product and sum rounded once)."""
    osum = torch.zeros((xo.shape[0], qo.shape[0]), dtype=torch.float32, device=xo.device) if out is None else out.zero_()
    term = torch.empty_like(osum)
    for c in range(xo.shape[1]):
        osum.add_(torch.mul(xo[:, c : c + 1], qo[None, :, c], out=term))
    return osum


# ------------------------------------------------------------------------------ CPU path

# Elements of x (and of the output) one step of the CPU path works on: 512 KiB of fp32, so a
# step's temporaries stay in a core's L2 between the few passes over them.
_CPU_CHUNK_ELEMENTS = 1 << 17


def _int8_linear_cpu(
    x: torch.Tensor, q: torch.Tensor, scb: torch.Tensor, bias: Optional[torch.Tensor], threshold: float
) -> torch.Tensor:
    """``int8_linear_reference`` on CPU tensors, bit for bit, in fewer passes over memory.

    The same fp32 operations in the same order; what changes is where they run. The reference
    allocates a fresh ``M x K`` temporary per step of the activation quantization (~9 of them)
    and three ``M x N`` ones in the epilogue. Here the activations are read once for the
    column and row absmaxes together (row absmaxes are re-read only for rows of a matrix that
    has outlier columns), quantized block of rows by block of rows in one reused buffer, the
    int8 GEMM runs once through ``torch._int_mm`` (oneDNN/VNNI on x86), and the epilogue
    (``acc * (row_scale * SCB)``, the outlier product, bias, the cast) runs in place, one
    cache-sized block of output rows at a time. The clamp of the reference is dropped: a kept
    value has ``|x| <= amax``, so ``|x * RN(127 / amax)| < 127.5`` and it rounds into range.
    Where the compiled CPU library builds (kernels/_cpu.py), those passes run in C++ instead
    (``_int8_linear_compiled``): one read of x for the absmaxes, one to quantize, one pass over
    the accumulator for the whole epilogue.
    """
    m, k = x.shape
    n = q.shape[0]
    if m <= DECODE_TOKENS or k == 0 or n == 0:
        return int8_linear_reference(x, q, scb, bias, threshold)
    lib = _cpu.library()
    if lib is not None and q.is_contiguous():
        return _int8_linear_compiled(lib, x, q, scb, bias, threshold)
    xf = x.float().contiguous()
    rows = max(1, _CPU_CHUNK_ELEMENTS // k)
    buf = torch.empty((min(rows, m), k), dtype=torch.float32)
    # Pass 1: row absmaxes and (with a threshold) column absmaxes, NaN propagating.
    amax = torch.empty(m, dtype=torch.float32)
    colmax = torch.zeros(k, dtype=torch.float32) if threshold > 0 else None
    for r0 in range(0, m, rows):
        a = torch.abs(xf[r0 : r0 + rows], out=buf[: min(rows, m - r0)])
        torch.amax(a, dim=1, out=amax[r0 : r0 + a.shape[0]])
        if colmax is not None:
            torch.maximum(colmax, a.amax(dim=0), out=colmax)
    cols = None if colmax is None else _outlier_columns(xf, colmax, threshold)
    if cols is not None:  # the row absmaxes of the reference exclude the outlier columns
        for r0 in range(0, m, rows):
            a = torch.abs(xf[r0 : r0 + rows], out=buf[: min(rows, m - r0)])
            a.index_fill_(1, cols, 0.0)
            torch.amax(a, dim=1, out=amax[r0 : r0 + a.shape[0]])
    usable = (amax > 0) & torch.isfinite(amax)
    inv = torch.where(usable, _div(127.0, amax), torch.zeros_like(amax))
    # x * inv is finite unless a row has a non-finite value (inv 0: inf * 0) or a tiny absmax (inv inf)
    finite = bool(torch.isfinite(amax).all()) and bool(torch.isfinite(inv).all())
    # Pass 2: quantize.
    xq = torch.empty((m, k), dtype=torch.int8)
    for r0 in range(0, m, rows):
        r1 = min(m, r0 + rows)
        s = torch.mul(xf[r0:r1], inv[r0:r1, None], out=buf[: r1 - r0])
        if cols is not None:
            s.index_fill_(1, cols, 0.0)
        if not finite:
            s.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
        xq[r0:r1].copy_(s.round_())
    acc = _int_mm_exact(xq, q)
    del xq, buf
    row_scale = _div(amax, 127.0)
    xo = qo = None
    if cols is not None:
        xo, qo = x[:, cols].float(), q[:, cols].float()
    bias32 = None if bias is None else bias.float()
    out = torch.empty((m, n), dtype=x.dtype)
    rows = max(1, _CPU_CHUNK_ELEMENTS // n)
    scale = torch.empty((min(rows, m), n), dtype=torch.float32)
    osum = None if xo is None else torch.empty((min(rows, m), n), dtype=torch.float32)
    fp32 = x.dtype == torch.float32
    out32 = None if fp32 else torch.empty((min(rows, m), n), dtype=torch.float32)
    for r0 in range(0, m, rows):
        r1 = min(m, r0 + rows)
        sc = torch.mul(row_scale[r0:r1, None], scb[None, :], out=scale[: r1 - r0])
        o = out[r0:r1] if fp32 else out32[: r1 - r0]
        o.copy_(acc[r0:r1]).mul_(sc)
        if xo is not None:
            o.add_(_outlier_sum(xo[r0:r1], qo, out=osum[: r1 - r0]).mul_(scb))
        if bias32 is not None:
            o.add_(bias32)
        if not fp32:
            out[r0:r1].copy_(o)  # the one rounding to x's dtype
    return out


def _outlier_columns(xf: torch.Tensor, colmax: torch.Tensor, threshold: float) -> Optional[torch.Tensor]:
    """The reference's outlier columns (at most ``OUTLIER_CAP``) from the column absmaxes, or None."""
    flagged = colmax >= threshold
    nan_cols = colmax.isnan()
    if bool(nan_cols.any()):  # a NaN hides whether its column also holds a |x| >= threshold
        flagged[nan_cols] = (xf[:, nan_cols].abs() >= threshold).any(dim=0)
    cols = flagged.nonzero().flatten()[:OUTLIER_CAP]
    return cols if cols.numel() else None


def _int8_linear_compiled(lib, x, q, scb, bias, threshold):
    """``_int8_linear_cpu`` with its passes in cpu/int8_cpu.cpp: row absmaxes and flagged columns
    in one read of x, the quantization (with the row scales) in one more, the epilogue (scales,
    outlier sum, bias) in one pass over the int32 accumulator, written over it. Same operations,
    same order, same bits as the reference."""
    m, k = x.shape
    n = q.shape[0]
    threads = torch.get_num_threads()
    xf = x.float().contiguous()
    amax = torch.empty(m, dtype=torch.float32)
    skip = cols = None
    if threshold > 0:
        flags = torch.empty(k, dtype=torch.uint8)
        lib.optim8_int8_scan(xf.data_ptr(), m, k, threshold, flags.data_ptr(), amax.data_ptr(), threads)
        cols = flags.nonzero().flatten()
        if not cols.numel():
            cols = None
        elif cols.numel() > OUTLIER_CAP:  # flagged columns past the cap stay in the int8 path
            cols = cols[:OUTLIER_CAP]
            skip = torch.zeros(k, dtype=torch.uint8)
            skip[cols] = 1
        else:
            skip = flags
    else:
        lib.optim8_int8_rowmax(xf.data_ptr(), m, k, None, amax.data_ptr(), threads)
    if skip is not None:  # the row absmaxes of the reference exclude the outlier columns
        lib.optim8_int8_rowmax(xf.data_ptr(), m, k, skip.data_ptr(), amax.data_ptr(), threads)
    xq = torch.empty((m, k), dtype=torch.int8)
    row_scale = torch.empty(m, dtype=torch.float32)
    lib.optim8_int8_quantize_rows(
        xf.data_ptr(), m, k, amax.data_ptr(), None if skip is None else skip.data_ptr(), xq.data_ptr(), row_scale.data_ptr(), threads
    )
    acc = _int_mm_exact(xq, q).contiguous()
    del xq
    xo = qo = None
    if cols is not None:  # the outlier columns: x's as fp32 [M, C], the weight's transposed [C, N]
        xo, qo = x[:, cols].float().contiguous(), q[:, cols].t().float().contiguous()
    bias32 = None if bias is None else bias.float().contiguous()
    scb32 = scb.float().contiguous()
    out = acc.view(torch.float32)  # the epilogue writes each row over its own accumulators
    lib.optim8_int8_epilogue(
        acc.data_ptr(), m, n, row_scale.data_ptr(), scb32.data_ptr(),
        None if xo is None else xo.data_ptr(), None if qo is None else qo.data_ptr(), 0 if xo is None else xo.shape[1],
        None if bias32 is None else bias32.data_ptr(), out.data_ptr(), threads,
    )
    return out if x.dtype == torch.float32 else out.to(x.dtype)


def _int8_linear_default(x, q, scb, bias, threshold):
    """The implementation off CUDA: the fast CPU path on CPU tensors, the reference elsewhere."""
    if x.device.type == "cpu":
        return _int8_linear_cpu(x, q, scb, bias, threshold)
    return int8_linear_reference(x, q, scb, bias, threshold)


# ----------------------------------------------------------------------------- CUDA paths


_functions: dict[tuple[str, str], object] = {}


def _launch_kernel(kernel: str, grid, block, args, device: torch.device) -> None:
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    # Memoized here as well: _launch.function hashes the whole source at every call, which
    # costs more than a launch on these per-token-count hot paths.
    key = (kernel, str(device))
    fn = _functions.get(key)
    if fn is None:
        fn = _functions[key] = _launch.function("int8.cu", kernel, device, _NAMES)
    _launch.launch(fn, grid, block, args, device)


def _null_or_ptr(t: Optional[torch.Tensor]) -> np.uint64:
    return np.uint64(0) if t is None else _launch.ptr(t)


def _quantize_activations_cuda(x: torch.Tensor, threshold: float, k_padded: int):
    """CUDA half of the activation side: ``(xq [M, k_padded], row_scale, outliers)``.

    ``outliers`` is None at threshold 0, else ``(slots [K] int32: slot or -1, cols [cap],
    count [1], xo [M, cap] fp32)``, all on the device: nothing here waits for the host.
    """
    m, k = x.shape
    ctype = _CTYPE[x.dtype]
    xq = torch.empty((m, k_padded), dtype=torch.int8, device=x.device)
    row_scale = torch.empty(m, dtype=torch.float32, device=x.device)
    outliers = None
    cap = min(OUTLIER_CAP, max(k, 1))
    if threshold > 0 and m and k:
        slots = torch.zeros(k, dtype=torch.int32, device=x.device)
        cols = torch.empty(cap, dtype=torch.int32, device=x.device)
        count = torch.empty(1, dtype=torch.int32, device=x.device)
        xo = torch.empty((m, cap), dtype=torch.float32, device=x.device)
        rows = max(64, -(-m // 65535))  # rows per CTA; gridDim.y may not exceed 65535
        grid = ((k + 255) // 256, (m + rows - 1) // rows)
        args = (_launch.ptr(x), _launch.ptr(slots), np.int64(m), np.int32(k), np.float32(threshold), np.int32(rows))
        _launch_kernel(f"outlier_columns<{ctype}>", grid, 256, args, x.device)
        args = (_launch.ptr(slots), _launch.ptr(cols), _launch.ptr(count), np.int32(k), np.int32(cap))
        _launch_kernel("select_outliers", 1, 1024, args, x.device)
        outliers = (slots, cols, count, xo)
    if m:
        slots_ptr = _launch.ptr(outliers[0]) if outliers else np.uint64(0)
        xo_ptr = _launch.ptr(outliers[3]) if outliers else np.uint64(0)
        vec = int(k % 8 == 0 and k_padded == k and x.data_ptr() % 16 == 0)
        args = (
            _launch.ptr(x),
            slots_ptr,
            _launch.ptr(xq),
            _launch.ptr(row_scale),
            xo_ptr,
            np.int32(k),
            np.int32(k_padded),
            np.int32(cap),
            np.int32(vec),
        )
        _launch_kernel(f"quantize_rows<{ctype}>", m, 256, args, x.device)
    return xq, row_scale, outliers


def _grid_rows(rows: int, cols: int, block: int = 256) -> tuple[int, int]:
    """Grid of the row-major elementwise kernels: x covers a row's columns, y the rows (strided past 65535)."""
    return max(1, (cols + block - 1) // block), max(1, min(rows, 65535))


def _dequantize_cuda(q: torch.Tensor, scb: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if dtype not in _CTYPE:  # float64: no kernel instantiation, the reference is exact enough
        return dequantize_rowwise_reference(q, scb, dtype)
    q, scb = q.contiguous(), scb.contiguous()
    out = torch.empty(q.shape, dtype=dtype, device=q.device)
    if q.numel():
        _launch_kernel(
            f"dequantize_rows<{_CTYPE[dtype]}>",
            _grid_rows(q.shape[0], q.shape[1]),
            256,
            (_launch.ptr(q), _launch.ptr(scb), _launch.ptr(out), np.int64(q.shape[0]), np.int32(q.shape[1])),
            q.device,
        )
    return out


def _gemv_cuda(x: torch.Tensor, q: torch.Tensor, scb: torch.Tensor, bias32: Optional[torch.Tensor]) -> torch.Tensor:
    m, k = x.shape
    n = q.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    mt = next(t for t in _GEMV_MT if t >= m)
    # 8 warps a CTA. Up to 4 tokens the kernel is bound by weight bytes: 2 rows per warp where
    # 4 would leave fewer than two CTAs per SM. From 8 tokens on it is bound by FMAs and
    # shared-memory reads of x, which 4 rows per warp halve.
    r = 4 if mt >= 8 or (n + 31) // 32 >= 2 * _sm_count(x.device) else 2
    rows_per_cta = 8 * r
    vec = int(k % 16 == 0 and q.data_ptr() % 16 == 0)
    _launch_kernel(
        f"gemv_int8<{_CTYPE[x.dtype]},{mt},{r}>",
        (n + rows_per_cta - 1) // rows_per_cta,
        256,
        (
            _launch.ptr(x),
            _launch.ptr(q),
            _launch.ptr(scb),
            _null_or_ptr(bias32),
            _launch.ptr(out),
            np.int32(m),
            np.int32(n),
            np.int32(k),
            np.int32(vec),
        ),
        x.device,
    )
    return out


def _sm_count(device: torch.device) -> int:
    return _launch.sm_count(device)


def _round_up(v: int, to: int) -> int:
    return (v + to - 1) // to * to


def _int8_linear_cuda(x, q, scb, bias, threshold):
    x, q, scb = x.contiguous(), q.contiguous(), scb.contiguous()
    m, k = x.shape
    n = q.shape[0]
    bias32 = None if bias is None else bias.float().contiguous()
    if m == 0 or n == 0:
        return torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m <= DECODE_TOKENS:
        return _gemv_cuda(x, q, scb, bias32)
    # cuBLASLt's int8 GEMM (torch._int_mm) wants K and N multiples of 8; other shapes pad
    # with zero columns / rows, which add nothing to the int32 sums.
    kp, np_ = _round_up(max(k, 1), 8), _round_up(n, 8)
    xq, row_scale, outliers = _quantize_activations_cuda(x, threshold, kp)
    wq = q
    if kp != k or np_ != n:
        wq = torch.zeros((np_, kp), dtype=torch.int8, device=q.device)
        wq[:n, :k] = q
    acc = _launch.int_mm(xq, wq.t())
    xo_ptr = qo_ptr = count_ptr = np.uint64(0)
    cap = 0
    if outliers is not None:
        slots, cols, count, xo = outliers
        cap = xo.shape[1]
        qo = torch.empty((cap, n), dtype=torch.int8, device=x.device)
        args = (_launch.ptr(q), _launch.ptr(cols), _launch.ptr(count), _launch.ptr(qo), np.int32(n), np.int32(k))
        _launch_kernel("gather_outlier_weights", (n + 255) // 256, 256, args, x.device)
        xo_ptr, qo_ptr, count_ptr = _launch.ptr(xo), _launch.ptr(qo), _launch.ptr(count)
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    args = (
        _launch.ptr(acc),
        np.int32(acc.stride(0)),
        _launch.ptr(row_scale),
        _launch.ptr(scb),
        xo_ptr,
        qo_ptr,
        count_ptr,
        np.int32(cap),
        _null_or_ptr(bias32),
        _launch.ptr(out),
        np.int64(m),
        np.int32(n),
    )
    _launch_kernel(f"int8_epilogue<{_CTYPE[x.dtype]}>", _grid_rows(m, n), 256, args, x.device)
    return out


# ------------------------------------------------------------------------ custom ops


@torch.library.custom_op("optim8::quantize_rowwise", mutates_args=())
def _quantize_rowwise_op(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return quantize_rowwise_reference(w)


@_quantize_rowwise_op.register_fake
def _(w):
    return w.new_empty(w.shape, dtype=torch.int8), w.new_empty((w.shape[0],), dtype=torch.float32)


@torch.library.custom_op("optim8::dequantize_rowwise", mutates_args=())
def _dequantize_op(q: torch.Tensor, scb: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return dequantize_rowwise_reference(q, scb, dtype)


@_dequantize_op.register_fake
def _(q, scb, dtype):
    return q.new_empty(q.shape, dtype=dtype)


_launch.cuda_kernel(_dequantize_op)(_dequantize_cuda)


@torch.library.custom_op("optim8::quantize_activations", mutates_args=())
def _quantize_activations_op(x: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return quantize_activations_reference(x, threshold)


@_quantize_activations_op.register_fake
def _(x, threshold):
    m, k = x.shape
    return (
        x.new_empty((m, k), dtype=torch.int8),
        x.new_empty((m,), dtype=torch.float32),
        x.new_empty((k,), dtype=torch.bool),
    )


@_launch.cuda_kernel(_quantize_activations_op)
def _(x, threshold):
    x = x.contiguous()
    k = x.shape[1]
    xq, row_scale, outliers = _quantize_activations_cuda(x, threshold, k)
    outlier = outliers[0] >= 0 if outliers is not None else torch.zeros(k, dtype=torch.bool, device=x.device)
    return xq, row_scale, outlier


@torch.library.custom_op("optim8::int8_linear", mutates_args=())
def _int8_linear_op(
    x: torch.Tensor, q: torch.Tensor, scb: torch.Tensor, bias: Optional[torch.Tensor], threshold: float
) -> torch.Tensor:
    return _int8_linear_default(x, q, scb, bias, threshold)


@_int8_linear_op.register_fake
def _(x, q, scb, bias, threshold):
    return x.new_empty((x.shape[0], q.shape[0]))


_launch.cuda_kernel(_int8_linear_op)(_int8_linear_cuda)


@torch.library.custom_op("optim8::int8_linear_grad_input", mutates_args=())
def _grad_input_op(grad: torch.Tensor, q: torch.Tensor, scb: torch.Tensor) -> torch.Tensor:
    return grad @ dequantize_rowwise_reference(q, scb, grad.dtype)


@_grad_input_op.register_fake
def _(grad, q, scb):
    return grad.new_empty((grad.shape[0], q.shape[1]))


@_launch.cuda_kernel(_grad_input_op)
def _(grad, q, scb):
    return grad @ _dequantize_cuda(q, scb, grad.dtype)


def _grad_input_setup_context(ctx, inputs, output):
    _, q, scb = inputs
    ctx.save_for_backward(q, scb)


def _grad_input_backward(ctx, grad_grad_x):
    # grad_x = grad @ W is linear in grad: its own backward is the straight-through product
    # grad_grad_x @ W^T (double backward, create_graph=True); W (int8 codes, scales) takes none.
    q, scb = ctx.saved_tensors
    return grad_grad_x @ _dequantize_op(q, scb, grad_grad_x.dtype).t(), None, None


_grad_input_op.register_autograd(_grad_input_backward, setup_context=_grad_input_setup_context)


def _setup_context(ctx, inputs, output):
    x, q, scb, bias, threshold = inputs
    # Only what the backward reads: the (frozen, already resident) int8 weight and scales.
    # x is not needed: the weight takes no gradient, and the bias gradient is a sum of grad.
    ctx.save_for_backward(q, scb)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, grad):
    q, scb = ctx.saved_tensors
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_x = _grad_input_op(grad.contiguous(), q, scb)
    if ctx.bias_dtype is not None and ctx.needs_input_grad[3]:
        grad_bias = grad.float().sum(dim=0).to(ctx.bias_dtype)
    return grad_x, None, None, grad_bias, None


_int8_linear_op.register_autograd(_backward, setup_context=_setup_context)


class _Int8LinearEager(torch.autograd.Function):
    """The same forward and backward as ``optim8::int8_linear``, without the custom-op dispatch.

    Measured on a 2-core CPU for a tiny call: the reference alone 13 us, through this
    Function 18 us, through the custom op 24 us. A decode step's GPU work on a 4096x14336
    layer is ~20 us, so eager calls take this path; tracing (torch.compile, export), fake
    and meta tensors and other devices take the custom op.
    """

    @staticmethod
    def forward(ctx, x, q, scb, bias, threshold):
        _setup_context(ctx, (x, q, scb, bias, threshold), None)
        if _launch.kernel_device(x.device):
            return _int8_linear_cuda(x, q, scb, bias, threshold)
        return _int8_linear_default(x, q, scb, bias, threshold)

    @staticmethod
    def backward(ctx, grad):
        return _backward(ctx, grad)


# ------------------------------------------------------------------------ public API


def _check_scb(q: torch.Tensor, scb: torch.Tensor, where: str) -> None:
    """SCB must be fp32 ``[N]`` for ``q [N, K]``, on q's device, finite and >= 0 (0: an all-zero row).

    The values are read once per version of the tensor (``scb._version`` counts in-place
    writes), so a layer's forward pays one host sync for its scales, not one per call.
    """
    if not isinstance(scb, torch.Tensor) or scb.dtype != torch.float32:
        got = scb.dtype if isinstance(scb, torch.Tensor) else type(scb).__name__
        raise TypeError(f"{where}: SCB (the row scales) must be a float32 tensor, got {got}")
    if scb.dim() != 1 or scb.shape[0] != q.shape[0]:
        raise ValueError(
            f"{where}: SCB has shape {tuple(scb.shape)} but the int8 weight has {q.shape[0]} rows; it needs one "
            f"scale per row, shape ({q.shape[0]},)"
        )
    if scb.device != q.device:
        raise ValueError(f"{where}: SCB is on {scb.device} but the int8 weight on {q.device}; put them on one device")
    if type(scb) is not torch.Tensor or scb.is_meta or torch.compiler.is_compiling() or not scb.numel():
        return
    try:
        version = scb._version
    except RuntimeError:  # inference tensors have no version counter: check every time
        version = None
    if version is not None and getattr(scb, "_optim8_checked_version", None) == version:
        return
    bad = ~(torch.isfinite(scb) & (scb >= 0))
    if bool(bad.any()):
        rows = bad.nonzero().flatten()[:5].tolist()
        raise ValueError(
            f"{where}: SCB holds {int(bad.sum())} scales that are NaN, infinite or negative (rows {rows}...); "
            "the checkpoint or the tensor passed in is damaged. Re-quantize the float weight (quantize_rowwise)"
        )
    if version is not None:
        scb._optim8_checked_version = version


def quantize_rowwise(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a float ``[N, K]`` weight to ``(q int8 [N, K], SCB fp32 [N])``; ``W ~= q * SCB[:, None]``.

    Raises ``ValueError`` if ``w`` holds NaN or Inf (checked except on the meta device).
    """
    if w.dim() != 2:
        raise ValueError(
            f"quantize_rowwise expects a 2-D [out_features, in_features] weight, got shape {tuple(w.shape)}"
        )
    if w.dtype not in FLOAT_DTYPES and w.dtype != torch.float64:
        raise TypeError(f"quantize_rowwise takes a floating weight, got {w.dtype}")
    if w.device.type != "meta" and w.numel() and not bool(torch.isfinite(w).all()):
        bad = (~torch.isfinite(w)).sum().item()
        raise ValueError(f"weight of shape {tuple(w.shape)} holds {bad} NaN/Inf values and cannot be quantized")
    return _quantize_rowwise_op(w.detach())


def dequantize_rowwise(q: torch.Tensor, scb: torch.Tensor, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(q * SCB[:, None])`` computed in fp32 and rounded once to ``dtype``."""
    if q.dtype != torch.int8 or scb.dtype != torch.float32:
        raise TypeError(f"dequantize_rowwise takes int8 codes and fp32 scales, got {q.dtype} and {scb.dtype}")
    if q.dim() != 2:
        raise ValueError(f"dequantize_rowwise takes a 2-D [out_features, in_features] weight, got shape {tuple(q.shape)}")
    if dtype not in FLOAT_DTYPES + (torch.float64,):
        raise TypeError(f"dtype must be a floating dtype (float32, float16, bfloat16, float64), got {dtype}")
    _check_scb(q, scb, "dequantize_rowwise")
    return _dequantize_op(q, scb, dtype)


def quantize_activations(x: torch.Tensor, *, threshold: float = 6.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The activation half of the mixed path for a 2-D ``x[M, K]``: ``(xq, row_scale, outlier)``.

    ``outlier`` (bool ``[K]``) marks the columns that take the float path (the first
    ``OUTLIER_CAP`` columns holding any ``|x| >= threshold``); ``xq`` (int8 ``[M, K]``, zero in
    those columns) and ``row_scale`` (fp32 ``[M]``) quantize the rest: ``x ~= xq * row_scale``.
    """
    if x.dim() != 2 or x.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"quantize_activations takes a 2-D fp32/fp16/bf16 tensor, got {x.dtype} of shape {tuple(x.shape)}"
        )
    return _quantize_activations_op(x, float(threshold))


def int8_linear(
    x: torch.Tensor, q: torch.Tensor, scb: torch.Tensor, bias: Optional[torch.Tensor] = None, *, threshold: float = 6.0
) -> torch.Tensor:
    """``x[M, K] @ (q * SCB)^T + bias`` by the decode or the mixed int8 path (module docstring).

    Differentiable in ``x`` and ``bias`` (straight-through: ``grad_x = grad @ (q * SCB)``).
    """
    if x.dim() != 2 or q.dim() != 2 or x.shape[1] != q.shape[1] or q.dtype != torch.int8:
        raise ValueError(
            f"int8_linear takes x [M, K] and int8 q [N, K]; got x {tuple(x.shape)} and {q.dtype} q {tuple(q.shape)}"
        )
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"int8_linear takes float32, float16 or bfloat16 x, got {x.dtype}; convert it first")
    if x.device != q.device or scb.device != q.device:
        raise ValueError(
            f"int8_linear: x is on {x.device}, q on {q.device}, SCB on {scb.device}; put them on one device"
        )
    _check_scb(q, scb, "int8_linear")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != q.shape[0] or bias.device != q.device):
        raise ValueError(
            f"int8_linear: bias has shape {tuple(bias.shape)} on {bias.device}; the int8 weight needs shape "
            f"({q.shape[0]},) on {q.device}"
        )
    if type(x) is torch.Tensor and x.device.type in ("cpu", "cuda") and not torch.compiler.is_compiling():
        return _Int8LinearEager.apply(x, q, scb, bias, float(threshold))
    return _int8_linear_op(x, q, scb, bias, float(threshold))


def int8_linear_grad_input(grad: torch.Tensor, q: torch.Tensor, scb: torch.Tensor) -> torch.Tensor:
    """``grad[M, N] @ dequantize_rowwise(q, SCB)`` in grad's dtype (differentiable in ``grad``)."""
    if grad.dim() != 2 or q.dim() != 2 or q.dtype != torch.int8 or grad.shape[1] != q.shape[0]:
        raise ValueError(
            f"int8_linear_grad_input takes grad [M, N] and int8 q [N, K]; got grad {tuple(grad.shape)} and "
            f"{q.dtype} q {tuple(q.shape)}"
        )
    _check_scb(q, scb, "int8_linear_grad_input")
    return _grad_input_op(grad, q, scb)
