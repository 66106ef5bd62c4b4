"""Throughput of blockwise 8-bit quantize / dequantize against a device-to-device copy.

    python benchmarks/bench_blockwise.py [--n 268435456] [--out benchmarks/results/blockwise.md] [--dry-run]

Counts bytes read + written: quantize reads 4 B (fp32) or 2 B (bf16) and writes 1 B + 4 B per
block; dequantize the reverse. bitsandbytes' quantize_blockwise is timed too where importable.
All numbers come from one process, side by side, on one device.

Headlines (``SUMMARY`` lines): optim8 quantize and dequantize throughput, fp32 and bf16, as a
fraction of the copy's (bar: >= 80%), each with the static prediction for an H200 from
``benchmarks/results/kernel_report.md`` ("Predicted fraction of copy bandwidth": SASS per element
and simulated shared-memory wavefronts against the bytes per element at 4.3 TB/s; an upper
bound). ``--dry-run``: 2**18 elements on the CPU with the host device running the kernels
(``_common.py``).
"""

from __future__ import annotations

import argparse
import datetime
import re
from pathlib import Path

import torch

import _common as C
from optim8.kernels import dequantize_blockwise, quantize_blockwise

DRY_N = 2**18
KERNEL_REPORT = Path(__file__).resolve().parent / "results" / "kernel_report.md"


def predicted(kernel: str, ctype: str, bs: int) -> str:
    """The kernel report's predicted fraction of copy bandwidth for ``kernel<ctype,bs>`` ("?" if absent)."""
    try:
        text = KERNEL_REPORT.read_text()
    except OSError:
        return "?"
    m = re.search(rf"^\| `{kernel}<{ctype},{bs}>` \|(?:[^|]*\|){{4}}\s*(\d+%)\s*\|", text, re.MULTILINE)
    return m.group(1) if m else "?"


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

    xb = x.to(torch.bfloat16)
    b_bytes = 2 * n + n + 4 * (n // bs)
    codes_b, absmax_b = quantize_blockwise(xb, blocksize=bs)
    ms = C.time_ms(lambda: quantize_blockwise(xb, blocksize=bs))
    rows.append(("optim8 quantize_blockwise, bf16 input", ms, b_bytes / ms / 1e6))
    ms = C.time_ms(lambda: dequantize_blockwise(codes_b, absmax_b, blocksize=bs, dtype=torch.bfloat16))
    rows.append(("optim8 dequantize_blockwise, bf16 output", ms, b_bytes / ms / 1e6))

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

    pred = {
        rows[1][0]: predicted("quantize_blockwise", "float", bs),
        rows[2][0]: predicted("dequantize_blockwise", "float", bs),
        rows[3][0]: predicted("quantize_blockwise", "bf16", bs),
        rows[4][0]: predicted("dequantize_blockwise", "bf16", bs),
    }
    lines = [
        f"# blockwise quantization throughput ({datetime.date.today()}, {C.device_name()}, torch {torch.__version__})",
        "",
        f"{n:,} elements (fp32, and the same values in bf16), blocksize {bs}; GB/s counts bytes read + written. "
        "predicted: the static model's fraction of copy bandwidth on an H200 (benchmarks/results/kernel_report.md).",
        "",
        "| op | ms | GB/s | vs copy | predicted |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, ms, gbs in rows:
        lines.append(f"| {name} | {ms:.3f} | {gbs:.0f} | {gbs / copy_gbs:.2f} | {pred.get(name, '')} |")
    C.write_report(lines, C.report_path(args.out, "blockwise.md"))
    size = f"{n / 2**20:g} Mi" if n >= 2**20 else f"{n / 2**10:g} Ki"
    for label, row in (("quantize fp32", rows[1]), ("dequantize fp32", rows[2]), ("quantize bf16", rows[3]), ("dequantize bf16", rows[4])):
        gbs = row[2]
        C.summary(
            f"blockwise {label} {size}, blocksize {bs}: optim8 vs copy bandwidth (predicted {pred[row[0]]})",
            f"{100 * gbs / copy_gbs:.0f}%",
            ">= 80%",
        )


if __name__ == "__main__":
    main()
