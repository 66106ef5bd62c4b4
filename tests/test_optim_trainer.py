"""optim8.AdamW8bit inside transformers.Trainer, both ways Trainer accepts an optimizer (CPU)."""

import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

import optim8  # noqa: E402

VOCAB = 97


def tiny_llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
    )
    return transformers.LlamaForCausalLM(config)


def dataset():
    gen = torch.Generator().manual_seed(0)
    # a learnable pattern (each token repeats its predecessor + 1) so the loss must fall
    out = []
    for _ in range(32):
        start = int(torch.randint(0, VOCAB, (1,), generator=gen))
        ids = (torch.arange(16) + start) % VOCAB
        out.append({"input_ids": ids, "labels": ids.clone()})
    return out


def args(tmp_path, steps):
    return transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=8, learning_rate=5e-3,
        logging_steps=1, report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0,
    )


def losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_trainer_optimizer_cls_and_kwargs(tmp_path):
    model = tiny_llama()
    trainer = transformers.Trainer(
        model=model, args=args(tmp_path, 12), train_dataset=dataset(),
        optimizer_cls_and_kwargs=(optim8.AdamW8bit, {"lr": 5e-3, "min_8bit_size": 1024}),
    )
    trainer.train()
    opt = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    assert isinstance(opt, optim8.AdamW8bit)
    # Trainer's two groups (decay / no decay) and 8-bit state for the matrices
    assert len(opt.param_groups) == 2
    assert any("exp_avg_absmax" in s for s in opt.state.values())
    ls = losses(trainer)
    assert ls[-1] < 0.8 * ls[0], ls


def test_trainer_optimizers_tuple(tmp_path):
    model = tiny_llama()
    opt = optim8.AdamW8bit(model.parameters(), lr=5e-3, min_8bit_size=1024)
    sched = transformers.get_linear_schedule_with_warmup(opt, num_warmup_steps=2, num_training_steps=12)
    trainer = transformers.Trainer(model=model, args=args(tmp_path, 12), train_dataset=dataset(), optimizers=(opt, sched))
    trainer.train()
    assert all(s["step"] == 12 for s in opt.state.values())
    ls = losses(trainer)
    assert ls[-1] < 0.8 * ls[0], ls


FAMILY_LR = {
    optim8.Lion8bit: 5e-4, optim8.SGD8bit: 5e-2, optim8.RMSprop8bit: 1e-3, optim8.Adagrad8bit: 2e-2,
    optim8.AdEMAMix8bit: 5e-3,
}


@pytest.mark.parametrize("cls", list(FAMILY_LR), ids=lambda c: c.__name__)
def test_trainer_with_each_optimizer(tmp_path, cls):
    """Trainer builds each optimizer; nn.Embedding weights get 32-bit state with no extra code."""
    model = tiny_llama()
    trainer = transformers.Trainer(
        model=model, args=args(tmp_path, 6), train_dataset=dataset(),
        optimizer_cls_and_kwargs=(cls, {"lr": FAMILY_LR[cls], "min_8bit_size": 1024}),
    )
    trainer.train()
    opt = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    assert isinstance(opt, cls)
    emb = model.get_input_embeddings().weight
    assert emb.numel() >= 1024 and not any(k.endswith("_absmax") for k in opt.state[emb])
    assert any(k.endswith("_absmax") for s in opt.state.values() for k in s)
    ls = losses(trainer)
    assert all(math.isfinite(x) for x in ls) and ls[-1] < ls[0], ls
