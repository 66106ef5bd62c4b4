"""The int8 kernels: references against brute force (CPU), custom-op registration, CUDA against the reference.

CUDA tests run the PyTorch reference on the same CUDA tensors, so the int8 codes, row scales,
outlier columns and dequantized weights must match bit for bit, and the fused epilogue (the
same fp32 operations in the same order, no FMA contraction) within one rounding of the dtype.
The decode GEMV sums in another order than the reference; its bound is one rounding of the
output dtype plus fp32 accumulation error (1e-5 of sum |x| |W|).
"""

import pytest
import torch
from torch import nn

from optim8 import Linear8bitLt, quantize_model
from optim8.kernels import int8
from devices import DEV, GPU, reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def eps(dtype):
    return torch.finfo(dtype).eps


# ------------------------------------------------------------------------- references (CPU)


@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_rowwise_against_float64(dtype):
    w = (torch.randn(37, 4097) * torch.rand(37, 1) * 3).to(dtype)
    q, scb = int8.quantize_rowwise(w)
    wd = w.double()
    absmax = wd.abs().amax(dim=1, keepdim=True)
    assert torch.equal(scb, (absmax.squeeze(1).float() / 127))
    exact = wd * 127 / absmax
    # the kernel multiplies by the fp32 inverse; only near-ties may round the other way
    differs = q.double() != exact.round()
    assert (exact[differs].frac().abs() - 0.5).abs().max().item() < 1e-4 if differs.any() else True
    assert (q.double() - exact).abs().max() <= 0.5 + 1e-4
    assert q.abs().max() == 127


def test_quantize_rowwise_zero_row_and_empty():
    w = torch.randn(4, 10)
    w[2] = 0
    q, scb = int8.quantize_rowwise(w)
    assert scb[2] == 0 and torch.all(q[2] == 0)
    assert torch.all(int8.dequantize_rowwise(q, scb)[2] == 0)
    q, scb = int8.quantize_rowwise(torch.randn(0, 5))
    assert q.shape == (0, 5) and scb.shape == (0,)


def test_quantize_rowwise_refuses_non_finite():
    w = torch.randn(3, 8)
    w[1, 2] = float("nan")
    with pytest.raises(ValueError, match="1 NaN/Inf"):
        int8.quantize_rowwise(w)


def test_scales_are_correctly_rounded_divisions():
    """127 / absmax and absmax / 127 are each one correctly rounded fp32 division, on every
    device (plain ``127.0 / t`` rounds twice, and CUDA's ``t / 127.0`` multiplies by 1/127)."""
    w = torch.randn(2000, 33) * torch.rand(2000, 1) * 10
    q, scb = int8.quantize_rowwise(w)
    absmax = w.abs().amax(dim=1).double()
    assert torch.equal(scb, (absmax / 127).float())
    inv = (127 / absmax).float()
    assert torch.equal(q, torch.round(w * inv[:, None]).to(torch.int8))
    xq, row_scale, _ = int8.quantize_activations(w, threshold=0.0)
    assert torch.equal(row_scale, scb) and torch.equal(xq, q)


def tiny_rows(rows: int = 6, cols: int = 37) -> torch.Tensor:
    """Rows 1 and 4 hold only magnitudes below 2**-128, where 127 / absmax overflows fp32."""
    w = torch.randn(rows, cols)
    w[1] = torch.randn(cols) * 1e-40
    w[4] = 0
    w[4, 3] = -2e-39
    return w


def test_tiny_rows_quantize_to_zero():
    w = tiny_rows()
    q, scb = int8.quantize_rowwise(w)
    assert torch.all(q[[1, 4]] == 0) and torch.all(scb[[1, 4]] > 0)
    normal = [0, 2, 3, 5]
    q2, scb2 = int8.quantize_rowwise(w[normal])
    assert torch.equal(q[normal], q2) and torch.equal(scb[normal], scb2)
    xq, row_scale, _ = int8.quantize_activations(w, threshold=6.0)
    assert torch.all(xq[[1, 4]] == 0) and torch.equal(xq[normal], q2)


def test_quantize_activations_semantics():
    x = torch.randn(40, 300)
    x[7, 11] = 9.0  # column 11 becomes an outlier column for every row
    x[:, 200] *= 30
    xq, row_scale, outlier = int8.quantize_activations(x, threshold=6.0)
    expected_cols = (x.abs() >= 6.0).any(dim=0)
    assert torch.equal(outlier, expected_cols) and outlier[11] and outlier[200]
    assert torch.all(xq[:, outlier] == 0)
    kept = x.masked_fill(outlier, 0)
    assert torch.equal(row_scale, kept.abs().amax(dim=1) / 127)
    err = (xq.float() * row_scale[:, None] - kept).abs()
    assert torch.all(err <= row_scale[:, None] * 0.5001)
    _, _, none = int8.quantize_activations(x, threshold=0.0)
    assert not none.any()


def test_outlier_columns_are_capped_in_column_order():
    """A threshold below the data flags every column: the first OUTLIER_CAP go to the float path."""
    x = torch.randn(30, 1000)
    _, row_scale, outlier = int8.quantize_activations(x, threshold=0.5)
    assert outlier.sum() == int8.OUTLIER_CAP and outlier[: int8.OUTLIER_CAP].all()
    assert torch.equal(row_scale, x[:, int8.OUTLIER_CAP :].abs().amax(dim=1) / 127)
    w = torch.randn(40, 1000)
    q, scb = int8.quantize_rowwise(w)
    exact = x.double() @ (q.double() * scb.double()[:, None]).t()
    got = int8.int8_linear(x, q, scb, threshold=0.5)
    assert ((got.double() - exact).norm() / exact.norm()) < 1.5e-2  # less precise, never wrong


def test_non_finite_activations_stay_in_their_row():
    layer = Linear8bitLt.from_linear(nn.Linear(64, 32))
    x = torch.randn(40, 64)
    x[3, 5] = float("nan")
    out = layer(x)
    assert out[3].isnan().all()
    assert torch.isfinite(out[torch.arange(40) != 3]).all()


def test_exact_int32_fallback(monkeypatch):
    """Where no int8 GEMM takes the shape, fp32 products over chunks of 1024 columns stay exact."""
    a = torch.randint(-127, 128, (20, 3001), dtype=torch.int8)
    b = torch.randint(-127, 128, (9, 3001), dtype=torch.int8)
    expected = (a.double() @ b.double().t()).to(torch.int32)
    assert torch.equal(int8._int_mm_exact(a, b), expected)

    def no_int_mm(*args):
        raise RuntimeError("no int8 GEMM here")

    monkeypatch.setattr(torch, "_int_mm", no_int_mm)
    assert torch.equal(int8._int_mm_exact(a, b), expected)
    a.fill_(127)
    b.fill_(-127)
    assert torch.equal(int8._int_mm_exact(a, b), torch.full((20, 9), -127 * 127 * 3001, dtype=torch.int32))


def test_decode_and_mixed_paths_meet_at_16_tokens():
    w = torch.randn(50, 128)
    q, scb = int8.quantize_rowwise(w)
    x = torch.randn(17, 128)
    exact = x.double() @ (q.double() * scb.double()[:, None]).t()
    decode = int8.int8_linear(x[:16], q, scb)  # weight-only
    mixed = int8.int8_linear(x, q, scb)  # activations in int8 too
    assert ((decode.double() - exact[:16]).norm() / exact[:16].norm()) < 1e-6
    assert 1e-4 < ((mixed.double() - exact).norm() / exact.norm()) < 1.5e-2


def _same(a, b):
    return torch.equal(a.nan_to_num(12345.0), b.nan_to_num(12345.0))


@pytest.fixture(params=["compiled", "torch"])
def cpu_path(request, monkeypatch):
    """The CPU forward with its passes compiled (cpu/int8_cpu.cpp), or in torch ops (no compiler)."""
    from optim8.kernels import _cpu

    if request.param == "compiled":
        if _cpu.library() is None:
            pytest.skip(f"compiled CPU kernels unavailable: {_cpu.unavailable_reason()}")
    else:
        monkeypatch.setattr(_cpu, "library", lambda: None)
    return request.param


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mkn", [(17, 64, 8), (33, 1001, 300), (300, 384, 33), (100, 7, 1), (129, 2000, 3), (700, 900, 40)])
@pytest.mark.parametrize("threshold", [0.0, 6.0, 0.5])
@pytest.mark.parametrize("chunk", [int8._CPU_CHUNK_ELEMENTS, 500])
def test_cpu_path_equals_reference_bit_for_bit(dtype, mkn, threshold, chunk, cpu_path, monkeypatch):
    """The fused CPU forward is the reference, bit for bit (0.5: more flagged columns than the cap;
    700x900: the compiled passes split rows over threads)."""
    if cpu_path == "compiled" and chunk != int8._CPU_CHUNK_ELEMENTS:
        pytest.skip("the row-block size is the torch path's")
    monkeypatch.setattr(int8, "_CPU_CHUNK_ELEMENTS", chunk)  # 500: many row blocks, 1-row blocks for wide x
    m, k, n = mkn
    x = torch.randn(m, k)
    x[:, torch.randperm(k)[: max(1, k // 250)]] *= 25
    x = x.to(dtype)
    q, scb = int8.quantize_rowwise(torch.randn(n, k))
    for bias in (None, torch.randn(n).to(dtype)):
        got = int8._int8_linear_cpu(x, q, scb, bias, threshold)
        assert got.dtype == dtype and torch.equal(got, int8.int8_linear_reference(x, q, scb, bias, threshold))


@pytest.mark.parametrize("threshold", [0.0, 6.0, float("inf")])
def test_cpu_path_non_finite_and_tiny_rows_as_reference(threshold, cpu_path):
    x = torch.randn(40, 50)
    x[3, 5] = float("nan")  # NaN row
    x[4] = 1e-38  # 127 / absmax overflows
    x[5, 7] = float("inf")
    x[6] = 0
    x[:, 9] = float("nan")  # a NaN column that also holds an outlier
    x[7, 9] = 10
    x[:, 11] *= 30
    q, scb = int8.quantize_rowwise(torch.randn(30, 50))
    assert _same(int8._int8_linear_cpu(x, q, scb, None, threshold), int8.int8_linear_reference(x, q, scb, None, threshold))
    x = torch.randn(40, 50)
    x[:, 9] = float("nan")  # NaN column without an outlier: not flagged
    x[:, 11] *= 30
    assert _same(int8._int8_linear_cpu(x, q, scb, None, threshold), int8.int8_linear_reference(x, q, scb, None, threshold))


def test_cpu_forward_takes_the_compiled_passes_where_they_build(monkeypatch):
    from optim8.kernels import _cpu

    if _cpu.compiler() is None:
        pytest.skip("no C++ compiler")
    assert _cpu.library() is not None, _cpu.unavailable_reason()
    calls = []
    compiled = int8._int8_linear_compiled
    monkeypatch.setattr(int8, "_int8_linear_compiled", lambda *a: calls.append(a[1].shape) or compiled(*a))
    layer = Linear8bitLt.from_linear(nn.Linear(64, 32))
    with torch.no_grad():
        layer(torch.randn(40, 64))
    assert calls == [(40, 64)]


def test_cpu_layer_takes_the_fused_path(monkeypatch):
    calls = []
    fused = int8._int8_linear_cpu
    monkeypatch.setattr(int8, "_int8_linear_cpu", lambda *a: calls.append(a[0].shape) or fused(*a))
    layer = Linear8bitLt.from_linear(nn.Linear(64, 32))
    x = torch.randn(3, 20, 64, requires_grad=True)
    out = layer(x)  # eager: the autograd Function
    out.sum().backward()
    assert calls == [(60, 64)] and x.grad.shape == x.shape
    int8._int8_linear_op(x.detach().reshape(60, 64), layer.weight, layer.SCB, layer.bias, 6.0)  # the custom op
    assert calls == [(60, 64)] * 2


@pytest.mark.parametrize(
    "op, args",
    [
        (
            "_int8_linear_op",
            lambda: (torch.randn(20, 33), *int8.quantize_rowwise(torch.randn(17, 33)), torch.randn(17), 1.0),
        ),
        ("_int8_linear_op", lambda: (torch.randn(5, 33), *int8.quantize_rowwise(torch.randn(17, 33)), None, 6.0)),
        ("_quantize_activations_op", lambda: (torch.randn(9, 31) * 5, 3.0)),
        ("_dequantize_op", lambda: (*int8.quantize_rowwise(torch.randn(7, 9)), torch.bfloat16)),
        ("_quantize_rowwise_op", lambda: (torch.randn(7, 9),)),
        ("_grad_input_op", lambda: (torch.randn(20, 17), *int8.quantize_rowwise(torch.randn(17, 33)))),
    ],
)
def test_custom_op_registration(op, args):
    """Schema, fake (meta) implementation, autograd registration and AOT tracing of every op."""
    torch.library.opcheck(getattr(int8, op), args())


def test_meta_tensors():
    x = torch.empty(5, 40, 64, device="meta")
    layer = quantize_model(nn.Sequential(nn.Linear(64, 48, device="meta")), skip=())[0]
    assert layer.is_quantized
    out = layer(x)
    assert out.is_meta and out.shape == (5, 40, 48)


# ------------------------------------------------------------------------- CUDA against the reference

# On a GPU, or on the host device without one (tests/devices.py); the host device runs the
# large shapes at a smaller size (its lanes are fibers).
cuda = pytest.mark.cuda
SHAPES = [(1, 1), (3, 4097), (17, 64), (257, 1000), (2048, 4096) if GPU else (300, 2048)]


def cuda_inputs(m, k, dtype, outliers=True):
    x = torch.randn(m, k, device=DEV)
    if outliers and k > 8:
        x[:, torch.randperm(k, device=DEV)[: max(1, k // 250)]] *= 25
    return x.to(dtype)


@cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("threshold", [0.0, 6.0, 0.5])  # 0.5: more flagged columns than the cap
def test_cuda_quantize_activations_is_exact(dtype, shape, threshold):
    x = cuda_inputs(*shape, dtype)
    got = int8.quantize_activations(x, threshold=threshold)
    expected = int8.quantize_activations_reference(x, threshold)
    for g, e in zip(got, expected):
        assert torch.equal(g, e)


@cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (33, 4097), (4096, 14336) if GPU else (300, 4100)])
def test_cuda_dequantize_is_exact(dtype, shape):
    q, scb = int8.quantize_rowwise(torch.randn(*shape, device=DEV))
    assert torch.equal(int8.dequantize_rowwise(q, scb, dtype=dtype), int8.dequantize_rowwise_reference(q, scb, dtype))


@cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_tiny_rows_match_reference(dtype):
    w = tiny_rows(6, 4096).to(dtype)  # 4096 columns: the vectorized kernel path; 37: the scalar one
    for x in (w.to(DEV), w[:, :37].contiguous().to(DEV)):
        got = int8.quantize_activations(x, threshold=6.0)
        expected = int8.quantize_activations_reference(x, 6.0)
        for g, e in zip(got, expected):
            assert torch.equal(g, e)
        q, scb = int8.quantize_rowwise(x)
        with reference():
            q_cpu, scb_cpu = int8.quantize_rowwise(x.cpu())
        assert torch.equal(q.cpu(), q_cpu) and torch.equal(scb.cpu(), scb_cpu)


@cuda
def test_cuda_weight_quantization_matches_cpu():
    w = torch.randn(1000, 4097)
    q_cpu, scb_cpu = int8.quantize_rowwise(w)
    q, scb = int8.quantize_rowwise(w.to(DEV))
    assert torch.equal(q.cpu(), q_cpu) and torch.equal(scb.cpu(), scb_cpu)


@cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mkn", [(17, 64, 8), (33, 4097, 1000), (300, 1000, 33), (2048, 4096, 4096) if GPU else (200, 1024, 300), (100, 64, 1)])
@pytest.mark.parametrize("threshold", [0.0, 6.0, 0.5])
@pytest.mark.parametrize("bias", [True, False])
def test_cuda_mixed_forward_matches_reference(dtype, mkn, threshold, bias):
    m, k, n = mkn
    x = cuda_inputs(m, k, dtype)
    q, scb = int8.quantize_rowwise(torch.randn(n, k, device=DEV))
    b = torch.randn(n, device=DEV, dtype=dtype) if bias else None
    got = int8.int8_linear(x, q, scb, b, threshold=threshold)
    expected = int8.int8_linear_reference(x, q, scb, b, threshold)
    assert got.dtype == dtype and got.shape == (m, n)
    # the same function: exact int32 GEMM, the outlier product as the same ordered fp32 sum
    assert torch.equal(got.cpu(), expected.cpu())


@cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 2, 3, 5, 8, 13, 16])
@pytest.mark.parametrize("kn", [(4096, 14336) if GPU else (2048, 1500), (14336, 4096) if GPU else (3000, 700), (4097, 33), (24, 1000), (1, 7)])
def test_cuda_decode_gemv(dtype, m, kn):
    k, n = kn
    x = torch.randn(m, k, device=DEV).to(dtype)
    q, scb = int8.quantize_rowwise(torch.randn(n, k, device=DEV))
    bias = torch.randn(n, device=DEV, dtype=dtype)
    got = int8.int8_linear(x, q, scb, bias)
    w = q.double() * scb.double()[:, None]
    exact = x.double() @ w.t() + bias.double()
    magnitude = x.double().abs() @ w.abs().t()
    err = (got.double() - exact).abs()
    assert torch.all(err <= eps(dtype) * exact.abs() + 1e-5 * magnitude + 1e-30), err.max()


@cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [4, 300])
def test_cuda_grad_input_is_exact(dtype, m):
    n, k = (1000, 4097) if GPU else (300, 1001)
    q, scb = int8.quantize_rowwise(torch.randn(n, k, device=DEV))
    grad = torch.randn(m, n, device=DEV, dtype=dtype)
    got = int8.int8_linear_grad_input(grad, q, scb)
    assert torch.equal(got, grad @ int8.dequantize_rowwise_reference(q, scb, dtype))


# ------------------------------------------------------------------------- CUDA layer behaviour


@cuda
@pytest.mark.gpu
def test_first_cuda_move_quantizes_once():
    ref = nn.Linear(300, 200)
    expected = Linear8bitLt.from_linear(ref)
    layer = Linear8bitLt(300, 200)
    layer.load_state_dict(ref.state_dict())  # quantizes on CPU...
    fresh = Linear8bitLt(300, 200)
    with torch.no_grad():
        fresh.weight.copy_(ref.weight)
        fresh.bias.copy_(ref.bias)
    assert not fresh.is_quantized
    fresh.to("cuda", torch.float16)  # ...or on its first way to the GPU, from the fp32 weight
    assert fresh.is_quantized and fresh.compute_dtype == torch.float16 and fresh.bias.dtype == torch.float16
    assert torch.equal(fresh.weight.cpu(), expected.weight) and torch.equal(fresh.SCB.cpu(), expected.SCB)
    ptr = fresh.weight.data_ptr()
    fresh.cuda().to(torch.bfloat16).to("cuda")
    assert fresh.weight.data_ptr() == ptr and fresh.SCB.dtype == torch.float32
    assert torch.equal(layer.cuda().weight, fresh.weight)


@cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_layer_matches_cpu_layer(dtype):
    ref = nn.Linear(1024, 768)
    cpu = Linear8bitLt.from_linear(ref).to(dtype)
    gpu = Linear8bitLt.from_linear(ref).to(dtype).to(DEV)
    for m in (1, 16, 17, 512 if GPU else 100):
        x = torch.randn(2, m, 1024).to(dtype)
        with reference():
            expected = cpu(x)
        got = gpu(x.to(DEV)).cpu()
        assert got.dtype == dtype
        # CPU and GPU matmuls sum in other orders: compare at the level of the dtype's rounding
        rel = ((got.double() - expected.double()).norm() / expected.double().norm()).item()
        assert rel <= 4 * eps(dtype) + 1e-5, (m, rel)


@cuda
def test_cuda_backward_and_state_dict_across_devices():
    layer = Linear8bitLt.from_linear(nn.Linear(512, 256)).to(torch.bfloat16).to(DEV)
    x = torch.randn(64, 512, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    layer(x).float().square().sum().backward()
    assert x.grad.dtype == torch.bfloat16 and layer.bias.grad is not None and layer.weight.grad is None
    fresh = Linear8bitLt(512, 256)
    fresh.load_state_dict(layer.state_dict())
    assert torch.equal(fresh.weight, layer.weight.cpu()) and torch.equal(fresh.SCB, layer.SCB.cpu())
    back = Linear8bitLt(512, 256, device=DEV)
    back.load_state_dict(fresh.state_dict())
    assert torch.equal(back.weight, layer.weight)


@cuda
def test_meta_model_to_empty_cuda_then_load():
    torch.manual_seed(0)
    real = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 256))
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 256))
    quantize_model(model, skip=())
    model.to_empty(device=DEV)
    model.load_state_dict(real.state_dict())
    expected = quantize_model(real, skip=()).to(DEV)
    x = torch.randn(40, 256, device=DEV)
    assert torch.equal(model(x), expected(x))
    # .cuda() of a meta layer has no values to move: refused as for nn.Linear, no garbage weights
    with torch.device("meta"):
        meta = Linear8bitLt(64, 32)
    with pytest.raises(NotImplementedError, match="to_empty"):
        meta.to(DEV)
    assert meta.weight.device.type == "meta"


@cuda
@pytest.mark.gpu
def test_quantized_model_holds_half_the_fp16_weight_bytes():
    torch.cuda.empty_cache()

    def build():
        return nn.Sequential(*[nn.Linear(2048, 2048, bias=False) for _ in range(8)]).half().cuda()

    before = torch.cuda.memory_allocated()
    fp16 = build()
    fp16_bytes = torch.cuda.memory_allocated() - before
    del fp16
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    model = quantize_model(build(), skip=())
    int8_bytes = torch.cuda.memory_allocated() - before
    assert all(isinstance(m, Linear8bitLt) for m in model)
    # int8 codes + one fp32 scale per row: 0.5 + 2 / 2048 of fp16
    assert 0.49 <= int8_bytes / fp16_bytes <= 0.51, int8_bytes / fp16_bytes


@cuda
@pytest.mark.gpu
def test_cuda_torch_compile():
    layer = Linear8bitLt.from_linear(nn.Linear(256, 128)).half().cuda()
    x = torch.randn(64, 256, device="cuda", dtype=torch.float16, requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True)
    out = compiled(x)
    assert torch.equal(out, layer(x))
    out.float().sum().backward()
    assert x.grad is not None


def test_int8_linear_refuses_mismatched_operands():
    q, scb = int8.quantize_rowwise(torch.randn(8, 16))
    with pytest.raises(ValueError, match=r"x \(4, 15\)"):
        int8.int8_linear(torch.randn(4, 15), q, scb)
    with pytest.raises(ValueError, match="int8 q"):
        int8.int8_linear(torch.randn(4, 16), q.float(), scb)
    with pytest.raises(ValueError, match="one device"):
        int8.int8_linear(torch.randn(4, 16, device="meta"), q, scb)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16 x, got torch.float64"):
        int8.int8_linear(torch.randn(4, 16, dtype=torch.float64), q, scb)


@pytest.mark.parametrize("int_mm", ["torch", "refused"])
def test_int8_gemm_reference_is_exact_under_autocast(int_mm, monkeypatch):
    """The int8 GEMM must stay exact for long rows and inside an autocast region that would round
    float matmuls to bf16, through torch._int_mm and through the fp32-chunk fallback."""
    from optim8.kernels.int8 import _int_mm_exact

    if int_mm == "refused":

        def refuse(*args):
            raise RuntimeError("shape not supported")

        monkeypatch.setattr(torch, "_int_mm", refuse)
    a = torch.randint(-127, 128, (37, 3001), dtype=torch.int8)
    b = torch.randint(-127, 128, (19, 3001), dtype=torch.int8)
    exact = (a.long() @ b.long().t()).int()
    assert torch.equal(_int_mm_exact(a, b), exact)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(_int_mm_exact(a, b), exact)
