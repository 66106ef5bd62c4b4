"""The generic update kernel (cuda/update.cuh) against the PyTorch rules, one rule at a time (pytest -m cuda).

On a GPU, or on the host device without one (tests/devices.py). Every rule's device function is
the reference's fp32 operations in the same order, and the requantizer is the reference's, so
kernel and reference must agree bit for bit: parameters, codes, absmax and fp32 state.
"""

import pytest
import torch

import optim8
from devices import DEV, reference

pytestmark = pytest.mark.cuda

# odd sizes: a lone element, a ragged last block and chunk, several tensors in one launch
SHAPES = [(1,), (37, 131), (4099,), (256,)]

RULES = {
    "lion": (optim8.Lion8bit, dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1)),
    "sgd": (optim8.SGD8bit, dict(lr=1e-2, momentum=0.9, dampening=0.1, weight_decay=1e-2)),
    "sgd_nesterov": (optim8.SGD8bit, dict(lr=1e-2, momentum=0.9, nesterov=True, maximize=True)),
    "rmsprop": (optim8.RMSprop8bit, dict(lr=1e-3, alpha=0.9, eps=1e-6, weight_decay=1e-2)),
    "rmsprop_momentum": (optim8.RMSprop8bit, dict(lr=1e-3, momentum=0.9, weight_decay=1e-2)),
    "adagrad": (optim8.Adagrad8bit, dict(lr=1e-2, lr_decay=1e-2, initial_accumulator_value=0.1, eps=1e-8)),
    "ademamix": (optim8.AdEMAMix8bit, dict(lr=1e-3, betas=(0.9, 0.999, 0.999), t_alpha=3, t_beta3=3)),
}


def run_pair(cls, hp, dtype, bits, blocksize, steps=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    cpu = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in SHAPES]
    dev = [torch.nn.Parameter(p.detach().to(DEV, copy=True)) for p in cpu]
    kw = dict(hp, optim_bits=bits, min_8bit_size=0, blocksize=blocksize)
    oc, od = cls(cpu, **kw), cls(dev, **kw)
    for _ in range(steps):
        for a, b in zip(cpu, dev):
            g = (torch.randn(a.shape, generator=gen) * torch.exp(torch.randn(a.shape, generator=gen))).to(dtype)
            a.grad, b.grad = g, g.to(DEV, copy=True)
        with reference():
            oc.step()
        od.step()
    return cpu, oc, dev, od


def assert_same(cpu, oc, dev, od):
    for a, b in zip(cpu, dev):
        assert torch.equal(a.detach(), b.detach().cpu()), (a.detach().float() - b.detach().cpu().float()).abs().max()
        for key, t in oc.state[a].items():
            if isinstance(t, torch.Tensor):
                u = od.state[b][key].cpu()
                assert u.dtype == t.dtype and torch.equal(u, t), key
            else:
                assert od.state[b][key] == t


@pytest.mark.parametrize("name", sorted(RULES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("bits, blocksize", [(8, 256), (8, 64), (32, 256)])
def test_rule_kernel_matches_reference(name, dtype, bits, blocksize):
    cls, hp = RULES[name]
    assert_same(*run_pair(cls, hp, dtype, bits, blocksize))


def test_plain_sgd_and_fp16():
    assert_same(*run_pair(optim8.SGD32bit, dict(lr=1e-2, weight_decay=1e-2), torch.float32, 32, 256))
    assert_same(*run_pair(optim8.Lion8bit, dict(lr=1e-2), torch.float16, 8, 128))


def test_nonfinite_gradients_skip_elements_in_the_kernel():
    cpu, oc, dev, od = run_pair(optim8.AdEMAMix8bit, dict(lr=1e-3), torch.float32, 8, 256, steps=2)
    for a, b in zip(cpu, dev):
        g = torch.randn(a.shape)
        g.view(-1)[::7] = float("nan")
        g.view(-1)[3::11] = float("inf")
        a.grad, b.grad = g, g.to(DEV, copy=True)
    with reference():
        oc.step()
    od.step()
    assert_same(cpu, oc, dev, od)


def test_tensor_lr_is_combined_on_the_device():
    hp = dict(lr=torch.tensor(1e-2), weight_decay=0.1)
    cpu, oc, dev, od = run_pair(optim8.Lion8bit, hp, torch.float32, 8, 256)
    od.param_groups[0]["lr"] = torch.tensor(1e-2, device=DEV)  # the device-side path from here on
    for a, b in zip(cpu, dev):
        g = torch.randn(a.shape)
        a.grad, b.grad = g, g.to(DEV, copy=True)
    with reference():
        oc.step()
    od.step()
    assert_same(cpu, oc, dev, od)
