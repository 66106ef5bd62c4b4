"""Blockwise dynamic 8-bit quantization.

``quantize_blockwise(x)`` splits ``x`` (flattened, row-major) into blocks of
``blocksize`` consecutive elements, keeps one fp32 scale ``absmax`` per block, and stores
each element as the index (uint8) of the entry of ``dynamic_map(signed)`` nearest to
``x / absmax``. ``dequantize_blockwise`` returns ``map[code] * absmax``.

Algorithm, per block (identical in the PyTorch reference, the CPU and the CUDA kernels):

    amax   = max(|x_i|)                   # fp32; NaN if any x_i is NaN
    absmax = amax                         # unsigned map
    absmax = x_k with |x_k| == amax       # signed map: the block's extreme value, its sign
                                          # included (+amax if both +amax and -amax occur)
    inv    = 1 / absmax  (1 if absmax == 0)
    code_i = #(boundaries < x_i * inv)    # boundaries[j] = (map[j] + map[j+1]) / 2
    code_i = max(code_i, 1) if x_i * inv > 0     # unsigned map only

Two rules make the stored state exact under requantization and safe as a divisor:

* The signed scale. The signed map holds ``+1`` but not ``-1`` (its lowest entry is
  -0.99297), so with a positive absmax a block whose extreme value is negative would come
  back 0.7% smaller every time it is requantized: a bias toward zero on every optimizer
  step. Dividing by the signed extreme maps it to exactly ``+1``, so
  ``quantize(dequantize(codes, absmax))`` returns the same codes and absmax (tested over
  random states, every blocksize, both maps). The unsigned map's values are >= 0, so its
  absmax is the plain maximum.
* Positive values never encode to zero in the unsigned map: they take at least its
  smallest positive entry (3.25e-7 of the block's absmax). Adam's second moment is stored
  with this map; an element whose ``v`` rounded to zero while its first moment kept a
  non-zero code would step by ``lr * m / eps`` (parameters of 7-14 after 100 steps on
  gradients whose scale spans 1e-3..1 within a block). Rounding such ``v`` up makes the
  denominator larger, never smaller, than the exact one.

Non-finite input: a block that holds a NaN or an infinity is stored with ``absmax = NaN``
and every code at the map's zero entry, so it dequantizes to NaN throughout. No other block
is affected. A block whose ``amax`` is below ``2**-104`` is stored as zero (``absmax = 0``,
every code at the zero entry): at or above it every dequantized non-zero value is a normal
fp32 number, which keeps requantization exact (a product in the subnormal range would lose
bits).

CUDA kernels (cuda/blockwise.cu): both stride over the tensor with a grid sized to the GPU, 8
elements per thread and step (16-byte loads and stores of values, 8-byte of codes); the quantizer
finds codes with a table in shared memory (one 32-bit word per cell of sign, exponent and top 7
mantissa bits: :func:`_encoder_table_cpu`, proven exact by :func:`_check_encoder`), one shared load
per element.

Dtypes: fp32, fp16 and bf16 are read natively (converted to fp32 in registers). Other
dtypes (float64, integers) raise ``TypeError``: convert with ``x.float()`` first.
Non-contiguous input is accepted and read through a contiguous copy.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

if not __name__.startswith("optim8."):  # see kernels/__init__.py: a second copy of the ops would free the first
    raise ImportError(f"{__name__} is part of optim8: import optim8.kernels, not the top-level 'kernels'")

from . import _launch
from .quant_map import map_boundaries, map_on, zero_code

__all__ = ["quantize_blockwise", "dequantize_blockwise", "BLOCKSIZES", "DEFAULT_BLOCKSIZE", "num_blocks"]

DEFAULT_BLOCKSIZE = 256
# Blocks whose largest magnitude is below this are stored as zero (see the module docstring).
TINY = 2.0**-104
BLOCKSIZES = (64, 128, 256, 512, 1024, 2048, 4096)
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_CTYPE = {torch.float32: "float", torch.float16: "f16", torch.bfloat16: "bf16"}
_NAMES = _launch.register(
    "blockwise.cu",
    tuple(
        f"{kernel}<{ctype},{bs}>"
        for kernel in ("quantize_blockwise", "dequantize_blockwise")
        for ctype in _CTYPE.values()
        for bs in BLOCKSIZES
    ),
)


def num_blocks(n: int, blocksize: int = DEFAULT_BLOCKSIZE) -> int:
    return (n + blocksize - 1) // blocksize


def _check_blocksize(blocksize: int) -> None:
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {BLOCKSIZES}, got {blocksize!r}")


# ---------------------------------------------------------------------------- reference


def quantize_blockwise_reference(x: torch.Tensor, blocksize: int, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The PyTorch definition of the quantizer (any device); see the module docstring."""
    n = x.numel()
    nb = num_blocks(n, blocksize)
    flat = x.reshape(-1).float()
    pad = nb * blocksize - n
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    blocks = flat.view(nb, blocksize)
    absmax, ok = block_scale_reference(blocks, signed)
    inv = torch.where(absmax != 0, 1.0 / absmax, torch.ones_like(absmax))
    scaled = blocks * inv[:, None]
    codes = torch.bucketize(scaled, map_boundaries(signed, x.device), right=False)
    if not signed:
        codes = torch.where((scaled > 0) & (codes == 0), 1, codes)
    codes = torch.where(ok[:, None], codes, zero_code(signed)).to(torch.uint8)
    return codes.reshape(-1)[:n].reshape(x.shape), absmax


def block_scale_reference(blocks: torch.Tensor, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(absmax, ok)`` of fp32 ``blocks [nb, blocksize]``: the stored scale of each block and
    whether its codes are encoded (False: stored as zero or as NaN; see the module docstring)."""
    if blocks.shape[0] == 0:
        return blocks.new_empty(0), blocks.new_empty(0, dtype=torch.bool)
    amax = blocks.abs().amax(dim=1)  # amax propagates NaN, like the kernel's nanmax
    finite = torch.isfinite(amax)
    ok = finite & (amax >= TINY)
    absmax = amax
    if signed:
        absmax = torch.where((blocks == amax[:, None]).any(dim=1), amax, -amax)
    absmax = torch.where(ok, absmax, torch.where(finite, 0.0, float("nan")))
    return absmax, ok
def dequantize_blockwise_reference(
    codes: torch.Tensor, absmax: torch.Tensor, blocksize: int, signed: bool, dtype: torch.dtype
) -> torch.Tensor:
    n = codes.numel()
    values = map_on(signed, codes.device)[codes.reshape(-1).long()]
    scale = absmax.float().repeat_interleave(blocksize)[:n]
    return (values * scale).to(dtype).reshape(codes.shape)


# ------------------------------------------------------------------------ custom ops
# torch.library gives device dispatch (CPU and any non-CUDA device take the reference),
# fake tensors for meta-device models and torch.compile.


def _to_f32(bits: torch.Tensor) -> torch.Tensor:
    return torch.where(bits >= 1 << 31, bits - (1 << 32), bits).to(torch.int32).view(torch.float32)


@functools.cache
def _encoder_table_cpu(signed: bool) -> torch.Tensor:
    """The CUDA quantizer's encoder table (cuda/blockwise.cu, ``encode_word``): one int32 per cell of
    kernels/adam.py's GPU table (sign, exponent field 102..128 or "tiny", top 7 mantissa bits),
    ``code << 16 | q``. ``code``: the code of the cell's lowest value (adam's count of boundaries
    below it); for the unsigned map at least 1 in every positive cell (a positive value never
    encodes to zero; the kernel sends +0 to the negative half, whose codes are 0). ``q = 0xffff - key(b)`` for the one boundary ``b``
    inside the cell, 0 for none: ``key`` is a value's low 16 bits, inverted for negative values,
    so that ``key(v) + q`` carries into the code exactly when ``v > b``. Raises where a cell holds
    two boundaries or the tiny row one (the kernel's encoder could not be exact there)."""
    from .adam import GPU_LUT_EXP0, GPU_LUT_NEXP, _gpu_encode_table_cpu

    count = _gpu_encode_table_cpu(signed).long().view(2, GPU_LUT_NEXP, 128)
    mid = map_boundaries(signed, "cpu")
    sgn = torch.arange(2).view(2, 1, 1)
    e = torch.arange(GPU_LUT_NEXP).view(1, -1, 1)
    field = (e + GPU_LUT_EXP0) << 23 | torch.arange(128).view(1, 1, -1) << 16
    # each cell's largest value: positive, its top; negative, its member nearest zero
    tiny_top = ((GPU_LUT_EXP0 + 1) << 23) - 1
    high = torch.where(sgn == 0, torch.where(e == 0, tiny_top, field | 0xFFFF), 1 << 31 | torch.where(e == 0, 0, field))
    inside = torch.bucketize(_to_f32(high), mid) - count  # boundaries in [lowest, largest) of the cell
    if int(inside.max()) > 1 or int(inside[:, 0].max()) > 0:
        raise AssertionError(f"the CUDA encoder table of the {'signed' if signed else 'unsigned'} map needs two boundary tests in a cell")
    b = mid.view(torch.int32).to(torch.int64)[count.clamp(max=254)] & 0xFFFF
    key = torch.where(sgn == 0, b, 0xFFFF - b)
    q = torch.where(inside == 1, 0xFFFF - key, 0)
    code = count
    if not signed:  # every positive value takes at least code 1: no boundary test below that
        low1 = (sgn == 0) & (count == 0)
        code = torch.where(low1, 1, code)
        q = torch.where(low1, 0, q)
    return (code << 16 | q).to(torch.int32).reshape(-1)


def _encoder_table(signed: bool, device: torch.device) -> torch.Tensor:
    key = (signed, device)
    t = _encoder_tables.get(key)
    if t is None:
        _check_encoder(signed)
        t = _encoder_tables[key] = _encoder_table_cpu(signed).to(device)
    return t


_encoder_tables: dict[tuple, torch.Tensor] = {}


@functools.cache
def _check_encoder(signed: bool) -> None:
    """Prove that the CUDA encoder (``encode_word`` in cuda/blockwise.cu with its table,
    :func:`_encoder_table_cpu`) computes ``torch.bucketize`` (with the unsigned map's "positive
    values take at least code 1") for every fp32 value ``|v| < 4``, the values it encodes: the
    kernel's integer arithmetic mirrored here. Both are step functions of ``v``, constant between
    consecutive critical values (both ends of every table cell, every boundary and the float
    just above it, the zeros, the smallest subnormals), so they agree everywhere when they agree
    on those. Checked once per map, on the CPU, before the first launch."""
    from .adam import GPU_LUT_EXP0, GPU_LUT_NEXP

    table = _encoder_table_cpu(signed).long() & 0xFFFFFFFF
    mid = map_boundaries(signed, "cpu")
    top = torch.arange(1 << 16, dtype=torch.int64)
    top = top[((top >> 7) & 0xFF) <= 128]  # exponent field <= 128: |v| < 4
    ends = _to_f32(torch.cat([top << 16, top << 16 | 0xFFFF]))
    tiny = float(np.nextafter(np.float32(0), np.float32(1)))
    zero = torch.tensor([0.0, -0.0, tiny, -tiny])
    v = torch.cat([ends, mid, torch.nextafter(mid, torch.tensor(float("inf"))), zero])
    v = v[v.abs() < 4]
    bits = v.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    t = (torch.clamp(v.abs(), min=2.0**-25).view(torch.int32).to(torch.int64) & 0xFFFFFFFF) >> 16
    # the negative half: negative values (the sign bit); for the unsigned map +0 too
    negative = (bits >> 31 == 1) if signed else ~((bits > 0) & (bits < 1 << 31))
    sm = torch.where(negative, 0xFFFFFFFF, 0)
    w = table[t - (GPU_LUT_EXP0 << 7) + (sm & (GPU_LUT_NEXP * 128))] + ((bits ^ sm) & 0xFFFF)
    c = (w >> 16) & 0xFF
    ref = torch.bucketize(v, mid)
    if not signed:
        ref = torch.where((v > 0) & (ref == 0), 1, ref)
    if not torch.equal(c, ref):
        bad = v[c != ref][:4].tolist()
        raise AssertionError(f"the CUDA encoder differs from torch.bucketize (signed={signed}) at {bad}")


# quantize_blockwise's threads per CTA (cuda/blockwise.cu, QB_THREADS): 8 elements each, so a CTA
# step covers 8192 elements; two CTAs per SM hold the GPU's 64 warps with two copies of the table.
_QUANTIZE_THREADS = 1024


def _grid_limit(fn, threads: int, device: torch.device) -> int:
    """CTAs that fit on the GPU at once: the kernels stride over the tensor with this many, so
    each CTA loads its tables into shared memory once."""
    return _launch.sm_count(device) * _launch.ctas_per_sm(fn, threads, device)


@torch.library.custom_op("optim8::quantize_blockwise", mutates_args=())
def _quantize_op(x: torch.Tensor, blocksize: int, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return quantize_blockwise_reference(x, blocksize, signed)


@_quantize_op.register_fake
def _(x, blocksize, signed):
    nb = num_blocks(x.numel(), blocksize)
    return x.new_empty(x.shape, dtype=torch.uint8), x.new_empty((nb,), dtype=torch.float32)


@_launch.cuda_kernel(_quantize_op)
def _quantize_cuda(x: torch.Tensor, blocksize: int, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.contiguous()
    n = x.numel()
    codes = torch.empty(x.shape, dtype=torch.uint8, device=x.device)
    absmax = torch.empty(num_blocks(n, blocksize), dtype=torch.float32, device=x.device)
    if n == 0:
        return codes, absmax
    fn = _launch.function("blockwise.cu", f"quantize_blockwise<{_CTYPE[x.dtype]},{blocksize}>", x.device, _NAMES)
    table = _encoder_table(signed, x.device)
    assert table.data_ptr() % 16 == 0, "the encoder table is copied to shared memory in 16-byte pieces"
    cta = _QUANTIZE_THREADS
    grid = min(num_blocks(n, cta * 8), _grid_limit(fn, cta, x.device))
    args = (
        _launch.ptr(x),
        _launch.ptr(table),
        _launch.ptr(codes),
        _launch.ptr(absmax),
        np.int64(n),
        np.int32(zero_code(signed)),
        np.int32(x.data_ptr() % 16 == 0),
        np.int32(signed),
    )
    _launch.launch(fn, grid, cta, args, x.device)
    return codes, absmax


@torch.library.custom_op("optim8::dequantize_blockwise", mutates_args=())
def _dequantize_op(
    codes: torch.Tensor, absmax: torch.Tensor, blocksize: int, signed: bool, dtype: torch.dtype
) -> torch.Tensor:
    return dequantize_blockwise_reference(codes, absmax, blocksize, signed, dtype)


@_dequantize_op.register_fake
def _(codes, absmax, blocksize, signed, dtype):
    return codes.new_empty(codes.shape, dtype=dtype)


@_launch.cuda_kernel(_dequantize_op)
def _dequantize_cuda(codes, absmax, blocksize, signed, dtype):
    codes = codes.contiguous()
    absmax = absmax.contiguous()
    n = codes.numel()
    out = torch.empty(codes.shape, dtype=dtype, device=codes.device)
    if n == 0:
        return out
    fn = _launch.function("blockwise.cu", f"dequantize_blockwise<{_CTYPE[dtype]},{blocksize}>", codes.device, _NAMES)
    args = (
        _launch.ptr(codes),
        _launch.ptr(map_on(signed, codes.device)),
        _launch.ptr(absmax),
        _launch.ptr(out),
        np.int64(n),
        np.int32(codes.data_ptr() % 8 == 0),
    )
    _launch.launch(fn, min(num_blocks(n, 256 * 8), _grid_limit(fn, 256, codes.device)), 256, args, codes.device)
    return out


# ------------------------------------------------------------------------ public API


def quantize_blockwise(
    x: torch.Tensor, *, blocksize: int = DEFAULT_BLOCKSIZE, signed: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x`` blockwise to 8 bits; see the module docstring for the algorithm.

    Args:
        x: fp32, fp16 or bf16 tensor of any shape (empty and non-contiguous allowed).
        blocksize: elements per absmax block, one of ``BLOCKSIZES`` (default 256).
        signed: use the signed map (for values of either sign) or the unsigned one
            (for non-negative values such as Adam's second moment).

    Returns:
        ``(codes, absmax)``: uint8 codes shaped like ``x`` and a 1-D fp32 tensor of
        ``ceil(x.numel() / blocksize)`` block scales (the largest magnitude; with the signed
        map, the value of largest magnitude with its sign), both on ``x.device``.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"quantize_blockwise expects a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"quantize_blockwise takes float32, float16 or bfloat16 input, got {x.dtype}; "
            "convert it first, e.g. x.float()"
        )
    _check_blocksize(blocksize)
    return _quantize_op(x, blocksize, bool(signed))


def dequantize_blockwise(
    codes: torch.Tensor,
    absmax: torch.Tensor,
    *,
    blocksize: int = DEFAULT_BLOCKSIZE,
    signed: bool = True,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Inverse of :func:`quantize_blockwise`: ``map[codes] * absmax``, cast to ``dtype``.

    ``codes`` (uint8, any shape) and ``absmax`` (fp32, ``ceil(codes.numel() /
    blocksize)`` entries) must be on one device, quantized with the same ``blocksize``
    and ``signed``. Returns a tensor shaped like ``codes``.
    """
    if codes.dtype != torch.uint8:
        raise TypeError(f"codes must be uint8, got {codes.dtype}")
    if absmax.dtype != torch.float32:
        raise TypeError(f"absmax must be float32, got {absmax.dtype}")
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    _check_blocksize(blocksize)
    expected = num_blocks(codes.numel(), blocksize)
    if absmax.numel() != expected:
        raise ValueError(
            f"absmax has {absmax.numel()} entries but {codes.numel()} codes in blocks of "
            f"{blocksize} need {expected}; were they quantized with another blocksize?"
        )
    if codes.device != absmax.device:
        raise ValueError(f"codes are on {codes.device} but absmax is on {absmax.device}")
    return _dequantize_op(codes, absmax.reshape(-1), blocksize, bool(signed), dtype)
