"""Hostile inputs (issue 10): every case ends in a correct result or a clear error, never in corrupted state.

Optimizer steps and loads are all or nothing; state dicts convert between torch's format,
8-bit and 32-bit state and FSDP2's gathered layout; int8 row scales are checked wherever
they enter; edge shapes, double backward and meta tensors work as in PyTorch.
"""

import copy
import io
import json
import math

import pytest
import torch
from torch import nn

import optim8
from optim8.kernels import dequantize_blockwise, quantize_blockwise
from optim8.kernels.int8 import dequantize_rowwise, int8_linear, int8_linear_grad_input, quantize_rowwise
from optim8.layers import Linear8bitLt


def params_and_grads(seed=0, shapes=((67, 131), (301,))):
    """An 8-bit-state parameter (8777 elements: ragged last block) and a 32-bit one, with gradients."""
    g = torch.Generator().manual_seed(seed)
    params = [nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
    return params, g


def set_grads(params, g):
    for p in params:
        p.grad = torch.randn(p.shape, generator=g) * torch.exp(torch.randn(p.shape, generator=g))


def trained(make, steps=3, seed=0, shapes=((67, 131), (301,))):
    params, g = params_and_grads(seed, shapes)
    opt = make(params)
    for _ in range(steps):
        set_grads(params, g)
        opt.step()
    return params, opt, g


def snapshot(opt):
    """Everything load_state_dict/step may change: state (by parameter order) and group options."""
    state = [
        {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in opt.state[p].items()}
        for g in opt.param_groups
        for p in g["params"]
        if p in opt.state
    ]
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    return state, groups, len(opt.state)


def same(a, b):
    (sa, ga, na), (sb, gb, nb) = a, b
    if na != nb or ga != gb or len(sa) != len(sb):
        return False
    for x, y in zip(sa, sb):
        if x.keys() != y.keys():
            return False
        for k in x:
            if isinstance(x[k], torch.Tensor):
                if not (x[k].dtype == y[k].dtype and torch.equal(x[k], y[k])):
                    return False
            elif x[k] != y[k]:
                return False
    return True


def saved(opt):
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


# ------------------------------------------------------------------ 3: eps=0


def test_eps_zero_is_refused_for_8bit_state_and_works_for_32bit():
    params, _ = params_and_grads()
    with pytest.raises(ValueError, match="eps=0 is not supported with 8-bit state"):
        optim8.AdamW8bit(params, eps=0.0)
    # 32-bit state: torch's behaviour, finite where torch's is (zero gradients after the first step)
    ours_p, g = params_and_grads(1)
    ref_p = [nn.Parameter(p.detach().clone()) for p in ours_p]
    ours, ref = optim8.AdamW32bit(ours_p, eps=0.0, lr=1e-2), torch.optim.AdamW(ref_p, eps=0.0, lr=1e-2)
    for step in range(4):
        set_grads(ours_p, g)
        for p, q in zip(ours_p, ref_p):
            if step:
                p.grad[: p.shape[0] // 2] = 0
            q.grad = p.grad.clone()
        ours.step()
        ref.step()
    for p, q in zip(ours_p, ref_p):
        assert torch.isfinite(p).all() and torch.isfinite(q).all()
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    # a set_optim_bits(8) parameter in a 32-bit group with eps=0: refused at the step, nothing changed
    p = nn.Parameter(torch.randn(5000))
    optim8.set_optim_bits(p, 8)
    opt = optim8.AdamW32bit([p], eps=0.0)
    p.grad = torch.randn(5000)
    with pytest.raises(ValueError, match="eps=0"):
        opt.step()
    assert len(opt.state) == 0


# ------------------------------------------------------------------ 4, 5: all-or-nothing steps and groups


def test_step_that_raises_changes_nothing():
    params, opt, g = trained(lambda ps: optim8.AdamW8bit([{"params": ps[:1]}, {"params": ps[1:], "lr": 1e-3}]))
    before, values = snapshot(opt), [p.detach().clone() for p in params]
    set_grads(params, g)
    opt.param_groups[1]["lr"] = float("nan")  # a scheduler gone wrong, in the second group
    with pytest.raises(ValueError, match="learning rate"):
        opt.step()
    opt.param_groups[1]["lr"] = 1e-3
    assert same(before, snapshot(opt)) and all(torch.equal(p, v) for p, v in zip(params, values))

    # a sparse gradient on a later parameter (with no state yet)
    emb = nn.Parameter(torch.randn(50, 8))
    opt.add_param_group({"params": [emb]})
    before = snapshot(opt)
    emb.grad = torch.sparse_coo_tensor([[1, 3]], torch.randn(2, 8), (50, 8))
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    assert same(before, snapshot(opt)) and emb not in opt.state
    assert all(torch.equal(p, v) for p, v in zip(params, values))
    emb.grad = None
    opt.step()  # recovered: the counters advance by exactly one
    assert [opt.state[p]["step"] for p in params] == [4, 4]


def test_refused_param_group_leaves_no_trace():
    params, opt, g = trained(lambda ps: optim8.AdamW8bit(ps))
    wide = nn.Parameter(torch.randn(7, dtype=torch.float64))
    with pytest.raises(TypeError, match="float64"):
        opt.add_param_group({"params": [wide]})
    with pytest.raises(ValueError, match="learning rate"):
        opt.add_param_group({"params": [nn.Parameter(torch.randn(3))], "lr": -1.0})
    with pytest.raises(ValueError, match="optim_bits"):
        opt.add_param_group({"params": [nn.Parameter(torch.randn(3))], "optim_bits": 16})
    assert len(opt.param_groups) == 1
    wide.grad = torch.randn(7, dtype=torch.float64)
    before = wide.detach().clone()
    set_grads(params, g)
    opt.step()
    assert torch.equal(wide, before) and wide not in opt.state


def test_betas_mixing_float_and_tensor_is_refused():
    params, _ = params_and_grads()
    with pytest.raises(ValueError, match="both floats or both Tensors"):
        optim8.AdamW8bit(params, betas=(0.9, torch.tensor(0.999)))
    opt = optim8.AdamW8bit(params, betas=(torch.tensor(0.9), torch.tensor(0.999)))  # both tensors: as torch
    set_grads(params, torch.Generator().manual_seed(0))
    opt.step()


# ------------------------------------------------------------------ 6: load_state_dict validates first


def _corrupt_missing_absmax(sd):
    del sd["state"][0]["exp_avg_sq_absmax"]


def _corrupt_nan_absmax(sd):
    sd["state"][0]["exp_avg_absmax"][3] = float("nan")


def _corrupt_negative_absmax(sd):
    sd["state"][0]["exp_avg_sq_absmax"][5] *= -1


def _corrupt_flipped_sign_byte(sd):
    raw = sd["state"][0]["exp_avg_sq_absmax"].view(torch.uint8)
    raw[4 * 7 + 3] ^= 0x80  # the sign bit of absmax[7] (the second moment's is >= 0): one flipped bit on disk


def _corrupt_absmax_length(sd):
    sd["state"][0]["exp_avg_absmax"] = sd["state"][0]["exp_avg_absmax"][:-1].clone()


def _corrupt_codes_dtype(sd):
    sd["state"][0]["exp_avg_codes"] = sd["state"][0]["exp_avg_codes"].float()


def _corrupt_codes_shape(sd):
    sd["state"][0]["exp_avg_sq_codes"] = sd["state"][0]["exp_avg_sq_codes"].reshape(131, 67).clone()


def _corrupt_step_negative(sd):
    sd["state"][0]["step"] = -1


def _corrupt_step_fraction(sd):
    sd["state"][1]["step"] = torch.tensor(2.5)


def _corrupt_nan_moment(sd):
    sd["state"][1]["exp_avg"][0] = float("nan")


def _corrupt_group_lr(sd):
    sd["param_groups"][0]["lr"] = -1.0


def _corrupt_group_blocksize(sd):
    sd["param_groups"][0]["blocksize"] = 100


def _corrupt_unknown_param(sd):
    sd["state"][7] = copy.deepcopy(sd["state"][1])


def _corrupt_group_count(sd):
    sd["param_groups"].append(copy.deepcopy(sd["param_groups"][0]))


@pytest.mark.parametrize(
    "corrupt",
    [
        _corrupt_missing_absmax, _corrupt_nan_absmax, _corrupt_negative_absmax, _corrupt_flipped_sign_byte,
        _corrupt_absmax_length, _corrupt_codes_dtype, _corrupt_codes_shape, _corrupt_step_negative,
        _corrupt_step_fraction, _corrupt_nan_moment, _corrupt_group_lr, _corrupt_group_blocksize,
        _corrupt_unknown_param, _corrupt_group_count,
    ],
    ids=lambda f: f.__name__.removeprefix("_corrupt_"),
)
def test_load_state_dict_refuses_damage_and_changes_nothing(corrupt):
    _, source, _ = trained(lambda ps: optim8.AdamW8bit(ps, lr=0.5))
    sd = saved(source)
    corrupt(sd)
    params, opt, g = trained(lambda ps: optim8.AdamW8bit(ps, lr=1e-3), steps=1, seed=1)
    before = snapshot(opt)
    with pytest.raises((ValueError, TypeError)) as error:
        opt.load_state_dict(sd)
    assert "state" in str(error.value) or "group" in str(error.value)
    assert same(before, snapshot(opt))
    set_grads(params, g)
    opt.step()  # still a working optimizer


# ------------------------------------------------------------------ 7: load hooks as in torch.optim


def test_load_hooks_work_as_in_torch():
    _, source, _ = trained(lambda ps: optim8.AdamW8bit(ps))
    sd = saved(source)
    params, opt, g = trained(lambda ps: optim8.AdamW8bit(ps), steps=1, seed=1)

    def pre(optimizer, state_dict):
        new = copy.deepcopy(state_dict)
        for s in new["state"].values():
            s["step"] = 99
        return new

    def post(optimizer):
        optimizer.state[params[1]]["step"] = 7

    seen = []
    opt.register_load_state_dict_pre_hook(pre)
    opt.register_load_state_dict_post_hook(post)
    opt.register_state_dict_post_hook(lambda optimizer, state_dict: seen.append(sorted(state_dict["state"][0])))
    opt.load_state_dict(sd)
    assert opt.state[params[0]]["step"] == 99 and opt.state[params[1]]["step"] == 7
    opt.state_dict()
    assert seen == [["exp_avg_absmax", "exp_avg_codes", "exp_avg_sq_absmax", "exp_avg_sq_codes", "step"]]


# ------------------------------------------------------------------ 8, 9: conversions


def test_torch_adamw_state_loads_into_adamw8bit_with_its_own_options():
    shapes = ((67, 131), (301,))
    ref_p, g = params_and_grads(2, shapes)
    ref = torch.optim.AdamW(ref_p, lr=2e-3, weight_decay=0.05)
    for _ in range(3):
        set_grads(ref_p, g)
        ref.step()
    ours_p = [nn.Parameter(p.detach().clone()) for p in ref_p]
    opt = optim8.AdamW8bit(ours_p, lr=1.0, blocksize=128, min_8bit_size=300)
    opt.load_state_dict(saved(ref))
    group = opt.param_groups[0]
    assert (group["lr"], group["weight_decay"], group["blocksize"], group["min_8bit_size"]) == (2e-3, 0.05, 128, 300)
    # torch's amsgrad has no meaning here; its implementation flags are this optimizer's own
    assert "amsgrad" not in group and group["foreach"] is None and group["fused"] is None
    for p, q in zip(ours_p, ref_p):
        st, rt = opt.state[p], ref.state[q]
        assert st["step"] == 3 and st["exp_avg"].dtype == torch.uint8 and st["exp_avg_absmax"].numel() == math.ceil(p.numel() / 128)
        for name, signed in (("exp_avg", True), ("exp_avg_sq", False)):
            codes, absmax = quantize_blockwise(rt[name], blocksize=128, signed=signed)
            assert torch.equal(st[name], codes) and torch.equal(st[name + "_absmax"], absmax)
    g2 = torch.Generator().manual_seed(9)
    set_grads(ours_p, g2)
    for p, q in zip(ours_p, ref_p):
        q.grad = p.grad.clone()
    opt.step()
    ref.step()
    for p, q in zip(ours_p, ref_p):
        assert (p - q).abs().max() < 2e-3 * 0.25  # a quarter of one step: the moments carried over


def test_8bit_checkpoint_into_32bit_optimizer_and_back():
    params, opt8, _ = trained(lambda ps: optim8.AdamW8bit(ps, min_8bit_size=300))
    sd8 = saved(opt8)
    p32 = [nn.Parameter(p.detach().clone()) for p in params]
    opt32 = optim8.AdamW32bit(p32, min_8bit_size=300)
    opt32.load_state_dict(sd8)
    numel = sum(p.numel() for p in params)
    assert opt32.state_bytes() == 8 * numel  # stays 32-bit
    st8, st32 = opt8.state[params[0]], opt32.state[p32[0]]
    assert st32["exp_avg"].dtype == torch.float32 and "exp_avg_absmax" not in st32
    assert torch.equal(st32["exp_avg"], dequantize_blockwise(st8["exp_avg"], st8["exp_avg_absmax"], signed=True))
    assert torch.equal(st32["exp_avg_sq"], dequantize_blockwise(st8["exp_avg_sq"], st8["exp_avg_sq_absmax"], signed=False))

    back = optim8.AdamW8bit([nn.Parameter(p.detach().clone()) for p in params], min_8bit_size=300)
    back.load_state_dict(saved(opt32))
    assert back.state_bytes() < 2.1 * numel  # quantized again
    for p, q in zip(params, back.param_groups[0]["params"]):  # requantizing dequantized codes: same layout
        assert back.state[q]["exp_avg"].dtype == torch.uint8
        assert back.state[q]["exp_avg_absmax"].shape == opt8.state[p]["exp_avg_absmax"].shape

    # another blocksize: re-blocked (dequantize with the saved blocks, quantize with the new ones)
    other = optim8.AdamW8bit([nn.Parameter(p.detach().clone()) for p in params], blocksize=64, min_8bit_size=300)
    other.load_state_dict(sd8)
    q = other.param_groups[0]["params"][0]
    values = dequantize_blockwise(st8["exp_avg"], st8["exp_avg_absmax"], signed=True)
    codes, absmax = quantize_blockwise(values, blocksize=64, signed=True)
    assert torch.equal(other.state[q]["exp_avg"], codes) and torch.equal(other.state[q]["exp_avg_absmax"], absmax)


def test_trainer_resumes_a_torch_adamw_checkpoint_with_adamw8bit(tmp_path):
    transformers = pytest.importorskip("transformers")
    from tiny_models import VOCAB, llama_config

    gen = torch.Generator().manual_seed(3)
    data = []
    for _ in range(8):
        ids = torch.randint(0, VOCAB, (8,), generator=gen)
        data.append({"input_ids": ids, "labels": ids.clone()})

    def trainer(optimizers, max_steps):
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(llama_config(num_hidden_layers=1))
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path), max_steps=max_steps, per_device_train_batch_size=2, save_strategy="steps",
            save_steps=2, report_to=[], use_cpu=True, seed=0, dataloader_num_workers=0, disable_tqdm=True,
            learning_rate=1e-3,
        )
        opts = optimizers(model) if optimizers else (None, None)
        return transformers.Trainer(model=model, args=args, train_dataset=data, optimizers=opts)

    trainer(None, 2).train()  # Trainer's default optimizer: torch.optim.AdamW
    checkpoint = tmp_path / "checkpoint-2"
    assert not any(t.dtype == torch.uint8 for s in torch.load(checkpoint / "optimizer.pt")["state"].values() for t in s.values() if torch.is_tensor(t))

    holder = {}

    def eight_bit(model):
        decay = set(transformers.Trainer.get_decay_parameter_names(None, model))
        named = list(model.named_parameters())
        groups = [{"params": [p for n, p in named if n in decay]}, {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0}]
        holder["opt"] = optim8.AdamW8bit(groups, lr=1e-3, min_8bit_size=1024)
        return holder["opt"], None

    resumed = trainer(eight_bit, 4)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    opt = holder["opt"]
    assert resumed.state.global_step == 4
    states = list(opt.state.values())
    assert states and all(s["step"] == 4 for s in states)
    assert any(s["exp_avg"].dtype == torch.uint8 for s in states) and opt.param_groups[0]["min_8bit_size"] == 1024


# ------------------------------------------------------------------ 10: torch's loader and the export


def test_torch_adamw_refuses_optim8_8bit_state_and_export_converts_it():
    params, opt, g = trained(lambda ps: optim8.AdamW8bit(ps, lr=1e-2))
    theirs_p = [nn.Parameter(p.detach().clone()) for p in params]
    theirs = torch.optim.AdamW(theirs_p, lr=1e-2)
    theirs.load_state_dict(opt.state_dict())  # torch cannot tell; but it never trains on the codes:
    for p in theirs_p:
        p.grad = torch.randn(p.shape)
    with pytest.raises(KeyError, match="exp_avg"):
        theirs.step()
    assert all(torch.equal(p, q) for p, q in zip(params, theirs_p))

    exported = optim8.to_torch_state_dict(opt)
    theirs = torch.optim.AdamW([nn.Parameter(p.detach().clone()) for p in params], lr=1.0)
    theirs.load_state_dict(exported)
    group = theirs.param_groups[0]
    assert group["decoupled_weight_decay"] is True and group["lr"] == 1e-2 and "blocksize" not in group
    st, tt = opt.state[params[0]], theirs.state[theirs.param_groups[0]["params"][0]]
    assert float(tt["step"]) == 3.0
    assert torch.equal(tt["exp_avg"], dequantize_blockwise(st["exp_avg"], st["exp_avg_absmax"], signed=True))
    # 32-bit: the torch optimizer continues exactly as an optim8 AdamW32bit would
    p32, opt32, _ = trained(lambda ps: optim8.AdamW32bit(ps, lr=1e-2))
    theirs_p = [nn.Parameter(p.detach().clone()) for p in p32]
    theirs = torch.optim.AdamW(theirs_p, lr=0.5)
    theirs.load_state_dict(optim8.to_torch_state_dict(opt32.state_dict(), decoupled_weight_decay=True))
    set_grads(p32, g)
    for p, q in zip(p32, theirs_p):
        q.grad = p.grad.clone()
    opt32.step()
    theirs.step()
    for p, q in zip(p32, theirs_p):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    with pytest.raises(TypeError, match="decoupled_weight_decay"):
        optim8.to_torch_state_dict(opt32.state_dict())


def test_old_format_checkpoint_still_loads():
    params, opt, _ = trained(lambda ps: optim8.AdamW8bit(ps))
    sd = saved(opt)
    sd["state"][0] = {({"exp_avg_codes": "exp_avg", "exp_avg_sq_codes": "exp_avg_sq"}).get(k, k): v for k, v in sd["state"][0].items()}
    other = optim8.AdamW8bit([nn.Parameter(p.detach().clone()) for p in params])
    other.load_state_dict(sd)
    q = other.param_groups[0]["params"][0]
    for key, value in opt.state[params[0]].items():
        assert torch.equal(torch.as_tensor(value), torch.as_tensor(other.state[q][key])), key


# ------------------------------------------------------------------ 11: FSDP2 gathered state


def _gathered_fsdp_state(shape, world, steps=3, blocksize=256):
    """The full_state_dict an FSDP2 run on ``world`` ranks writes for one parameter (Shard(0)), and
    the fp32 moments its shards held. Each shard is optimized as its own parameter: FSDP2's layout."""
    g = torch.Generator().manual_seed(5)
    full = torch.randn(shape, generator=g)
    shards = [nn.Parameter(c.clone()) for c in torch.chunk(full, world, dim=0)]
    shards += [nn.Parameter(torch.empty((0,) + tuple(shape[1:]))) for _ in range(world - len(shards))]
    for s in shards:
        optim8.set_optim_bits(s, 8)  # by the global size, as FSDP2 ranks decide (empty shards too)
    opts = [optim8.AdamW8bit([s], blocksize=blocksize) for s in shards]
    for _ in range(steps):
        grad = torch.randn(shape, generator=g)
        for s, c, opt in zip(shards, list(torch.chunk(grad, world, dim=0)) + [None] * world, opts):
            s.grad = c.clone() if c is not None else torch.zeros_like(s)
            opt.step()
    capacity = math.ceil(shards[0].numel() / blocksize)
    state = {"step": steps}
    truth = {}
    for name, signed in (("exp_avg", True), ("exp_avg_sq", False)):
        sts = [opt.state[s] for s, opt in zip(shards, opts)]
        state[name + "_codes"] = torch.cat([st[name].reshape(-1) for st in sts]).reshape(shape)
        absmax = torch.zeros(world, capacity)
        for i, st in enumerate(sts):
            absmax[i, : st[name + "_absmax"].numel()] = st[name + "_absmax"]
        state[name + "_absmax"] = absmax
        truth[name] = torch.cat(
            [dequantize_blockwise(st[name], st[name + "_absmax"], blocksize=blocksize, signed=signed).reshape(-1) for st in sts]
        )
    group = dict(opts[0].state_dict()["param_groups"][0], params=[0])
    return {"state": {0: state}, "param_groups": [group]}, full, truth


@pytest.mark.parametrize("shape,world", [((77, 64), 2), ((7, 100), 3), ((5, 130), 8)])
def test_fsdp2_gathered_state_is_reblocked_for_one_process(shape, world):
    sd, full, truth = _gathered_fsdp_state(shape, world)
    p = nn.Parameter(full.clone())
    opt = optim8.AdamW8bit([p], min_8bit_size=1)
    opt.load_state_dict(sd)
    st = opt.state[p]
    assert st["step"] == 3 and st["exp_avg_absmax"].shape == (math.ceil(p.numel() / 256),)
    for name, signed in (("exp_avg", True), ("exp_avg_sq", False)):
        codes, absmax = quantize_blockwise(truth[name].reshape(shape), signed=signed)
        assert torch.equal(st[name], codes) and torch.equal(st[name + "_absmax"], absmax)
        # within one quantization step of what the shards held
        got = dequantize_blockwise(st[name], st[name + "_absmax"], signed=signed).reshape(-1)
        blocks = absmax.abs().repeat_interleave(256)[: p.numel()]
        assert ((got - truth[name]).abs() <= 0.07 * blocks).all()
    exported = optim8.to_torch_state_dict(sd, decoupled_weight_decay=True)
    assert torch.equal(exported["state"][0]["exp_avg"].reshape(-1), truth["exp_avg"])


def test_fsdp2_gathered_state_of_another_layout_is_refused():
    sd, full, _ = _gathered_fsdp_state((77, 64), 2)
    opt = optim8.AdamW8bit([nn.Parameter(full.clone())], min_8bit_size=1)
    before = snapshot(opt)
    bad = copy.deepcopy(sd)
    absmax = bad["state"][0]["exp_avg_absmax"]
    bad["state"][0]["exp_avg_absmax"] = torch.cat([absmax, absmax[:, :1]], dim=1)  # not 2 shards of dim 0
    with pytest.raises(ValueError, match="sharded otherwise"):
        opt.load_state_dict(bad)
    bad["state"][0]["exp_avg_absmax"] = sd["state"][0]["exp_avg_absmax"].reshape(2, 2, 5)
    with pytest.raises(ValueError, match="one mesh dimension"):
        opt.load_state_dict(bad)
    assert same(before, snapshot(opt))


# ------------------------------------------------------------------ 13: SCB wherever it enters


@pytest.mark.parametrize("bad", ["nan", "negative", "inf", "short", "bias"])
def test_bad_row_scales_and_bias_are_refused(bad):
    w = torch.randn(23, 37)
    q, scb = quantize_rowwise(w)
    bias = torch.randn(23)
    x = torch.randn(19, 37)
    if bad == "nan":
        scb[4] = float("nan")
    elif bad == "negative":
        scb[4] = -scb[4]
    elif bad == "inf":
        scb[4] = float("inf")
    elif bad == "short":
        scb = scb[:1].clone()
    else:
        bias = bias[:1].clone()
    with pytest.raises(ValueError, match="SCB|bias"):
        int8_linear(x, q, scb, bias)
    with pytest.raises(ValueError, match="SCB|bias"):
        int8_linear(x[:3], q, scb, bias)  # the decode path too
    if bad != "bias":
        with pytest.raises(ValueError, match="SCB"):
            dequantize_rowwise(q, scb)
        with pytest.raises(ValueError, match="SCB"):
            int8_linear_grad_input(torch.randn(5, 23), q, scb)
    layer = Linear8bitLt(37, 23).quantize()
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(RuntimeError, match="SCB|bias"):
        layer.load_state_dict({"weight": q, "SCB": scb, "bias": bias})
    assert all(torch.equal(v, layer.state_dict()[k]) for k, v in before.items())


def test_scales_written_in_place_are_checked_again_and_zero_rows_are_valid():
    w = torch.randn(9, 33)
    w[2] = 0  # an all-zero row: SCB 0, a valid scale
    layer = Linear8bitLt.from_linear(nn.Linear(33, 9)).quantize()
    layer.load_state_dict({"weight": w, "bias": torch.randn(9)})
    assert layer.SCB[2] == 0
    x = torch.randn(20, 33)
    layer(x)
    with torch.no_grad():
        layer.SCB[1] = float("nan")
    with pytest.raises(ValueError, match="SCB"):
        layer(x)


# ------------------------------------------------------------------ 14: Int8Config and checkpoints


def test_int8config_skip_modules_errors(tmp_path):
    transformers = pytest.importorskip("transformers")
    from tiny_models import llama_model

    with pytest.raises(TypeError, match="strings"):
        optim8.Int8Config(skip_modules=["lm_head", 3])
    torch.manual_seed(0)
    llama_model(num_hidden_layers=1).save_pretrained(tmp_path / "fp32")
    with pytest.raises(ValueError, match=r"gate_prj.*match no module"):
        transformers.AutoModelForCausalLM.from_pretrained(
            tmp_path / "fp32", quantization_config=optim8.Int8Config(skip_modules=["mlp.gate_prj"])
        )
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "fp32", quantization_config=optim8.Int8Config())
    model.save_pretrained(tmp_path / "int8")

    # config.json now keeps a module in float whose checkpoint weights are int8
    def add_skip(node):
        if isinstance(node, dict):
            for key, value in node.items():
                if "skip" in key and isinstance(value, list):
                    value.append("model.layers.0.mlp.down_proj")
                else:
                    add_skip(value)

    config = json.loads((tmp_path / "int8" / "config.json").read_text())
    add_skip(config["quantization_config"])
    (tmp_path / "int8" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.down_proj.*skip_modules"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "int8")


# ------------------------------------------------------------------ 15: edge shapes, double backward, meta


@pytest.mark.parametrize("rows", [3, 21])
@pytest.mark.parametrize("in_features,out_features", [(0, 7), (5, 0), (0, 0)])
def test_empty_linear_works_like_nn_linear(in_features, out_features, rows):
    ref = nn.Linear(in_features, out_features)
    with torch.no_grad():
        ref.bias.normal_()
    layer = Linear8bitLt.from_linear(ref)
    x = torch.randn(2, rows, in_features, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    y, y2 = layer(x), ref(x2)
    assert torch.equal(y, y2)
    y.sum().backward()
    y2.sum().backward()
    assert torch.equal(x.grad, x2.grad) and torch.equal(layer.bias.grad, ref.bias.grad)


@pytest.mark.parametrize("rows", [5, 40])
def test_double_backward_through_linear8bitlt(rows):
    layer = Linear8bitLt(37, 23).quantize()
    weight = layer.dequantize(torch.float32)
    x = torch.randn(rows, 37, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    gx, = torch.autograd.grad(torch.tanh(layer(x)).sum(), x, create_graph=True)
    gx2, = torch.autograd.grad(torch.tanh(nn.functional.linear(x2, weight, layer.bias)).sum(), x2, create_graph=True)
    torch.testing.assert_close(gx, gx2, rtol=0.05, atol=0.02)  # the int8 forward's error
    (gx.square().sum()).backward()  # a gradient penalty
    (gx2.square().sum()).backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=0.1, atol=0.02)
    # grad_input itself: its backward is the same straight-through product, exactly
    q, scb = layer.weight, layer.SCB
    grad = torch.randn(rows, 23, requires_grad=True)
    out = int8_linear_grad_input(grad, q, scb)
    up = torch.randn_like(out)
    (got,) = torch.autograd.grad(out, grad, up)
    assert torch.equal(got, up @ dequantize_rowwise(q, scb).t())


def test_meta_parameters_step_as_in_torch():
    ours = [nn.Parameter(torch.empty(70, 90, device="meta")), nn.Parameter(torch.empty(11, device="meta"))]
    theirs = [nn.Parameter(torch.empty(p.shape, device="meta")) for p in ours]
    opt, ref = optim8.AdamW8bit(ours), torch.optim.AdamW(theirs)
    for _ in range(2):
        for p in ours + theirs:
            p.grad = torch.empty(p.shape, device="meta")
        opt.step()
        ref.step()
    for p, q in zip(ours, theirs):
        assert opt.state[p]["step"] == int(ref.state[q]["step"]) == 2
        assert p.is_meta and opt.state[p]["exp_avg"].is_meta
    assert opt.state[ours[0]]["exp_avg"].dtype == torch.uint8
    sd = opt.state_dict()
    other = optim8.AdamW8bit([nn.Parameter(torch.empty(p.shape, device="meta")) for p in ours])
    other.load_state_dict(sd)  # meta state: nothing to read, shapes still checked
    assert other.state[other.param_groups[0]["params"][0]]["step"] == 2
