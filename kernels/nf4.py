"""4-bit (NF4 / FP4) blockwise weights with double quantization, QLoRA's format (and bitsandbytes').

Weights (``quantize_4bit``), for a float weight ``W`` flattened row-major into ``n`` elements and cut
into blocks of ``blocksize`` (64 by default) consecutive elements::

    absmax_b = max_{i in b} |W_i|                                  # fp32
    s_i      = clamp(W_i * (1 / absmax_b), -1, 1)                  # 0 where absmax_b == 0
    c_i      = argmin_j |s_i - code_j|   (ties: the lowest j)      # 4 bits
    packed[i // 2] = c_{2i} << 4 | c_{2i+1}                        # even elements in the high nibble

``code`` is one of two 16-entry maps (:func:`code_map`): ``"nf4"``, the normal-float values of
QLoRA (quantiles of N(0, 1), from -1 to 1 with an exact 0), or ``"fp4"``, e2m1 in bitsandbytes'
bit order (sign bit 3; ``[0, 0.0625, 8, 12, 4, 6, 2, 3] / 12``). An odd ``n`` pads the last low
nibble with the code of 0.0 (NF4: 7, FP4: 0), as bitsandbytes does, so the packed bytes match
its own. Non-finite weights are refused.

Double quantization (``double_quant=True``): the fp32 absmaxes are stored in 8 bits as well::

    offset   = mean(absmax)                                        # fp32
    nested_absmax_g = max_{b in g} |absmax_b - offset|             # fp32, groups g of 256 blocks
    qabsmax_b = nearest entry of the signed dynamic map to (absmax_b - offset) / nested_absmax_g
    absmax_b ~= fp32(nested_map[qabsmax_b] * nested_absmax_g) + offset      # the decoded absmax

so the scales cost ``8 / 64 + 32 / (64 * 256) = 0.127`` bits per weight instead of ``0.5``.

Dequantization (``dequantize_4bit``, the definition every path computes):
``W_i = fp32(code[c_i] * absmax_{i // blocksize})``, rounded once to the output dtype. The
maps travel with the weight (``QuantState4bit``), so a checkpoint made with other map values
(bitsandbytes' dynamic map is built in fp32, optim8's in fp64) dequantizes with its own.

Forward, ``linear_4bit(x[M, K], weight, state, bias)`` computes ``x @ W^T + bias`` in x's dtype:

* ``M <= DECODE_TOKENS`` (16): fp32 accumulation against the dequantized weight,
  ``(x.float() @ W.float()^T + bias.float())`` rounded once. On CUDA a GEMV reads the packed
  weight directly (a quarter of the bytes of fp16) and decodes it in registers.
* more tokens: the weight is dequantized ``TILE_ELEMENTS`` at a time (whole output rows) into
  x's dtype and multiplied by the dtype's matmul, ``out[:, rows] = x @ W[rows]^T + bias``; the
  float weight never exists whole.

Backward (straight-through, as for the int8 layer): ``grad_x = grad @ W``, tile by tile; it is
linear in ``grad``, so its own backward (double backward) is the forward without bias.

Dequantization, the forward and its backward are ``torch.library`` custom ops: the PyTorch
reference is the default implementation, CUDA gets the kernels of ``cuda/nf4.cu`` (dequantize,
GEMV). Quantization (once per weight) is the reference's torch ops on every device.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

if not __name__.startswith("optim8."):  # see kernels/__init__.py: a second copy of the ops would free the first
    raise ImportError(f"{__name__} is part of optim8: import optim8.kernels, not the top-level 'kernels'")

from . import _launch
from .quant_map import dynamic_map

__all__ = [
    "DECODE_TOKENS",
    "NESTED_BLOCKSIZE",
    "QUANT_TYPES",
    "BLOCKSIZES_4BIT",
    "QuantState4bit",
    "code_map",
    "quantize_4bit",
    "dequantize_4bit",
    "dequantize_absmax",
    "linear_4bit",
    "linear_4bit_grad_input",
]

DECODE_TOKENS = 16
NESTED_BLOCKSIZE = 256
QUANT_TYPES = ("nf4", "fp4")
BLOCKSIZES_4BIT = (32, 64, 128, 256, 512, 1024, 2048, 4096)
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Output rows of one dequantized tile in the many-token path: ~2**22 elements (8 MiB in bf16).
TILE_ELEMENTS = 1 << 22
_CTYPE = {torch.float32: "float", torch.float16: "f16", torch.bfloat16: "bf16"}
_GEMV_MT = (1, 2, 4, 8, 16)
_NAMES = _launch.register(
    "nf4.cu",
    tuple(f"dequantize_4bit<{c},{dq}>" for c in _CTYPE.values() for dq in (0, 1))
    + tuple(f"gemv_4bit<{c},{mt},{dq}>" for c in _CTYPE.values() for mt in _GEMV_MT for dq in (0, 1)),
)
# Elements quantized per step of the reference: bounds its [chunk, 16] distance matrix to 64 MiB.
_QUANT_CHUNK = 1 << 20

_NF4 = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
)  # fmt: skip
_FP4 = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)


@functools.cache
def _code_cpu(quant_type: str) -> torch.Tensor:
    if quant_type == "nf4":
        return torch.tensor(_NF4, dtype=torch.float32)
    values = torch.tensor(_FP4, dtype=torch.float32)
    return values / values.abs().max()  # fp32 division, as bitsandbytes builds it


def code_map(quant_type: str = "nf4") -> torch.Tensor:
    """The 16 fp32 values of a 4-bit code (a new CPU tensor), indexed by the nibble."""
    _check_quant_type(quant_type)
    return _code_cpu(quant_type).clone()


def _check_quant_type(quant_type) -> None:
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")


def _check_blocksize(blocksize) -> None:
    if blocksize not in BLOCKSIZES_4BIT:
        raise ValueError(f"4-bit blocksize must be one of {BLOCKSIZES_4BIT}, got {blocksize!r}")


@dataclass
class QuantState4bit:
    """Everything besides the packed codes that a 4-bit weight needs to be dequantized.

    ``absmax`` is fp32 (one per block) without double quantization, else uint8 codes with
    ``nested_absmax`` (fp32, one per 256 blocks), ``nested_quant_map`` (256 fp32) and ``offset``.
    ``shape`` is the weight's ``[out_features, in_features]``, ``dtype`` its float dtype before
    quantization (recorded, as bitsandbytes does; not used to compute).
    """

    absmax: torch.Tensor
    quant_map: torch.Tensor
    blocksize: int
    quant_type: str
    shape: tuple[int, int]
    dtype: torch.dtype = torch.float32
    nested_absmax: Optional[torch.Tensor] = None
    nested_quant_map: Optional[torch.Tensor] = None
    offset: float = 0.0

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    def nbytes(self) -> int:
        """Bytes of the scales and maps (the packed codes not included)."""
        tensors = (self.absmax, self.quant_map, self.nested_absmax, self.nested_quant_map)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None) + (4 if self.double_quant else 0)

    def to(self, device) -> "QuantState4bit":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return QuantState4bit(
            move(self.absmax), move(self.quant_map), self.blocksize, self.quant_type, self.shape, self.dtype,
            move(self.nested_absmax), move(self.nested_quant_map), self.offset,
        )  # fmt: skip

    def json_dict(self) -> dict:
        """bitsandbytes' ``quant_state.bitsandbytes__<type>`` JSON (its ``QuantState.as_dict`` non-tensor part)."""
        d = {
            "quant_type": self.quant_type,
            "blocksize": self.blocksize,
            "dtype": str(self.dtype).removeprefix("torch."),
            "shape": list(self.shape),
        }
        if self.double_quant:
            d.update(nested_blocksize=NESTED_BLOCKSIZE, nested_dtype="float32", nested_offset=float(self.offset))
        return d

    def op_args(self) -> tuple:
        """The custom ops' view of the state: (absmax, quant_map, nested_absmax, nested_quant_map, offset, blocksize)."""
        return self.absmax, self.quant_map, self.nested_absmax, self.nested_quant_map, float(self.offset), self.blocksize


def pack_json(d: dict) -> torch.Tensor:
    """A dict as the uint8 tensor of its JSON bytes (bitsandbytes' ``pack_dict_to_tensor``)."""
    return torch.tensor(list(json.dumps(d).encode("utf-8")), dtype=torch.uint8)


def unpack_json(t: torch.Tensor) -> dict:
    return json.loads(bytes(t.cpu().to(torch.uint8).tolist()).decode("utf-8"))


# ---------------------------------------------------------------------------- references


def _nearest(values: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Index of the nearest ``table`` entry to each value (argmin of |v - t|, first on ties), chunked."""
    out = torch.empty(values.numel(), dtype=torch.uint8, device=values.device)
    flat = values.reshape(-1)
    for i in range(0, flat.numel(), _QUANT_CHUNK):
        chunk = flat[i : i + _QUANT_CHUNK]
        out[i : i + chunk.numel()] = (chunk[:, None] - table[None, :]).abs().argmin(dim=1).to(torch.uint8)
    return out


def _block_scale(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(absmax fp32 [nb], blocks [nb, blocksize] zero-padded) of a 1-D fp32 tensor."""
    n = flat.numel()
    nb = (n + blocksize - 1) // blocksize
    pad = nb * blocksize - n
    blocks = torch.nn.functional.pad(flat, (0, pad)).view(nb, blocksize)
    absmax = blocks.abs().amax(dim=1) if nb else flat.new_empty(0)
    return absmax, blocks


def quantize_4bit_reference(
    w: torch.Tensor, blocksize: int, quant_type: str, double_quant: bool
) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor], float]:
    """``(packed uint8 [ceil(n/2)], absmax, nested_absmax, nested_quant_map, offset)``; see the module docstring.

    ``absmax`` is fp32 without double quantization, uint8 codes with it.
    """
    code = _code_cpu(quant_type).to(w.device)
    flat = w.detach().reshape(-1).float()
    n = flat.numel()
    absmax, blocks = _block_scale(flat, blocksize)
    inv = torch.where(absmax > 0, 1.0 / absmax, torch.zeros_like(absmax))
    scaled = (blocks * inv[:, None]).clamp_(-1.0, 1.0).reshape(-1)[:n]
    codes = _nearest(scaled, code)
    if n % 2:  # the pad nibble: the code of 0.0, as bitsandbytes writes it
        codes = torch.cat([codes, _nearest(flat.new_zeros(1), code)])
    packed = (codes[0::2] << 4) | codes[1::2]
    if not double_quant:
        return packed, absmax, None, None, 0.0
    offset = absmax.mean() if absmax.numel() else absmax.new_zeros(())
    nested_map = dynamic_map(signed=True).to(w.device)
    nabs, nblocks = _block_scale(absmax - offset, NESTED_BLOCKSIZE)
    ninv = torch.where(nabs > 0, 1.0 / nabs, torch.zeros_like(nabs))
    nscaled = (nblocks * ninv[:, None]).clamp_(-1.0, 1.0).reshape(-1)[: absmax.numel()]
    qabsmax = _nearest(nscaled, nested_map)
    return packed, qabsmax, nabs, nested_map, float(offset)


def dequantize_absmax_reference(
    absmax: torch.Tensor, nested_absmax: Optional[torch.Tensor], nested_map: Optional[torch.Tensor], offset: float
) -> torch.Tensor:
    """The fp32 block absmaxes: ``absmax`` itself, or ``fp32(nested_map[q] * nested_absmax) + offset``."""
    if nested_absmax is None:
        return absmax.float()
    scale = nested_absmax.float().repeat_interleave(NESTED_BLOCKSIZE)[: absmax.numel()]
    return nested_map[absmax.long()] * scale + torch.tensor(offset, dtype=torch.float32, device=absmax.device)


def _build_byte_table(quant_map: torch.Tensor) -> torch.Tensor:
    byte = torch.arange(256, device=quant_map.device)
    pairs = torch.stack([quant_map[byte >> 4], quant_map[byte & 15]], dim=1).contiguous()
    return pairs.view(torch.int64).reshape(256)


@functools.lru_cache(maxsize=16)
def _byte_table_cpu(values: tuple[float, ...]) -> torch.Tensor:
    return _build_byte_table(torch.tensor(values, dtype=torch.float32))


def _byte_table(quant_map: torch.Tensor) -> torch.Tensor:
    """``[256]`` int64: for each packed byte, the two fp32 map values it holds (high nibble first),
    side by side in one 8-byte word. Decoding is then one 1-D gather per byte from a 2 KiB table,
    ~4x faster on a CPU than splitting the nibbles and gathering each (index_select of rows is
    slow for short rows); the values are the map's own bits, so the result is unchanged.
    Cached on the CPU by the map's values."""
    if quant_map.device.type == "cpu":
        return _byte_table_cpu(tuple(quant_map.float().tolist()))
    return _build_byte_table(quant_map.float())


def dequantize_4bit_reference(
    packed, absmax, quant_map, nested_absmax, nested_map, offset: float, blocksize: int, start: int, count: int, dtype
) -> torch.Tensor:
    """Elements ``[start, start + count)`` of the flattened weight, in ``dtype`` (1-D)."""
    if count == 0:
        return torch.empty(0, dtype=dtype, device=packed.device)
    # Whole blocks around the range, so the scale multiplies as a [blocks, blocksize] broadcast
    # (no per-element index tensors: those made this 30x slower on the CPU).
    b0, b1 = start // blocksize, (start + count - 1) // blocksize + 1
    e0, e1 = b0 * blocksize, min(b1 * blocksize, 2 * packed.numel())
    raw = packed.reshape(-1)[e0 // 2 : (e1 + 1) // 2]
    values = torch.index_select(_byte_table(quant_map), 0, raw.to(torch.int32)).view(torch.float32)[: e1 - e0]
    if nested_absmax is None:
        scales = absmax[b0:b1].float()
    else:
        g0 = b0 // NESTED_BLOCKSIZE
        nabs = nested_absmax[g0 : (b1 - 1) // NESTED_BLOCKSIZE + 1].float().repeat_interleave(NESTED_BLOCKSIZE)
        scales = nested_map[absmax[b0:b1].long()] * nabs[b0 - g0 * NESTED_BLOCKSIZE : b1 - g0 * NESTED_BLOCKSIZE]
        scales = scales + torch.tensor(offset, dtype=torch.float32, device=packed.device)
    pad = (b1 - b0) * blocksize - values.numel()
    if pad:
        values = torch.nn.functional.pad(values, (0, pad))
    out = values.view(b1 - b0, blocksize).mul_(scales[:, None]).view(-1)  # values is ours: in place
    return out[start - e0 : start - e0 + count].to(dtype)


def _tile_rows(k: int) -> int:
    return max(1, TILE_ELEMENTS // max(k, 1))


def _decode_rows_cap(k: int) -> int:
    # the fp32 rows of the decode reference: at most ~2**21 elements at a time
    return max(1, (1 << 21) // max(k, 1))


def _linear_tiled(x, n, dequant_rows, bias, *, fp32_accumulate: bool) -> torch.Tensor:
    """``x @ W^T + bias`` with W produced ``rows`` at a time by ``dequant_rows(r0, r1, dtype)``."""
    m, k = x.shape
    if fp32_accumulate:
        xf = x.float()
        out = torch.empty((m, n), dtype=torch.float32, device=x.device)
        step = _decode_rows_cap(k)
        for r0 in range(0, n, step):
            r1 = min(n, r0 + step)
            out[:, r0:r1] = xf @ dequant_rows(r0, r1, torch.float32).t()
        if bias is not None:
            out = out + bias.float()
        return out.to(x.dtype)
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    step = _tile_rows(k)
    with torch.autocast(x.device.type, enabled=False):
        for r0 in range(0, n, step):
            r1 = min(n, r0 + step)
            tile = dequant_rows(r0, r1, x.dtype)
            if bias is None:
                out[:, r0:r1] = x @ tile.t()
            else:
                out[:, r0:r1] = torch.addmm(bias[r0:r1].to(x.dtype), x, tile.t())
    return out


def _grad_input_tiled(grad, k, dequant_rows) -> torch.Tensor:
    """``grad[M, N] @ W`` with W produced tile by tile."""
    m, n = grad.shape
    out = torch.zeros((m, k), dtype=grad.dtype, device=grad.device)
    step = _tile_rows(k)
    with torch.autocast(grad.device.type, enabled=False):
        for r0 in range(0, n, step):
            r1 = min(n, r0 + step)
            out.addmm_(grad[:, r0:r1], dequant_rows(r0, r1, grad.dtype))
    return out


def _reference_rows(packed, absmax, quant_map, nested_absmax, nested_map, offset, blocksize, k):
    def rows(r0, r1, dtype):
        flat = dequantize_4bit_reference(
            packed, absmax, quant_map, nested_absmax, nested_map, offset, blocksize, r0 * k, (r1 - r0) * k, dtype
        )
        return flat.view(r1 - r0, k)

    return rows


def linear_4bit_reference(x, packed, absmax, quant_map, nested_absmax, nested_map, offset, blocksize, n, bias):
    rows = _reference_rows(packed, absmax, quant_map, nested_absmax, nested_map, offset, blocksize, x.shape[1])
    return _linear_tiled(x, n, rows, bias, fp32_accumulate=x.shape[0] <= DECODE_TOKENS)


def grad_input_4bit_reference(grad, packed, absmax, quant_map, nested_absmax, nested_map, offset, blocksize, k):
    rows = _reference_rows(packed, absmax, quant_map, nested_absmax, nested_map, offset, blocksize, k)
    return _grad_input_tiled(grad, k, rows)


# ----------------------------------------------------------------------------- CUDA paths


_functions: dict[tuple[str, str], object] = {}


def _launch_kernel(kernel: str, grid, block, args, device: torch.device) -> None:
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    key = (kernel, str(device))  # memoized: _launch.function hashes the source at every call
    fn = _functions.get(key)
    if fn is None:
        fn = _functions[key] = _launch.function("nf4.cu", kernel, device, _NAMES)
    _launch.launch(fn, grid, block, args, device)


def _null_or_ptr(t: Optional[torch.Tensor]) -> np.uint64:
    return np.uint64(0) if t is None else _launch.ptr(t)


def _state_ptrs(absmax, nested_absmax, nested_map) -> tuple:
    """Kernel arguments (absmax32, qabsmax, nested_map, nested_absmax) and the DQ template flag."""
    if nested_absmax is None:
        return (_launch.ptr(absmax), np.uint64(0), np.uint64(0), np.uint64(0)), 0
    return (np.uint64(0), _launch.ptr(absmax), _launch.ptr(nested_map), _launch.ptr(nested_absmax)), 1


def _contiguous_state(absmax, quant_map, nested_absmax, nested_map):
    fix = lambda t: None if t is None else t.contiguous()  # noqa: E731
    return fix(absmax), fix(quant_map.float()), fix(nested_absmax), fix(None if nested_map is None else nested_map.float())


def _dequantize_cuda(packed, absmax, quant_map, nested_absmax, nested_map, offset, blocksize, start, count, dtype):
    if dtype not in _CTYPE:
        return dequantize_4bit_reference(
            packed, absmax, quant_map, nested_absmax, nested_map, offset, blocksize, start, count, dtype
        )
    packed = packed.contiguous()
    absmax, quant_map, nested_absmax, nested_map = _contiguous_state(absmax, quant_map, nested_absmax, nested_map)
    out = torch.empty(count, dtype=dtype, device=packed.device)
    if count == 0:
        return out
    ptrs, dq = _state_ptrs(absmax, nested_absmax, nested_map)
    args = (
        _launch.ptr(packed),
        _launch.ptr(quant_map),
        *ptrs,
        np.float32(offset),
        _launch.ptr(out),
        np.int64(start),
        np.int64(count),
        np.int32(blocksize),
    )
    grid = (count + 256 * 8 - 1) // (256 * 8)
    _launch_kernel(f"dequantize_4bit<{_CTYPE[dtype]},{dq}>", grid, 256, args, packed.device)
    return out


def _cuda_rows(packed, absmax, quant_map, nested_absmax, nested_map, offset, blocksize, k):
    def rows(r0, r1, dtype):
        flat = _dequantize_cuda(
            packed, absmax, quant_map, nested_absmax, nested_map, offset, blocksize, r0 * k, (r1 - r0) * k, dtype
        )
        return flat.view(r1 - r0, k)

    return rows


def _gemv_cuda(x, packed, absmax, quant_map, nested_absmax, nested_map, offset, blocksize, n, bias):
    m, k = x.shape
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    mt = next(t for t in _GEMV_MT if t >= m)
    ptrs, dq = _state_ptrs(absmax, nested_absmax, nested_map)
    bias32 = None if bias is None else bias.float().contiguous()
    vec = int(k % 8 == 0 and packed.data_ptr() % 4 == 0)
    rows_per_cta = 8 * 2  # 8 warps, 2 output rows each
    args = (
        _launch.ptr(x),
        _launch.ptr(packed),
        _launch.ptr(quant_map),
        *ptrs,
        np.float32(offset),
        _null_or_ptr(bias32),
        _launch.ptr(out),
        np.int32(m),
        np.int32(n),
        np.int32(k),
        np.int32(blocksize),
        np.int32(vec),
    )
    _launch_kernel(f"gemv_4bit<{_CTYPE[x.dtype]},{mt},{dq}>", (n + rows_per_cta - 1) // rows_per_cta, 256, args, x.device)
    return out


def _linear_4bit_cuda(x, packed, absmax, quant_map, nested_absmax, nested_map, offset, blocksize, n, bias):
    x, packed = x.contiguous(), packed.contiguous()
    absmax, quant_map, nested_absmax, nested_map = _contiguous_state(absmax, quant_map, nested_absmax, nested_map)
    m, k = x.shape
    if m == 0 or n == 0 or k == 0:
        return linear_4bit_reference(x, packed, absmax, quant_map, nested_absmax, nested_map, offset, blocksize, n, bias)
    if m <= DECODE_TOKENS:
        return _gemv_cuda(x, packed, absmax, quant_map, nested_absmax, nested_map, offset, blocksize, n, bias)
    rows = _cuda_rows(packed, absmax, quant_map, nested_absmax, nested_map, offset, blocksize, k)
    return _linear_tiled(x, n, rows, bias, fp32_accumulate=False)


def _grad_input_cuda(grad, packed, absmax, quant_map, nested_absmax, nested_map, offset, blocksize, k):
    rows = _cuda_rows(packed, absmax, quant_map, nested_absmax, nested_map, offset, blocksize, k)
    return _grad_input_tiled(grad.contiguous(), k, rows)


# ------------------------------------------------------------------------ custom ops


@torch.library.custom_op("optim8::dequantize_4bit", mutates_args=())
def _dequantize_op(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    quant_map: torch.Tensor,
    nested_absmax: Optional[torch.Tensor],
    nested_map: Optional[torch.Tensor],
    offset: float,
    blocksize: int,
    start: int,
    count: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    return dequantize_4bit_reference(
        packed, absmax, quant_map, nested_absmax, nested_map, offset, blocksize, start, count, dtype
    )


@_dequantize_op.register_fake
def _(packed, absmax, quant_map, nested_absmax, nested_map, offset, blocksize, start, count, dtype):
    return packed.new_empty((count,), dtype=dtype)


_launch.cuda_kernel(_dequantize_op)(_dequantize_cuda)


@torch.library.custom_op("optim8::linear_4bit", mutates_args=())
def _linear_op(
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    quant_map: torch.Tensor,
    nested_absmax: Optional[torch.Tensor],
    nested_map: Optional[torch.Tensor],
    offset: float,
    blocksize: int,
    n: int,
    bias: Optional[torch.Tensor],
) -> torch.Tensor:
    return linear_4bit_reference(x, packed, absmax, quant_map, nested_absmax, nested_map, offset, blocksize, n, bias)


@_linear_op.register_fake
def _(x, packed, absmax, quant_map, nested_absmax, nested_map, offset, blocksize, n, bias):
    return x.new_empty((x.shape[0], n))


_launch.cuda_kernel(_linear_op)(_linear_4bit_cuda)


@torch.library.custom_op("optim8::linear_4bit_grad_input", mutates_args=())
def _grad_input_op(
    grad: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    quant_map: torch.Tensor,
    nested_absmax: Optional[torch.Tensor],
    nested_map: Optional[torch.Tensor],
    offset: float,
    blocksize: int,
    k: int,
) -> torch.Tensor:
    return grad_input_4bit_reference(grad, packed, absmax, quant_map, nested_absmax, nested_map, offset, blocksize, k)


@_grad_input_op.register_fake
def _(grad, packed, absmax, quant_map, nested_absmax, nested_map, offset, blocksize, k):
    return grad.new_empty((grad.shape[0], k))


_launch.cuda_kernel(_grad_input_op)(_grad_input_cuda)


def _setup_linear(ctx, inputs, output):
    x, packed, absmax, quant_map, nested_absmax, nested_map, offset, blocksize, n, bias = inputs
    # Only the frozen, resident quantized weight: x is not needed (the weight takes no gradient).
    ctx.save_for_backward(packed, absmax, quant_map, nested_absmax, nested_map)
    ctx.offset, ctx.blocksize, ctx.k = offset, blocksize, x.shape[1]
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward_linear(ctx, grad):
    packed, absmax, quant_map, nested_absmax, nested_map = ctx.saved_tensors
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_x = _grad_input_op(
            grad.contiguous(), packed, absmax, quant_map, nested_absmax, nested_map, ctx.offset, ctx.blocksize, ctx.k
        )
    if ctx.bias_dtype is not None and ctx.needs_input_grad[9]:
        grad_bias = grad.float().sum(dim=0).to(ctx.bias_dtype)
    return grad_x, None, None, None, None, None, None, None, None, grad_bias


_linear_op.register_autograd(_backward_linear, setup_context=_setup_linear)


def _setup_grad_input(ctx, inputs, output):
    grad, packed, absmax, quant_map, nested_absmax, nested_map, offset, blocksize, k = inputs
    ctx.save_for_backward(packed, absmax, quant_map, nested_absmax, nested_map)
    ctx.offset, ctx.blocksize, ctx.n = offset, blocksize, grad.shape[1]


def _backward_grad_input(ctx, gg):
    # grad_x = grad @ W is linear in grad: d/d(grad) is gg @ W^T, the forward without bias.
    packed, absmax, quant_map, nested_absmax, nested_map = ctx.saved_tensors
    out = None
    if ctx.needs_input_grad[0]:
        out = _linear_op(
            gg.contiguous(), packed, absmax, quant_map, nested_absmax, nested_map, ctx.offset, ctx.blocksize, ctx.n, None
        )
    return out, None, None, None, None, None, None, None, None


_grad_input_op.register_autograd(_backward_grad_input, setup_context=_setup_grad_input)


# ------------------------------------------------------------------------ public API


def quantize_4bit(
    w: torch.Tensor, *, blocksize: int = 64, quant_type: str = "nf4", double_quant: bool = True
) -> tuple[torch.Tensor, QuantState4bit]:
    """Quantize a 2-D float weight to ``(packed uint8 [ceil(n / 2), 1], QuantState4bit)``; module docstring.

    Raises ``ValueError`` for NaN/Inf weights (checked except on the meta device).
    """
    if w.dim() != 2:
        raise ValueError(f"quantize_4bit expects a 2-D [out_features, in_features] weight, got shape {tuple(w.shape)}")
    if not w.is_floating_point():
        raise TypeError(f"quantize_4bit takes a floating weight, got {w.dtype}")
    _check_quant_type(quant_type)
    _check_blocksize(blocksize)
    shape = (int(w.shape[0]), int(w.shape[1]))
    n = shape[0] * shape[1]
    nb = (n + blocksize - 1) // blocksize
    if w.device.type == "meta":
        absmax = w.new_empty((nb,), dtype=torch.uint8 if double_quant else torch.float32)
        nested = w.new_empty(((nb + NESTED_BLOCKSIZE - 1) // NESTED_BLOCKSIZE,), dtype=torch.float32)
        state = QuantState4bit(
            absmax, _code_cpu(quant_type).to("meta"), blocksize, quant_type, shape, w.dtype,
            nested if double_quant else None, dynamic_map(True).to("meta") if double_quant else None, 0.0,
        )  # fmt: skip
        return w.new_empty(((n + 1) // 2, 1), dtype=torch.uint8), state
    if n and not bool(torch.isfinite(w).all()):
        bad = (~torch.isfinite(w)).sum().item()
        raise ValueError(f"weight of shape {shape} holds {bad} NaN/Inf values and cannot be quantized")
    # Plain torch ops on any device (quantization runs once per weight, not per step).
    packed, absmax, nabs, nmap, offset = quantize_4bit_reference(w.detach(), blocksize, quant_type, bool(double_quant))
    state = QuantState4bit(
        absmax, _code_cpu(quant_type).to(w.device, copy=True), blocksize, quant_type, shape, w.dtype, nabs, nmap, offset
    )
    return packed.reshape(-1, 1), state


def dequantize_absmax(state: QuantState4bit) -> torch.Tensor:
    """The fp32 block absmaxes of ``state`` (decoded when double-quantized)."""
    return dequantize_absmax_reference(state.absmax, state.nested_absmax, state.nested_quant_map, state.offset)


def dequantize_4bit(packed: torch.Tensor, state: QuantState4bit, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float weight ``[out, in]``: ``fp32(code[c] * absmax)`` rounded once to ``dtype``."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed 4-bit codes must be uint8, got {packed.dtype}")
    if dtype not in FLOAT_DTYPES + (torch.float64,):
        raise TypeError(f"dtype must be a floating dtype, got {dtype}")
    n = state.numel
    flat = _dequantize_op(packed, *state.op_args(), 0, n, dtype)
    return flat.view(state.shape)


def linear_4bit(
    x: torch.Tensor, packed: torch.Tensor, state: QuantState4bit, bias: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """``x[M, K] @ W^T + bias`` in x's dtype (module docstring); differentiable in x and bias."""
    if x.dim() != 2 or x.shape[1] != state.shape[1]:
        raise ValueError(f"linear_4bit takes x [M, {state.shape[1]}], got {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"linear_4bit takes float32, float16 or bfloat16 x, got {x.dtype}; convert it first")
    if x.device != packed.device:
        raise ValueError(f"linear_4bit: x is on {x.device} but the weight on {packed.device}; put them on one device")
    return _linear_op(x, packed, *state.op_args(), state.shape[0], bias)


def linear_4bit_grad_input(grad: torch.Tensor, packed: torch.Tensor, state: QuantState4bit) -> torch.Tensor:
    """``grad[M, N] @ W`` in grad's dtype."""
    return _grad_input_op(grad, packed, *state.op_args(), state.shape[1])
