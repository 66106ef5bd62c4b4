"""End-to-end full fine-tune throughput: torch fused AdamW vs optim8 AdamW8bit vs bitsandbytes AdamW8bit.

    python benchmarks/e2e_full_finetune.py [--steps 30] [--warmup 3] [--out benchmarks/results/e2e_full_finetune.md] [--dry-run]

Model (DESIGN.md): the 291M Llama shape (hidden 1024, 20 layers, MLP 2816, 16 heads, 4 KV
heads, vocab 32000), random weights built from a config, fp32 weights, bf16 autocast, SDPA
attention, no gradient checkpointing; 8 x 1024 random tokens a step. Each optimizer gets a
fresh model with the same seed; tokens/s is measured over the timed steps (forward,
backward, optimizer step, zero_grad), peak memory is ``torch.cuda.max_memory_allocated``
over the whole run of that optimizer.

Headlines (``SUMMARY`` lines): optim8 AdamW8bit tokens/s against torch fused AdamW (bar,
DESIGN.md: no throughput cost, >= 1.0x) and its peak memory against torch's (about the state
bytes saved lower). ``--dry-run``: a 2-layer, hidden-64, vocab-512 Llama, 2 x 32 tokens,
1 warm-up + 2 timed steps, on the CPU with the host device running optim8's kernels
(``_common.py``); no bitsandbytes, no memory statistics.
"""

from __future__ import annotations

import argparse
import importlib.util
import datetime
import gc
import time

import torch

import _common as C
import optim8

SHAPE = dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=20, num_attention_heads=16, num_key_value_heads=4)
DRY_SHAPE = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
DRY_ARGS = dict(steps=2, warmup=1, batch=2, seq=32)


def build_model():
    import transformers

    config = transformers.LlamaConfig(
        **(DRY_SHAPE if C.dry_run() else SHAPE), max_position_embeddings=2048,
        tie_word_embeddings=False, attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).to(C.device())


def run(name, make_opt, args):
    gc.collect()
    C.empty_cache()
    C.reset_peak_memory()
    if name.startswith("bitsandbytes") and (C.dry_run() or importlib.util.find_spec("bitsandbytes") is None):
        return name, None, None, None, "skipped in a dry run" if C.dry_run() else "not installed", None
    model = build_model()
    model.train()
    try:
        opt = make_opt(model.parameters())
    except ImportError as exc:
        del model
        return name, None, None, None, f"not available ({exc})", None
    gen = torch.Generator(device=C.device()).manual_seed(1)
    tokens = args.batch * args.seq
    vocab = model.config.vocab_size

    def step():
        ids = torch.randint(0, vocab, (args.batch, args.seq), device=C.device(), generator=gen)
        with torch.autocast(C.device().type, dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    try:
        for _ in range(args.warmup):
            step()
        C.sync()
        t = time.perf_counter()
        for _ in range(args.steps):
            loss = step()
        C.sync()
        elapsed = time.perf_counter() - t
    except Exception as exc:  # keep the other rows of the table
        del model, opt
        print(f"{name}: failed: {type(exc).__name__}: {exc}", flush=True)
        return name, None, None, None, f"failed: {type(exc).__name__}: {exc}"[:200], None
    print(f"{name}: {args.steps * tokens / elapsed:,.0f} tokens/s", flush=True)
    n_params = sum(p.numel() for p in model.parameters())
    state = sum(x.numel() * x.element_size() for s in opt.state.values() for x in s.values() if isinstance(x, torch.Tensor) and x.dim() > 0)
    peak = C.peak_memory_gib()
    final = float(loss)
    del model, opt
    return name, args.steps * tokens / elapsed, peak, state / n_params, f"loss {final:.3f}", n_params


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=None, help=f"timed steps (default 30; {DRY_ARGS['steps']} in a dry run)")
    ap.add_argument("--warmup", type=int, default=None, help=f"default 3; {DRY_ARGS['warmup']} in a dry run")
    ap.add_argument("--batch", type=int, default=None, help=f"default 8; {DRY_ARGS['batch']} in a dry run")
    ap.add_argument("--seq", type=int, default=None, help=f"default 1024; {DRY_ARGS['seq']} in a dry run")
    ap.add_argument("--out", default=None, help="default: benchmarks/results/e2e_full_finetune.md")
    C.add_dry_run_argument(ap)
    args = ap.parse_args()
    defaults = DRY_ARGS if args.dry_run else dict(steps=30, warmup=3, batch=8, seq=1024)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    with C.session(args.dry_run):
        bench(args)


def bench(args):
    def bnb_adamw8bit(params):
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=2e-5)

    rows = [
        run("torch AdamW (fused=True)", lambda ps: torch.optim.AdamW(ps, lr=2e-5, fused=True), args),
        run("optim8 AdamW8bit", lambda ps: optim8.AdamW8bit(ps, lr=2e-5), args),
        run("bitsandbytes AdamW8bit", bnb_adamw8bit, args),
    ]
    base = rows[0][1]
    model = "291M Llama" if not C.dry_run() else "tiny Llama (dry run)"
    lines = [
        f"# Full fine-tune, {model}, fp32 weights + bf16 autocast ({datetime.date.today()}, {C.device_name()}, torch {torch.__version__})",
        "",
        f"{args.batch}x{args.seq} random tokens a step, {args.warmup} warm-up + {args.steps} timed steps, SDPA attention, no gradient checkpointing.",
        "",
        "| optimizer | tokens/s | vs torch fused | peak GiB | state B/param | note |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    if C.dry_run():
        lines[2:2] = ["Dry run: a tiny model on the CPU, optim8's CUDA kernels on the host device; not speeds.", ""]
    for name, tps, peak, sb, note, _ in rows:
        if tps is None:
            lines.append(f"| {name} | | | | | {note} |")
        else:
            vs = f"{tps / base:.2f}" if base else "n/a"
            lines.append(f"| {name} | {tps:,.0f} | {vs} | {'n/a' if peak is None else f'{peak:.2f}'} | {sb:.2f} | {note} |")
    C.write_report(lines, C.report_path(args.out, "e2e_full_finetune.md"))

    torch_row, o8_row = rows[0], rows[1]
    size = C.params(o8_row[5]) if C.dry_run() and o8_row[5] else "291M"  # DESIGN.md's name of the real model
    head = f"e2e full fine-tune {size} fp32 + bf16 autocast"
    C.summary(f"{head}: optim8 AdamW8bit vs torch fused AdamW tokens/s", C.ratio(o8_row[1], base), ">= 1.0x (no throughput cost)")
    delta = None if o8_row[2] is None or torch_row[2] is None else o8_row[2] - torch_row[2]
    saved = None if o8_row[3] is None or torch_row[3] is None else (torch_row[3] - o8_row[3]) * o8_row[5] / 2**30
    C.summary(f"{head}: optim8 AdamW8bit peak - torch fused peak", "n/a" if delta is None else ("+" if delta >= 0 else "") + C.memory(delta),
              "-" if saved is None else f"about -{C.memory(saved)} (state bytes saved)")
    if rows[2][1] is not None:
        C.summary(f"{head}: bitsandbytes AdamW8bit vs torch fused AdamW tokens/s", C.ratio(rows[2][1], base), "-")


if __name__ == "__main__":
    main()
