"""The Python half of every CUDA launch, checked on the CPU against the kernels' signatures.

A kernel launched with one argument too few, an ``np.int32`` where the kernel takes
``long long``, or a template instance that was never registered compiles fine and fails (or
silently reads garbage) only on a GPU. Here each ``*_cuda`` launcher runs on CPU tensors with
``_launch.function`` / ``_launch.launch`` replaced by a checker that compares every launch with the
``__global__`` signature parsed from the ``.cu`` source: argument count, and for each argument
its type (pointers as ``np.uint64``, ``i64`` as ``np.int64``, ``int`` as ``np.int32``,
``float`` as ``np.float32``), plus a valid grid and block.
"""

import re

import numpy as np
import pytest
import torch

from optim8.kernels import _launch, adam, blockwise, int8

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def kernel_signatures() -> dict[str, list[str]]:
    sigs = {}
    for name in _launch.SOURCES:
        src = re.sub(r"//[^\n]*", "", _launch.source(name))
        pattern = r"__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s*)?(\w+)\s*\(([^)]*)\)"
        for m in re.finditer(pattern, src):
            sigs[m.group(1)] = [" ".join(p.split()) for p in m.group(2).split(",")]
    return sigs


SIGNATURES = kernel_signatures()


def expected_type(param: str):
    if "*" in param:
        return np.uint64
    words = param.replace("const", "").split()
    ctype = words[0]
    return {"i64": np.int64, "int": np.int32, "float": np.float32}[ctype]


class Launches:
    def __init__(self):
        self.kernels = []

    def function(self, source, kernel, device, name_expressions=()):
        assert kernel in name_expressions, f"{kernel} is launched but not registered for {source}"
        assert kernel.split("<")[0] in SIGNATURES, f"no __global__ {kernel} in {source}"
        fn = type("Fn", (), {})()
        fn.kernel, fn.ptr = kernel, 0
        return fn

    def launch(self, fn, grid, block, args, device, *rest):
        params = SIGNATURES[fn.kernel.split("<")[0]]
        assert len(args) == len(params), f"{fn.kernel}: {len(args)} arguments for {len(params)} parameters"
        for i, (param, arg) in enumerate(zip(params, args)):
            want = expected_type(param)
            assert type(arg) is want, f"{fn.kernel} argument {i} ({param}): {type(arg).__name__}, not {want.__name__}"
        dims = grid if isinstance(grid, tuple) else (grid,)
        assert all(isinstance(d, int) and d >= 1 for d in dims), f"{fn.kernel}: grid {grid}"
        assert len(dims) < 2 or dims[1] <= 65535, f"{fn.kernel}: grid {grid} exceeds gridDim.y"
        threads = block if isinstance(block, int) else int(np.prod(block))
        assert 1 <= threads <= 1024, f"{fn.kernel}: block {block}"
        self.kernels.append(fn.kernel)


@pytest.fixture
def launches(monkeypatch):
    rec = Launches()
    monkeypatch.setattr(_launch, "function", rec.function)
    monkeypatch.setattr(_launch, "launch", rec.launch)
    monkeypatch.setattr(_launch, "int_mm", lambda a, b_t: torch.zeros(a.shape[0], b_t.shape[1], dtype=torch.int32))
    monkeypatch.setattr(adam, "_grid_limit", lambda fn, device: 132 * 4)
    monkeypatch.setattr(blockwise, "_grid_limit", lambda fn, threads, device: 132 * 8)
    monkeypatch.setattr(adam, "_table", lambda device, rows, starts: torch.tensor([x for r in rows for x in r] + starts))
    monkeypatch.setattr(int8, "_sm_count", lambda device: 132)
    monkeypatch.setattr(int8, "_functions", {})  # never leave a fake in the real launch cache
    return rec


def test_every_kernel_has_a_parsed_signature():
    registered = {expr.split("<")[0] for exprs in _launch.SOURCES.values() for expr in exprs}
    assert registered <= set(SIGNATURES), registered - set(SIGNATURES)
    for name, params in SIGNATURES.items():
        for p in params:
            expected_type(p)  # every parameter type is one the launchers can pass


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blocksize", blockwise.BLOCKSIZES)
def test_blockwise_launches(launches, dtype, blocksize):
    n = 5 * blocksize + 3
    blockwise._quantize_cuda(torch.randn(n).to(dtype), blocksize, True)
    blockwise._dequantize_cuda(torch.zeros(n, dtype=torch.uint8), torch.ones(6), blocksize, False, dtype)
    assert launches.kernels == [
        f"quantize_blockwise<{blockwise._CTYPE[dtype]},{blocksize}>",
        f"dequantize_blockwise<{blockwise._CTYPE[dtype]},{blocksize}>",
    ]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("state8,blocksize", [(True, 64), (True, 128), (True, 256), (False, 256)])
@pytest.mark.parametrize("decoupled", [True, False])
def test_adam_launch(launches, dtype, state8, blocksize, decoupled):
    ps = [torch.randn(n).to(dtype) for n in (1, 4097, 300)]
    gs = [torch.randn_like(p) for p in ps]
    if state8:
        ms = [torch.zeros(p.shape, dtype=torch.uint8) for p in ps]
        vs = [torch.zeros(p.shape, dtype=torch.uint8) for p in ps]
        mas = [torch.zeros(blockwise.num_blocks(p.numel(), blocksize)) for p in ps]
        vas = [torch.zeros(blockwise.num_blocks(p.numel(), blocksize)) for p in ps]
    else:
        ms, vs, mas, vas = [torch.zeros(p.shape) for p in ps], [torch.zeros(p.shape) for p in ps], None, None
    s = adam.adam_scalars(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, step=1, decoupled=decoupled)
    adam._step_cuda(ps, gs, ms, vs, mas, vas, s, blocksize)
    assert len(launches.kernels) == 1  # all tensors in one launch


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("threshold", [0.0, 6.0])
@pytest.mark.parametrize("m,k,n", [(17, 64, 8), (33, 4097, 1000), (100, 64, 1), (1, 7, 3), (16, 4096, 33), (3, 1, 7)])
def test_int8_launches(launches, dtype, threshold, m, k, n):
    x = (torch.randn(m, k) * 4).to(dtype)
    q, scb = int8.quantize_rowwise(torch.randn(n, k))
    bias = torch.randn(n).to(dtype)
    int8._int8_linear_cuda(x, q, scb, bias, threshold)
    assert launches.kernels, "no kernel launched"
    if m <= int8.DECODE_TOKENS:
        assert all(kname.startswith("gemv_int8<") for kname in launches.kernels), launches.kernels
    int8._quantize_activations_cuda(x, threshold, int8._round_up(k, 8))
    int8._dequantize_cuda(q, scb, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("m,k,n", [(1, 64, 33), (16, 4096, 17), (17, 77, 9), (3, 7, 1)])
def test_4bit_launches(launches, monkeypatch, dtype, double_quant, m, k, n):
    from optim8.kernels import nf4

    monkeypatch.setattr(nf4, "_functions", {})  # never leave a fake in the real launch cache
    packed, state = nf4.quantize_4bit(torch.randn(n, k), double_quant=double_quant)
    x = torch.randn(m, k).to(dtype)
    nf4._linear_4bit_cuda(x, packed, *state.op_args(), n, torch.randn(n).to(dtype))
    nf4._grad_input_cuda(torch.randn(m, n).to(dtype), packed, *state.op_args(), k)
    dq = int(double_quant)
    if m <= nf4.DECODE_TOKENS:
        assert launches.kernels[0].startswith(f"gemv_4bit<{nf4._CTYPE[dtype]},")
        assert launches.kernels[0].endswith(f",{dq}>")
    assert all(kn.endswith(f",{dq}>") for kn in launches.kernels)
    assert f"dequantize_4bit<{nf4._CTYPE[dtype]},{dq}>" in launches.kernels


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("state8", [True, False])
def test_update_rule_launches(launches, monkeypatch, dtype, state8):
    from optim8.kernels import update

    monkeypatch.setattr(_launch, "sm_count", lambda device: 132)
    monkeypatch.setattr(_launch, "ctas_per_sm", lambda fn, block, device: 4)
    monkeypatch.setattr(_launch, "upload", lambda host, device: host.clone())
    monkeypatch.setattr(_launch, "record_stream", lambda t, device: None)
    monkeypatch.setattr(update, "_tables", {})
    monkeypatch.setattr(update, "_uploaded", {})
    for rule in update.RULES:
        if state8 and not rule.slots:
            continue
        ps = [torch.randn(n).to(dtype) for n in (1, 4097, 300)]
        gs = [torch.randn_like(p) for p in ps]
        if state8:
            st = [[torch.zeros(p.shape, dtype=torch.uint8) for _ in rule.slots] for p in ps]
            am = [[torch.zeros(blockwise.num_blocks(p.numel(), 128)) for _ in rule.slots] for p in ps]
        else:
            st, am = [[torch.zeros(p.shape) for _ in rule.slots] for p in ps], None
        scalars = {name: 0.5 for name in rule.scalars}
        update._step_cuda(rule, ps, gs, st, am, scalars, 128)
        bs = 128 if state8 else 256
        assert launches.kernels[-1] == f"update_multi<{update._CTYPE[dtype]},{str(state8).lower()},{bs},{rule.kernel}>"
