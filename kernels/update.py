"""One update machinery for every optimizer rule: dequantize -> update in fp32 -> new absmax -> requantize -> store.

An update rule (:class:`Rule`) is its per-element math written once in PyTorch, on fp32 tensors
(:meth:`Rule.reference`), plus the same math as a CUDA device function (``cuda/<rule>.cu``: a
struct with ``apply``, the template parameter of the one kernel ``update_multi`` in
``cuda/update.cuh``). Everything else is shared and written once, here and in that header:

* state: ``len(rule.slots)`` tensors per parameter, each 8-bit (uint8 codes + fp32 absmax per
  ``blocksize`` elements, the signed or unsigned dynamic map, ``kernels/blockwise.py``) or fp32;
* per element: dequantize each state (``map[code] * absmax``) -> ``rule`` -> requantize with the
  new block absmax; fp16/bf16 parameters read into fp32 and rounded once (nearest even);
* non-finite results: an element whose new parameter or any new state value is not finite
  (a NaN or infinite gradient, an overflowing square) keeps its parameter and state; nothing of
  it reaches its block's absmax, so the other elements are updated as usual;
* the scalars: computed by the optimizer in float64 and rounded to fp32 once (``rule.scalars``
  names them in the kernel's order); on CUDA they travel as a small device array, so a tensor
  ``lr`` on the GPU is combined with them on the GPU, never read by the host.

Every operation of a rule is one correctly rounded fp32 operation (no fused multiply-add; the
kernels are compiled with ``--fmad=false`` and use ``__f*_rn``; a square root goes through
fp64 in the reference, which equals ``__fsqrt_rn``), so the CUDA kernel computes the
reference's bits. :func:`rule_step` dispatches: one kernel launch for all tensors of a call on
CUDA (or the host device), the reference tensor by tensor (in chunks) elsewhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import torch

from . import _launch
from . import adam as _adam
from .adam import STATE_BLOCKSIZES, _gpu_encode_table
from .blockwise import dequantize_blockwise_reference, quantize_blockwise_reference
from .quant_map import map_boundaries, map_on, zero_code

__all__ = ["Rule", "RULES", "rule_step", "rule_scalars", "LION", "SGD", "SGD_PLAIN", "RMSPROP", "RMSPROP_MOMENTUM", "ADAGRAD", "ADEMAMIX"]

_CTYPE = {torch.float32: "float", torch.float16: "f16", torch.bfloat16: "bf16"}
_CHUNK = 256  # elements per warp iteration of update_multi: 32 lanes x 8
_CPU_CHUNK = 1 << 18  # reference chunk (a multiple of every blocksize): bounded temporaries


def _sqrt(x: torch.Tensor) -> torch.Tensor:
    # fp32 sqrt correctly rounded (through fp64; torch's fp32 CPU sqrt is not): CUDA's __fsqrt_rn
    return x.double().sqrt_().float()


@dataclass(frozen=True)
class Rule:
    """An update rule: ``kernel`` (the struct in ``cuda/<source>``), the signedness of each state
    (``slots``), the names of its fp32 scalars in kernel order, and the reference math."""

    kernel: str
    source: str
    slots: tuple[bool, ...]
    scalars: tuple[str, ...]
    math: object  # (p, g, states, c) -> (p', states'), fp32 tensors; c has the scalars as attributes

    def reference(self, p, g, states, c):
        return self.math(p, g, states, c)


# ------------------------------------------------------------------ the rules (fp32 math, written once)
# Each line is one correctly rounded fp32 operation per element; the .cu structs do the same in
# the same order. ``gsign`` is -1.0 with maximize=True (an exact negation), else 1.0.


def _lion(p, g, s, c):
    (m,) = s
    g = g * c.gsign
    u = m * c.beta1
    u += g * c.one_minus_beta1
    u = torch.sign(u)  # sign(0) = 0, as torch and bitsandbytes
    p1 = p * c.decay  # decoupled weight decay: decay = 1 - lr * weight_decay
    p1 -= u * c.lr
    m1 = m * c.beta2
    m1 += g * c.one_minus_beta2
    return p1, [m1]


def _weight_decayed(p, g, c):
    g = g * c.gsign
    g += p * c.weight_decay  # L2 penalty as torch.optim does it (exact no-op at weight_decay=0)
    return g


def _sgd(p, g, s, c):
    (buf,) = s
    g = _weight_decayed(p, g, c)
    b1 = buf * c.momentum  # first step: momentum 0 and dampening weight 1, so buf' = g as in torch
    b1 += g * c.dampened
    d = g * c.nesterov_g  # nesterov: g + momentum * buf'; else buf' (0 * g + 1 * buf')
    d += b1 * c.nesterov_b
    p1 = p - d * c.lr
    return p1, [b1]


def _sgd_plain(p, g, s, c):
    g = _weight_decayed(p, g, c)
    return p - g * c.lr, []


def _rmsprop(p, g, s, c):
    (sq,) = s
    g = _weight_decayed(p, g, c)
    sq1 = sq * c.alpha
    sq1 += (g * g) * c.one_minus_alpha
    avg = _sqrt(sq1)
    avg += c.eps
    p1 = p - (g / avg) * c.lr
    return p1, [sq1]


def _rmsprop_momentum(p, g, s, c):
    sq, buf = s
    g = _weight_decayed(p, g, c)
    sq1 = sq * c.alpha
    sq1 += (g * g) * c.one_minus_alpha
    avg = _sqrt(sq1)
    avg += c.eps
    b1 = buf * c.momentum  # torch: buf = momentum * buf + g / avg; p -= lr * buf
    b1 += g / avg
    p1 = p - b1 * c.lr
    return p1, [sq1, b1]


def _adagrad(p, g, s, c):
    (acc,) = s
    g = _weight_decayed(p, g, c)
    acc1 = acc + g * g
    std = _sqrt(acc1)
    std += c.eps
    p1 = p - (g / std) * c.clr  # clr = lr / (1 + (step - 1) * lr_decay)
    return p1, [acc1]


def _ademamix(p, g, s, c):
    m1, m2, nu = s
    g = g * c.gsign
    a = m1 * c.beta1
    a += g * c.one_minus_beta1
    b = m2 * c.beta3
    b += g * c.one_minus_beta3
    v = g * g
    v *= c.one_minus_beta2
    v += nu * c.beta2
    denom = _sqrt(v)
    denom *= c.inv_bc2_sqrt
    denom += c.eps
    u = a * c.inv_bc1
    u += b * c.alpha
    u /= denom
    p1 = p * c.decay
    p1 -= u * c.lr
    return p1, [a, b, v]


LION = Rule("Lion", "lion.cu", (True,), ("gsign", "beta1", "one_minus_beta1", "beta2", "one_minus_beta2", "lr", "decay"), _lion)
SGD = Rule("SGDMomentum", "sgd.cu", (True,), ("gsign", "weight_decay", "momentum", "dampened", "nesterov_g", "nesterov_b", "lr"), _sgd)
SGD_PLAIN = Rule("SGDPlain", "sgd.cu", (), ("gsign", "weight_decay", "lr"), _sgd_plain)
RMSPROP = Rule("RMSprop", "rmsprop.cu", (False,), ("gsign", "weight_decay", "alpha", "one_minus_alpha", "eps", "lr"), _rmsprop)
RMSPROP_MOMENTUM = Rule(
    "RMSpropMomentum", "rmsprop.cu", (False, True), ("gsign", "weight_decay", "alpha", "one_minus_alpha", "eps", "momentum", "lr"),
    _rmsprop_momentum,
)
ADAGRAD = Rule("Adagrad", "adagrad.cu", (False,), ("gsign", "weight_decay", "eps", "clr"), _adagrad)
ADEMAMIX = Rule(
    "AdEMAMix", "ademamix.cu", (True, True, False),
    ("gsign", "beta1", "one_minus_beta1", "beta2", "one_minus_beta2", "beta3", "one_minus_beta3", "inv_bc1", "alpha",
     "inv_bc2_sqrt", "eps", "lr", "decay"),
    _ademamix,
)
RULES = (LION, SGD, SGD_PLAIN, RMSPROP, RMSPROP_MOMENTUM, ADAGRAD, ADEMAMIX)


def _expressions(rules) -> tuple[str, ...]:
    out = []
    for rule in rules:
        for ctype in _CTYPE.values():
            if rule.slots:
                out += [f"update_multi<{ctype},true,{bs},{rule.kernel}>" for bs in STATE_BLOCKSIZES]
            out.append(f"update_multi<{ctype},false,256,{rule.kernel}>")
    return tuple(out)


_NAMES = {src: _launch.register(src, _expressions([r for r in RULES if r.source == src])) for src in dict.fromkeys(r.source for r in RULES)}


# ------------------------------------------------------------------ scalars


def rule_scalars(rule: Rule, values: dict) -> dict:
    """Check that ``values`` names exactly ``rule.scalars``; returns it in kernel order.

    A value is a Python float (float64 math done by the caller) or, for the terms that involve
    a tensor ``lr``, a 0-d float64 tensor: it is rounded to fp32 where it is used.
    """
    if set(values) != set(rule.scalars):
        raise KeyError(f"{rule.kernel} takes the scalars {rule.scalars}, got {sorted(values)}")
    return {k: values[k] for k in rule.scalars}


def _host_scalars(values: dict) -> SimpleNamespace:
    return SimpleNamespace(**{k: float(np.float32(float(v))) for k, v in values.items()})


_uploaded: dict[tuple, torch.Tensor] = {}


def _device_scalars(values: dict, device: torch.device) -> torch.Tensor:
    """The scalars as fp32 on ``device`` without a host synchronization."""
    if any(isinstance(v, torch.Tensor) for v in values.values()):
        # tensor lr: the float64 terms are finished on the device (same IEEE operations, same bits)
        parts = [v.to(device=device, dtype=torch.float64).reshape(()) if isinstance(v, torch.Tensor)
                 else torch.tensor(float(v), dtype=torch.float64) for v in values.values()]
        return torch.stack([x.to(device) for x in parts]).float()
    host = np.array([float(v) for v in values.values()], dtype=np.float32)
    key = (device, host.tobytes())
    t = _uploaded.get(key)
    if t is None:
        t = _launch.upload(torch.from_numpy(host), device)
        if len(_uploaded) >= 64:
            _uploaded.pop(next(iter(_uploaded)))
        _uploaded[key] = t
    _launch.record_stream(t, device)
    return t


# ------------------------------------------------------------------ the step


def rule_step(
    rule: Rule,
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    states: list[list[torch.Tensor]],
    absmax: list[list[torch.Tensor]] | None,
    *,
    scalars: dict,
    blocksize: int = 256,
) -> None:
    """Update ``params`` and their state in place with ``rule``, all with the same ``scalars``.

    ``states[i]`` holds parameter ``i``'s ``len(rule.slots)`` state tensors (uint8 codes for 8-bit
    state, ``absmax[i]`` then their fp32 absmax; fp32 tensors and ``absmax=None`` for 32-bit
    state). All tensors of a call live on one device; params and grads share one float dtype.
    On CUDA: one kernel launch, no host synchronization.
    """
    if not params:
        return
    values = rule_scalars(rule, scalars)
    if _launch.kernel_device(params[0].device):
        simple = [i for i, p in enumerate(params) if p.is_contiguous() and all(s.is_contiguous() for s in states[i])]
        pick = lambda xs, idx: None if xs is None else [xs[i] for i in idx]  # noqa: E731
        _step_cuda(rule, pick(params, simple), pick(grads, simple), pick(states, simple), pick(absmax, simple), values, blocksize)
        if len(simple) == len(params):
            return
        rest = [i for i in range(len(params)) if i not in set(simple)]  # rare: strided views as parameters
        params, grads, states, absmax = pick(params, rest), pick(grads, rest), pick(states, rest), pick(absmax, rest)
    c = _host_scalars(values)
    for i, p in enumerate(params):
        _step_reference(rule, p, grads[i], states[i], absmax[i] if absmax is not None else None, c, blocksize,
                        fast=p.device.type == "cpu")


def _step_reference(rule: Rule, p, g, st, am, c, blocksize: int, fast: bool = False) -> None:
    """The reference step of one tensor, in place, in chunks of whole blocks (any device).

    ``fast`` (CPU tensors): the 8-bit state goes through ``kernels/adam.py``'s table-driven
    dequantizer and quantizer, bit for bit ``*_blockwise_reference`` and about 6x faster than
    ``torch.bucketize`` (tests/test_optim_family.py checks the two against each other).
    """
    pf, gf = p.view(-1) if p.is_contiguous() else p.reshape(-1), g.reshape(-1)
    sf = [s.view(-1) if s.is_contiguous() else s.reshape(-1) for s in st]
    n = pf.numel()
    scratch = torch.empty(min(n, _CPU_CHUNK), dtype=torch.int64) if fast and am is not None else None
    for start in range(0, n, _CPU_CHUNK):
        end = min(start + _CPU_CHUNK, n)
        b0, b1 = start // blocksize, (end + blocksize - 1) // blocksize
        if am is not None and fast:
            old = [_adam._dequantize(s[start:end], a[b0:b1], blocksize, sg, scratch) for s, a, sg in zip(sf, am, rule.slots)]
        elif am is not None:
            old = [dequantize_blockwise_reference(s[start:end], a[b0:b1], blocksize, sg, torch.float32)
                   for s, a, sg in zip(sf, am, rule.slots)]
        else:
            old = [s[start:end] for s in sf]
        p0 = pf[start:end].float()
        p1, new = rule.reference(p0, gf[start:end].float(), old, c)
        # cheap screen first: one sum per tensor; an overflowing sum only sends us to the exact check
        if not math.isfinite(sum(float(t.sum()) for t in [p1, *new])):
            ok = torch.isfinite(p1)
            for t in new:
                ok &= torch.isfinite(t)
            p1 = torch.where(ok, p1, p0)
            new = [torch.where(ok, t, o) for t, o in zip(new, old)]
        for k, t in enumerate(new):
            if am is not None and fast:
                _adam._quantize_into(t.contiguous(), sf[k][start:end], am[k][b0:b1], blocksize, rule.slots[k], scratch)
            elif am is not None:
                codes, absmax = quantize_blockwise_reference(t, blocksize, rule.slots[k])
                sf[k][start:end].copy_(codes)
                am[k][b0:b1].copy_(absmax)
            else:
                sf[k][start:end].copy_(t)
        pf[start:end].copy_(p1)  # one round-to-nearest-even to the parameter's dtype
    if not p.is_contiguous():
        p.copy_(pf.view(p.shape))
    for s, f in zip(st, sf):
        if not s.is_contiguous():
            s.copy_(f.view(s.shape))


# ------------------------------------------------------------------ CUDA

_tables: dict[tuple, torch.Tensor] = {}


def _table(device, flat: list[int]) -> torch.Tensor:
    """The launch table on ``device``, cached by content (stable pointers: built once)."""
    key = (device, tuple(flat))
    table = _tables.get(key)
    if table is None:
        table = _launch.upload(torch.tensor(flat, dtype=torch.int64), device)
        if len(_tables) >= 32:
            _tables.pop(next(iter(_tables)))
        _tables[key] = table
    _launch.record_stream(table, device)
    return table


def _step_cuda(rule: Rule, params, grads, states, absmax, values: dict, blocksize: int) -> None:
    """One ``update_multi`` launch. Table: per tensor p, g, the states, their absmax, n, aligned
    (``4 + 2 * len(rule.slots)`` int64), then the chunk-count prefix sums."""
    if not params:
        return
    device, dtype = params[0].device, params[0].dtype
    state8 = absmax is not None
    ns = len(rule.slots)
    rows, starts, total = [], [], 0
    for i, p in enumerate(params):
        g = grads[i]
        if not g.is_contiguous():
            g = g.contiguous()
            grads[i] = g  # alive until the launch is queued
        n = p.numel()
        sp = [s.data_ptr() for s in states[i]]
        ap = [a.data_ptr() for a in absmax[i]] if state8 else [0] * ns
        width = 8 if state8 else 16  # 8 codes or 8 fp32 values per lane
        aligned = int(p.data_ptr() % 16 == 0 and g.data_ptr() % 16 == 0 and all(x % width == 0 for x in sp))
        rows += [p.data_ptr(), g.data_ptr(), *sp, *ap, n, aligned]
        starts.append(total)
        total += (n + _CHUNK - 1) // _CHUNK
    starts.append(total)
    if total == 0:
        return
    table = _table(device, rows + starts)
    bs = blocksize if state8 else 256
    expr = f"update_multi<{_CTYPE[dtype]},{'true' if state8 else 'false'},{bs},{rule.kernel}>"
    fn = _launch.function(rule.source, expr, device, _NAMES[rule.source])
    warps_per_cta = 256 // 32
    limit = _launch.sm_count(device) * _launch.ctas_per_sm(fn, 256, device)
    grid = min((total + warps_per_cta - 1) // warps_per_cta, limit)
    scalars = _device_scalars(values, device)  # held until the launch is queued (a tensor lr makes a fresh one)
    args = (
        _launch.ptr(table),
        np.int32(len(params)),
        np.int64(total),
        _launch.ptr(map_on(True, device)),
        _launch.ptr(map_on(False, device)),
        _launch.ptr(map_boundaries(True, device)),
        _launch.ptr(map_boundaries(False, device)),
        _launch.ptr(_gpu_encode_table(True, device)),
        _launch.ptr(_gpu_encode_table(False, device)),
        np.int32(zero_code(True)),
        np.int32(zero_code(False)),
        _launch.ptr(scalars),
    )
    _launch.launch(fn, grid, 256, args, device)
