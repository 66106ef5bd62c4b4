"""CPU speed of optim8.Linear8bitLt against fp32 nn.Linear (and bitsandbytes where importable), side by side.

    python benchmarks/bench_linear8bit_cpu.py [--out benchmarks/results/cpu_linear8bit.md] [--threads 1,2]
        [--shapes 384x1536,...] [--bert] [--dry-run]

One process, the CPU only, fp32 activations, forward under ``no_grad``. Layers (in x out)
384x1536 (MiniLM's MLP), 4096x4096 and 4096x14336 (to 512 tokens: fp32 takes seconds
beyond); 1, 16, 128, 512 and 2048 tokens; 1 and 2 threads. Each row times the layers in
interleaved rounds (fp32, optim8, optim8's PyTorch reference, bitsandbytes, fp32, ...) and
reports each one's median, so a CPU shared with other work slows all of them alike.

* optim8: ``Linear8bitLt`` (threshold 6) as a user calls it: the fused CPU path.
* reference: ``int8_linear_reference`` on the same weights, the definition the CPU path
  equals bit for bit (it was the CPU path before).
* "+outliers": 0.4 % of the input features (at least one) x25, so those columns exceed the
  threshold and take the float path (the LLM.int8() situation).
* ``--bert``: a BERT encoder with all-MiniLM-L6-v2's shapes (6 layers, hidden 384, MLP 1536,
  12 heads, random weights: the real checkpoint needs a download) encoding 512 texts of 64
  random tokens in batches of 32, fp32 against every linear layer as optim8 int8 (threshold
  6); the faster of two interleaved runs each.

Bar (issue 15): optim8 <= 1.0x fp32 nn.Linear from 128 tokens up. ``SUMMARY`` lines: the
worst optim8 / fp32 ratio at >= 128 tokens per thread count. ``--dry-run``: tiny layers, a
few rounds, report under ``$OUT/dry-run/`` (with the host device active, as in the other
benchmarks' dry runs: the int8 layer then runs the CUDA kernels compiled for the CPU).
"""

from __future__ import annotations

import argparse
import datetime
import time

import torch
from torch import nn

import _common as C
from optim8 import Linear8bitLt, quantize_model
from optim8.kernels import int8

SHAPES = [(384, 1536), (4096, 4096), (4096, 14336)]
TOKENS = [1, 16, 128, 512, 2048]
MAX_TOKENS = {(4096, 14336): 512}
BAR_TOKENS = 128
DRY_SHAPES, DRY_TOKENS = [(64, 96)], [1, 16, 130]


def interleaved_ms(fns: dict, rounds: int, budget_s: float) -> dict:
    """Median ms of each ``fns`` entry, timed in interleaved rounds (at least 3, until ``budget_s`` or ``rounds``)."""
    for fn in fns.values():
        fn()
    samples = {name: [] for name in fns}
    start = time.perf_counter()
    for i in range(rounds):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - t) * 1e3)
        if i >= 2 and time.perf_counter() - start > budget_s:
            break
    return {name: C._median(s) for name, s in samples.items()}


def bnb_cpu_layer(ref: nn.Linear):
    """bitsandbytes' Linear8bitLt on the CPU holding ref's weights (threshold 6), or None."""
    try:
        import bitsandbytes as bnb

        layer = bnb.nn.Linear8bitLt(ref.in_features, ref.out_features, bias=True, has_fp16_weights=False, threshold=6.0)
        layer.weight = bnb.nn.Int8Params(ref.weight.detach().clone(), requires_grad=False, has_fp16_weights=False)
        layer.bias = nn.Parameter(ref.bias.detach().clone(), requires_grad=False)
        layer(torch.randn(17, ref.in_features))
        return layer
    except Exception:  # not installed, or without a CPU backend
        return None


def activations(tokens: int, k: int, outliers: bool) -> torch.Tensor:
    x = torch.randn(tokens, k)
    if outliers:
        x[:, torch.randperm(k)[: max(1, round(0.004 * k))]] *= 25
    return x


def layer_rows(shapes, tokens_list, threads, rounds, budget_s, worst):
    rows = []
    for k, n in shapes:
        torch.manual_seed(0)
        ref = nn.Linear(k, n).requires_grad_(False)
        layer = Linear8bitLt.from_linear(ref, threshold=6.0).requires_grad_(False)
        bnb = bnb_cpu_layer(ref)
        q, scb, bias = layer.weight, layer.SCB, layer.bias
        for tokens in tokens_list:
            if tokens > MAX_TOKENS.get((k, n), tokens):
                continue
            for outliers in (False, True) if tokens > int8.DECODE_TOKENS else (False,):
                x = activations(tokens, k, outliers)
                fns = {
                    "fp32": lambda: ref(x),
                    "optim8": lambda: layer(x),
                    "reference": lambda: int8.int8_linear_reference(x, q, scb, bias, 6.0),
                }
                if bnb is not None:
                    fns["bnb"] = lambda: bnb(x)
                with torch.no_grad():
                    t = interleaved_ms(fns, rounds, budget_s)
                r = t["optim8"] / t["fp32"]
                if tokens >= BAR_TOKENS:
                    worst[threads] = max(worst.get(threads, 0.0), r)
                rows.append(
                    f"| {threads} | {k}x{n} | {tokens}{' +outliers' if outliers else ''} | {t['fp32']:.3f} "
                    f"| {t['optim8']:.3f} | {r:.2f}x | {t['reference']:.3f} | {C.ratio(t['reference'], t['fp32'])} "
                    f"| {C.ratio(t.get('bnb'), t['fp32'])} |"
                )
                print(rows[-1], flush=True)
    return rows


def bert_rows(threads, texts, seq, batch, layers, hidden, mlp, heads):
    """Encoding ``texts`` random-token texts with a random-weight BERT, fp32 against int8 (optim8, threshold 6)."""
    from transformers import BertConfig, BertModel

    config = BertConfig(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=mlp, vocab_size=30522
    )
    torch.manual_seed(0)
    fp32 = BertModel(config).eval()
    q8 = quantize_model(BertModel(config).eval(), threshold=6.0, skip=())
    q8.load_state_dict(fp32.state_dict())
    ids = torch.randint(1000, 30000, (texts, seq))

    def encode(model):
        def run():
            for b0 in range(0, texts, batch):
                model(input_ids=ids[b0 : b0 + batch]).last_hidden_state[:, 0]

        return run

    with torch.no_grad():
        for model in (fp32, q8):  # warm-up on one batch: a whole extra encoding takes tens of seconds
            model(input_ids=ids[:batch])
        samples = {"fp32": [], "optim8": []}
        for _ in range(2):
            for name, model in (("fp32", fp32), ("optim8", q8)):
                start = time.perf_counter()
                encode(model)()
                samples[name].append((time.perf_counter() - start) * 1e3)
        t = {name: min(s) for name, s in samples.items()}
    return [f"| {threads} | {t['fp32'] / 1e3:.2f} | {t['optim8'] / 1e3:.2f} | {t['optim8'] / t['fp32']:.2f}x |"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None, help="default: benchmarks/results/cpu_linear8bit.md")
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts (default 1,2)")
    ap.add_argument("--shapes", default=None, help="comma-separated INxOUT layers (default 384x1536,4096x4096,4096x14336)")
    ap.add_argument("--bert", action="store_true", help="also time the MiniLM-shaped BERT encoding 512 texts")
    C.add_dry_run_argument(ap)
    args = ap.parse_args()
    if args.dry_run:
        with C.session(True):
            run(args)
    else:
        run(args)


def run(args):
    dry = C.dry_run()
    shapes, tokens_list = (DRY_SHAPES, DRY_TOKENS) if dry else (SHAPES, TOKENS)
    if args.shapes and not dry:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    rounds, budget_s = (3, 0.0) if dry else (15, 3.0)
    threads_list = [int(t) for t in args.threads.split(",")]
    try:
        import bitsandbytes

        bnb_version = bitsandbytes.__version__
    except Exception:
        bnb_version = None
    initial_threads = torch.get_num_threads()
    worst, rows, bert = {}, [], []
    try:
        for threads in threads_list:
            torch.set_num_threads(threads)
            rows += layer_rows(shapes, tokens_list, threads, rounds, budget_s, worst)
            if args.bert:
                sizes = (8, 16, 4, 2, 32, 64, 2) if dry else (512, 64, 32, 6, 384, 1536, 12)
                bert += bert_rows(threads, *sizes)
    finally:
        torch.set_num_threads(initial_threads)
    lines = [
        f"# Linear8bitLt on the CPU ({datetime.date.today()}, {C.cpu_name()}, torch {torch.__version__}, "
        f"{torch.backends.cpu.get_cpu_capability()}, bitsandbytes {bnb_version or 'not installed'})",
        "",
        "ms per forward (no_grad, fp32 activations), median of interleaved rounds; ratios against fp32 nn.Linear."
        if not dry
        else "Dry run: tiny layers, the int8 layer on the host device; perf_counter over 3 rounds, not speeds.",
        "optim8 at threshold 6; 'reference' is int8_linear_reference (the CPU path before issue 15, same results).",
        "",
        "| threads | layer (in x out) | tokens | fp32 ms | optim8 ms | optim8 / fp32 | reference ms | reference / fp32 "
        "| bnb / fp32 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        *rows,
    ]
    if bert:
        lines += [
            "",
            "## Encoding 512 texts x 64 tokens (batches of 32), BERT with all-MiniLM-L6-v2's shapes, random weights"
            if not dry
            else "## Encoding 8 texts x 16 tokens, a 2-layer BERT (dry run)",
            "",
            "| threads | fp32 s | optim8 int8 (every linear layer, threshold 6) s | optim8 / fp32 |",
            "| --- | --- | --- | --- |",
            *bert,
        ]
    C.write_report(lines, C.report_path(args.out, "cpu_linear8bit.md"))
    for threads in threads_list:
        C.summary(
            f"int8 linear CPU, {threads} thread{'s' if threads > 1 else ''}, worst optim8 vs fp32 nn.Linear "
            f"at >= {BAR_TOKENS} tokens",
            C.ratio(worst.get(threads), 1.0),
            "<= 1.0x",
        )


if __name__ == "__main__":
    main()
