"""Linear4bit (QLoRA): the layer, quantize_model(bits=4), Int4Config save/reload, peft LoRA, Trainer."""

import json

import pytest
import torch
from torch import nn

import optim8
from optim8.layers import Linear4bit, Linear8bitLt

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from tiny_models import VOCAB, llama_model  # noqa: E402


def test_layer_forward_backward_and_double_backward():
    lin = nn.Linear(130, 70)
    layer = Linear4bit.from_linear(lin)
    assert layer.is_quantized and layer.weight.dtype == torch.uint8 and not layer.weight.requires_grad
    w = layer.dequantize(torch.float32)
    assert ((w - lin.weight).norm() / lin.weight.norm()) < 0.11
    for tokens in (1, 16, 33):
        x = torch.randn(2, tokens, 130, requires_grad=True)
        out = layer(x)
        assert out.shape == (2, tokens, 70)
        assert torch.allclose(out, x @ w.t() + lin.bias, atol=1e-5, rtol=1e-5)
    v = torch.randn(2, 33, 70, requires_grad=True)
    (gx,) = torch.autograd.grad(out, x, grad_outputs=v, create_graph=True)
    assert torch.allclose(gx, v @ w, atol=1e-5, rtol=1e-5)
    u = torch.randn_like(gx)
    (gv,) = torch.autograd.grad((gx * u).sum(), v)
    assert torch.allclose(gv, u @ w.t(), atol=1e-5, rtol=1e-5)
    layer.bias.requires_grad_(True)
    layer(torch.randn(5, 130)).sum().backward()
    assert layer.bias.grad is not None and layer.weight.grad is None


def test_compute_dtype_and_casts_keep_the_4bit_state():
    layer = Linear4bit(64, 32, compute_dtype=torch.bfloat16)
    x = torch.randn(3, 64)
    out = layer(x)  # quantized at the first forward
    assert layer.is_quantized and out.dtype == torch.float32
    expected = (x.bfloat16() @ layer.dequantize(torch.bfloat16).t() + layer.bias.bfloat16()).float()
    assert torch.allclose(out, expected, atol=3e-2, rtol=3e-2)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    layer.half()
    assert layer.absmax.dtype == torch.uint8 and layer.nested_absmax.dtype == torch.float32
    assert layer.quant_map.dtype == torch.float32 and layer.float_dtype == torch.float16
    after = layer.state_dict()
    for key in before:
        if key != "bias" and "quant_state" not in key:
            assert torch.equal(before[key], after[key]), key


def test_state_dict_is_bitsandbytes_layout_and_round_trips():
    layer = Linear4bit.from_linear(nn.Linear(128, 64))
    state = layer.state_dict()
    assert {k: (v.dtype, tuple(v.shape)) for k, v in state.items() if k != "weight.quant_state.bitsandbytes__nf4"} == {
        "weight": (torch.uint8, (4096, 1)),
        "weight.absmax": (torch.uint8, (128,)),
        "weight.quant_map": (torch.float32, (16,)),
        "weight.nested_absmax": (torch.float32, (1,)),
        "weight.nested_quant_map": (torch.float32, (256,)),
        "bias": (torch.float32, (64,)),
    }
    meta = json.loads(bytes(state["weight.quant_state.bitsandbytes__nf4"].tolist()))
    assert meta["quant_type"] == "nf4" and meta["blocksize"] == 64 and meta["shape"] == [64, 128]
    assert meta["nested_blocksize"] == 256 and meta["nested_offset"] == layer.offset
    other = Linear4bit(128, 64)
    other.load_state_dict(state)
    assert torch.equal(other.dequantize(), layer.dequantize())
    with pytest.raises(RuntimeError, match="shape"):
        Linear4bit(64, 128).load_state_dict(state)
    fp4 = Linear4bit(128, 64, quant_type="fp4", double_quant=False)
    fp4.load_state_dict(nn.Linear(128, 64).state_dict())  # a float checkpoint is quantized
    assert fp4.is_quantized and fp4.absmax.dtype == torch.float32
    assert "weight.quant_state.bitsandbytes__fp4" in fp4.state_dict()


def test_quantize_model_bits_4_and_bytes_per_parameter():
    model = nn.Sequential(nn.Linear(1024, 512), nn.ReLU(), nn.Linear(512, 256))
    model.lm_head = nn.Linear(256, 10)
    optim8.quantize_model(model, bits=4, blocksize=64)
    assert isinstance(model[0], Linear4bit) and isinstance(model[2], Linear4bit)
    assert type(model.lm_head) is nn.Linear
    bits = model[0].bits_per_parameter()
    maps = 8 * (16 + 256) * 4 / (1024 * 512)
    assert abs(bits - maps - 4.127) < 1e-3, bits
    with pytest.raises(ValueError, match="bits must be"):
        optim8.quantize_model(nn.Sequential(nn.Linear(4, 4)), bits=3)
    with pytest.raises(TypeError, match="bits=4 only"):
        optim8.quantize_model(nn.Sequential(nn.Linear(4, 4)), quant_type="nf4")


def test_relative_error_next_to_int8():
    """README numbers: output error against fp32 of Linear4bit (NF4, FP4) and Linear8bitLt."""
    torch.manual_seed(0)
    lin = nn.Linear(1024, 1024)
    x = torch.randn(64, 1024)
    ref = lin(x)
    errors = {}
    for name, layer in {
        "nf4": Linear4bit.from_linear(lin),
        "fp4": Linear4bit.from_linear(lin, quant_type="fp4"),
        "int8": Linear8bitLt.from_linear(lin),
    }.items():
        with torch.no_grad():
            errors[name] = ((layer(x) - ref).norm() / ref.norm()).item()
    print(errors)
    assert errors["int8"] < errors["nf4"] < errors["fp4"] < 0.15


@pytest.fixture(scope="module")
def fp32_dir(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("llama-fp32")
    llama_model().save_pretrained(path)
    return path


def test_int4config_load_save_reload_bit_identical(fp32_dir, tmp_path):
    model = transformers.AutoModelForCausalLM.from_pretrained(
        fp32_dir, quantization_config=optim8.Int4Config(skip_modules=["lm_head"])
    )
    layers = {n: m for n, m in model.named_modules() if isinstance(m, Linear4bit)}
    assert len(layers) == 14 and model.is_quantized and type(model.lm_head) is nn.Linear
    reference = transformers.AutoModelForCausalLM.from_pretrained(fp32_dir)
    for name, layer in layers.items():
        direct = Linear4bit.from_linear(reference.get_submodule(name))
        assert torch.equal(layer.weight, direct.weight) and torch.equal(layer.dequantize(), direct.dequantize())
    model.save_pretrained(tmp_path)
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "bitsandbytes" and qc["load_in_4bit"] and qc["bnb_4bit_quant_type"] == "nf4"
    assert qc["optim8"]["bits"] == 4
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    a, b = model.state_dict(), reloaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ids = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)
        rel = (model(ids).logits - reference(ids).logits).norm() / reference(ids).logits.norm()
    assert rel < 0.2, rel
    with pytest.raises(ValueError, match="quant_type"):
        optim8.Int4Config(quant_type="int4")


def test_qlora_trains_merges_and_unmerges_through_trainer(fp32_dir, tmp_path):
    model = transformers.AutoModelForCausalLM.from_pretrained(fp32_dir, quantization_config=optim8.Int4Config())
    model = optim8.prepare_for_lora(model, gradient_checkpointing=False)
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"])
    model = peft.get_peft_model(model, config)
    from optim8.integrations.peft import LoraLinear4bit

    wrapped = [m for m in model.modules() if isinstance(m, LoraLinear4bit)]
    assert len(wrapped) == 6
    ids = torch.randint(0, VOCAB, (16, 12), generator=torch.Generator().manual_seed(1))
    data = [{"input_ids": row, "labels": row} for row in ids]
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = optim8.AdamW8bit(trainable, lr=1e-2)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, logging_steps=1, report_to=[],
        save_strategy="no", use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, optimizers=(optimizer, None))
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 4 and losses[-1] < losses[0]
    lora = wrapped[0]
    base = lora.get_base_layer()
    batch = ids[:2]
    with torch.no_grad():
        before = model(input_ids=batch).logits
        w0 = base.dequantize(torch.float32)
        delta = lora.get_delta_weight("default").float()
        lora.merge()
        merged = base.dequantize(torch.float32)
        assert base.is_quantized and base.weight.dtype == torch.uint8
        # one 4-bit rounding of W + delta: at most half a code gap times the block absmax
        assert (merged - (w0 + delta)).abs().max() <= 0.2 * (w0 + delta).abs().max()
        lora.unmerge()
        assert not lora.merged
        after = model(input_ids=batch).logits
    assert (after - before).abs().max() < 0.5 * before.abs().max()
