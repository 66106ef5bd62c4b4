"""Throughput of blockwise 8-bit quantize / dequantize against a device-to-device copy.

    python benchmarks/bench_blockwise.py [--n 268435456] [--out benchmarks/results/blockwise.md]

Counts bytes read + written: quantize reads 4 B (fp32) and writes 1 B + 4 B per block;
dequantize the reverse. bitsandbytes' quantize_blockwise is timed too where importable.
All numbers come from one process, side by side, on one device.
"""

from __future__ import annotations

import argparse
import datetime

import torch

from optim8.kernels import dequantize_blockwise, quantize_blockwise
from _common import cuda_time_ms, write_report



def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=256 * 2**20)
    ap.add_argument("--blocksize", type=int, default=256)
    ap.add_argument("--out", default="benchmarks/results/blockwise.md")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")
    n, bs = args.n, args.blocksize
    x = torch.randn(n, device="cuda")
    dst = torch.empty_like(x)
    rows = []

    ms = cuda_time_ms(lambda: dst.copy_(x))
    copy_gbs = 2 * 4 * n / ms / 1e6
    rows.append(("torch copy_ (fp32 -> fp32)", ms, copy_gbs))

    q_bytes = 4 * n + n + 4 * (n // bs)
    codes, absmax = quantize_blockwise(x, blocksize=bs)
    ms = cuda_time_ms(lambda: quantize_blockwise(x, blocksize=bs))
    rows.append(("optim8 quantize_blockwise", ms, q_bytes / ms / 1e6))
    ms = cuda_time_ms(lambda: dequantize_blockwise(codes, absmax, blocksize=bs))
    rows.append(("optim8 dequantize_blockwise", ms, q_bytes / ms / 1e6))

    try:
        import bitsandbytes
        import bitsandbytes.functional as bnbf

        code = bnbf.create_dynamic_map(signed=True).cuda()
        c2, state = bnbf.quantize_blockwise(x, code=code, blocksize=bs)
        ms = cuda_time_ms(lambda: bnbf.quantize_blockwise(x, code=code, blocksize=bs))
        rows.append((f"bitsandbytes {bitsandbytes.__version__} quantize_blockwise", ms, q_bytes / ms / 1e6))
        ms = cuda_time_ms(lambda: bnbf.dequantize_blockwise(c2, state))
        rows.append(("bitsandbytes dequantize_blockwise", ms, q_bytes / ms / 1e6))
    except Exception:  # not installed, or installed without a matching CUDA library
        rows.append(("bitsandbytes (not installed)", float("nan"), float("nan")))

    device = torch.cuda.get_device_name()
    lines = [
        f"# blockwise quantization throughput ({datetime.date.today()}, {device}, torch {torch.__version__})",
        "",
        f"{n:,} fp32 elements, blocksize {bs}; GB/s counts bytes read + written.",
        "",
        "| op | ms | GB/s | vs copy |",
        "| --- | --- | --- | --- |",
    ]
    for name, ms, gbs in rows:
        lines.append(f"| {name} | {ms:.3f} | {gbs:.0f} | {gbs / copy_gbs:.2f} |")
    write_report(lines, args.out)


if __name__ == "__main__":
    main()
