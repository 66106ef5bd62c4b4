"""End-to-end full fine-tune throughput: torch fused AdamW vs optim8 AdamW8bit vs bitsandbytes AdamW8bit.

    python benchmarks/e2e_full_finetune.py [--steps 12] [--warmup 3] [--out benchmarks/results/e2e_full_finetune.md]

Model (DESIGN.md): the 291M Llama shape (hidden 1024, 20 layers, MLP 2816, 16 heads, 4 KV
heads, vocab 32000), random weights built from a config, fp32 weights, bf16 autocast, SDPA
attention, no gradient checkpointing; 8 x 1024 random tokens a step. Each optimizer gets a
fresh model with the same seed; tokens/s is measured over the timed steps (forward,
backward, optimizer step, zero_grad), peak memory is ``torch.cuda.max_memory_allocated``
over the whole run of that optimizer.
"""

from __future__ import annotations

import argparse
import importlib.util
import datetime
import gc
import time

import torch

import optim8
from _common import write_report


def build_model():
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=20,
        num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=2048,
        tie_word_embeddings=False, attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).cuda()


def run(name, make_opt, args):
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    if name.startswith("bitsandbytes") and importlib.util.find_spec("bitsandbytes") is None:
        return name, None, None, None, "not installed"
    model = build_model()
    model.train()
    try:
        opt = make_opt(model.parameters())
    except ImportError as exc:
        del model
        return name, None, None, None, f"not available ({exc})"
    gen = torch.Generator(device="cuda").manual_seed(1)
    tokens = args.batch * args.seq

    def step():
        ids = torch.randint(0, 32000, (args.batch, args.seq), device="cuda", generator=gen)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    try:
        for _ in range(args.warmup):
            step()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(args.steps):
            loss = step()
        torch.cuda.synchronize()
        elapsed = time.perf_counter() - t
    except Exception as exc:  # keep the other rows of the table
        del model, opt
        print(f"{name}: failed: {type(exc).__name__}: {exc}", flush=True)
        return name, None, None, None, f"failed: {type(exc).__name__}: {exc}"[:200]
    print(f"{name}: {args.steps * tokens / elapsed:,.0f} tokens/s", flush=True)
    n_params = sum(p.numel() for p in model.parameters())
    state = sum(x.numel() * x.element_size() for s in opt.state.values() for x in s.values() if isinstance(x, torch.Tensor) and x.dim() > 0)
    peak = torch.cuda.max_memory_allocated() / 2**30
    final = float(loss)
    del model, opt
    return name, args.steps * tokens / elapsed, peak, state / n_params, f"loss {final:.3f}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--out", default="benchmarks/results/e2e_full_finetune.md")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")

    def bnb_adamw8bit(params):
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=2e-5)

    rows = [
        run("torch AdamW (fused=True)", lambda ps: torch.optim.AdamW(ps, lr=2e-5, fused=True), args),
        run("optim8 AdamW8bit", lambda ps: optim8.AdamW8bit(ps, lr=2e-5), args),
        run("bitsandbytes AdamW8bit", bnb_adamw8bit, args),
    ]
    base = rows[0][1]
    lines = [
        f"# Full fine-tune, 291M Llama, fp32 weights + bf16 autocast ({datetime.date.today()}, {torch.cuda.get_device_name()}, torch {torch.__version__})",
        "",
        f"{args.batch}x{args.seq} random tokens a step, {args.warmup} warm-up + {args.steps} timed steps, SDPA attention, no gradient checkpointing.",
        "",
        "| optimizer | tokens/s | vs torch fused | peak GiB | state B/param | note |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, tps, peak, sb, note in rows:
        if tps is None:
            lines.append(f"| {name} | | | | | {note} |")
        else:
            lines.append(f"| {name} | {tps:,.0f} | {tps / base:.2f} | {peak:.2f} | {sb:.2f} | {note} |")
    write_report(lines, args.out)


if __name__ == "__main__":
    main()
