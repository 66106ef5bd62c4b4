"""Blockwise 8-bit quantization: the reference against brute force, and CUDA against the reference."""

import math

import pytest
import torch

from optim8.kernels import BLOCKSIZES, dequantize_blockwise, dynamic_map, quantize_blockwise
from optim8.kernels.quant_map import map_boundaries, zero_code
from devices import DEV, GPU, reference

SIZES = [1, 255, 256, 257, 4097, 1_000_003]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def brute_force_codes(x: torch.Tensor, blocksize: int, signed: bool):
    """Nearest map entry by argmin over all 256 entries, in float64; also the margin
    by which the nearest entry wins (0 at a decision boundary)."""
    qmap = dynamic_map(signed).double()
    flat = x.reshape(-1).double()
    n = flat.numel()
    nb = math.ceil(n / blocksize)
    flat = torch.nn.functional.pad(flat, (0, nb * blocksize - n)).view(nb, blocksize)
    absmax = block_scale(flat, signed)[:, None]
    scaled = (flat / torch.where(absmax == 0, 1.0, absmax)).reshape(-1)[:n]
    codes, margins = [], []
    for chunk in scaled.split(1 << 16):
        dist = (chunk[:, None] - qmap[None, :]).abs()
        two = dist.topk(2, dim=1, largest=False)
        codes.append(two.indices[:, 0])
        margins.append(two.values[:, 1] - two.values[:, 0])
    codes, margins = torch.cat(codes), torch.cat(margins)
    if not signed:  # a positive value takes the smallest positive entry rather than zero
        up = (scaled > 0) & (codes == 0)
        codes[up] = 1
        margins[up] = math.inf
    return codes, margins, scaled


def block_scale(blocks: torch.Tensor, signed: bool) -> torch.Tensor:
    """The stored absmax of finite ``blocks [nb, blocksize]`` above 2**-104: the largest
    magnitude (unsigned map), the value of largest magnitude with its sign (signed map; +
    over - on a tie)."""
    amax = blocks.abs().amax(dim=1)
    if not signed:
        return amax
    top = blocks.gather(1, blocks.abs().argmax(dim=1, keepdim=True))[:, 0]
    return torch.where((blocks == amax[:, None]).any(dim=1), amax, top)


def test_dynamic_map_shape_and_values():
    for signed in (True, False):
        m = dynamic_map(signed)
        assert m.shape == (256,) and m.dtype == torch.float32
        assert torch.all(m[1:] > m[:-1]), "sorted, no duplicates"
        assert (m == 0).sum() == 1 and (m == 1).sum() == 1
        assert m.max() == 1.0
        assert m.min() >= (-1.0 if signed else 0.0)
    assert dynamic_map(True).min() < -0.99
    assert (dynamic_map(True) < 0).sum() == 127
    # the smallest non-zero magnitude lives in the 1e-6 decade
    assert 1e-7 < dynamic_map(False)[1] < 1e-6
    # callers get their own copy
    m = dynamic_map(True)
    m[0] = 5
    assert dynamic_map(True)[0] != 5


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("n", SIZES)
def test_codes_are_the_nearest_map_entry(n, signed):
    x = torch.randn(n) * torch.rand(1) * 10
    if not signed:
        x = x.abs()
    codes, absmax = quantize_blockwise(x, signed=signed)
    assert codes.shape == x.shape and codes.dtype == torch.uint8
    assert absmax.shape == (math.ceil(n / 256),) and absmax.dtype == torch.float32
    bf, margin, scaled = brute_force_codes(x, 256, signed)
    differ = codes.reshape(-1).long() != bf
    # a different code is allowed only where the value sits within float rounding of a
    # decision boundary (two map entries equally near)
    assert torch.all(margin[differ] <= 1e-6 * scaled[differ].abs().clamp_min(1e-6)), differ.sum()
    assert differ.sum() <= max(2, n // 100_000)
    # every block's absmax is its largest magnitude, with its sign in the signed map
    ref = block_scale(torch.nn.functional.pad(x, (0, absmax.numel() * 256 - n)).view(-1, 256), signed)
    assert torch.equal(absmax, ref)
    if signed and n > 4096:
        assert bool((absmax < 0).any() and (absmax > 0).any())


@pytest.mark.parametrize("blocksize", BLOCKSIZES)
def test_every_blocksize_partial_last_block(blocksize):
    n = 3 * blocksize + 5
    x = torch.randn(n)
    codes, absmax = quantize_blockwise(x, blocksize=blocksize)
    assert absmax.numel() == 4
    assert absmax[-1] == block_scale(x[-5:].view(1, 5), True)[0]
    bf, margin, _ = brute_force_codes(x, blocksize, True)
    assert (codes.long() != bf).sum() <= 1
    y = dequantize_blockwise(codes, absmax, blocksize=blocksize)
    assert torch.allclose(y, x, atol=0.02 * x.abs().max())


# Bound on |x - dequant(quant(x))| / absmax: half the widest gap between map entries
# (the top decade: 0.9 / 2**6 / 2 for the signed map), plus the storage dtype's rounding.
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("signed", [True, False])
def test_roundtrip_error_bound(dtype, signed):
    x = torch.randn(1_000_003, dtype=torch.float32) * 3
    if not signed:
        x = x.abs()
    x = x.to(dtype)
    codes, absmax = quantize_blockwise(x, signed=signed)
    y = dequantize_blockwise(codes, absmax, signed=signed, dtype=dtype)
    assert y.dtype == dtype and y.shape == x.shape
    qmap = dynamic_map(signed)
    half_gap = ((qmap[1:] - qmap[:-1]).max() / 2).item()
    eps = torch.finfo(dtype).eps
    per_elem_absmax = absmax.repeat_interleave(256)[: x.numel()]
    err = (y.float() - x.float()).abs() / per_elem_absmax
    assert err.max() <= half_gap * (1 + 1e-5) + eps
    # and most values do much better than the worst case
    assert err.mean() < half_gap / 2


def test_multidimensional_and_noncontiguous():
    x = torch.randn(37, 129)
    xt = x.t()  # non-contiguous
    codes, absmax = quantize_blockwise(xt)
    assert codes.shape == xt.shape
    c2, a2 = quantize_blockwise(xt.contiguous())
    assert torch.equal(codes, c2) and torch.equal(absmax, a2)
    y = dequantize_blockwise(codes, absmax)
    assert y.shape == xt.shape


def test_empty():
    codes, absmax = quantize_blockwise(torch.empty(0, 5))
    assert codes.shape == (0, 5) and absmax.shape == (0,)
    y = dequantize_blockwise(codes, absmax)
    assert y.shape == (0, 5)


def test_all_zero_block_roundtrips_to_zero():
    x = torch.randn(1000)
    x[256:512] = 0
    codes, absmax = quantize_blockwise(x)
    assert absmax[1] == 0
    assert torch.all(codes[256:512] == zero_code(True))
    y = dequantize_blockwise(codes, absmax)
    assert torch.all(y[256:512] == 0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_stays_in_its_block(bad):
    x = torch.randn(1025)
    x[300] = bad
    codes, absmax = quantize_blockwise(x)
    assert math.isnan(absmax[1].item())
    assert torch.all(codes[256:512] == zero_code(True))
    y = dequantize_blockwise(codes, absmax)
    assert torch.all(torch.isnan(y[256:512]))
    clean = torch.cat([x[:256], x[512:]])
    c2, a2 = quantize_blockwise(clean)
    # the other blocks are exactly what they would be without the bad value
    assert torch.equal(absmax[[0, 2, 3]], a2[[0, 1, 2]])
    assert torch.equal(codes[:256], c2[:256]) and torch.equal(codes[512:768], c2[256:512])
    assert torch.isfinite(y[:256]).all() and torch.isfinite(y[512:]).all()


def tiny_block_input(n: int = 1000) -> torch.Tensor:
    """Block 1 holds only values below 2**-104 (subnormal ones among them); the rest is ordinary."""
    x = torch.randn(n)
    x[256:512] = 0
    x[[256, 300, 301, 400]] = torch.tensor([1e-39, -1e-40, 5e-40, -3e-32])
    return x


@pytest.mark.parametrize("signed", [True, False])
def test_tiny_block_stores_zeros(signed):
    x = tiny_block_input()
    if not signed:
        x = x.abs()
    codes, absmax = quantize_blockwise(x, signed=signed)
    assert absmax[1] == 0 and x[256:512].abs().max() > 0
    assert torch.all(codes[256:512] == zero_code(signed))
    y = dequantize_blockwise(codes, absmax, signed=signed)
    assert torch.all(y[256:512] == 0)
    # the other blocks are what they are without the tiny one
    clean = torch.cat([x[:256], x[512:]])
    c2, a2 = quantize_blockwise(clean, signed=signed)
    assert torch.equal(codes[:256], c2[:256]) and torch.equal(codes[512:768], c2[256:512])
    # the optimizer's fast CPU quantizer agrees
    from optim8.kernels import adam as A

    fast_codes, fast_absmax = torch.empty(x.numel(), dtype=torch.uint8), torch.empty(absmax.numel())
    A._quantize_into(x, fast_codes, fast_absmax, 256, signed)
    assert torch.equal(fast_codes, codes) and torch.equal(fast_absmax, absmax)


@pytest.mark.parametrize("dtype", [torch.float64, torch.int32, torch.uint8, torch.bool])
def test_unsupported_dtypes_raise(dtype):
    x = torch.ones(10, dtype=dtype)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        quantize_blockwise(x)


def test_bad_arguments():
    with pytest.raises(ValueError, match="blocksize"):
        quantize_blockwise(torch.randn(10), blocksize=100)
    codes, absmax = quantize_blockwise(torch.randn(1000))
    with pytest.raises(ValueError, match="absmax has 3 entries"):
        dequantize_blockwise(codes, absmax[:3])
    with pytest.raises(ValueError, match="another blocksize"):
        dequantize_blockwise(codes, absmax, blocksize=512)
    with pytest.raises(TypeError, match="uint8"):
        dequantize_blockwise(codes.int(), absmax)
    with pytest.raises(TypeError, match="float32"):
        dequantize_blockwise(codes, absmax.half())


def test_meta_tensors():
    x = torch.empty(1000, 3, device="meta")
    codes, absmax = quantize_blockwise(x)
    assert codes.device.type == "meta" and codes.shape == (1000, 3) and absmax.shape == (12,)
    y = dequantize_blockwise(codes, absmax, dtype=torch.bfloat16)
    assert y.device.type == "meta" and y.dtype == torch.bfloat16


def test_boundaries_are_fp32_midpoints():
    for signed in (True, False):
        m = dynamic_map(signed)
        b = map_boundaries(signed)
        assert b.shape == (255,)
        assert torch.all(b > m[:-1]) and torch.all(b < m[1:])


# ------------------------------------------------------------------------------ CUDA
# On a GPU, or on the host device without one (tests/devices.py): the kernel against the reference.

CUDA_SIZES = SIZES if GPU else [1, 255, 256, 257, 4097, 100_003]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("n", CUDA_SIZES)
def test_cuda_matches_reference(n, signed, dtype):
    x = (torch.randn(n) * 4).to(dtype)
    if not signed:
        x = x.abs()
    with reference():
        codes_ref, absmax_ref = quantize_blockwise(x, signed=signed)
        y_ref = dequantize_blockwise(codes_ref, absmax_ref, signed=signed, dtype=dtype)
    codes, absmax = quantize_blockwise(x.to(DEV), signed=signed)
    assert torch.equal(absmax.cpu(), absmax_ref)
    differ = codes.cpu() != codes_ref
    assert differ.sum().item() == 0, f"{differ.sum().item()} of {n} codes differ"
    y = dequantize_blockwise(codes, absmax, signed=signed, dtype=dtype)
    assert torch.equal(y.cpu(), y_ref)


@pytest.mark.cuda
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("signed", [True, False])
def test_cuda_every_blocksize(blocksize, dtype, signed):
    x = torch.randn(5 * blocksize + 3).to(dtype)
    x = x if signed else x.abs()
    with reference():
        codes_ref, absmax_ref = quantize_blockwise(x, blocksize=blocksize, signed=signed)
        y_ref = dequantize_blockwise(codes_ref, absmax_ref, blocksize=blocksize, signed=signed, dtype=dtype)
    codes, absmax = quantize_blockwise(x.to(DEV), blocksize=blocksize, signed=signed)
    assert torch.equal(absmax.cpu(), absmax_ref)
    assert torch.equal(codes.cpu(), codes_ref)
    y = dequantize_blockwise(codes, absmax, blocksize=blocksize, signed=signed, dtype=dtype)
    assert torch.equal(y.cpu(), y_ref)


@pytest.mark.cuda
@pytest.mark.parametrize("blocksize", [64, 512, 4096])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_grid_stride(blocksize, dtype):
    """More steps than the grid has CTAs (the host device fits 16; a GPU, every SM's worth):
    each CTA strides over several steps, its shared block maxima (blocksize > 256) reused
    step after step; blocks of every kind, a NaN one and a tiny one among them."""
    step = 1024 * 8  # a CTA step
    n = (17 * step if not GPU else 5 << 20) + 5  # a GPU's grid (2 CTAs per SM) covers ~2 Mi elements per sweep
    x = (torch.randn(n) * 10.0 ** torch.randint(-3, 4, (n,)).float()).to(dtype)
    x[blocksize * 5 : blocksize * 6] *= 2.0**-120  # a tiny block
    x[blocksize * 9 + 3] = float("nan")
    for signed in (True, False):
        xs = x if signed else x.abs()
        with reference():
            codes_ref, absmax_ref = quantize_blockwise(xs, blocksize=blocksize, signed=signed)
            y_ref = dequantize_blockwise(codes_ref, absmax_ref, blocksize=blocksize, signed=signed, dtype=dtype)
        codes, absmax = quantize_blockwise(xs.to(DEV), blocksize=blocksize, signed=signed)
        torch.testing.assert_close(absmax.cpu(), absmax_ref, equal_nan=True, rtol=0, atol=0)
        assert torch.equal(codes.cpu(), codes_ref)
        y = dequantize_blockwise(codes, absmax, blocksize=blocksize, signed=signed, dtype=dtype)
        torch.testing.assert_close(y.cpu(), y_ref, equal_nan=True, rtol=0, atol=0)


def test_cuda_encoder_needs_one_boundary_test():
    """The CUDA encoder's proof of exactness (cuda/blockwise.cu, encode_word, and its table) holds for both maps."""
    from optim8.kernels import blockwise

    for signed in (True, False):
        blockwise._check_encoder.__wrapped__(signed)


@pytest.mark.cuda
def test_cuda_misaligned_views_and_nonfinite():
    base = torch.randn(10_001, device=DEV)
    x = base[3:]  # storage offset: not 16-byte aligned
    x[1000] = float("nan")
    x[5000] = float("inf")
    codes, absmax = quantize_blockwise(x)
    full = dequantize_blockwise(codes, absmax)
    with reference():
        codes_ref, absmax_ref = quantize_blockwise(x.cpu().clone())
        full_ref = dequantize_blockwise(codes_ref, absmax_ref)
    torch.testing.assert_close(absmax.cpu(), absmax_ref, equal_nan=True, rtol=0, atol=0)
    assert torch.equal(codes.cpu(), codes_ref)
    torch.testing.assert_close(full.cpu(), full_ref, equal_nan=True, rtol=0, atol=0)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blocksize", [64, 256, 1024])
def test_cuda_tiny_block_stores_zeros(blocksize, dtype):
    x = tiny_block_input(max(1000, 3 * blocksize + 5)).to(dtype)
    with reference():
        codes_ref, absmax_ref = quantize_blockwise(x, blocksize=blocksize)
    codes, absmax = quantize_blockwise(x.to(DEV), blocksize=blocksize)
    assert torch.equal(absmax.cpu(), absmax_ref)
    assert torch.equal(codes.cpu(), codes_ref)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("signed", [True, False])
def test_cuda_subnormal_values_match_reference(dtype, signed):
    """Flush-to-zero would zero subnormal values: in the unsigned map they must keep code 1
    (positive values never encode to zero) inside blocks whose absmax is just above 2**-104."""
    blocksize = 256
    tiny = torch.finfo(dtype).smallest_normal
    x = (torch.rand(7 * blocksize + 9) * tiny * 0.9).to(dtype)  # subnormal values ...
    x[::blocksize] = 2.0**-103  # ... in blocks that are not stored as zero
    x[::3] = -x[::3] if signed else x[::3]
    x[blocksize + 17] = 0.0
    assert bool(((x.float().abs() < tiny) & (x.float() != 0)).float().mean() > 0.9)
    with reference():
        codes_ref, absmax_ref = quantize_blockwise(x, blocksize=blocksize, signed=signed)
        y_ref = dequantize_blockwise(codes_ref, absmax_ref, blocksize=blocksize, signed=signed, dtype=dtype)
    codes, absmax = quantize_blockwise(x.to(DEV), blocksize=blocksize, signed=signed)
    assert torch.equal(absmax.cpu(), absmax_ref)
    assert bool((absmax_ref.abs() == 2.0**-103).all())
    if not signed:
        assert bool(((codes_ref == 1) == ((x > 0) & (x < tiny))).all())
    assert torch.equal(codes.cpu(), codes_ref)
    assert torch.equal(dequantize_blockwise(codes, absmax, blocksize=blocksize, signed=signed, dtype=dtype).cpu(), y_ref)


@pytest.mark.cuda
@pytest.mark.parametrize("signed", [True, False])
def test_cuda_huge_absmax_keeps_real_codes(signed):
    """Above 2**126 the block's reciprocal is subnormal: flushed to zero it would zero every code."""
    x = torch.randn(4 * 256 + 3) * 2.0**127
    x = x if signed else x.abs()
    x[:256] *= 1.5  # absmax up to ~2**128 in the first block: still finite
    x = x.clamp(-3.0e38, 3.0e38)
    with reference():
        codes_ref, absmax_ref = quantize_blockwise(x, signed=signed)
    codes, absmax = quantize_blockwise(x.to(DEV), signed=signed)
    assert bool((absmax_ref > 2.0**126).all())
    assert len(set(codes_ref.tolist())) > 50  # real codes, not all the zero code
    assert torch.equal(absmax.cpu(), absmax_ref)
    assert torch.equal(codes.cpu(), codes_ref)


@pytest.mark.cuda
@pytest.mark.gpu
def test_cuda_runs_on_current_stream():
    x = torch.randn(1 << 20, device="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())  # x is produced on the default stream
    with torch.cuda.stream(s):
        y = x * 2  # queued on s; the kernel must see it
        codes, absmax = quantize_blockwise(y)
    torch.cuda.synchronize()
    codes_ref, absmax_ref = quantize_blockwise(y.cpu())
    assert torch.equal(absmax.cpu(), absmax_ref)


def random_state_input(n: int, blocksize: int, signed: bool, seed: int) -> torch.Tensor:
    """Values whose blocks span 1e-30..1e30 in scale and ~10 decades inside a block, with
    the extreme of about half the blocks negative (signed); zeros, ties and a zero block too."""
    g = torch.Generator().manual_seed(seed)
    nb = math.ceil(n / blocksize)
    block_scale_ = 10.0 ** (torch.rand(nb, generator=g) * 60 - 30)
    inner = 10.0 ** (-10 * torch.rand(n, generator=g))
    x = torch.randn(n, generator=g) * inner * block_scale_.repeat_interleave(blocksize)[:n]
    x[:: 7] = 0.0
    if nb > 2:
        x[blocksize : 2 * blocksize] = 0.0  # a zero block
        x[2 * blocksize] = 1.0
        x[2 * blocksize + 1] = -1.0  # a tie of +amax and -amax
        x[3 * blocksize + 2] = -1e31  # a negative extreme
    return x if signed else x.abs()


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
def test_requantization_is_lossless(blocksize, signed):
    """quantize(dequantize(codes, absmax)) gives back the same codes and absmax: a skipped
    optimizer step leaves 8-bit state byte-identical, and no block shrinks on requantization."""
    for seed in range(3):
        x = random_state_input(5 * blocksize + 3, blocksize, signed, seed)
        codes, absmax = quantize_blockwise(x, blocksize=blocksize, signed=signed)
        y = dequantize_blockwise(codes, absmax, blocksize=blocksize, signed=signed)
        c2, a2 = quantize_blockwise(y, blocksize=blocksize, signed=signed)
        assert torch.equal(a2.view(torch.int32), absmax.view(torch.int32))
        assert torch.equal(c2, codes)
        if signed:  # a negative extreme is exactly -1 times its scale, not the map's -0.99297
            assert bool((absmax < 0).any())


def test_requantization_of_random_codes_converges_in_one_step():
    """Arbitrary codes (not produced by quantize) need not be a fixed point, but their first
    requantization is one: the state cannot drift over repeated skipped steps."""
    g = torch.Generator().manual_seed(0)
    for signed in (True, False):
        codes = torch.randint(0, 256, (4 * 256 + 11,), generator=g, dtype=torch.uint8)
        absmax = torch.randn(5, generator=g).abs() + 0.1
        y = dequantize_blockwise(codes, absmax, signed=signed)
        c1, a1 = quantize_blockwise(y, signed=signed)
        c2, a2 = quantize_blockwise(dequantize_blockwise(c1, a1, signed=signed), signed=signed)
        assert torch.equal(c1, c2) and torch.equal(a1, a2)


@pytest.mark.cuda
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("blocksize", [64, 256, 2048])
def test_cuda_requantization_is_lossless(blocksize, signed):
    x = random_state_input(5 * blocksize + 3, blocksize, signed, 1)
    with reference():
        codes_ref, absmax_ref = quantize_blockwise(x, blocksize=blocksize, signed=signed)
    codes, absmax = quantize_blockwise(x.to(DEV), blocksize=blocksize, signed=signed)
    assert torch.equal(absmax.cpu().view(torch.int32), absmax_ref.view(torch.int32))
    assert torch.equal(codes.cpu(), codes_ref)
    y = dequantize_blockwise(codes, absmax, blocksize=blocksize, signed=signed)
    c2, a2 = quantize_blockwise(y, blocksize=blocksize, signed=signed)
    assert torch.equal(a2.cpu().view(torch.int32), absmax_ref.view(torch.int32))
    assert torch.equal(c2.cpu(), codes_ref)
