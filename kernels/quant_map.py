"""The 256-entry dynamic (tree) quantization maps used for 8-bit optimizer state."""

from __future__ import annotations

import functools

import torch

__all__ = ["dynamic_map", "map_boundaries", "zero_code"]


@functools.cache
def _dynamic_map_cpu(signed: bool) -> torch.Tensor:
    values = [0.0, 1.0]
    decades = 7  # magnitudes 1e-6 .. 1 (one decade per exponent)
    for i in range(decades):
        # Decade i spans [0.1, 1] * 10**(i - 6); it holds 2**i values (signed map) or
        # 2**(i + 1) values (unsigned map, which spends the sign bit on precision):
        # the midpoints of that many equal bins over [0.1, 1].
        count = 2**i if signed else 2 ** (i + 1)
        edges = torch.linspace(0.1, 1.0, count + 1, dtype=torch.float64)
        means = (edges[:-1] + edges[1:]) / 2 * 10.0 ** (i - decades + 1)
        values += means.tolist()
        if signed:
            values += (-means).tolist()
    assert len(values) == 256, len(values)
    out = torch.tensor(sorted(values), dtype=torch.float64).to(torch.float32)
    return out


def dynamic_map(signed: bool = True) -> torch.Tensor:
    """The dynamic (tree) quantization map: 256 sorted fp32 values.

    Construction (Dettmers, "8-Bit Approximations for Parallelism in Deep Learning",
    2016; the map bitsandbytes also uses): magnitudes are split into seven decades,
    ``[0.1, 1] * 10**e`` for ``e = -6 .. 0``. Decade ``e`` holds ``2**(e + 6)`` values
    (``2**(e + 7)`` in the unsigned map, which spends the sign bit on precision), the
    midpoints of that many equal-width bins over ``[0.1, 1]`` scaled by ``10**e``; so
    small magnitudes get a fine exponent and coarse fraction, large ones the reverse.
    The signed map holds each magnitude with both signs (2 * 127 values), the unsigned
    one only positive values (254); both add exactly ``0.0`` and ``1.0``.

    Signed: values in ``[-0.9930, 1]`` (``-1`` is not representable; ``1`` is: the blockwise
    quantizer divides by each block's signed extreme, which maps it to ``+1`` exactly).
    Unsigned: values in ``[0, 1]``. Returns a new CPU tensor each call.
    """
    return _dynamic_map_cpu(bool(signed)).clone()


@functools.cache
def _boundaries_cpu(signed: bool) -> torch.Tensor:
    m = _dynamic_map_cpu(signed)
    return (m[:-1] + m[1:]) * 0.5  # fp32 arithmetic, shared by the reference and CUDA


def map_boundaries(signed: bool, device: torch.device | str = "cpu") -> torch.Tensor:
    """The 255 fp32 decision boundaries between consecutive map entries.

    A normalized value ``v`` is stored as ``#(boundaries < v)``: its nearest map entry,
    ties to the lower one. Cached per device; do not modify the returned tensor.
    """
    return _on_device(_boundaries_cpu, signed, torch.device(device))


def map_on(signed: bool, device: torch.device | str = "cpu") -> torch.Tensor:
    """``dynamic_map(signed)`` cached on ``device``; do not modify the returned tensor."""
    return _on_device(_dynamic_map_cpu, signed, torch.device(device))


_device_cache: dict[tuple, torch.Tensor] = {}


def _on_device(fn, signed: bool, device: torch.device) -> torch.Tensor:
    if device.type == "cpu":
        return fn(bool(signed))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    key = (fn.__name__, bool(signed), device)
    t = _device_cache.get(key)
    if t is None:
        t = fn(bool(signed)).to(device)
        _device_cache[key] = t
    return t


def zero_code(signed: bool) -> int:
    """Index of the exact ``0.0`` entry in the map."""
    return int((_dynamic_map_cpu(bool(signed)) == 0).nonzero()[0, 0])
