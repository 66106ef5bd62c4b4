"""Linear8bitLt and quantize_model: accuracy, the outlier decomposition, backward, state dicts, moves, bad input.

Accuracy bounds: LLM.int8() rounds weights (per output row) and activations (per token) to
int8, a relative error of ~0.4 % and ~0.9 % on Gaussian data (absmax over a row of 1k-4k
Gaussians is ~4 sigma, so the step is 4 sigma / 127); together they stay below 1.0e-2.
"""

import io

import pytest
import torch
from torch import nn

from optim8 import Linear8bitLt, quantize_model
from optim8.kernels.int8 import DECODE_TOKENS, dequantize_rowwise, int8_linear_reference


def rel_error(got, expected):
    return ((got.double() - expected.double()).norm() / expected.double().norm()).item()


def linear(in_features, out_features, bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features, bias=bias)


def with_outliers(x, fraction=0.004, factor=25.0, seed=1):
    """Scale a random 0.4 % of the feature columns by 25: the activation outliers of large LMs."""
    k = x.shape[-1]
    cols = torch.randperm(k, generator=torch.Generator().manual_seed(seed))[: max(1, round(fraction * k))]
    x = x.clone()
    x[..., cols] *= factor
    return x, cols


# ------------------------------------------------------------------------- accuracy


@pytest.mark.parametrize("shape", [(64, 1024, 512), (33, 4097, 300), (200, 256, 1000)])
def test_gaussian_error_against_fp32_linear(shape):
    m, k, n = shape
    ref = linear(k, n)
    layer = Linear8bitLt.from_linear(ref)
    x = torch.randn(m, k)
    error = rel_error(layer(x), ref(x))
    assert 1e-3 < error <= 1.0e-2, error  # > 1e-3: the int8 path ran, this is not a float matmul


def test_outlier_decomposition_is_why_threshold_exists():
    """0.4 % of the features x25: kept in float at threshold 6, the error stays at the int8 level;
    at threshold 0 they set every row's scale and the remaining features lose most of their bits."""
    ref = linear(1024, 512)
    x, cols = with_outliers(torch.randn(64, 1024))
    expected = ref(x)
    decomposed = rel_error(Linear8bitLt.from_linear(ref, threshold=6.0)(x), expected)
    plain = rel_error(Linear8bitLt.from_linear(ref, threshold=0.0)(x), expected)
    assert decomposed <= 8e-3, decomposed
    assert plain >= 4 * decomposed, (plain, decomposed)


def test_decode_path_is_weight_only():
    """<= 16 tokens: x @ dequant(W)^T + b in fp32 (no activation rounding), for 1 token and 4097 features too."""
    ref = linear(4097, 300)
    layer = Linear8bitLt.from_linear(ref)
    for m in (1, 7, DECODE_TOKENS):
        x = torch.randn(m, 4097)
        got = layer(x)
        expected = x.double() @ layer.dequantize(torch.float32).double().t() + ref.bias.double()
        assert got.shape == (m, 300)
        assert rel_error(got, expected) <= 1e-6
        assert rel_error(got, ref(x)) <= 6e-3  # weight rounding only


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_native_dtypes(dtype):
    """The output is in x's dtype; its error is the int8 error plus one rounding to that dtype."""
    ref = linear(512, 384)
    layer = Linear8bitLt.from_linear(ref).to(dtype)
    assert layer.weight.dtype == torch.int8 and layer.SCB.dtype == torch.float32 and layer.bias.dtype == dtype
    x = torch.randn(3, 40, 512).to(dtype)
    out = layer(x)
    assert out.dtype == dtype and out.shape == (3, 40, 384)
    expected = ref(x.float())
    rounding = rel_error(expected.to(dtype), expected)
    assert rel_error(out, expected) <= 1.0e-2 + rounding


def test_leading_dims_are_rows():
    ref = linear(96, 80)
    layer = Linear8bitLt.from_linear(ref)
    x = torch.randn(2, 3, 5, 96)
    assert torch.equal(layer(x), layer(x.reshape(30, 96)).reshape(2, 3, 5, 80))


def test_matches_the_kernel_reference():
    ref = linear(300, 200)
    layer = Linear8bitLt.from_linear(ref, threshold=2.5)
    x, _ = with_outliers(torch.randn(50, 300))
    expected = int8_linear_reference(x, layer.weight, layer.SCB, layer.bias, 2.5)
    assert torch.equal(layer(x), expected)


# ------------------------------------------------------------------------- backward


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [5, 48])
def test_input_grad_is_grad_output_times_dequantized_weight(dtype, tokens):
    layer = Linear8bitLt.from_linear(linear(200, 120)).to(dtype)
    x = torch.randn(2, tokens, 200, dtype=dtype, requires_grad=True)
    grad = torch.randn(2, tokens, 120, dtype=dtype)
    layer(x).backward(grad)
    expected = (grad.reshape(-1, 120) @ layer.dequantize(dtype)).reshape(x.shape)
    assert torch.equal(x.grad, expected)
    assert layer.bias.grad is not None
    assert torch.allclose(layer.bias.grad.float(), grad.float().sum(dim=(0, 1)), rtol=1e-2, atol=1e-2)
    assert layer.weight.grad is None and not layer.weight.requires_grad and not layer.SCB.requires_grad


def test_backward_saves_only_the_weight_and_scales():
    """The forward keeps nothing for the backward beyond the resident int8 weight and SCB (not x)."""
    layer = Linear8bitLt.from_linear(linear(256, 128))
    x = torch.randn(64, 256, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = layer(x)
    assert {(t.dtype, tuple(t.shape)) for t in saved} == {(torch.int8, (128, 256)), (torch.float32, (128,))}
    assert all(t.data_ptr() in (layer.weight.data_ptr(), layer.SCB.data_ptr()) for t in saved)
    out.sum().backward()


def test_frozen_bias_and_no_input_grad():
    layer = Linear8bitLt.from_linear(linear(64, 32))
    layer.bias.requires_grad_(False)
    x = torch.randn(20, 64)
    assert not layer(x).requires_grad


def test_torch_compile_traces_the_custom_ops():
    layer = Linear8bitLt.from_linear(linear(64, 48))
    x = torch.randn(24, 64, requires_grad=True)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    out = compiled(x)
    assert torch.equal(out, layer(x))
    out.sum().backward()
    assert x.grad is not None


# ------------------------------------------------------------------------- quantization and moves


def test_quantize_once_and_casts_leave_int8_alone():
    ref = linear(128, 64)
    layer = Linear8bitLt(128, 64)
    layer.load_state_dict(ref.state_dict())
    assert layer.is_quantized
    codes, scb = layer.weight.clone(), layer.SCB.clone()
    assert layer.quantize() is layer and torch.equal(layer.weight, codes)
    for cast in (lambda m: m.half(), lambda m: m.to(torch.bfloat16), lambda m: m.float(), lambda m: m.cpu()):
        cast(layer)
        assert layer.weight.dtype == torch.int8 and torch.equal(layer.weight, codes)
        assert layer.SCB.dtype == torch.float32 and torch.equal(layer.SCB, scb)
    assert layer.compute_dtype == torch.float32
    assert torch.equal(layer.dequantize(), dequantize_rowwise(codes, scb))


def test_unquantized_layer_quantizes_at_first_forward():
    layer = Linear8bitLt(32, 16)
    assert not layer.is_quantized and layer.weight.dtype == torch.float32
    weight = layer.weight.detach().clone()
    layer(torch.randn(4, 32))
    assert layer.is_quantized
    assert torch.all((layer.dequantize() - weight).abs() <= layer.SCB[:, None] * 0.5001)


def test_row_scale_convention():
    ref = linear(100, 30)
    layer = Linear8bitLt.from_linear(ref)
    absmax = ref.weight.detach().abs().amax(dim=1)
    assert torch.equal(layer.SCB, absmax / 127)
    assert layer.weight.abs().amax(dim=1).eq(127).all()
    assert torch.all((layer.dequantize() - ref.weight).abs() <= layer.SCB[:, None] * 0.5001)


def test_from_linear_keeps_device_bias_and_copies():
    ref = linear(40, 24)
    layer = Linear8bitLt.from_linear(ref, threshold=3.0)
    assert layer.threshold == 3.0 and layer.weight.device == ref.weight.device
    assert torch.equal(layer.bias, ref.bias) and layer.bias.data_ptr() != ref.bias.data_ptr()
    again = Linear8bitLt.from_linear(layer, threshold=1.0)
    assert torch.equal(again.weight, layer.weight) and again.threshold == 1.0
    no_bias = Linear8bitLt.from_linear(linear(40, 24, bias=False))
    assert no_bias.bias is None and no_bias(torch.randn(3, 40)).shape == (3, 24)


# ------------------------------------------------------------------------- state dicts


def test_state_dict_round_trip_is_exact():
    layer = Linear8bitLt.from_linear(linear(257, 129), threshold=4.0)
    state = layer.state_dict()
    assert state["weight"].dtype == torch.int8 and state["SCB"].dtype == torch.float32
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    fresh = Linear8bitLt(257, 129, threshold=4.0)
    fresh.load_state_dict(loaded)
    for key, value in layer.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    x = torch.randn(30, 257)
    assert torch.equal(fresh(x), layer(x))


def test_state_dict_is_safetensors_compatible(tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    layer = Linear8bitLt.from_linear(linear(64, 40))
    safetensors.save_file(layer.state_dict(), tmp_path / "layer.safetensors")
    fresh = Linear8bitLt(64, 40)
    fresh.load_state_dict(safetensors.load_file(tmp_path / "layer.safetensors"))
    assert torch.equal(fresh.weight, layer.weight) and torch.equal(fresh.SCB, layer.SCB)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_loading_a_float_linear_state_dict_quantizes(dtype):
    ref = linear(96, 72).to(dtype)
    layer = Linear8bitLt(96, 72)
    layer.load_state_dict(ref.state_dict())
    direct = Linear8bitLt.from_linear(ref)
    assert layer.is_quantized and torch.equal(layer.weight, direct.weight) and torch.equal(layer.SCB, direct.SCB)
    assert layer.compute_dtype == dtype
    # into an already quantized layer as well
    quantized = Linear8bitLt.from_linear(linear(96, 72, seed=5))
    quantized.load_state_dict(ref.state_dict())
    assert torch.equal(quantized.weight, direct.weight)


def test_meta_device_quantize_model_then_load():
    def build():
        torch.manual_seed(3)
        return nn.Sequential(nn.Linear(48, 64), nn.GELU(), nn.Linear(64, 32), nn.Linear(32, 10))

    real = quantize_model(build(), skip=())
    with torch.device("meta"):
        model = build()
    quantize_model(model, skip=())
    for index in (0, 2, 3):
        assert model[index].weight.dtype == torch.int8 and model[index].weight.is_meta and model[index].SCB.is_meta
    model.to_empty(device="cpu")
    model.load_state_dict(real.state_dict())
    x = torch.randn(20, 48)
    assert torch.equal(model(x), real(x))
    # a float checkpoint into a meta model with assign=True quantizes on the checkpoint's device
    with torch.device("meta"):
        meta = quantize_model(build(), skip=())
    meta.load_state_dict(build().state_dict(), assign=True)
    assert torch.equal(meta(x), real(x))


# ------------------------------------------------------------------------- quantize_model


def test_quantize_model_swaps_and_skips():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.up = nn.Linear(32, 64)
            self.down = nn.Linear(64, 32)
            self.attn = nn.MultiheadAttention(32, 4, batch_first=True)

        def forward(self, x):
            x = x + self.attn(x, x, x, need_weights=False)[0]
            return x + self.down(torch.relu(self.up(x)))

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([Block(), Block()])
            self.lm_head = nn.Linear(32, 11)
            self.shared = self.blocks[0].up  # one module under two names

        def forward(self, x):
            for block in self.blocks:
                x = block(x)
            return self.lm_head(x)

    torch.manual_seed(0)
    model = Model().eval()
    x = torch.randn(2, 24, 32)
    expected = model(x)
    quantize_model(model, threshold=5.0, skip=("lm_head", "1.down"))
    assert type(model.lm_head) is nn.Linear
    assert type(model.blocks[1].down) is nn.Linear
    assert isinstance(model.blocks[1].up, Linear8bitLt) and isinstance(model.blocks[0].down, Linear8bitLt)
    assert model.shared is model.blocks[0].up and model.blocks[0].up.layer_name == "blocks.0.up"
    assert not isinstance(model.blocks[0].attn.out_proj, Linear8bitLt)  # MHA reads its weight directly
    assert all(m.threshold == 5.0 for m in model.modules() if isinstance(m, Linear8bitLt))
    assert rel_error(model(x), expected) <= 2e-2
    before = sum(isinstance(m, Linear8bitLt) for m in model.modules())
    quantize_model(model, skip=("lm_head", "1.down"))  # idempotent
    assert sum(isinstance(m, Linear8bitLt) for m in model.modules()) == before


def test_quantize_model_frees_each_float_layer_before_the_next(monkeypatch):
    import weakref

    model = nn.Sequential(*[nn.Linear(32, 32) for _ in range(5)])
    weights = [weakref.ref(layer.weight) for layer in model]
    alive_at_each_call = []
    from_linear = Linear8bitLt.from_linear.__func__

    def recording(cls, linear, *, threshold=6.0):
        alive_at_each_call.append(sum(ref() is not None for ref in weights))
        return from_linear(cls, linear, threshold=threshold)

    monkeypatch.setattr(Linear8bitLt, "from_linear", classmethod(recording))
    quantize_model(model, skip=())
    # at the i-th conversion, the i earlier float weights are gone already
    assert alive_at_each_call == [5, 4, 3, 2, 1]
    assert all(ref() is None for ref in weights)


# ------------------------------------------------------------------------- bad input


def test_bad_inputs_have_clear_errors():
    layer = Linear8bitLt.from_linear(linear(64, 32))
    with pytest.raises(ValueError, match=r"shape \(4, 63\).*in_features=64"):
        layer(torch.randn(4, 63))
    with pytest.raises(TypeError, match="torch.int64"):
        layer(torch.ones(4, 64, dtype=torch.long))
    with pytest.raises(TypeError, match="float64"):
        layer(torch.randn(4, 64, dtype=torch.float64))
    with pytest.raises(ValueError, match="threshold"):
        Linear8bitLt(4, 4, threshold=-1.0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weight_names_the_layer(bad):
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 8))
    with torch.no_grad():
        model[1].weight[3, 5] = bad
    with pytest.raises(ValueError, match=r"'1'.*in_features=16, out_features=8.*1 NaN/Inf"):
        quantize_model(model, skip=())
    layer = Linear8bitLt(16, 8)
    with torch.no_grad():
        layer.weight[0, 0] = bad
    with pytest.raises(ValueError, match="NaN/Inf"):
        layer.quantize()


def test_wrong_state_dict_shape_names_the_layer():
    model = nn.Sequential(nn.Linear(16, 16), Linear8bitLt(16, 8))
    other = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 9))
    with pytest.raises(RuntimeError, match=r"1\.weight.*\(9, 16\).*'1'.*expects \(8, 16\)"):
        model.load_state_dict(other.state_dict())
    int8_state = Linear8bitLt.from_linear(nn.Linear(16, 8)).state_dict()
    del int8_state["SCB"]
    with pytest.raises(RuntimeError, match="no SCB"):
        Linear8bitLt(16, 8).load_state_dict(int8_state)


def test_autocast_computes_in_the_autocast_dtype():
    layer = Linear8bitLt.from_linear(linear(64, 32))
    x = torch.randn(40, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, layer(x.to(torch.bfloat16)))
