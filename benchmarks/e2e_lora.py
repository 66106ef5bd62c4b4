"""End to end: LoRA r=16 on every linear layer of a 1.1B Llama-shaped model, fp16/bf16 base vs int8 base.

    python benchmarks/e2e_lora.py [--steps 20] [--dtype fp16] [--out benchmarks/results/e2e_lora_<dtype>.md] [--dry-run]

Random weights (a model built from a config; nothing is downloaded), TinyLlama shapes:
hidden 2048, 22 layers, MLP 5632, 32 heads, 4 KV heads of 64, vocab 32000. Each step is
4 sequences of 1024 random tokens: forward, causal-LM loss, backward, torch AdamW step on
the adapters. No gradient checkpointing. Runs, in one process, one after the other:

* float base: the model in --dtype, LoRA adapters from peft;
* optim8 int8 base: the same model after ``optim8.quantize_model`` (threshold 6, lm_head
  kept in float), LoRA adapters from peft over ``Linear8bitLt`` (optim8 registers them);
* bitsandbytes int8 base (threshold 6, fp16 only), where bitsandbytes is importable.

Reports tokens/s (median step time over --steps after 3 warm-up steps) and the peak GPU
memory of training (model, adapters, activations, optimizer; the set-up is excluded).
Bars (issue 4): int8 >= 0.8x the float tokens/s, peak below the float run's by about the
weight bytes saved; both are printed as ``SUMMARY`` lines. ``--dry-run``: a 2-layer,
hidden-64, vocab-512 Llama, 2 x 32 tokens, 1 step after 1 warm-up, on the CPU with the host
device running optim8's kernels (``_common.py``); no bitsandbytes, no memory statistics.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import time

import torch
from torch import nn

import _common as C
import optim8

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BATCH, SEQ, WARMUP = 4, 1024, 3
SHAPE = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4)
DRY_BATCH, DRY_SEQ, DRY_WARMUP, DRY_STEPS = 2, 32, 1, 1
DRY_SHAPE = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def build(dtype):
    import transformers

    config = transformers.LlamaConfig(
        **(DRY_SHAPE if C.dry_run() else SHAPE),
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        use_cache=False,
    )
    torch.manual_seed(0)
    with C.device():
        model = transformers.LlamaForCausalLM(config).to(dtype)
    model.config.use_cache = False
    return model


def swap_bnb(model):
    """Replace every nn.Linear but lm_head by bitsandbytes' Linear8bitLt (threshold 6), one at a time."""
    import bitsandbytes as bnb

    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear or name.endswith("lm_head"):
            continue
        layer = bnb.nn.Linear8bitLt(
            module.in_features, module.out_features, bias=module.bias is not None, has_fp16_weights=False, threshold=6.0
        )
        layer.weight = bnb.nn.Int8Params(module.weight.detach().cpu(), requires_grad=False, has_fp16_weights=False)
        if module.bias is not None:
            layer.bias = nn.Parameter(module.bias.detach(), requires_grad=False)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer.cuda())
    return model


def linear_weight_bytes(model) -> int:
    total = 0
    for module in model.modules():
        if isinstance(module, nn.Linear) and module.weight is not None:
            total += module.weight.numel() * module.weight.element_size()
    return total


def run(label, model, steps, batch=BATCH, seq=SEQ, warmup=WARMUP):
    import peft

    for param in model.parameters():
        param.requires_grad_(False)
    config = peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS)
    model = peft.get_peft_model(model, config)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    weight_bytes = linear_weight_bytes(model)
    n_params = sum(p.numel() for p in model.parameters())
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), device=C.device())

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    gc.collect()
    C.empty_cache()
    C.reset_peak_memory()
    times = []
    for i in range(warmup + steps):
        C.sync()
        t0 = time.perf_counter()
        loss = step()
        C.sync()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    times.sort()
    step_s = times[len(times) // 2]
    peak = C.peak_memory_gib()
    result = {
        "label": label,
        "params": n_params,
        "tokens_per_s": batch * seq / step_s,
        "step_ms": step_s * 1e3,
        "peak_gib": peak,
        "linear_weight_gib": weight_bytes / 2**30,
        "loss": loss.item(),
        "trainable": sum(p.numel() for p in params),
    }
    print(result, flush=True)
    return result


def gib(x, signed=False):
    return "n/a" if x is None else f"{x:{'+' if signed else ''}.2f}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=None, help=f"timed steps (default 20; {DRY_STEPS} in a dry run)")
    ap.add_argument("--dtype", choices=["fp16", "bf16"], default="fp16")
    ap.add_argument("--out", default=None, help="default: benchmarks/results/e2e_lora_<dtype>.md")
    C.add_dry_run_argument(ap)
    args = ap.parse_args()
    with C.session(args.dry_run):
        bench(args)


def bench(args):
    dry = C.dry_run()
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    steps = args.steps or (DRY_STEPS if dry else 20)
    shape = dict(batch=DRY_BATCH, seq=DRY_SEQ, warmup=DRY_WARMUP) if dry else dict(batch=BATCH, seq=SEQ, warmup=WARMUP)
    results = []

    model = build(dtype)
    results.append(run(f"{args.dtype} base", model, steps, **shape))
    del model
    gc.collect()
    C.empty_cache()

    model = optim8.quantize_model(build(dtype), threshold=6.0, skip=("lm_head",))
    results.append(run("optim8 int8 base (threshold 6)", model, steps, **shape))
    del model
    gc.collect()
    C.empty_cache()

    try:
        import bitsandbytes  # noqa: F401

        bnb_ok = dtype == torch.float16 and not dry  # its int8 layer is a CUDA one
    except Exception:  # not installed, or installed without a matching CUDA library
        bnb_ok = False
    if bnb_ok:
        model = swap_bnb(build(dtype))
        results.append(run(f"bitsandbytes {bitsandbytes.__version__} int8 base (threshold 6)", model, steps, **shape))
        del model

    base = results[0]
    batch, seq, warmup = shape["batch"], shape["seq"], shape["warmup"]
    n = base["params"]
    size = C.params(n)
    lines = [
        f"# LoRA r=16 on all linear layers, {'1.1B Llama shapes' if not dry else f'{size} Llama (dry run)'} ({datetime.date.today()}, "
        f"{C.device_name()}, torch {torch.__version__})",
        "",
        f"{batch}x{seq} tokens a step, torch fused AdamW on the adapters, no gradient checkpointing, "
        f"median of {steps} steps after {warmup} warm-up steps. Peak: torch.cuda.max_memory_allocated during training.",
        "",
        "| base | tokens/s | vs float | step ms | peak GiB | peak - float peak | linear weights GiB | last loss |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    if dry:
        lines[2:2] = ["Dry run: a tiny model on the CPU, optim8's CUDA kernels on the host device; not speeds.", ""]
    for r in results:
        delta = None if r["peak_gib"] is None else r["peak_gib"] - base["peak_gib"]
        lines.append(
            f"| {r['label']} | {r['tokens_per_s']:,.0f} | {r['tokens_per_s'] / base['tokens_per_s']:.2f}x "
            f"| {r['step_ms']:.1f} | {gib(r['peak_gib'])} | {gib(delta, signed=True)} "
            f"| {r['linear_weight_gib']:.2f} | {r['loss']:.3f} |"
        )
    C.write_report(lines, C.report_path(args.out, f"e2e_lora_{args.dtype}.md"))
    o8 = results[1]
    head = f"e2e LoRA r=16 {size} {args.dtype}"
    C.summary(f"{head}: optim8 int8 base vs {args.dtype} base tokens/s", C.ratio(o8["tokens_per_s"], base["tokens_per_s"]), ">= 0.8x")
    saved = base["linear_weight_gib"] - o8["linear_weight_gib"]
    delta = None if o8["peak_gib"] is None else o8["peak_gib"] - base["peak_gib"]
    C.summary(f"{head}: optim8 int8 base peak - {args.dtype} base peak", "n/a" if delta is None else ("+" if delta >= 0 else "") + C.memory(delta),
              f"about -{C.memory(saved)} (linear weight bytes saved)")
    for r in results[2:]:
        C.summary(f"{head}: {r['label'].split(' int8')[0]} int8 base vs {args.dtype} base tokens/s",
                  C.ratio(r["tokens_per_s"], base["tokens_per_s"]), "-")


if __name__ == "__main__":
    main()
