"""peft LoRA over Linear8bitLt: prepare_for_lora, training, merge_and_unload, adapter save/load.

Tiny random models built from configs, loaded in int8 through optim8.Int8Config; nothing is
downloaded.
"""

import pytest
import torch
from devices import DEV, GPU
from torch import nn

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from safetensors.torch import load_file  # noqa: E402

import optim8  # noqa: E402
from optim8.integrations.peft import LoraLinear8bitLt  # noqa: E402
from optim8.layers import Linear8bitLt  # noqa: E402

from tiny_models import VOCAB, llama_model  # noqa: E402
from tiny_models import bert_model as _bert_model  # noqa: E402


def bert_model():
    return _bert_model(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


# model -> (builder, auto class, LoRA target modules, batch -> loss-ready kwargs)
MODELS = {
    "llama": (llama_model, transformers.AutoModelForCausalLM, ["q_proj", "v_proj", "down_proj"]),
    "bert": (bert_model, transformers.AutoModelForSequenceClassification, ["query", "value", "attention.output.dense"]),
}


def batch(name, seed=1):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (4, 12), generator=generator)
    if name == "llama":
        return {"input_ids": ids, "labels": ids}
    return {"input_ids": ids, "labels": torch.randint(0, 3, (4,), generator=generator)}


@pytest.fixture(scope="module", params=sorted(MODELS))
def int8_dir(request, tmp_path_factory):
    """(name, directory of the model saved in int8, auto class, target modules)."""
    build, auto, targets = MODELS[request.param]
    torch.manual_seed(0)
    fp32_dir = tmp_path_factory.mktemp(f"{request.param}-fp32")
    build().save_pretrained(fp32_dir)
    int8_dir = tmp_path_factory.mktemp(f"{request.param}-int8")
    auto.from_pretrained(fp32_dir, quantization_config=optim8.Int8Config()).save_pretrained(int8_dir)
    return request.param, int8_dir, auto, targets


def lora_model(int8_dir, *, dtype=torch.float32, gradient_checkpointing=False, seed=0, **lora_kwargs):
    name, path, auto, targets = int8_dir
    model = optim8.prepare_for_lora(
        auto.from_pretrained(path, dtype=dtype), gradient_checkpointing=gradient_checkpointing
    )
    torch.manual_seed(seed)
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets, **lora_kwargs)
    if name == "bert":
        config.task_type = "SEQ_CLS"  # the classifier head trains in full (modules_to_save)
    return peft.get_peft_model(model, config)


def lora_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLinear8bitLt)}


def logits(model, name):
    with torch.no_grad():
        return model(input_ids=batch(name)["input_ids"]).logits


def train(model, name, steps, lr=3e-2):
    """``steps`` AdamW steps fitting one fixed batch; returns the losses."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses = []
    inputs = batch(name)
    for step in range(steps):
        loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses


def test_prepare_for_lora_freezes_keeps_norms_fp32_and_checkpoints(int8_dir):
    name, path, auto, targets = int8_dir
    model = auto.from_pretrained(path, dtype=torch.bfloat16)
    prepared = optim8.prepare_for_lora(model)
    assert prepared is model
    assert not any(p.requires_grad for p in model.parameters())
    norms = [m for m in model.modules() if type(m).__name__.endswith("Norm")]
    assert norms and all(p.dtype == torch.float32 for m in norms for p in m.parameters())
    others = {p.dtype for m in model.modules() if m not in norms for p in m.parameters(recurse=False)}
    assert others == {torch.bfloat16, torch.int8}  # nothing else was upcast
    assert model.is_activation_checkpointing and not model.config.use_cache
    # norms compute in fp32 but hand on the activation dtype
    seen = []
    hook = norms[0].register_forward_hook(lambda m, args, out: seen.append((args[0].dtype, out.dtype)))
    logits(model, name)
    hook.remove()
    assert seen == [(torch.float32, torch.bfloat16)]
    # input embeddings' output requires grad (gradients reach adapters in checkpointed blocks)
    embedded = model.get_input_embeddings()(batch(name)["input_ids"])
    assert embedded.requires_grad
    optim8.prepare_for_lora(model)  # idempotent: no second pair of hooks
    assert len(norms[0]._forward_hooks) == 1 and len(norms[0]._forward_pre_hooks) == 1


def test_lora_layers_wrap_int8_bases(int8_dir):
    name, path, auto, targets = int8_dir
    model = lora_model(int8_dir)
    layers = lora_layers(model)
    assert len(layers) == 3 * 2  # three targets per block, two blocks
    for layer in layers.values():
        base = layer.get_base_layer()
        assert isinstance(base, Linear8bitLt) and base.weight.dtype == torch.int8
        assert layer.lora_A["default"].weight.dtype == torch.float32
    # at initialization (lora_B = 0) the adapters change nothing
    base = transformers_model(int8_dir)
    assert torch.equal(logits(model, name), logits(base, name))


def transformers_model(int8_dir, dtype=torch.float32):
    name, path, auto, targets = int8_dir
    return auto.from_pretrained(path, dtype=dtype)


def test_adapters_start_in_the_compute_dtype(int8_dir):
    model = lora_model(int8_dir, dtype=torch.bfloat16)
    # peft's default autocast_adapter_dtype=True keeps trainable adapters in fp32 ...
    assert {p.dtype for n, p in model.named_parameters() if "lora_" in n} == {torch.float32}
    name, path, auto, targets = int8_dir
    base = optim8.prepare_for_lora(auto.from_pretrained(path, dtype=torch.bfloat16), gradient_checkpointing=False)
    config = peft.LoraConfig(r=4, target_modules=targets)
    bf16 = peft.get_peft_model(base, config, autocast_adapter_dtype=False)
    # ... and without it they are created in the model's compute dtype, not in int8 or fp32.
    assert {p.dtype for n, p in bf16.named_parameters() if "lora_" in n} == {torch.bfloat16}
    out = bf16(**batch(name))
    assert out.logits.dtype == torch.bfloat16
    out.loss.backward()
    assert all(p.grad is not None for n, p in bf16.named_parameters() if "lora_B" in n)


@pytest.mark.parametrize("gradient_checkpointing", [False, True])
def test_lora_trains_and_only_adapters_change(int8_dir, gradient_checkpointing):
    name, path, auto, targets = int8_dir
    model = lora_model(int8_dir, gradient_checkpointing=gradient_checkpointing)
    before = {n: t.detach().clone() for n, t in model.state_dict(keep_vars=True).items()}
    losses = train(model, name, steps=8)
    # a random tiny model fitting one batch: the loss falls at every step
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < 0.95 * losses[0], losses
    after = model.state_dict()
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert changed == {n for n in trainable if n in after}
    assert all("lora_" in n or "classifier" in n for n in changed), changed
    assert any("lora_A" in n for n in changed) and any("lora_B" in n for n in changed)
    assert all(after[n].dtype == torch.int8 for n in after if n.endswith("base_layer.weight"))


def test_gradient_checkpointing_gives_the_same_gradients(int8_dir):
    name, path, auto, targets = int8_dir
    grads = []
    for checkpointing in (False, True):
        model = lora_model(int8_dir, gradient_checkpointing=checkpointing, init_lora_weights="gaussian")
        model.train()
        model(**batch(name)).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for key in grads[0]:
        torch.testing.assert_close(grads[0][key], grads[1][key], rtol=1e-5, atol=1e-7)


def test_merge_and_unload_requantizes(int8_dir, tmp_path):
    name, path, auto, targets = int8_dir
    model = lora_model(int8_dir)
    train(model, name, steps=4)
    expected_weights = {}
    for layer_name, layer in lora_layers(model).items():
        base = layer.get_base_layer()
        expected_weights[layer_name] = base.dequantize(torch.float32) + layer.get_delta_weight("default").float()
    unmerged_logits = logits(model, name)

    merged = model.merge_and_unload()
    assert not any(isinstance(m, LoraLinear8bitLt) for m in merged.modules())
    for layer_name, expected in expected_weights.items():
        layer = merged.get_submodule(layer_name.removeprefix("base_model.model."))
        assert isinstance(layer, Linear8bitLt) and layer.weight.dtype == torch.int8
        # one row-wise int8 rounding of the exact merged weight: |error| <= SCB / 2 per row
        error = (layer.dequantize(torch.float32) - expected).abs().amax(dim=1)
        assert torch.all(error <= layer.SCB * (0.5 + 1e-4)), layer_name
        assert torch.allclose(layer.SCB, expected.abs().amax(dim=1) / 127, rtol=1e-6)
    merged_logits = logits(merged, name)
    assert (merged_logits - unmerged_logits).abs().max() <= 3e-2 * unmerged_logits.abs().max()

    # a merged model is an ordinary optim8 int8 model: it saves and loads as one
    merged.save_pretrained(tmp_path)
    reloaded = auto.from_pretrained(tmp_path)
    assert torch.equal(logits(reloaded, name), merged_logits)


def test_merge_then_unmerge_restores_within_one_rounding(int8_dir):
    name, path, auto, targets = int8_dir
    model = lora_model(int8_dir, init_lora_weights="gaussian")
    layer = next(iter(lora_layers(model).values()))
    nn.init.normal_(layer.lora_B["default"].weight, std=0.05)
    base = layer.get_base_layer()
    original = base.dequantize(torch.float32)
    with pytest.warns(UserWarning, match="merged"):
        layer.merge(safe_merge=True)
        layer.merge()  # second call: warns, nothing left to merge
    assert layer.merged and not torch.equal(base.dequantize(torch.float32), original)
    merged_scale = base.SCB.clone()
    layer.unmerge()
    assert not layer.merged
    # two roundings (merge, unmerge), each <= half a step of the row scale it was made with
    bound = 0.5 * (merged_scale + base.SCB) * (1 + 1e-4)
    assert torch.all((base.dequantize(torch.float32) - original).abs().amax(dim=1) <= bound)


def test_adapter_save_and_load_round_trip(int8_dir, tmp_path):
    name, path, auto, targets = int8_dir
    model = lora_model(int8_dir)
    train(model, name, steps=3)
    expected = logits(model, name)
    model.save_pretrained(tmp_path)
    saved_keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert saved_keys and all("lora_" in k or "classifier" in k for k in saved_keys)

    fresh = optim8.prepare_for_lora(auto.from_pretrained(path), gradient_checkpointing=False)
    loaded = peft.PeftModel.from_pretrained(fresh, tmp_path)
    assert len(lora_layers(loaded)) == len(lora_layers(model))
    assert torch.equal(logits(loaded, name), expected)

    trainable = peft.PeftModel.from_pretrained(
        optim8.prepare_for_lora(auto.from_pretrained(path), gradient_checkpointing=False), tmp_path, is_trainable=True
    )
    losses = train(trainable, name, steps=2)
    assert losses[0] == pytest.approx(train(model, name, steps=1)[0], rel=1e-6)


def test_lora_variants_needing_float_weights_are_refused(int8_dir):
    with pytest.raises(ValueError, match="plain LoRA adapters only"):
        lora_model(int8_dir, use_dora=True)


@pytest.mark.cuda
def test_cuda_lora_trains_merges_and_round_trips(int8_dir, tmp_path):
    name, path, auto, targets = int8_dir
    model = optim8.prepare_for_lora(auto.from_pretrained(path, dtype=torch.bfloat16, device_map={"": 0} if GPU else None))
    torch.manual_seed(0)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, task_type="SEQ_CLS" if name == "bert" else None)
    model = peft.get_peft_model(model, config)
    optimizer = optim8.AdamW8bit([p for p in model.parameters() if p.requires_grad], lr=5e-2, weight_decay=0.0)
    model.train()
    losses = []
    inputs = {k: v.to(DEV) for k, v in batch(name).items()}
    for step in range(8):
        loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.95 * losses[0], losses
    assert all(
        m.get_base_layer().weight.dtype == torch.int8 and m.get_base_layer().weight.device.type == DEV
        for m in lora_layers(model).values()
    )
    model.eval()
    ids = batch(name)["input_ids"].to(DEV)
    with torch.no_grad():
        expected = model(input_ids=ids).logits.float()
    model.save_pretrained(tmp_path / "adapter")
    base = optim8.prepare_for_lora(auto.from_pretrained(path, dtype=torch.bfloat16, device_map={"": 0} if GPU else None))
    loaded = peft.PeftModel.from_pretrained(base, tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits.float(), expected)
        merged = loaded.merge_and_unload()
        got = merged(input_ids=ids).logits.float()
    assert (got - expected).abs().max() <= 6e-2 * expected.abs().max()
