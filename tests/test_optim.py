"""optim8's Adam/AdamW (8-bit and 32-bit state) on the CPU: numerics, state, resume, API, bad input."""

import io
import math

import pytest
import torch

import optim8
from optim8.kernels import dequantize_blockwise, quantize_blockwise
from optim8.kernels.adam import adam_scalars, adam_update_reference


def make_params(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    big = torch.nn.Parameter(torch.randn(97, 131, generator=g).to(dtype))  # 12707 elements: 8-bit, ragged last block
    small = torch.nn.Parameter(torch.randn(301, generator=g).to(dtype))  # < 4096: 32-bit state
    return [big, small]


def set_grads(params, gen, scale=1.0):
    for p in params:
        # a signal correlated with the weights plus noise of varied magnitude, like real gradients
        noise = torch.randn(p.shape, generator=gen) * torch.exp(torch.randn(p.shape, generator=gen))
        p.grad = (scale * (0.1 * p.detach().float() + noise)).to(p.dtype)


def run(make_opt, steps, *, dtype=torch.float32, params=None, gen_seed=1):
    params = params or make_params(dtype)
    opt = make_opt(params)
    gen = torch.Generator().manual_seed(gen_seed)
    for _ in range(steps):
        set_grads(params, gen)
        opt.step()
    return params, opt


# ------------------------------------------------------------------ numerics


@pytest.mark.parametrize("ours, theirs", [(optim8.AdamW32bit, torch.optim.AdamW), (optim8.Adam32bit, torch.optim.Adam)])
def test_32bit_matches_torch(ours, theirs):
    hp = dict(lr=3e-3, betas=(0.9, 0.99), eps=1e-7, weight_decay=0.05)
    a, _ = run(lambda ps: ours(ps, **hp), 120)
    b, _ = run(lambda ps: theirs(ps, **hp), 120)
    for x, y in zip(a, b):
        # torch computes m with lerp (one FMA) where we use mul + add: a few ulp per step
        torch.testing.assert_close(x, y, rtol=1e-5, atol=2e-6)


def test_8bit_tracks_float_adamw():
    """Over 150 steps the 8-bit parameters stay within 3% of the float run's total movement."""
    hp = dict(lr=1e-2, weight_decay=0.1)
    start = [p.detach().clone() for p in make_params()]
    a, opt = run(lambda ps: optim8.AdamW8bit(ps, **hp), 150)
    b, _ = run(lambda ps: torch.optim.AdamW(ps, **hp), 150)
    assert "exp_avg_absmax" in opt.state[a[0]]
    moved = (b[0] - start[0]).norm()
    err = (a[0] - b[0]).norm()
    assert moved > 1.0  # the run went somewhere
    assert err / moved < 0.03, float(err / moved)
    # elementwise: no element runs away (8-bit noise is per element, bounded by a few lr)
    assert (a[0] - b[0]).abs().max() < 15 * hp["lr"]
    torch.testing.assert_close(a[1], b[1], rtol=1e-5, atol=2e-6)  # the small tensor has 32-bit state


def test_8bit_step_is_dequantize_update_requantize():
    """One 8-bit step equals the blockwise quantizer composed with the fp32 reference update."""
    params, opt = run(lambda ps: optim8.AdamW8bit(ps, lr=1e-2, betas=(0.8, 0.95), weight_decay=0.1), 5)
    p = params[0]
    st = opt.state[p]
    m = dequantize_blockwise(st["exp_avg"], st["exp_avg_absmax"], signed=True)
    v = dequantize_blockwise(st["exp_avg_sq"], st["exp_avg_sq_absmax"], signed=False)
    p0 = p.detach().clone()
    set_grads(params, torch.Generator().manual_seed(5))
    g = p.grad.clone()
    opt.step()
    s = adam_scalars(lr=1e-2, beta1=0.8, beta2=0.95, eps=1e-8, weight_decay=0.1, step=6, decoupled=True)
    p1, m1, v1 = adam_update_reference(p0, g, m, v, s)
    assert torch.equal(p.detach(), p1)
    codes, absmax = quantize_blockwise(m1, signed=True)
    assert torch.equal(st["exp_avg"], codes) and torch.equal(st["exp_avg_absmax"], absmax)
    codes, absmax = quantize_blockwise(v1, signed=False)
    assert torch.equal(st["exp_avg_sq"], codes) and torch.equal(st["exp_avg_sq_absmax"], absmax)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_params_update_in_fp32_round_once(dtype):
    params, opt = run(lambda ps: optim8.AdamW8bit(ps, lr=1e-2), 3, dtype=dtype)
    p = params[0]
    st = opt.state[p]
    assert st["exp_avg_absmax"].dtype == torch.float32
    assert opt.state[params[1]]["exp_avg"].dtype == torch.float32  # 32-bit moments stay fp32 for low-precision params
    m = dequantize_blockwise(st["exp_avg"], st["exp_avg_absmax"], signed=True)
    v = dequantize_blockwise(st["exp_avg_sq"], st["exp_avg_sq_absmax"], signed=False)
    p0 = p.detach().clone()
    set_grads(params, torch.Generator().manual_seed(9))
    g = p.grad.clone()
    opt.step()
    s = adam_scalars(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2, step=4, decoupled=True)
    p1, _, _ = adam_update_reference(p0.float(), g.float(), m, v, s)
    assert p.dtype == dtype
    assert torch.equal(p.detach(), p1.to(dtype))


def test_adam_differs_from_adamw_only_by_weight_decay():
    a, _ = run(lambda ps: optim8.Adam8bit(ps, lr=1e-2, weight_decay=0.0), 20)
    b, _ = run(lambda ps: optim8.AdamW8bit(ps, lr=1e-2, weight_decay=0.0), 20)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    c, _ = run(lambda ps: optim8.Adam8bit(ps, lr=1e-2, weight_decay=0.1), 20)
    assert not torch.equal(a[0], c[0])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_gradient_elements_are_skipped(bad):
    params, opt = run(lambda ps: optim8.AdamW8bit(ps, lr=1e-2), 3)
    p = params[0]
    before = p.detach().clone()
    set_grads(params, torch.Generator().manual_seed(4))
    flat = p.grad.view(-1)
    hit = torch.tensor([0, 5, 300, 12706])
    flat[hit] = bad
    opt.step()
    after = p.detach().view(-1)
    assert torch.equal(after[hit], before.view(-1)[hit])  # skipped elements keep their value
    others = torch.ones_like(after, dtype=torch.bool)
    others[hit] = False
    assert torch.isfinite(after).all()
    assert (after[others] != before.view(-1)[others]).float().mean() > 0.99  # the rest moved
    st = opt.state[p]
    assert torch.isfinite(st["exp_avg_absmax"]).all() and torch.isfinite(st["exp_avg_sq_absmax"]).all()
    m = dequantize_blockwise(st["exp_avg"], st["exp_avg_absmax"], signed=True)
    assert torch.isfinite(m).all()
    # and training carries on normally
    set_grads(params, torch.Generator().manual_seed(5))
    opt.step()
    assert torch.isfinite(p).all()


def test_overflowing_square_is_skipped():
    p = torch.nn.Parameter(torch.randn(5000))
    opt = optim8.AdamW8bit([p], lr=1e-2)
    p.grad = torch.randn(5000)
    p.grad[7] = 3e38  # finite, but g*g overflows
    before = p.detach().clone()
    opt.step()
    assert p[7] == before[7]
    assert torch.isfinite(opt.state[p]["exp_avg_sq_absmax"]).all()


# ------------------------------------------------------------------ state


def test_state_bytes_per_param():
    big = torch.nn.Parameter(torch.randn(4096 * 64))
    small = torch.nn.Parameter(torch.randn(4095))
    opt = optim8.AdamW8bit([big, small])
    for p in (big, small):
        p.grad = torch.randn_like(p)
    opt.step()
    nbytes = lambda p: sum(t.numel() * t.element_size() for t in opt.state[p].values() if isinstance(t, torch.Tensor))  # noqa: E731
    assert nbytes(big) / big.numel() == 2 + 8 / 256  # 2.03125
    assert nbytes(small) / small.numel() == 8
    assert opt.state[big]["exp_avg"].dtype == torch.uint8
    assert opt.state_bytes() == nbytes(big) + nbytes(small)


def test_overrides_and_group_bits():
    emb = torch.nn.Embedding(1000, 16)  # 16000 elements: 8-bit by size
    lin = torch.nn.Linear(100, 100)
    tiny = torch.nn.Parameter(torch.randn(64))
    optim8.set_optim_bits(emb, 32)
    optim8.set_optim_bits(tiny, 8)  # force 8-bit below min_8bit_size
    opt = optim8.AdamW8bit([{"params": [emb.weight, tiny]}, {"params": lin.parameters(), "optim_bits": 32}])
    for p in [emb.weight, tiny, lin.weight, lin.bias]:
        p.grad = torch.randn_like(p)
    opt.step()
    assert opt.state[emb.weight]["exp_avg"].dtype == torch.float32
    assert opt.state[tiny]["exp_avg"].dtype == torch.uint8
    assert opt.state[lin.weight]["exp_avg"].dtype == torch.float32
    optim8.set_optim_bits(emb, None)
    assert not hasattr(emb.weight, "_optim8_bits")
    model = torch.nn.Sequential(torch.nn.Linear(80, 80), torch.nn.Linear(80, 80))
    optim8.set_optim_bits(model, 32, names=["1.weight"])
    assert getattr(model[1].weight, "_optim8_bits") == 32 and not hasattr(model[0].weight, "_optim8_bits")
    with pytest.raises(ValueError, match="no parameters named"):
        optim8.set_optim_bits(model, 32, names=["2.weight"])
    with pytest.raises(ValueError, match="bits must be"):
        optim8.set_optim_bits(model, 16)


def _save_load(opt):
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cls", [optim8.AdamW8bit, optim8.Adam8bit, optim8.AdamW32bit])
def test_resume_is_bit_exact(cls, dtype):
    make = lambda ps: cls([{"params": ps[:1]}, {"params": ps[1:], "lr": 3e-3}], lr=1e-2, weight_decay=0.1)  # noqa: E731
    full, full_opt = run(make, 10, dtype=dtype)

    first = make_params(dtype)
    opt = make(first)
    gen = torch.Generator().manual_seed(1)
    for _ in range(4):
        set_grads(first, gen)
        opt.step()
    saved_state = _save_load(opt)
    saved_params = [p.detach().clone() for p in first]
    del opt

    resumed = [torch.nn.Parameter(p) for p in saved_params]
    opt2 = make(resumed)
    opt2.load_state_dict(saved_state)
    st = opt2.state[resumed[0]]
    if cls is not optim8.AdamW32bit:
        assert st["exp_avg"].dtype == torch.uint8 and st["exp_avg_absmax"].dtype == torch.float32
    assert opt2.state[resumed[1]]["exp_avg"].dtype == torch.float32  # not cast to bf16
    for _ in range(6):
        set_grads(resumed, gen)
        opt2.step()
    for x, y in zip(full, resumed):
        assert torch.equal(x, y)
    for x, y in zip(full, resumed):
        for key, t in full_opt.state[x].items():
            u = opt2.state[y][key]
            assert (torch.equal(t, u) and t.dtype == u.dtype) if isinstance(t, torch.Tensor) else t == u


def test_load_state_dict_does_not_alias_and_checks_shapes():
    params, opt = run(lambda ps: optim8.AdamW8bit(ps), 2)
    sd = opt.state_dict()
    opt2 = optim8.AdamW8bit([torch.nn.Parameter(p.detach().clone()) for p in params])
    opt2.load_state_dict(sd)
    st = next(iter(opt2.state.values()))
    assert st["exp_avg"].data_ptr() != opt.state[params[0]]["exp_avg"].data_ptr()
    wrong = [torch.nn.Parameter(torch.randn(50, 50)), torch.nn.Parameter(torch.randn(301))]
    with pytest.raises(ValueError, match="does not match the parameter"):
        optim8.AdamW8bit(wrong).load_state_dict(sd)


def test_loads_a_torch_adamw_state_dict():
    params, ref = run(lambda ps: torch.optim.AdamW(ps, lr=1e-3), 3)
    opt = optim8.AdamW32bit([torch.nn.Parameter(p.detach().clone()) for p in params], lr=1e-3)
    opt.load_state_dict(_save_load(ref))
    assert all(s["step"] == 3 for s in opt.state.values())


# ------------------------------------------------------------------ torch.optim API


def test_param_groups_schedulers_closure_zero_grad():
    model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.GELU(), torch.nn.Linear(96, 8))
    opt = optim8.AdamW8bit(model[0].parameters(), lr=1e-2, min_8bit_size=1024)
    opt.add_param_group({"params": model[2].parameters(), "lr": 5e-3, "weight_decay": 0.0})
    assert opt.param_groups[1]["optim_bits"] == 8 and opt.param_groups[1]["blocksize"] == 256
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[1e-2, 5e-3], total_steps=60)
    x = torch.randn(256, 64)
    y = torch.randn(256, 8)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    first = closure().item()
    for _ in range(60):
        loss = opt.step(closure)
        sched.step()
    assert loss.item() < 0.5 * first
    assert opt.param_groups[0]["lr"] < 1e-3  # the scheduler drove the lr
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    # a parameter without a gradient is skipped and gets no state
    extra = torch.nn.Parameter(torch.randn(10))
    opt.add_param_group({"params": [extra]})
    closure()
    opt.step()
    assert extra not in opt.state


def test_trainer_style_groups_with_tensor_lr_and_list_betas():
    p = torch.nn.Parameter(torch.randn(5000))
    opt = optim8.AdamW8bit([p], lr=torch.tensor(1e-3), betas=[0.9, 0.999])
    p.grad = torch.randn_like(p)
    opt.step()
    assert opt.state[p]["step"] == 1


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(lr=-1e-3), "learning rate"),
        (dict(lr=float("nan")), "learning rate"),
        (dict(betas=(1.0, 0.999)), "beta parameter at index 0"),
        (dict(betas=(0.9, -0.1)), "beta parameter at index 1"),
        (dict(betas=(0.9,)), "pair"),
        (dict(eps=-1e-8), "epsilon"),
        (dict(weight_decay=-0.1), "weight_decay"),
        (dict(amsgrad=True), "amsgrad"),
        (dict(optim_bits=16), "optim_bits"),
        (dict(blocksize=100), "blocksize"),
        (dict(blocksize=512), "blocksize"),
        (dict(min_8bit_size=-1), "min_8bit_size"),
    ],
)
def test_bad_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        optim8.AdamW8bit([torch.nn.Parameter(torch.randn(10))], **kwargs)


def test_bad_group_and_scheduler_values():
    p = torch.nn.Parameter(torch.randn(10))
    opt = optim8.AdamW8bit([p])
    with pytest.raises(ValueError, match="learning rate"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(3))], "lr": -1.0})
    with pytest.raises(ValueError, match="optim_bits"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(3))], "optim_bits": 4})
    opt.param_groups[0]["lr"] = -0.5  # as a broken scheduler would
    p.grad = torch.randn_like(p)
    with pytest.raises(ValueError, match="learning rate"):
        opt.step()


def test_sparse_gradients_are_refused():
    emb = torch.nn.Embedding(100, 8, sparse=True)
    opt = optim8.AdamW8bit(emb.parameters())
    emb(torch.tensor([1, 2, 3])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step()


def test_non_float_params_and_mismatched_grads_are_refused():
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        optim8.AdamW8bit([torch.nn.Parameter(torch.randn(10, dtype=torch.float64))])
    p = torch.nn.Parameter(torch.randn(10))
    opt = optim8.AdamW8bit([p])
    if hasattr(p, "grad_dtype"):
        p.grad_dtype = None  # torch >= 2.10 refuses a mismatched grad unless told to allow it
    p.grad = torch.randn(10, dtype=torch.float64)
    with pytest.raises(TypeError, match="gradient dtype"):
        opt.step()


def test_cpu_step_speed_is_reasonable():
    """The vectorized CPU path: an 8-bit step over 2M parameters within 20x torch's AdamW.

    Timed on one thread (measured ~8x): with two OpenMP threads on a loaded machine, every
    op's barrier waits on a descheduled thread and the ratio measures the machine's load.
    """
    import time

    p = torch.nn.Parameter(torch.randn(2_000_000))
    p.grad = torch.randn_like(p)
    timings = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for cls in (torch.optim.AdamW, optim8.AdamW8bit):
            opt = cls([p], lr=1e-4)
            opt.step()
            t = time.perf_counter()
            for _ in range(3):
                opt.step()
            timings[cls.__name__] = (time.perf_counter() - t) / 3
    finally:
        torch.set_num_threads(threads)
    assert timings["AdamW8bit"] < max(20 * timings["AdamW"], 0.05), timings
    assert math.isfinite(p.sum().item())


# ------------------------------------------------------------------ the fast CPU path is the reference


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("blocksize", [64, 256])
def test_cpu_quantizer_equals_reference(signed, blocksize):
    from optim8.kernels import adam as A
    from optim8.kernels.blockwise import quantize_blockwise_reference

    n = 70_001
    x = torch.randn(n) * torch.exp(torch.randn(n) * 4)
    x = x if signed else x.abs()
    x[:blocksize] = 0.0  # an all-zero block
    x[blocksize + 1] = -0.0
    x[3 * blocksize + 5] = float("nan")
    x[5 * blocksize] = float("inf")
    x[-3:] = torch.tensor([1e-30, 3e38, 1e-45])  # ragged tail with extremes
    codes = torch.empty(n, dtype=torch.uint8)
    absmax = torch.empty((n + blocksize - 1) // blocksize)
    A._quantize_into(x, codes, absmax, blocksize, signed)
    ref_codes, ref_absmax = quantize_blockwise_reference(x, blocksize, signed)
    assert torch.equal(codes, ref_codes)
    assert torch.equal(absmax.nan_to_num(), ref_absmax.nan_to_num()) and torch.equal(absmax.isnan(), ref_absmax.isnan())
    # every finite fp32 pattern of a 16-bit cell boundary region: the table encoder is exact
    probe = torch.linspace(-1.01, 1.01, 200_001)
    assert torch.equal(A._encode(probe, signed).long(), torch.bucketize(probe, A.map_boundaries(signed)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("state8", [True, False])
def test_chunked_cpu_step_equals_reference(state8, dtype, monkeypatch):
    from optim8.kernels import adam as A

    monkeypatch.setattr(A, "_CPU_CHUNK", 1 << 14)
    n = 3 * A._CPU_CHUNK + 1001  # several chunks and a ragged last block
    gen = torch.Generator().manual_seed(0)
    p0 = torch.randn(n, generator=gen).to(dtype)
    g = torch.randn(n, generator=gen).to(dtype)
    g[77] = float("nan")
    if state8:
        m, ma = quantize_blockwise(torch.randn(n, generator=gen) * 1e-2, signed=True)
        v, va = quantize_blockwise(torch.rand(n, generator=gen) * 1e-4, signed=False)
    else:
        m, v = torch.randn(n, generator=gen) * 1e-2, torch.rand(n, generator=gen) * 1e-4
        ma = va = None
    s = adam_scalars(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, step=7, decoupled=True)
    clone = lambda t: None if t is None else t.clone()  # noqa: E731
    a = [p0.clone(), g, clone(m), clone(v), clone(ma), clone(va)]
    b = [p0.clone(), g, clone(m), clone(v), clone(ma), clone(va)]
    A._step_cpu(*a, s, 256)
    A._step_reference(*b, s, 256)
    assert torch.equal(a[0], b[0]) and a[0][77] == p0[77]  # the NaN-gradient element is untouched
    for x, y in zip(a[2:], b[2:]):
        assert (x is None and y is None) or torch.equal(x, y)


@pytest.mark.parametrize("signed", [True, False])
def test_gpu_encoder_table_is_exact(signed):
    """The CUDA kernel's encoder (cell table + upward walk), emulated here with its exact index
    math, equals torch.bucketize on a scan of fp32 patterns and on every boundary's neighbours."""
    from optim8.kernels import adam as A

    lut = A._gpu_encode_table_cpu(signed).long()
    assert lut.numel() == A.GPU_LUT_SIZE
    mid = A.map_boundaries(signed)
    top = torch.tensor(4.0).view(torch.int32).item()
    pats = torch.arange(0, top, 997, dtype=torch.int64)
    near = torch.cat([mid, torch.nextafter(mid, torch.tensor(2.0)), torch.nextafter(mid, torch.tensor(-2.0))])
    x = torch.cat([pats.to(torch.int32).view(torch.float32), -pats.to(torch.int32).view(torch.float32), near, torch.tensor([0.0, -0.0, 1e-45, -1e-45])])
    b = x.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    e = (((b >> 23) & 0xFF) - A.GPU_LUT_EXP0).clamp(0, A.GPU_LUT_NEXP - 1)
    m7 = torch.where(e == 0, 0, (b >> 16) & 0x7F)
    c = lut[((b >> 31) * A.GPU_LUT_NEXP + e) * 128 + m7]
    mid_ext = torch.cat([mid, torch.tensor([float("inf")])])
    for _ in range(4):  # the kernel walks while needed; here: at most 4 steps, then it must be exact
        c += mid_ext[c] < x
    assert torch.equal(c, torch.bucketize(x, mid))


@pytest.mark.parametrize("signed", [True, False])
def test_gpu_packed_encoder_table_is_exact(signed):
    """adam.cu's encoder (state8.cuh encode_signed / encode_unsigned: one packed entry per cell,
    no walk), emulated here with its exact index and compare math, equals torch.bucketize (the
    unsigned map: raised to 1 for a positive value) on a scan of the normalized values it can
    see (|s| < 1 + 2**-21) and on every boundary's neighbours; its constants are the header's."""
    import re
    from pathlib import Path

    from optim8.kernels import adam as A

    header = (Path(A.__file__).parent / "cuda" / "state8.cuh").read_text()
    const = {k: int(v, 16) for k, v in re.findall(r"#define (ENC_\w+) (0x[0-9a-f]+)", header)}
    assert const["ENC_S_KEY0"] == A.packed_first_key(True) and const["ENC_U_KEY0"] == A.packed_first_key(False)
    assert const["ENC_KEY_LAST"] == A.PACKED_KEY_LAST
    table = A._gpu_packed_table_cpu(signed).to(torch.int64) & 0xFFFFFFFF
    assert table.shape == (A.PACKED_KEY_LAST - A.packed_first_key(signed) + 1, 2)
    mid = A.map_boundaries(signed)
    top = torch.tensor(1.0 + 2**-21).view(torch.int32).item()
    pats = torch.cat([torch.arange(0, top + 1, 997, dtype=torch.int64), torch.arange(0, 1 << 16), torch.arange(top - (1 << 16), top + 1)])
    near = [mid]
    for d in (2.0, -2.0):
        y = mid
        for _ in range(3):
            y = torch.nextafter(y, torch.tensor(d))
            near.append(y)
    xs = [pats.to(torch.int32).view(torch.float32), torch.cat(near), torch.tensor([0.0, -0.0, 1e-45, 1.0, 1.0 + 2**-21])]
    if signed:
        xs += [-xs[0], torch.tensor([-1e-45, -1.0, -1.0 - 2**-21])]
    x = torch.cat(xs)
    if not signed:
        x = x[x >= 0]  # the v state: never negative
    b = x.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    lo = torch.tensor(A.packed_first_key(signed) << 16, dtype=torch.int32).view(torch.float32)
    r = torch.maximum(x.abs() if signed else x, lo)
    e = table[(r.view(torch.int32).to(torch.int64) >> 16) - A.packed_first_key(signed)]
    if signed:
        t = torch.where(b >> 31 == 1, e[:, 1], e[:, 0])
        bound = (b & 0xFFFF0000) | (t >> 16)  # __byte_perm(t, b, 0x7632)
    else:
        t = e[:, 0]
        bound = (b | 0xFFFF) & e[:, 1]
    bound = torch.where(bound >= 1 << 31, bound - (1 << 32), bound).to(torch.int32).view(torch.float32)
    code = (t & 0xFF) + (x > bound).long()
    want = torch.bucketize(x, mid)
    if not signed:
        want = torch.where((want == 0) & (x > 0), 1, want)
    assert torch.equal(code, want)
