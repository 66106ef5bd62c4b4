"""8-bit optimizer state that stays bounded and exact (issue 10, items 1 and 2).

* High dynamic range inside a block: one element of every 256 with gradient scale 1, the rest
  with scale ``s`` (what outlier feature columns give). Before the unsigned map's
  "positive never encodes to zero" rule, a small element's second moment rounded to code 0
  while its first moment kept a code, and it stepped by ``lr * m / eps``: 7.2 at s = 1e-3 and
  14.6 at s = 1e-4 where torch AdamW's largest step is 0.001.
* Requantization is lossless: a step in which every gradient is non-finite leaves the 8-bit
  state byte-identical (before the signed scale each such step shrank blocks whose extreme
  first moment was negative by 0.7%).
"""

import math

import pytest
import torch

import optim8
from devices import DEV, reference

N = 16384


def _max_step(opt_cls, s: float, *, steps: int = 100, seed: int = 0, n: int = N, device="cpu", **kw) -> float:
    torch.manual_seed(seed)
    p = torch.nn.Parameter((torch.randn(n) * 0.1).to(device))
    opt = opt_cls([p], lr=1e-3, weight_decay=0.0, **kw)
    gen = torch.Generator().manual_seed(seed + 100)
    scale = torch.full((n,), s)
    scale[::256] = 1.0
    largest = 0.0
    for _ in range(steps):
        p.grad = (torch.randn(n, generator=gen) * scale).to(device)
        old = p.detach().clone()
        opt.step()
        largest = max(largest, float((p.detach() - old).abs().max()))
    return largest


@pytest.mark.parametrize("s", [1e-2, 1e-3, 1e-4])
def test_largest_step_stays_within_3x_torch_adamw(s):
    torch_step = _max_step(torch.optim.AdamW, s)
    assert 9e-4 < torch_step < 1.1e-3
    for blocksize in (64, 128, 256):
        ours = _max_step(optim8.AdamW8bit, s, blocksize=blocksize, min_8bit_size=0)
        # measured (seeds 0-4): at most 1.8x (2.1x for seed 0 of another generator)
        assert ours <= 3 * torch_step, (s, blocksize, ours, torch_step)


def test_positive_second_moment_never_encodes_to_zero():
    p = torch.nn.Parameter(torch.randn(4096))
    opt = optim8.AdamW8bit([p], min_8bit_size=0)
    g = torch.randn(4096) * 1e-5
    g[::256] = 10.0  # v of the rest: ~1e-12 of the block's absmax, below the map's smallest entry
    p.grad = g
    opt.step()
    from optim8.kernels.quant_map import zero_code

    codes = opt.state[p]["exp_avg_sq"]
    assert bool((codes[g != 0] != zero_code(False)).all())


def _skipped_steps_leave_state_identical(device, steps: int):
    gen = torch.Generator().manual_seed(3)
    params = [torch.nn.Parameter(torch.randn(shape, generator=gen).to(device)) for shape in [(300, 97), (4099,)]]
    opt = optim8.AdamW8bit(params, min_8bit_size=0, blocksize=64)
    for _ in range(3):
        for p in params:
            p.grad = (torch.randn(p.shape, generator=gen) * torch.exp(2 * torch.randn(p.shape, generator=gen))).to(device)
        opt.step()
    before = {k: v.clone() for p in params for k, v in opt.state[p].items() if isinstance(v, torch.Tensor) and v.dim()}
    weights = [p.detach().clone() for p in params]
    absmax = opt.state[params[0]]["exp_avg_absmax"]
    assert bool((absmax < 0).any()), "the test needs blocks whose extreme first moment is negative"
    for i in range(steps):
        for p in params:
            p.grad = torch.full_like(p, float("nan") if i % 2 else float("inf"))
        opt.step()
    after = {k: v for p in params for k, v in opt.state[p].items() if isinstance(v, torch.Tensor) and v.dim()}
    for key, t in before.items():
        a = after[key].cpu()
        assert torch.equal(a.view(torch.uint8) if a.dtype != torch.uint8 else a, (t.cpu().view(torch.uint8) if t.dtype != torch.uint8 else t.cpu())), key
    for w, p in zip(weights, params):
        assert torch.equal(w, p.detach())


def test_skipped_steps_leave_8bit_state_byte_identical():
    _skipped_steps_leave_state_identical("cpu", 100)


@pytest.mark.cuda
def test_cuda_skipped_steps_leave_8bit_state_byte_identical():
    _skipped_steps_leave_state_identical(DEV, 3)


@pytest.mark.cuda
@pytest.mark.parametrize("blocksize", [64, 256])
def test_cuda_high_dynamic_range_matches_reference(blocksize):
    """The kernel applies both rules exactly as the reference does (bit for bit)."""
    n = 4099
    gen = torch.Generator().manual_seed(1)
    cpu = torch.nn.Parameter(torch.randn(n, generator=gen) * 0.1)
    gpu = torch.nn.Parameter(cpu.detach().to(DEV, copy=True))
    opt_c = optim8.AdamW8bit([cpu], min_8bit_size=0, blocksize=blocksize)
    opt_g = optim8.AdamW8bit([gpu], min_8bit_size=0, blocksize=blocksize)
    scale = torch.full((n,), 1e-4)
    scale[::97] = 1.0
    for _ in range(4):
        g = torch.randn(n, generator=gen) * scale
        cpu.grad, gpu.grad = g, g.to(DEV, copy=True)
        with reference():
            opt_c.step()
        opt_g.step()
    assert torch.equal(cpu.detach(), gpu.detach().cpu())
    for key in ("exp_avg", "exp_avg_sq", "exp_avg_absmax", "exp_avg_sq_absmax"):
        a, b = opt_c.state[cpu][key], opt_g.state[gpu][key].cpu()
        assert torch.equal(a, b), key
    assert bool((opt_c.state[cpu]["exp_avg_absmax"] < 0).any())
    assert math.isfinite(float(gpu.detach().abs().max()))
