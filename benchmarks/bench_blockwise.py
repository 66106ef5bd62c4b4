"""Throughput of blockwise 8-bit quantize / dequantize against a device-to-device copy.

    python benchmarks/bench_blockwise.py [--n 268435456] [--out benchmarks/results/blockwise.md] [--dry-run]

Counts bytes read + written: quantize reads 4 B (fp32) and writes 1 B + 4 B per block;
dequantize the reverse. bitsandbytes' quantize_blockwise is timed too where importable.
All numbers come from one process, side by side, on one device.

Headlines (``SUMMARY`` lines): optim8 quantize and dequantize throughput as a fraction of the
copy's (bar: >= 80%). ``--dry-run``: 2**18 elements on the CPU with the host device running
the kernels (``_common.py``).
"""

from __future__ import annotations

import argparse
import datetime

import torch

import _common as C
from optim8.kernels import dequantize_blockwise, quantize_blockwise

DRY_N = 2**18


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=None, help=f"elements (default 256 Mi; {DRY_N:,} in a dry run)")
    ap.add_argument("--blocksize", type=int, default=256)
    ap.add_argument("--out", default=None, help="default: benchmarks/results/blockwise.md")
    C.add_dry_run_argument(ap)
    args = ap.parse_args()
    with C.session(args.dry_run):
        run(args)


def run(args):
    n = args.n or (DRY_N if C.dry_run() else 256 * 2**20)
    bs = args.blocksize
    x = torch.randn(n, device=C.device())
    dst = torch.empty_like(x)
    rows = []

    ms = C.time_ms(lambda: dst.copy_(x))
    copy_gbs = 2 * 4 * n / ms / 1e6
    rows.append(("torch copy_ (fp32 -> fp32)", ms, copy_gbs))

    q_bytes = 4 * n + n + 4 * (n // bs)
    codes, absmax = quantize_blockwise(x, blocksize=bs)
    ms = C.time_ms(lambda: quantize_blockwise(x, blocksize=bs))
    rows.append(("optim8 quantize_blockwise", ms, q_bytes / ms / 1e6))
    ms = C.time_ms(lambda: dequantize_blockwise(codes, absmax, blocksize=bs))
    rows.append(("optim8 dequantize_blockwise", ms, q_bytes / ms / 1e6))

    try:
        import bitsandbytes
        import bitsandbytes.functional as bnbf

        code = bnbf.create_dynamic_map(signed=True).to(C.device())
        c2, state = bnbf.quantize_blockwise(x, code=code, blocksize=bs)
        ms = C.time_ms(lambda: bnbf.quantize_blockwise(x, code=code, blocksize=bs))
        rows.append((f"bitsandbytes {bitsandbytes.__version__} quantize_blockwise", ms, q_bytes / ms / 1e6))
        ms = C.time_ms(lambda: bnbf.dequantize_blockwise(c2, state))
        rows.append(("bitsandbytes dequantize_blockwise", ms, q_bytes / ms / 1e6))
    except Exception:  # not installed, or installed without a matching CUDA library
        rows.append(("bitsandbytes (not installed)", float("nan"), float("nan")))

    lines = [
        f"# blockwise quantization throughput ({datetime.date.today()}, {C.device_name()}, torch {torch.__version__})",
        "",
        f"{n:,} fp32 elements, blocksize {bs}; GB/s counts bytes read + written.",
        "",
        "| op | ms | GB/s | vs copy |",
        "| --- | --- | --- | --- |",
    ]
    for name, ms, gbs in rows:
        lines.append(f"| {name} | {ms:.3f} | {gbs:.0f} | {gbs / copy_gbs:.2f} |")
    C.write_report(lines, C.report_path(args.out, "blockwise.md"))
    size = f"{n / 2**20:g} Mi" if n >= 2**20 else f"{n / 2**10:g} Ki"
    for label, (_, _, gbs) in (("quantize", rows[1]), ("dequantize", rows[2])):
        C.summary(f"blockwise {label} fp32 {size}, blocksize {bs}: optim8 vs copy bandwidth", f"{100 * gbs / copy_gbs:.0f}%", ">= 80%")


if __name__ == "__main__":
    main()
