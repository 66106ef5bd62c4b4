"""The compiled CPU Adam step (kernels/cpu/adam_cpu.cpp): the reference's bits, used when a
compiler exists, and a clean fallback to the PyTorch path when none does."""

import pytest
import torch

from optim8.kernels import _cpu
from optim8.kernels import adam as A
from optim8.kernels.blockwise import quantize_blockwise_reference

needs_compiler = pytest.mark.skipif(_cpu.compiler() is None, reason="no C++ compiler")

SHAPES = [(97, 33), (4099,), (1,), (256 * 5 + 3,), (300, 257), (64,)]


def _tensors(dtype, state8, blocksize, seed=0):
    g = torch.Generator().manual_seed(seed)
    ps = [torch.randn(s, generator=g).to(dtype) for s in SHAPES]
    gs = [(torch.randn(s, generator=g) * torch.exp(2 * torch.randn(s, generator=g))).to(dtype) for s in SHAPES]
    gs[1][17] = float("nan")
    gs[1][300] = float("inf")
    gs[3][:256] *= 1e-20  # tiny gradients: second moments far below their block's absmax
    if not state8:
        ms = [torch.randn(s, generator=g) * 0.1 for s in SHAPES]
        vs = [torch.rand(s, generator=g) * 0.01 for s in SHAPES]
        return ps, gs, ms, vs, None, None
    ms, mas, vs, vas = [], [], [], []
    for s in SHAPES:
        c, a = quantize_blockwise_reference(torch.randn(s, generator=g) * 0.1, blocksize, True)
        ms.append(c)
        mas.append(a)
        c, a = quantize_blockwise_reference(torch.rand(s, generator=g) * 0.01, blocksize, False)
        vs.append(c)
        vas.append(a)
    return ps, gs, ms, vs, mas, vas


def _bits(t):
    return t if t.dtype == torch.uint8 else t.reshape(-1).view(torch.uint8)


@needs_compiler
@pytest.mark.parametrize("decoupled", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("state8,blocksize", [(True, 64), (True, 128), (True, 256), (False, 256)])
def test_compiled_step_equals_reference_bit_for_bit(state8, blocksize, dtype, decoupled):
    assert _cpu.library() is not None, _cpu.unavailable_reason()
    s = A.adam_scalars(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, step=3, decoupled=decoupled)
    ref = _tensors(dtype, state8, blocksize)
    got = _tensors(dtype, state8, blocksize)
    for _ in range(3):
        for i in range(len(SHAPES)):
            A._step_reference(*(x[i] if x is not None else None for x in ref), s, blocksize)
        left = A._step_compiled(*got, s, blocksize)
        assert left[0] == [], "every tensor went through the compiled kernel"
    for name, xs, ys in zip(("p", "g", "m", "v", "m_absmax", "v_absmax"), ref, got):
        if xs is None:
            continue
        for x, y in zip(xs, ys):
            assert torch.equal(_bits(x), _bits(y)), (name, x.shape)


@needs_compiler
def test_compiled_path_is_used_when_a_compiler_exists(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the PyTorch path ran")

    monkeypatch.setattr(A, "_step_cpu", fail)
    monkeypatch.setattr(A, "_step_reference", fail)
    p, g = torch.randn(5000), torch.randn(5000)
    m, v = torch.zeros(5000), torch.zeros(5000)
    s = A.adam_scalars(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, step=1, decoupled=True)
    before = p.clone()
    A.adam_step([p], [g], [m], [v], None, None, scalars=s)
    assert not torch.equal(p, before)


def _fresh(monkeypatch, tmp_path, **env):
    monkeypatch.setenv("OPTIM8_CPU_CACHE", str(tmp_path))
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    _cpu.reset()


def _reference_result():
    p = torch.randn(3000, generator=torch.Generator().manual_seed(5))
    g = torch.randn(3000, generator=torch.Generator().manual_seed(6))
    s = A.adam_scalars(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, step=1, decoupled=True)
    a, b = p.clone(), p.clone()
    m1, ma1 = torch.full((3000,), 127, dtype=torch.uint8), torch.zeros(12)
    v1, va1 = torch.zeros(3000, dtype=torch.uint8), torch.zeros(12)
    m2, ma2, v2, va2 = m1.clone(), ma1.clone(), v1.clone(), va1.clone()
    A._step_reference(a, g, m1, v1, ma1, va1, s, 256)
    A.adam_step([b], [g], [m2], [v2], [ma2], [va2], scalars=s, blocksize=256)
    return torch.equal(a, b) and torch.equal(m1, m2) and torch.equal(v1, v2) and torch.equal(ma1, ma2)


def test_no_compiler_falls_back_cleanly(monkeypatch, tmp_path):
    _fresh(monkeypatch, tmp_path)
    monkeypatch.setattr(_cpu, "compiler", lambda: None)
    try:
        assert _cpu.library() is None
        assert "no C++ compiler" in _cpu.unavailable_reason()
        assert _reference_result()
    finally:
        _cpu.reset()


def test_a_failing_compiler_warns_once_and_falls_back(monkeypatch, tmp_path):
    _fresh(monkeypatch, tmp_path, CXX="false")  # exists, exits 1
    try:
        with pytest.warns(RuntimeWarning, match="PyTorch reference"):
            assert _cpu.library() is None
        assert "failed" in _cpu.unavailable_reason()
        assert _reference_result()
        assert not list(tmp_path.glob("*.so"))
    finally:
        _cpu.reset()


def test_switched_off_by_environment(monkeypatch, tmp_path):
    _fresh(monkeypatch, tmp_path, OPTIM8_CPU_KERNELS="0")
    try:
        assert _cpu.library() is None and _cpu.unavailable_reason() == "OPTIM8_CPU_KERNELS=0"
        assert _reference_result()
    finally:
        _cpu.reset()


@needs_compiler
def test_builds_into_its_cache(monkeypatch, tmp_path):
    _fresh(monkeypatch, tmp_path)
    try:
        assert _cpu.library() is not None
        assert len(list(tmp_path.glob("adam_cpu-*.so"))) == 1
        assert _reference_result()
    finally:
        _cpu.reset()


@needs_compiler
@pytest.mark.parametrize("blocksize", [64, 256])
def test_compiled_encoder_at_every_boundary(blocksize):
    """beta1 = beta2 = 0 makes the new moments the gradient (and its square): codes of values on,
    just above and just below every decision boundary of both maps, in blocks whose scale is 1."""
    from optim8.kernels.quant_map import map_boundaries

    vals = []
    for signed in (True, False):
        mid = map_boundaries(signed)
        for x in (mid, torch.nextafter(mid, torch.tensor(2.0)), torch.nextafter(mid, torch.tensor(-2.0))):
            vals.append(x)
            vals.append(x.abs().sqrt())  # the second moment is g * g
    v = torch.cat(vals)
    per = blocksize - 1
    nb = (v.numel() + per - 1) // per
    g = torch.zeros(nb, blocksize)
    g[:, 0] = 1.0  # every block's scale is exactly 1
    g.view(-1)[torch.arange(nb * blocksize).view(nb, blocksize)[:, 1:].reshape(-1)[: v.numel()]] = v
    g = g.reshape(-1)
    s = A.adam_scalars(lr=1e-3, beta1=0.0, beta2=0.0, eps=1e-8, weight_decay=0.0, step=1, decoupled=True)
    n = g.numel()
    nbk = (n + blocksize - 1) // blocksize

    def state():
        return torch.zeros(n), torch.full((n,), 127, dtype=torch.uint8), torch.zeros(n, dtype=torch.uint8), torch.zeros(nbk), torch.zeros(nbk)

    p1, m1, v1, ma1, va1 = state()
    p2, m2, v2, ma2, va2 = state()
    A._step_reference(p1, g, m1, v1, ma1, va1, s, blocksize)
    assert A._step_compiled([p2], [g], [m2], [v2], [ma2], [va2], s, blocksize)[0] == []
    assert torch.equal(m1, m2) and torch.equal(v1, v2)
    assert torch.equal(ma1, ma2) and torch.equal(va1, va2) and torch.equal(p1, p2)


@needs_compiler
def test_scalar_build_equals_reference_too(monkeypatch, tmp_path):
    """The loops without AVX-512 (what a CPU without it runs): the same bits."""
    monkeypatch.setattr(_cpu, "FLAGS", _cpu.FLAGS + ("-mno-avx512f",))
    _fresh(monkeypatch, tmp_path)
    try:
        assert _cpu.library() is not None, _cpu.unavailable_reason()
        test_compiled_step_equals_reference_bit_for_bit(True, 64, torch.bfloat16, True)
        test_compiled_step_equals_reference_bit_for_bit(False, 256, torch.float16, False)
        test_compiled_encoder_at_every_boundary(128)
    finally:
        _cpu.reset()
