"""LoRA fine-tune of an int8 causal LM with optim8: the main recipe.

    python recipes/lora_finetune.py                        # offline defaults, about 3 minutes on a 2-core CPU
    python recipes/lora_finetune.py --model Qwen/Qwen2.5-0.5B --data my_text.jsonl --max-steps 500
    python recipes/lora_finetune.py --bits 4                # QLoRA: NF4 base with double quantization

What it does:

1. loads the model with ``quantization_config=optim8.Int8Config()``: every linear layer but the
   output head becomes an LLM.int8() ``optim8.Linear8bitLt`` while the checkpoint streams in;
2. ``optim8.prepare_for_lora``: freezes the base, keeps norms in fp32, enables activation
   checkpointing; ``peft.get_peft_model`` adds LoRA adapters (optim8's LoRA layer over
   ``Linear8bitLt`` is registered with peft by ``import optim8``);
3. trains the adapters with transformers' ``Trainer`` and ``optim8.AdamW8bit`` (8-bit blockwise
   Adam moments) under a warm-up + cosine schedule, on text cut into ``--seq-len`` token blocks;
4. evaluates the held-out blocks before and after training, saves the adapters (peft format,
   reloadable with ``peft.PeftModel.from_pretrained``) and the tokenizer, plots the loss curve,
   writes ``summary.json`` and prints a summary (peak memory, time, tokens/s, losses, outputs).

On a CUDA GPU the same command puts the model on the GPU, computes in bf16 (fp16 where bf16 is
missing) and optim8's int8 matmul and optimizer run their CUDA kernels; on a CPU everything runs
optim8's PyTorch reference path in fp32.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import _common as common

RECIPE = "lora_finetune"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lora_finetune.py",
        description="LoRA fine-tune of an int8 (LLM.int8()) causal LM with optim8.AdamW8bit and Trainer.",
    )
    common.add_common_arguments(parser, recipe=RECIPE, max_steps=64, seq_len=64, batch_size=4, lr=1e-3)
    lora = parser.add_argument_group("LoRA")
    lora.add_argument("--lora-r", type=int, default=16, help="adapter rank (default: %(default)s)")
    lora.add_argument("--lora-alpha", type=float, default=32.0, help="adapter scale numerator; scale = alpha / r (default: %(default)s)")
    lora.add_argument("--lora-dropout", type=float, default=0.05, help="dropout on the adapter input (default: %(default)s)")
    lora.add_argument("--lora-targets", default="all-linear", help=(
        "comma-separated module names to adapt (e.g. q_proj,v_proj), or all-linear for every linear layer "
        "but the output head (default: %(default)s)"))
    int8 = parser.add_argument_group("quantized base")
    int8.add_argument("--bits", type=int, default=8, choices=[8, 4], help=(
        "8: LLM.int8() Linear8bitLt base; 4: QLoRA Linear4bit base (default: %(default)s)"))
    int8.add_argument("--quant-type", default="nf4", choices=["nf4", "fp4"], help="4-bit code (default: %(default)s)")
    int8.add_argument("--threshold", type=float, default=6.0, help=(
        "LLM.int8() outlier threshold: input columns with a magnitude at or above it run in float "
        "(0 turns the decomposition off; default: %(default)s)"))
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    common.check_common_arguments(parser, args)
    if args.lora_r < 1:
        parser.error(f"--lora-r must be >= 1, got {args.lora_r}")
    if not 0 <= args.lora_dropout < 1:
        parser.error(f"--lora-dropout must be in [0, 1), got {args.lora_dropout}")
    if args.threshold < 0:
        parser.error(f"--threshold must be >= 0, got {args.threshold}")
    targets = [t.strip() for t in args.lora_targets.split(",") if t.strip()]
    if not targets:
        parser.error("--lora-targets is empty")
    args.lora_targets = "all-linear" if targets == ["all-linear"] else targets
    if args.gradient_checkpointing is None:
        args.gradient_checkpointing = True
    args.output_dir = Path(args.output_dir)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    started = common.now()

    import torch

    import optim8  # registers Int8Config with transformers and the LoRA layer with peft
    import peft
    from transformers import AutoModelForCausalLM, Trainer, default_data_collator, set_seed

    set_seed(args.seed)
    runtime = common.detect_runtime()
    model_source, model_description = common.resolve_model(args.model)
    dataset, data_description = common.load_text(args)
    tokenizer = common.load_tokenizer(model_source)
    train_set, eval_set, data_tokens = common.build_blocks(dataset, tokenizer, args)

    if args.bits == 4:
        quantization_config = optim8.Int4Config(quant_type=args.quant_type, compute_dtype=runtime.compute_dtype)
        layer_class = optim8.Linear4bit
    else:
        quantization_config = optim8.Int8Config(threshold=args.threshold)
        layer_class = optim8.Linear8bitLt
    model = AutoModelForCausalLM.from_pretrained(
        model_source,
        quantization_config=quantization_config,
        dtype=runtime.compute_dtype,
        device_map={"": runtime.device.index} if runtime.device.type == "cuda" else None,
    )
    quantized = [m for m in model.modules() if isinstance(m, layer_class)]
    n_int8 = len(quantized)
    if n_int8 == 0:
        raise common.RecipeError(f"{model_description} has no linear layers that {type(quantization_config).__name__} quantized; LoRA over a quantized base needs nn.Linear layers")
    base_weights = sum(m.in_features * m.out_features for m in quantized)
    base_bytes = sum(m.nbytes() if args.bits == 4 else m.weight.numel() + 4 * m.SCB.numel() for m in quantized)
    model = optim8.prepare_for_lora(model, gradient_checkpointing=args.gradient_checkpointing)
    lora_config = peft.LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=args.lora_targets,
        task_type="CAUSAL_LM",
    )
    try:
        model = peft.get_peft_model(model, lora_config)
    except ValueError as error:
        names = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise common.RecipeError(f"--lora-targets {','.join(args.lora_targets) if isinstance(args.lora_targets, list) else args.lora_targets}: "
                                 f"{str(error).splitlines()[0]} (the model's linear layers are named {names})") from None
    trainable, total = model.get_nb_trainable_parameters()

    trainable_params = [p for p in model.parameters() if p.requires_grad]
    optimizer = optim8.AdamW8bit(trainable_params, lr=args.lr, weight_decay=args.weight_decay)
    scheduler = common.make_scheduler(optimizer, args)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(
        model=model,
        args=common.make_training_arguments(args, runtime),
        train_dataset=train_set,
        eval_dataset=eval_set,
        data_collator=default_data_collator,
        processing_class=tokenizer,
        optimizers=(optimizer, scheduler),
    )
    common.EvalProgress.install(trainer)  # the before/after evaluation bars say "evaluating"

    common.reset_peak_memory(runtime)
    eval_before = trainer.evaluate()["eval_loss"]
    result = trainer.train()
    eval_after = trainer.evaluate()["eval_loss"]

    adapter_dir = args.output_dir / "adapter"
    model.save_pretrained(adapter_dir)
    tokenizer.save_pretrained(adapter_dir)

    peak, peak_kind = common.peak_memory(runtime)
    train_seconds = result.metrics["train_runtime"]
    batch_tokens = args.batch_size * args.grad_accum * args.seq_len
    record = common.RunRecord(
        recipe=RECIPE,
        model=f"{model_description}; "
              + (f"int8 base ({n_int8} Linear8bitLt, threshold {args.threshold:g}), " if args.bits == 8 else
                 f"4-bit base ({n_int8} Linear4bit, {args.quant_type}, double quant), ")
              + f"{8 * base_bytes / base_weights:.3f} bits/weight, "
              f"LoRA r={args.lora_r} alpha={args.lora_alpha:g} on {args.lora_targets if isinstance(args.lora_targets, str) else ','.join(args.lora_targets)}",
        data=data_description,
        device=runtime.describe(),
        cuda_kernels=common.cuda_kernels_active(),
        optimizer=f"optim8.AdamW8bit lr={args.lr:g} ({args.scheduler}, warm-up {common.warmup_steps(args)} steps)",
        steps=trainer.state.global_step,
        batch_tokens=batch_tokens,
        train_blocks=len(train_set),
        eval_blocks=len(eval_set),
        data_tokens=data_tokens,
        trainable_params=trainable,
        total_params=total,
        train_seconds=train_seconds,
        train_tokens_per_second=trainer.state.global_step * batch_tokens / train_seconds,
        eval_loss_before=eval_before,
        eval_loss_after=eval_after,
        peak_memory_bytes=peak,
        peak_memory_kind=peak_kind,
        optimizer_state_bytes=common.optimizer_state_bytes(optimizer),
        outputs={"adapters": str(adapter_dir)},
        extra={"gradient_checkpointing": args.gradient_checkpointing, "model_source": model_source, "bits": args.bits,
               "base_bytes_per_weight": base_bytes / base_weights},
    )
    record.total_seconds = common.now() - started
    common.finish(record, trainer.state.log_history, args.output_dir)


if __name__ == "__main__":
    sys.exit(common.run_main(main, sys.argv[1:]))
