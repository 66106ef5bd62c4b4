"""Full fine-tune (or pretraining from a config) of a causal LM: optim8's 8-bit AdamW against 32-bit AdamW.

    python recipes/full_finetune.py                          # AdamW8bit, offline defaults, about 3 minutes on a 2-core CPU
    python recipes/full_finetune.py --optim adamw            # the same run with torch.optim.AdamW (32-bit state)
    python recipes/full_finetune.py --from-config --config-overrides num_hidden_layers=4  # pretrain from scratch

Every weight trains. The optimizer is the point of comparison: ``--optim adamw8bit`` keeps Adam's
two moments as blockwise-quantized 8-bit codes (about 2 bytes of state per parameter instead of 8),
``--optim adamw`` is ``torch.optim.AdamW``. Run both with the same seed and compare the summaries'
``optimizer state`` and ``peak memory`` lines and their loss curves (``loss.png`` in each output
directory, or ``summary.json``).

With ``adamw8bit`` the input embeddings keep 32-bit state by default (``--embedding-state-bits``),
as recommended for 8-bit optimizers: rows of rare tokens see rare, spiky gradients that 8-bit
blocks shared with frequent tokens represent poorly.

``--from-config`` builds the model from ``--model``'s configuration with freshly initialized
weights (``--config-overrides`` changes sizes), i.e. pretraining on ``--data``.

On a CUDA GPU the weights stay fp32 (master weights), activations run under bf16 autocast (fp16
where bf16 is missing) and optim8's optimizer runs its CUDA kernel; on a CPU everything is fp32.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

import _common as common

RECIPE = "full_finetune"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="full_finetune.py",
        description="Full fine-tune or pretraining of a causal LM with optim8.AdamW8bit or torch.optim.AdamW, through Trainer.",
    )
    common.add_common_arguments(parser, recipe=RECIPE, max_steps=40, seq_len=64, batch_size=4, lr=5e-5)
    group = parser.add_argument_group("optimizer and model")
    group.add_argument("--optim", default="adamw8bit", choices=["adamw8bit", "adamw"], help=(
        "adamw8bit: optim8.AdamW8bit (8-bit moments); adamw: torch.optim.AdamW (32-bit moments) (default: %(default)s)"))
    group.add_argument("--embedding-state-bits", type=int, default=32, choices=[8, 32], help=(
        "optimizer-state precision of the input embeddings with adamw8bit (default: %(default)s)"))
    group.add_argument("--from-config", action="store_true", help=(
        "initialize the weights randomly from --model's configuration (pretraining) instead of loading them"))
    group.add_argument("--config-overrides", default=None, help=(
        "with --from-config: comma-separated key=value changes to the configuration, "
        "e.g. num_hidden_layers=4,hidden_size=256,intermediate_size=768"))
    group.add_argument("--save", action=argparse.BooleanOptionalAction, default=True, help=(
        "save the trained model and tokenizer to OUTPUT_DIR/model (default: save)"))
    return parser


def parse_overrides(parser: argparse.ArgumentParser, text: str | None) -> dict:
    if not text:
        return {}
    overrides = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            parser.error(f"--config-overrides: expected key=value, got {item!r}")
        try:
            overrides[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            overrides[key.strip()] = value.strip()
    return overrides


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    common.check_common_arguments(parser, args)
    if args.config_overrides and not args.from_config:
        parser.error("--config-overrides only applies with --from-config")
    args.config_overrides = parse_overrides(parser, args.config_overrides)
    if args.gradient_checkpointing is None:
        args.gradient_checkpointing = False
    args.output_dir = Path(args.output_dir)
    return args


def build_model(args: argparse.Namespace, model_source: str, runtime: common.Runtime):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if not args.from_config:
        # fp32 master weights everywhere; Trainer's autocast gives bf16/fp16 compute on a GPU.
        return AutoModelForCausalLM.from_pretrained(model_source, dtype=torch.float32)
    config = AutoConfig.from_pretrained(model_source)
    unknown = sorted(k for k in args.config_overrides if not hasattr(config, k))
    if unknown:
        raise common.RecipeError(f"--config-overrides: {type(config).__name__} has no attribute(s) {unknown}")
    for key, value in args.config_overrides.items():
        setattr(config, key, value)
    try:
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    except (ValueError, TypeError, AssertionError) as error:
        raise common.RecipeError(f"cannot build a model from the configuration with --config-overrides {args.config_overrides}: {error}") from None


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    started = common.now()

    import torch
    from transformers import Trainer, default_data_collator, set_seed

    import optim8

    set_seed(args.seed)
    runtime = common.detect_runtime()
    model_source, model_description = common.resolve_model(args.model)
    dataset, data_description = common.load_text(args)
    tokenizer = common.load_tokenizer(model_source)
    train_set, eval_set, data_tokens = common.build_blocks(dataset, tokenizer, args)

    model = build_model(args, model_source, runtime)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        raise common.RecipeError(f"the tokenizer has {len(tokenizer)} tokens but the model's embeddings only {model.get_input_embeddings().num_embeddings}")
    model.to(runtime.device)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False

    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            # Norm weights and biases are not decayed (the usual transformer recipe).
            (no_decay if param.ndim < 2 else decay).append(param)
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if args.optim == "adamw8bit":
        if args.embedding_state_bits == 32:
            optim8.set_optim_bits(model.get_input_embeddings(), 32)
        optimizer = optim8.AdamW8bit(groups, lr=args.lr)
        optimizer_name = f"optim8.AdamW8bit (embeddings: {args.embedding_state_bits}-bit state)"
    else:
        optimizer = torch.optim.AdamW(groups, lr=args.lr)
        optimizer_name = "torch.optim.AdamW (32-bit state)"
    scheduler = common.make_scheduler(optimizer, args)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

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

    outputs = {}
    if args.save:
        model_dir = args.output_dir / "model"
        trainer.save_model(str(model_dir))
        outputs["model"] = str(model_dir)

    peak, peak_kind = common.peak_memory(runtime)
    train_seconds = result.metrics["train_runtime"]
    batch_tokens = args.batch_size * args.grad_accum * args.seq_len
    if args.from_config:
        overrides = ", ".join(f"{k}={v}" for k, v in args.config_overrides.items())
        model_description = f"random init from the configuration of {model_description}" + (f" with {overrides}" if overrides else "")
    record = common.RunRecord(
        recipe=RECIPE,
        model=model_description,
        data=data_description,
        device=runtime.describe(),
        cuda_kernels=common.cuda_kernels_active() if args.optim == "adamw8bit" else "not used (torch.optim.AdamW)",
        optimizer=f"{optimizer_name} lr={args.lr:g} ({args.scheduler}, warm-up {common.warmup_steps(args)} steps)",
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
        outputs=outputs,
        extra={"optim": args.optim, "from_config": args.from_config, "gradient_checkpointing": args.gradient_checkpointing,
               "model_source": model_source},
    )
    record.total_seconds = common.now() - started
    common.finish(record, trainer.state.log_history, args.output_dir)


if __name__ == "__main__":
    sys.exit(common.run_main(main, sys.argv[1:]))
