"""Speed and accuracy of optim8.Linear8bitLt against fp16/bf16 nn.Linear and bitsandbytes' Linear8bitLt.

    python benchmarks/bench_linear8bit.py [--out benchmarks/results/linear8bit.md] [--quick] [--dry-run]

One process, one device, side by side. Layers (in x out) 4096x4096 and 4096x14336; 1, 16,
256, 2048 and 8192 tokens; fp16 and bf16 activations. Timed with CUDA events (median of 30).

* forward: no_grad, Gaussian activations; "+outliers": 0.4 % of the input features x25
  (the LLM.int8() situation: those columns exceed the threshold 6 and take the float path).
* fwd+bwd: forward + backward to the input only (frozen base of a LoRA step), 4096 tokens.
* graphed: the same forward replayed from a CUDA graph (no Python or launch overhead),
  for the decode token counts, where a GPU call lasts about as long as its launch.
* error: ||out - out_fp32|| / ||out_fp32|| against the fp32 layer, 2048 tokens.

Bars (issue 4): forward <= 1.3x fp16 at >= 2048 tokens; <= 1.0x at 1-16 tokens on
4096x14336; forward+input-grad <= 1.3x at 4096 tokens. bitsandbytes runs at threshold 6.

Headlines (``SUMMARY`` lines), 4096x4096 fp16 without outliers, optim8 against nn.Linear:
forward at 1 token (bar <= 1.0x), at 2048 tokens (bars <= 1.3x of issue 4, <= 1.1x of
issue 12), forward + input gradient at 4096 tokens (bar <= 1.3x). ``--dry-run``: layers
128x128 and 128x256, at most 32 tokens, on the CPU with the host device running the kernels
(``_common.py``); no CUDA graphs and no bitsandbytes there.
"""

from __future__ import annotations

import argparse
import datetime
import functools

import torch
from torch import nn

import _common as C
from optim8 import Linear8bitLt

SHAPES = [(4096, 4096), (4096, 14336)]
TOKENS = [1, 16, 256, 2048, 8192]
BWD_TOKENS, ERR_TOKENS, HEADLINE_TOKENS = 4096, 2048, 2048
DRY_SHAPES = [(128, 128), (128, 256)]
DRY_TOKENS = [1, 4, 32]  # DRY_TOKENS[-1] stands in for BWD_TOKENS, ERR_TOKENS and HEADLINE_TOKENS
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
time_ms = functools.partial(C.time_ms, warmup=5, iters=30)


def graphed(fn):
    """``fn`` captured once in a CUDA graph; returns the replay function (or None if capture fails)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            fn()
    except Exception as error:  # report, do not abort the whole table
        print(f"CUDA graph capture failed: {error}")
        return None
    return graph.replay


def bnb_layer(ref: nn.Linear):
    """bitsandbytes' int8 layer holding ref's weights (threshold 6), or None where not installed."""
    try:
        import bitsandbytes as bnb
    except Exception:  # not installed, or installed without a matching CUDA library
        return None
    layer = bnb.nn.Linear8bitLt(ref.in_features, ref.out_features, bias=True, has_fp16_weights=False, threshold=6.0)
    layer.weight = bnb.nn.Int8Params(ref.weight.detach().half().cpu(), requires_grad=False, has_fp16_weights=False)
    layer.bias = nn.Parameter(ref.bias.detach().half().cpu(), requires_grad=False)
    return layer.cuda()


def activations(tokens, k, dtype, outliers, requires_grad=False):
    x = torch.randn(tokens, k, device=C.device())
    if outliers:
        cols = torch.randperm(k, device=C.device())[: max(1, round(0.004 * k))]
        x[:, cols] *= 25
    return x.to(dtype).requires_grad_(requires_grad)


def maybe_time(fn):
    """time_ms(fn), or None (printed) where the layer refuses the input (e.g. bitsandbytes and bf16)."""
    try:
        return time_ms(fn)
    except Exception as error:
        print(f"skipped: {type(error).__name__}: {error}")
        return None


def fmt(ms):
    return "n/a" if ms is None else f"{ms:.3f}"


ratio = C.ratio


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None, help="default: benchmarks/results/linear8bit.md")
    ap.add_argument("--quick", action="store_true", help="fp16 only, fewer token counts (a smoke run)")
    C.add_dry_run_argument(ap)
    args = ap.parse_args()
    with C.session(args.dry_run):
        run(args)


def run(args):
    torch.manual_seed(0)
    dry = C.dry_run()
    dtypes = {"fp16": torch.float16} if args.quick else DTYPES
    tokens_list = [1, 16, 2048] if args.quick else TOKENS
    shapes, bwd_tokens, err_tokens, headline_tokens = SHAPES, BWD_TOKENS, ERR_TOKENS, HEADLINE_TOKENS
    if dry:
        shapes, tokens_list = DRY_SHAPES, DRY_TOKENS
        bwd_tokens = err_tokens = headline_tokens = DRY_TOKENS[-1]
    try:
        import bitsandbytes

        bnb_version = bitsandbytes.__version__
    except ImportError:
        bnb_version = None
    if dry:
        bnb_version = None  # its layer is a CUDA one; the dry run checks this script, not bitsandbytes

    times = {}  # (k, n, dtype name, tokens, outliers, "fwd" | "bwd") -> (float ms, optim8 ms)
    fwd_rows, bwd_rows, err_rows = [], [], []
    for k, n in shapes:
        ref32 = nn.Linear(k, n, device=C.device())
        bnb = bnb_layer(ref32) if bnb_version is not None else None
        for dname, dtype in dtypes.items():
            base = nn.Linear(k, n, device=C.device(), dtype=dtype)
            base.load_state_dict(ref32.state_dict())
            base.requires_grad_(False)
            layer = Linear8bitLt.from_linear(ref32, threshold=6.0).to(dtype)
            layer.requires_grad_(False)
            for tokens in tokens_list:
                for outliers in (False, True):
                    if outliers and tokens <= 16:
                        continue  # the decode path does not quantize activations: nothing to decompose
                    x = activations(tokens, k, dtype, outliers)
                    with torch.no_grad():
                        t_fp = time_ms(lambda: base(x))
                        t_o8 = time_ms(lambda: layer(x))
                        t_bnb = maybe_time(lambda: bnb(x)) if bnb is not None else None
                        g_fp = g_o8 = None
                        if tokens <= 16 and not dry:
                            replay_fp, replay_o8 = graphed(lambda: base(x)), graphed(lambda: layer(x))
                            g_fp = time_ms(replay_fp) if replay_fp else None
                            g_o8 = time_ms(replay_o8) if replay_o8 else None
                    times[k, n, dname, tokens, outliers, "fwd"] = (t_fp, t_o8)
                    fwd_rows.append(
                        f"| {k}x{n} | {dname} | {tokens}{' +outliers' if outliers else ''} | {fmt(t_fp)} | {fmt(t_o8)} "
                        f"| {ratio(t_o8, t_fp)} | {fmt(t_bnb)} | {ratio(t_bnb, t_fp)} | {ratio(g_o8, g_fp)} |"
                    )
                    print(fwd_rows[-1], flush=True)
            for outliers in (False, True):
                x = activations(bwd_tokens, k, dtype, outliers, requires_grad=True)
                grad = torch.randn(bwd_tokens, n, device=C.device(), dtype=dtype)

                def step(module):
                    return lambda: torch.autograd.grad(module(x), x, grad)

                t_fp = time_ms(step(base))
                t_o8 = time_ms(step(layer))
                t_bnb = maybe_time(step(bnb)) if bnb is not None else None
                times[k, n, dname, bwd_tokens, outliers, "bwd"] = (t_fp, t_o8)
                bwd_rows.append(
                    f"| {k}x{n} | {dname} | {bwd_tokens}{' +outliers' if outliers else ''} | {fmt(t_fp)} | {fmt(t_o8)} "
                    f"| {ratio(t_o8, t_fp)} | {fmt(t_bnb)} | {ratio(t_bnb, t_fp)} |"
                )
                print(bwd_rows[-1], flush=True)
            if k == n:
                for outliers in (False, True):
                    x32 = activations(err_tokens, k, torch.float32, outliers)
                    with torch.no_grad():
                        expected = ref32(x32).double()
                        x = x32.to(dtype)

                        def err(module):
                            try:
                                out = module(x).double()
                            except Exception as error:
                                return f"failed ({type(error).__name__})"
                            return f"{((out - expected).norm() / expected.norm()).item():.2e}"

                        err_rows.append(
                            f"| {k}x{n} | {dname} | {'yes' if outliers else 'no'} | {err(base)} | {err(layer)} "
                            f"| {err(bnb) if bnb is not None else 'n/a'} |"
                        )
                    print(err_rows[-1], flush=True)
        del bnb

    lines = [
        f"# Linear8bitLt ({datetime.date.today()}, {C.device_name()}, torch {torch.__version__}, "
        f"bitsandbytes {bnb_version or 'not installed'})",
        "",
        "ms per call, median of 30 (CUDA events); ratios against the float nn.Linear of the same dtype."
        if not dry
        else "Dry run: tiny layers on the CPU, optim8's CUDA kernels on the host device; perf_counter, not speeds.",
        "optim8 and bitsandbytes at threshold 6."
        + ("" if dry else " Decode rows (<= 16 tokens) also replayed from a CUDA graph."),
        "",
        "## Forward",
        "",
        "| layer (in x out) | dtype | tokens | nn.Linear ms | optim8 ms | optim8 / float | bnb ms | bnb / float "
        "| optim8 / float, graphed |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        *fwd_rows,
        "",
        "## Forward + backward to the input (frozen base, as under LoRA)",
        "",
        "| layer | dtype | tokens | nn.Linear ms | optim8 ms | optim8 / float | bnb ms | bnb / float |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
        *bwd_rows,
        "",
        f"## Relative error against the fp32 layer ({err_tokens} tokens)",
        "",
        "| layer | dtype | outlier columns | nn.Linear | optim8 | bnb |",
        "| --- | --- | --- | --- | --- | --- |",
        *err_rows,
    ]
    C.write_report(lines, C.report_path(args.out, "linear8bit.md"))
    k, n = shapes[0]
    head = f"int8 linear {k}x{n} fp16"
    for what, key, bar in (
        ("1 token", (1, False, "fwd"), "<= 1.0x"),
        (f"{headline_tokens} tokens", (headline_tokens, False, "fwd"), "<= 1.3x (issue 4), <= 1.1x (issue 12)"),
        (f"fwd+input grad {bwd_tokens} tokens", (bwd_tokens, False, "bwd"), "<= 1.3x"),
    ):
        t_fp, t_o8 = times.get((k, n, "fp16", *key), (None, None))
        C.summary(f"{head}, {what}: optim8 vs nn.Linear", ratio(t_o8, t_fp), bar)


if __name__ == "__main__":
    main()
