"""Speed and accuracy of optim8.Linear8bitLt against fp16/bf16 nn.Linear and bitsandbytes' Linear8bitLt.

    python benchmarks/bench_linear8bit.py [--out benchmarks/results/linear8bit.md] [--quick]

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
"""

from __future__ import annotations

import argparse
import datetime

import torch
from torch import nn

from optim8 import Linear8bitLt
import functools

from _common import cuda_time_ms as _cuda_time_ms
from _common import write_report

SHAPES = [(4096, 4096), (4096, 14336)]
TOKENS = [1, 16, 256, 2048, 8192]
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
cuda_time_ms = functools.partial(_cuda_time_ms, warmup=5, iters=30)



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
    x = torch.randn(tokens, k, device="cuda")
    if outliers:
        cols = torch.randperm(k, device="cuda")[: max(1, round(0.004 * k))]
        x[:, cols] *= 25
    return x.to(dtype).requires_grad_(requires_grad)


def maybe_time(fn):
    """cuda_time_ms(fn), or None (printed) where the layer refuses the input (e.g. bitsandbytes and bf16)."""
    try:
        return cuda_time_ms(fn)
    except Exception as error:
        print(f"skipped: {type(error).__name__}: {error}")
        return None


def fmt(ms):
    return "n/a" if ms is None else f"{ms:.3f}"


def ratio(a, b):
    return "n/a" if a is None or b is None else f"{a / b:.2f}x"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/linear8bit.md")
    ap.add_argument("--quick", action="store_true", help="fp16 only, fewer token counts (a smoke run)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")
    torch.manual_seed(0)
    dtypes = {"fp16": torch.float16} if args.quick else DTYPES
    tokens_list = [1, 16, 2048] if args.quick else TOKENS
    try:
        import bitsandbytes

        bnb_version = bitsandbytes.__version__
    except ImportError:
        bnb_version = None

    fwd_rows, bwd_rows, err_rows = [], [], []
    for k, n in SHAPES:
        ref32 = nn.Linear(k, n, device="cuda")
        bnb = bnb_layer(ref32)
        for dname, dtype in dtypes.items():
            base = nn.Linear(k, n, device="cuda", dtype=dtype)
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
                        t_fp = cuda_time_ms(lambda: base(x))
                        t_o8 = cuda_time_ms(lambda: layer(x))
                        t_bnb = maybe_time(lambda: bnb(x)) if bnb is not None else None
                        g_fp = g_o8 = None
                        if tokens <= 16:
                            replay_fp, replay_o8 = graphed(lambda: base(x)), graphed(lambda: layer(x))
                            g_fp = cuda_time_ms(replay_fp) if replay_fp else None
                            g_o8 = cuda_time_ms(replay_o8) if replay_o8 else None
                    fwd_rows.append(
                        f"| {k}x{n} | {dname} | {tokens}{' +outliers' if outliers else ''} | {fmt(t_fp)} | {fmt(t_o8)} "
                        f"| {ratio(t_o8, t_fp)} | {fmt(t_bnb)} | {ratio(t_bnb, t_fp)} | {ratio(g_o8, g_fp)} |"
                    )
                    print(fwd_rows[-1], flush=True)
            for outliers in (False, True):
                x = activations(4096, k, dtype, outliers, requires_grad=True)
                grad = torch.randn(4096, n, device="cuda", dtype=dtype)

                def step(module):
                    return lambda: torch.autograd.grad(module(x), x, grad)

                t_fp = cuda_time_ms(step(base))
                t_o8 = cuda_time_ms(step(layer))
                t_bnb = maybe_time(step(bnb)) if bnb is not None else None
                bwd_rows.append(
                    f"| {k}x{n} | {dname} | 4096{' +outliers' if outliers else ''} | {fmt(t_fp)} | {fmt(t_o8)} "
                    f"| {ratio(t_o8, t_fp)} | {fmt(t_bnb)} | {ratio(t_bnb, t_fp)} |"
                )
                print(bwd_rows[-1], flush=True)
            if k == n:
                for outliers in (False, True):
                    x32 = activations(2048, k, torch.float32, outliers)
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

    device = torch.cuda.get_device_name()
    lines = [
        f"# Linear8bitLt ({datetime.date.today()}, {device}, torch {torch.__version__}, "
        f"bitsandbytes {bnb_version or 'not installed'})",
        "",
        "ms per call, median of 30 (CUDA events); ratios against the float nn.Linear of the same dtype.",
        "optim8 and bitsandbytes at threshold 6. Decode rows (<= 16 tokens) also replayed from a CUDA graph.",
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
        "## Relative error against the fp32 layer (2048 tokens)",
        "",
        "| layer | dtype | outlier columns | nn.Linear | optim8 | bnb |",
        "| --- | --- | --- | --- | --- | --- |",
        *err_rows,
    ]
    write_report(lines, args.out)


if __name__ == "__main__":
    main()
