"""End to end: LoRA r=16 on every linear layer of a 1.1B Llama-shaped model, fp16/bf16 base vs int8 base.

    python benchmarks/e2e_lora.py [--steps 20] [--dtype fp16] [--out benchmarks/results/e2e_lora_<dtype>.md]

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
weight bytes saved.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import time

import torch
from torch import nn

import optim8
from _common import write_report

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BATCH, SEQ = 4, 1024


def build(dtype):
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        use_cache=False,
    )
    torch.manual_seed(0)
    with torch.device("cuda"):
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


def run(label, model, steps):
    import peft

    for param in model.parameters():
        param.requires_grad_(False)
    config = peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS)
    model = peft.get_peft_model(model, config)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    weight_bytes = linear_weight_bytes(model)
    ids = torch.randint(0, 32000, (BATCH, SEQ), device="cuda")

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(3 + steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = step()
        torch.cuda.synchronize()
        if i >= 3:
            times.append(time.perf_counter() - t0)
    times.sort()
    step_s = times[len(times) // 2]
    peak = torch.cuda.max_memory_allocated() / 2**30
    result = {
        "label": label,
        "tokens_per_s": BATCH * SEQ / step_s,
        "step_ms": step_s * 1e3,
        "peak_gib": peak,
        "linear_weight_gib": weight_bytes / 2**30,
        "loss": loss.item(),
        "trainable": sum(p.numel() for p in params),
    }
    print(result, flush=True)
    return result


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--dtype", choices=["fp16", "bf16"], default="fp16")
    ap.add_argument("--out", default=None, help="default: benchmarks/results/e2e_lora_<dtype>.md")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    results = []

    model = build(dtype)
    results.append(run(f"{args.dtype} base", model, args.steps))
    del model
    gc.collect()
    torch.cuda.empty_cache()

    model = optim8.quantize_model(build(dtype), threshold=6.0, skip=("lm_head",))
    results.append(run("optim8 int8 base (threshold 6)", model, args.steps))
    del model
    gc.collect()
    torch.cuda.empty_cache()

    try:
        import bitsandbytes  # noqa: F401

        bnb_ok = dtype == torch.float16
    except Exception:  # not installed, or installed without a matching CUDA library
        bnb_ok = False
    if bnb_ok:
        model = swap_bnb(build(dtype))
        results.append(run(f"bitsandbytes {bitsandbytes.__version__} int8 base (threshold 6)", model, args.steps))
        del model

    base = results[0]
    lines = [
        f"# LoRA r=16 on all linear layers, 1.1B Llama shapes ({datetime.date.today()}, "
        f"{torch.cuda.get_device_name()}, torch {torch.__version__})",
        "",
        f"{BATCH}x{SEQ} tokens a step, torch fused AdamW on the adapters, no gradient checkpointing, "
        f"median of {args.steps} steps after 3 warm-up steps. Peak: torch.cuda.max_memory_allocated during training.",
        "",
        "| base | tokens/s | vs float | step ms | peak GiB | peak - float peak | linear weights GiB | last loss |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        lines.append(
            f"| {r['label']} | {r['tokens_per_s']:,.0f} | {r['tokens_per_s'] / base['tokens_per_s']:.2f}x "
            f"| {r['step_ms']:.1f} | {r['peak_gib']:.2f} | {r['peak_gib'] - base['peak_gib']:+.2f} "
            f"| {r['linear_weight_gib']:.2f} | {r['loss']:.3f} |"
        )
    write_report(lines, args.out or f"benchmarks/results/e2e_lora_{args.dtype}.md")


if __name__ == "__main__":
    main()
