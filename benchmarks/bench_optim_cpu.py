"""Optimizer step time on the CPU: optim8's compiled 8-bit step against torch's AdamW, side by side.

    python benchmarks/bench_optim_cpu.py [--threads 1 2] [--dtypes float32 bfloat16] [--quick]

Parameter set: Llama-shaped tensors (hidden 512, 8 layers, MLP 1536, 4 KV heads of 64,
vocab 16000, untied head): 75 tensors, 41.6 M parameters. Random parameters and gradients,
set once (every step still reads them). Each row is the median wall time of whole ``step()``
calls (after one warm-up step), in one process, one row after the other:

* ``torch.optim.AdamW`` with its default (foreach) implementation; fp32 state;
* ``optim8.AdamW8bit`` through the compiled CPU kernel (``kernels/cpu/adam_cpu.cpp``);
* ``optim8.AdamW8bit`` through the PyTorch path (``OPTIM8_CPU_KERNELS=0``: what a machine
  without a C++ compiler runs; it computes the same bits);
* ``optim8.AdamW32bit`` (compiled, fp32 state);
* ``bitsandbytes.optim.AdamW8bit`` where importable.

Headlines (``SUMMARY`` lines): optim8 AdamW8bit against torch AdamW per dtype and thread
count (bar, issue 15: <= 1.0x). ``--quick``: a tiny parameter set (a check of the script;
not speeds). Writes ``benchmarks/results/cpu_optim.md`` (``--out`` elsewhere).
"""

from __future__ import annotations

import argparse
import datetime
import os
import time

import torch

import optim8
from optim8.kernels import _cpu
import _common as C
from bench_optim import tinyllama_shapes

SHAPES = dict(hidden=512, layers=8, mlp=1536, kv_heads=4, head_dim=64, vocab=16000)
QUICK_SHAPES = dict(hidden=64, layers=2, mlp=160, kv_heads=2, head_dim=16, vocab=300)


def make_params(shapes, dtype):
    gen = torch.Generator().manual_seed(0)
    params = []
    for s in shapes:
        p = torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype) * 0.02)
        p.grad = (torch.randn(s, generator=gen) * 1e-3).to(dtype)
        params.append(p)
    return params


def time_step(make_opt, shapes, dtype, iters: int) -> float:
    params = make_params(shapes, dtype)
    opt = make_opt(params)
    opt.step()  # state allocation, first-use compile
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2] * 1e3


class compiled_kernels:
    """Context: the compiled CPU kernels on (the default) or off (the PyTorch path)."""

    def __init__(self, on: bool):
        self.on = on

    def __enter__(self):
        self.old = os.environ.get("OPTIM8_CPU_KERNELS")
        os.environ["OPTIM8_CPU_KERNELS"] = "1" if self.on else "0"
        _cpu.reset()

    def __exit__(self, *exc):
        if self.old is None:
            os.environ.pop("OPTIM8_CPU_KERNELS", None)
        else:
            os.environ["OPTIM8_CPU_KERNELS"] = self.old
        _cpu.reset()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="tiny sizes: checks the script, not speeds")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    shapes = tinyllama_shapes(**(QUICK_SHAPES if args.quick else SHAPES))
    n = sum(torch.Size(s).numel() for s in shapes)
    iters = 2 if args.quick else args.iters
    try:
        import bitsandbytes as bnb
    except ImportError:
        bnb = None
    with compiled_kernels(True):
        compiled = _cpu.library() is not None
        why = _cpu.unavailable_reason()
    hp = dict(lr=1e-4, weight_decay=0.01)
    lines = [
        f"# Optimizer step on the CPU ({datetime.date.today()}, {C.cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__})",
        "",
        f"Llama-shaped parameter set: {len(shapes)} tensors, {n / 1e6:.1f} M parameters. Median of {iters} "
        f"`step()` calls after one warm-up, ns per parameter; ratios against torch AdamW in the same row group. "
        f"Compiled CPU kernel: {'yes' if compiled else 'no (' + str(why) + ')'}.",
        "",
    ]
    if args.quick:
        lines[2:2] = ["Quick run: a tiny parameter set; not speeds.", ""]
    headlines = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for dtype_name in args.dtypes:
            dtype = getattr(torch, dtype_name)
            rows = [("torch.optim.AdamW (default, foreach)", time_step(lambda ps: torch.optim.AdamW(ps, **hp), shapes, dtype, iters))]
            with compiled_kernels(True):
                rows.append(("optim8 AdamW8bit (compiled CPU kernel)", time_step(lambda ps: optim8.AdamW8bit(ps, **hp), shapes, dtype, iters)))
                rows.append(("optim8 AdamW32bit (compiled CPU kernel)", time_step(lambda ps: optim8.AdamW32bit(ps, **hp), shapes, dtype, iters)))
            with compiled_kernels(False):
                rows.append(("optim8 AdamW8bit (PyTorch path, no compiler)", time_step(lambda ps: optim8.AdamW8bit(ps, **hp), shapes, dtype, iters)))
            if bnb is not None:
                rows.append((f"bitsandbytes {bnb.__version__} AdamW8bit", time_step(lambda ps: bnb.optim.AdamW8bit(ps, **hp), shapes, dtype, iters)))
            base = rows[0][1]
            lines += [f"## {dtype_name}, {threads} thread{'s' if threads > 1 else ''}", "",
                      "| optimizer | ms/step | ns/param | x torch AdamW |", "| --- | --- | --- | --- |"]
            for name, ms in rows:
                lines.append(f"| {name} | {ms:.1f} | {ms * 1e6 / n:.2f} | {ms / base:.2f} |")
            if bnb is None:
                lines.append("| bitsandbytes AdamW8bit | | | not installed |")
            lines.append("")
            short = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(dtype_name, dtype_name)
            headlines.append((f"CPU optim step {short} {threads}T: optim8 AdamW8bit vs torch AdamW", f"{rows[1][1] / base:.2f}x", "<= 1.0x"))
    text = "\n".join(lines).rstrip("\n") + "\n"
    print(text)
    out = args.out or (None if args.quick else os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "cpu_optim.md"))
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            f.write(text)
        print(f"report written to {out}")
    for what, value, bar in headlines:
        print(f"SUMMARY | {what} | {value}{' (quick)' if args.quick else ''} | {bar}", flush=True)


if __name__ == "__main__":
    main()
