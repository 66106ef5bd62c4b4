"""Trainer LoRA fine-tune of an int8 model with optim8.AdamW8bit: checkpoint, resume, same result.

A tiny Llama-style model (random weights, built from a config) is saved, loaded in int8 through
optim8.Int8Config, given LoRA adapters and trained 6 steps with a checkpoint at step 3. A second
run loads the step-3 checkpoint into fresh objects and must end bit-identical to the first.
"""

import os

import pytest
import torch
from devices import DEV, GPU

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import optim8  # noqa: E402

from tiny_models import VOCAB, llama_config  # noqa: E402

STEPS, SAVE_AT = 6, 3


@pytest.fixture(scope="module")
def int8_dir(tmp_path_factory):
    config = llama_config()
    torch.manual_seed(0)
    fp32_dir = tmp_path_factory.mktemp("llama-fp32")
    transformers.LlamaForCausalLM(config).save_pretrained(fp32_dir)
    int8_dir = tmp_path_factory.mktemp("llama-int8")
    model = transformers.AutoModelForCausalLM.from_pretrained(fp32_dir, quantization_config=optim8.Int8Config())
    model.save_pretrained(int8_dir)
    return int8_dir


def dataset():
    generator = torch.Generator().manual_seed(3)
    # 12 examples, batch 2: one epoch is the 6 steps, so the resumed run must skip 3 batches exactly
    examples = []
    for _ in range(12):
        ids = torch.randint(0, VOCAB, (10,), generator=generator)
        examples.append({"input_ids": ids, "labels": ids.clone()})
    return examples


def run(int8_dir, output_dir, *, resume_from=None, device="cpu", dtype=torch.float32):
    """One Trainer run; returns (trainer, optimizer)."""
    # on the GPU: eager attention, whose kernels all have deterministic implementations
    gpu = {"device_map": {"": 0}, "attn_implementation": "eager"} if device == "cuda" else {}
    model = transformers.AutoModelForCausalLM.from_pretrained(int8_dir, dtype=dtype, **gpu)
    model = optim8.prepare_for_lora(model, gradient_checkpointing=True)
    torch.manual_seed(1)  # adapter init; a resumed run overwrites it from the checkpoint anyway
    config = peft.LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.1, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"]
    )
    model = peft.get_peft_model(model, config)
    optimizer = optim8.AdamW8bit(
        [p for p in model.parameters() if p.requires_grad], lr=2e-2, weight_decay=1e-2, min_8bit_size=256
    )
    scheduler = transformers.get_linear_schedule_with_warmup(optimizer, num_warmup_steps=2, num_training_steps=STEPS)
    args = transformers.TrainingArguments(
        output_dir=str(output_dir),
        max_steps=STEPS,
        per_device_train_batch_size=2,
        save_strategy="steps",
        save_steps=SAVE_AT,
        logging_steps=1,
        report_to=[],
        use_cpu=device == "cpu",
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
        full_determinism=device == "cuda",
    )
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=dataset(), optimizers=(optimizer, scheduler)
    )
    trainer.train(resume_from_checkpoint=resume_from)
    return trainer, optimizer


def losses(trainer):
    return {entry["step"]: entry["loss"] for entry in trainer.state.log_history if "loss" in entry}


def adapter_state(trainer):
    return {n: p.detach().cpu().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


def check_resume(int8_dir, tmp_path, **kwargs):
    full, full_optimizer = run(int8_dir, tmp_path / "full", **kwargs)
    checkpoint = tmp_path / "full" / f"checkpoint-{SAVE_AT}"
    assert (checkpoint / "adapter_model.safetensors").exists() and (checkpoint / "optimizer.pt").exists()
    saved_state = torch.load(checkpoint / "optimizer.pt", weights_only=True)["state"]
    assert any(t.dtype == torch.uint8 for s in saved_state.values() for t in s.values() if torch.is_tensor(t)), (
        "the LoRA parameters should have 8-bit optimizer state"
    )

    resumed, resumed_optimizer = run(int8_dir, tmp_path / "resumed", resume_from=str(checkpoint), **kwargs)

    # the resumed history is the checkpoint's (steps 1-3) followed by the steps it ran (4-6)
    full_losses, resumed_losses = losses(full), losses(resumed)
    assert sorted(full_losses) == list(range(1, STEPS + 1))
    assert resumed_losses == full_losses
    assert resumed.state.global_step == STEPS

    expected, got = adapter_state(full), adapter_state(resumed)
    assert expected.keys() == got.keys() and len(expected) == 4 * 2 * 2
    assert all(expected[n].abs().max() > 0 for n in expected if "lora_B" in n)  # B starts at zero: it trained
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    expected_state, got_state = full_optimizer.state_dict()["state"], resumed_optimizer.state_dict()["state"]
    assert expected_state.keys() == got_state.keys()
    for index in expected_state:
        for key, value in expected_state[index].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(got_state[index][key])), (index, key)


def test_trainer_resume_gives_the_uninterrupted_result(int8_dir, tmp_path):
    check_resume(int8_dir, tmp_path)


def test_trainer_refuses_an_int8_model_without_adapters(int8_dir, tmp_path):
    model = transformers.AutoModelForCausalLM.from_pretrained(int8_dir)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=1, report_to=[], use_cpu=True)
    with pytest.raises(ValueError, match="purely quantized"):
        transformers.Trainer(model=model, args=args, train_dataset=dataset())


@pytest.fixture
def restore_determinism():
    """full_determinism=True switches global torch/cuDNN/env settings on; undo them after the test."""
    environment = dict(os.environ)
    algorithms = torch.are_deterministic_algorithms_enabled()
    cudnn = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    yield
    os.environ.clear()
    os.environ.update(environment)
    torch.use_deterministic_algorithms(algorithms)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn


@pytest.mark.cuda
def test_cuda_trainer_resume_gives_the_uninterrupted_result(int8_dir, tmp_path, restore_determinism):
    # GPU attention backward may use atomics: Trainer's full_determinism makes both runs repeatable.
    check_resume(int8_dir, tmp_path, device="cuda" if GPU else "cpu", dtype=torch.bfloat16)
