"""The fused CUDA Adam kernel against the PyTorch reference (run with: pytest -m cuda).

On a GPU, or on the host device without one (tests/devices.py): parameters are copied to
``DEV`` (a copy even when ``DEV`` is the CPU, so the two optimizers never share storage) and
the CPU optimizer steps inside ``reference()``.

Every operation of the kernel is a correctly rounded fp32 operation in the reference's
order, and its quantizer is the reference's algorithm, so CUDA and CPU are expected to
agree bit for bit; the multi-step tests allow a hair more (a code flipping at a decision
boundary) so that a divergence is reported with numbers rather than as a bare mismatch.
"""

import io

import pytest
import torch

import optim8
from devices import DEV, GPU, reference

pytestmark = pytest.mark.cuda


def dev(t):
    return t.to(DEV, copy=True)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def pair(shapes, dtype, cls, **kw):
    gen = torch.Generator().manual_seed(0)
    cpu = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in shapes]
    gpu = [torch.nn.Parameter(dev(p.detach())) for p in cpu]
    return cpu, cls(cpu, **kw), gpu, cls(gpu, **kw)


def step_both(cpu, opt_cpu, gpu, opt_gpu, gen):
    for a, b in zip(cpu, gpu):
        g = (torch.randn(a.shape, generator=gen) * torch.exp(torch.randn(a.shape, generator=gen))).to(a.dtype)
        a.grad = g
        b.grad = dev(g)
    with reference():
        opt_cpu.step()
    opt_gpu.step()


def compare(cpu, opt_cpu, gpu, opt_gpu, *, exact):
    for a, b in zip(cpu, gpu):
        bb = b.detach().cpu()
        if exact:
            assert torch.equal(a.detach(), bb), (a.detach().float() - bb.float()).abs().max()
        else:
            torch.testing.assert_close(bb, a.detach(), rtol=2e-3 if a.dtype != torch.float32 else 1e-5, atol=1e-5)
        sa, sb = opt_cpu.state[a], opt_gpu.state[b]
        assert sa["step"] == sb["step"]
        for key, t in sa.items():
            if not isinstance(t, torch.Tensor):
                continue
            u = sb[key].cpu()
            assert u.dtype == t.dtype
            if exact:
                assert torch.equal(t, u), key
            elif t.dtype == torch.uint8:
                diff = (t.int() - u.int()).abs()
                assert (diff > 0).float().mean() < 1e-3 and diff.max() <= 1, key
            else:
                torch.testing.assert_close(u, t, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 4097, 10**6 + 3 if GPU else 200_003])
@pytest.mark.parametrize("cls", [optim8.AdamW8bit, optim8.Adam8bit])
def test_one_step_bit_exact(cls, n, dtype):
    cpu, oc, gpu, og = pair([(n,)], dtype, cls, lr=1e-2, weight_decay=0.1, min_8bit_size=0)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        step_both(cpu, oc, gpu, og, gen)
        compare(cpu, oc, gpu, og, exact=True)


@pytest.mark.parametrize("blocksize", [64, 256])
def test_ragged_tails_bit_exact(blocksize):
    """Every tail length mod 8: the lanes' padding must not reach the last block's absmax
    (the signed map's code 0 is -0.993, not 0). Gradients that flip sign and span decades
    make the last block's absmax shrink, which is when leaked padding would show."""
    shapes = [(blocksize * 3 + r,) for r in range(1, 8)] + [(r,) for r in range(1, 8)]
    cpu, oc, gpu, og = pair(shapes, torch.float32, optim8.AdamW8bit, lr=1e-2, min_8bit_size=0, blocksize=blocksize)
    gen = torch.Generator().manual_seed(3)
    for i in range(4):
        for a, b in zip(cpu, gpu):
            g = torch.randn(a.shape, generator=gen) * (-1) ** i * 10.0 ** (-3 * i)
            a.grad, b.grad = g, dev(g)
        with reference():
            oc.step()
        og.step()
        compare(cpu, oc, gpu, og, exact=True)


@pytest.mark.parametrize("blocksize", [64, 256])
@pytest.mark.parametrize("bits", [8, 32])
def test_tensors_split_into_rows_bit_exact(monkeypatch, blocksize, bits):
    """A tensor larger than a launch-table row (kernels/adam.py _ROW_ELEMENTS, 2**30 elements:
    the kernel's offsets are 32-bit) takes several rows; here rows of 512 elements, with tails."""
    from optim8.kernels import adam as A

    monkeypatch.setattr(A, "_ROW_ELEMENTS", 512)
    shapes = [(2048 + 5,), (512,), (1537,), (7,)]
    cpu, oc, gpu, og = pair(shapes, torch.bfloat16, optim8.AdamW8bit if bits == 8 else optim8.AdamW32bit,
                            lr=1e-2, **({"min_8bit_size": 0, "blocksize": blocksize} if bits == 8 else {}))
    gen = torch.Generator().manual_seed(5)
    for _ in range(2):
        step_both(cpu, oc, gpu, og, gen)
        compare(cpu, oc, gpu, og, exact=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [8, 32])
@pytest.mark.parametrize("blocksize", [64, 128, 256])
def test_many_steps_match_reference(bits, blocksize, dtype):
    if bits == 32 and blocksize != 256:
        pytest.skip("blocksize only concerns 8-bit state")
    shapes = [(1,), (4097,), (1000, 1001) if GPU else (200, 301), (33, 7), (5000,)]
    cpu, oc, gpu, og = pair(shapes, dtype, optim8.AdamW8bit, lr=3e-3, betas=(0.9, 0.95), optim_bits=bits, blocksize=blocksize, min_8bit_size=4096)
    gen = torch.Generator().manual_seed(2)
    for _ in range(40 if GPU else 20):
        step_both(cpu, oc, gpu, og, gen)
    compare(cpu, oc, gpu, og, exact=False)


def test_many_tensors_one_launch_per_kind():
    gen = torch.Generator().manual_seed(3)
    shapes = [(int(torch.randint(1, 20000, (1,), generator=gen)),) for _ in range(150)]
    cpu, oc, gpu, og = pair(shapes, torch.float32, optim8.AdamW8bit, lr=1e-3)
    step_both(cpu, oc, gpu, og, gen)
    compare(cpu, oc, gpu, og, exact=True)
    for p in gpu:
        p.grad = torch.randn_like(p)
    kinds = {("exp_avg_absmax" in og.state[p]) for p in gpu}
    if GPU:
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            og.step()
            torch.cuda.synchronize()
        launches = [e.name for e in prof.events() if "adam_multi" in e.name]
        assert len(launches) == len(kinds), launches
    else:
        from optim8.kernels import _launch

        before = _launch._host.launches
        og.step()
        assert _launch._host.launches - before == len(kinds)


@pytest.mark.gpu
def test_step_does_not_synchronize():
    model = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.LayerNorm(512), torch.nn.Linear(512, 10)).cuda()
    opt = optim8.AdamW8bit(model.parameters(), lr=1e-3)
    x = torch.randn(64, 512, device="cuda")
    for i in range(3):
        model(x).square().mean().backward()
        if i == 2:
            torch.cuda.set_sync_debug_mode("error")
        try:
            opt.step()  # first steps compile and build the launch table
        finally:
            torch.cuda.set_sync_debug_mode("default")
        opt.zero_grad()


@pytest.mark.parametrize("dtype", DTYPES)
def test_nonfinite_gradients_match_reference(dtype):
    cpu, oc, gpu, og = pair([(5000,)], dtype, optim8.AdamW8bit, lr=1e-2)
    gen = torch.Generator().manual_seed(4)
    step_both(cpu, oc, gpu, og, gen)
    g = torch.randn(5000).to(dtype)
    g[[0, 17, 4999]] = torch.tensor([float("nan"), float("inf"), -float("inf")]).to(dtype)
    cpu[0].grad, gpu[0].grad = g, dev(g)
    before = gpu[0].detach().clone()
    with reference():
        oc.step()
    og.step()
    compare(cpu, oc, gpu, og, exact=True)
    assert torch.equal(gpu[0][[0, 17, 4999]], before[[0, 17, 4999]])
    assert torch.isfinite(og.state[gpu[0]]["exp_avg_absmax"]).all()


def test_unaligned_and_noncontiguous():
    base = torch.randn(10001, device=DEV)
    p = torch.nn.Parameter(base[1:])  # 4-byte offset: scalar path
    cpu = torch.nn.Parameter(p.detach().cpu().clone())
    og, oc = optim8.AdamW8bit([p], lr=1e-2), optim8.AdamW8bit([cpu], lr=1e-2)
    p.grad = torch.randn(20000, device=DEV)[::2]  # strided: a non-contiguous gradient
    cpu.grad = p.grad.cpu().clone()
    og.step()
    with reference():
        oc.step()
    assert torch.equal(p.detach().cpu(), cpu.detach())


def test_checkpoint_moves_between_cpu_and_cuda():
    cpu, oc, gpu, og = pair([(4097,), (300, 70), (100,)], torch.bfloat16, optim8.AdamW8bit, lr=1e-2)
    gen = torch.Generator().manual_seed(5)
    for _ in range(3):
        step_both(cpu, oc, gpu, og, gen)
    buf = io.BytesIO()
    torch.save(oc.state_dict(), buf)
    buf.seek(0)
    on_cuda = [torch.nn.Parameter(dev(p.detach())) for p in cpu]
    opt = optim8.AdamW8bit(on_cuda, lr=1e-2)
    opt.load_state_dict(torch.load(buf, weights_only=True))
    assert all(t.device.type == DEV for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor))
    assert opt.state[on_cuda[2]]["exp_avg"].dtype == torch.float32
    back = [torch.nn.Parameter(p.detach().cpu().clone()) for p in on_cuda]
    opt_back = optim8.AdamW8bit(back, lr=1e-2)
    opt_back.load_state_dict(opt.state_dict())
    compare(cpu, oc, back, opt_back, exact=True)
    # continuing on CUDA equals continuing on the CPU
    for a, b in zip(cpu, on_cuda):
        g = torch.randn(a.shape, generator=gen).to(a.dtype)
        a.grad, b.grad = g, dev(g)
    with reference():
        oc.step()
    opt.step()
    compare(cpu, oc, on_cuda, opt, exact=True)
