"""Optimizer step time over the TinyLlama-1.1B parameter set, against the memory-bandwidth floor.

    python benchmarks/bench_optim.py [--dtypes float32 bfloat16] [--out benchmarks/results/optim.md] [--dry-run]

Parameter set (DESIGN.md): hidden 2048, 22 layers, MLP 5632, 4 KV heads of 64, vocab 32000,
untied head: 201 tensors, 1.10 B parameters. Random parameters and gradients (gradients
are set once and reused; every step still reads them).

Compared in one process on one device: ``optim8.AdamW8bit``, ``torch.optim.AdamW(fused=True)``,
``bitsandbytes.optim.AdamW8bit`` (where importable), and the bandwidth floor of an 8-bit Adam:
the bytes it must move (read p, g, both code bytes; write p and both code bytes: 16 B/param
for fp32, 10 B/param for bf16, plus the absmax) divided by the bandwidth of a large
device-to-device copy measured in the same run. Times are CUDA-event medians of whole
``step()`` calls; "host ms" is the CPU time of one ``step()`` call (launch overhead).

The rest of optim8's family (Lion, SGD with momentum, RMSprop, Adagrad, AdEMAMix: 8-bit state,
one ``update_multi`` launch each) gets a row each, beside torch's counterpart where torch has one
(``foreach=True``), for the first dtype only, with its own floor in the note (8-bit state: 2 B/param per state tensor
read and written, plus absmax). ``--family none`` skips them.

Headlines (``SUMMARY`` lines), per dtype: optim8 AdamW8bit against the floor (bar, issue 12:
<= 1.25x) and against torch's fused AdamW (bar: < 1.0x). ``--dry-run``: a 2-layer, hidden-64
parameter set on the CPU with the host device running the kernels (``_common.py``).
"""

from __future__ import annotations

import argparse
import datetime

import torch

import _common as C
import optim8


def tinyllama_shapes(hidden=2048, layers=22, mlp=5632, kv_heads=4, head_dim=64, vocab=32000):
    kv = kv_heads * head_dim
    shapes = [(vocab, hidden)]
    for _ in range(layers):
        shapes += [(hidden, hidden), (kv, hidden), (kv, hidden), (hidden, hidden), (mlp, hidden), (mlp, hidden), (hidden, mlp), (hidden,), (hidden,)]
    shapes += [(hidden,), (vocab, hidden)]
    return shapes


DRY_SHAPES = dict(hidden=64, layers=2, mlp=160, kv_heads=2, head_dim=16, vocab=512)


def copy_bandwidth_gbs(nbytes=4 * 2**30) -> float:
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=C.device()).normal_()
    dst = torch.empty_like(src)
    ms = C.time_ms(lambda: dst.copy_(src))
    del src, dst
    C.empty_cache()
    return 2 * nbytes / ms / 1e6  # read + write


def make_params(shapes, dtype):
    gen = torch.Generator(device=C.device()).manual_seed(0)
    params = []
    for s in shapes:
        p = torch.nn.Parameter(torch.empty(s, device=C.device(), dtype=dtype))
        p.data.normal_(0, 0.02, generator=gen)
        p.grad = torch.empty_like(p).normal_(0, 1e-3, generator=gen)
        params.append(p)
    return params


def state_bytes(opt) -> int:
    return sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor) and t.dim() > 0)


def bench(name, make_opt, shapes, dtype):
    params = make_params(shapes, dtype)
    n = sum(p.numel() for p in params)
    try:
        opt = make_opt(params)
        ms = C.time_ms(opt.step)
        hms = C.host_ms(opt.step)
    except Exception as exc:  # e.g. torch fused AdamW refusing a dtype, or a kernel failing
        print(f"{name} ({dtype}): failed: {type(exc).__name__}: {exc}", flush=True)
        return (name, float("nan"), float("nan"), float("nan"), f"failed: {type(exc).__name__}: {exc}"[:200])
    sb = state_bytes(opt) / n
    print(f"{name} ({dtype}): {ms:.2f} ms/step", flush=True)
    del opt, params
    C.empty_cache()
    return (name, ms, hms, sb, "")


# (row name, constructor, 8-bit state tensors per parameter: 0 for torch's optimizers)
FAMILY = [
    ("optim8 Lion8bit", lambda ps: optim8.Lion8bit(ps, lr=1e-4, weight_decay=0.01), 1),
    ("optim8 SGD8bit (momentum 0.9)", lambda ps: optim8.SGD8bit(ps, lr=1e-3, momentum=0.9), 1),
    ("torch SGD (momentum 0.9, foreach=True)", lambda ps: torch.optim.SGD(ps, lr=1e-3, momentum=0.9, foreach=True), 0),
    ("optim8 RMSprop8bit", lambda ps: optim8.RMSprop8bit(ps, lr=1e-4), 1),
    ("torch RMSprop (foreach=True)", lambda ps: torch.optim.RMSprop(ps, lr=1e-4, foreach=True), 0),
    ("optim8 Adagrad8bit", lambda ps: optim8.Adagrad8bit(ps, lr=1e-3), 1),
    ("torch Adagrad (foreach=True)", lambda ps: torch.optim.Adagrad(ps, lr=1e-3, foreach=True), 0),
    ("optim8 AdEMAMix8bit", lambda ps: optim8.AdEMAMix8bit(ps, lr=1e-4), 3),
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--out", default=None, help="default: benchmarks/results/optim.md")
    ap.add_argument("--family", choices=("all", "none"), default="all", help="rows for Lion/SGD/RMSprop/Adagrad/AdEMAMix")
    C.add_dry_run_argument(ap)
    args = ap.parse_args()
    with C.session(args.dry_run):
        run(args)


def run(args):
    shapes = tinyllama_shapes(**DRY_SHAPES) if C.dry_run() else tinyllama_shapes()
    n = sum(torch.Size(s).numel() for s in shapes)
    size = C.params(n)
    copy_gbs = copy_bandwidth_gbs(2**24) if C.dry_run() else copy_bandwidth_gbs()
    try:
        import bitsandbytes as bnb
    except ImportError:
        bnb = None

    lines = [
        f"# Optimizer step, TinyLlama-1.1B parameter set ({datetime.date.today()}, {C.device_name()}, torch {torch.__version__})",
        "",
        f"{len(shapes)} tensors, {n / 1e9:.3f} B parameters ({n:,}); copy bandwidth measured in this run: {copy_gbs:.0f} GB/s "
        f"(read + write). lr 1e-4, weight decay 0.01, betas (0.9, 0.999).",
        "",
    ]
    if C.dry_run():
        lines[2:2] = ["Dry run: a tiny parameter set on the CPU, optim8's CUDA kernels on the host device; not speeds.", ""]
    hp = dict(lr=1e-4, weight_decay=0.01)
    headlines = []
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        esize = torch.finfo(dtype).bits // 8
        floor_bytes = n * (3 * esize + 4) + 2 * 2 * 4 * sum((torch.Size(s).numel() + 255) // 256 for s in shapes)
        floor_ms = floor_bytes / copy_gbs / 1e6
        # torch first: a CUDA error is sticky, and it must not cost the baseline
        rows = [bench("torch AdamW (fused=True)", lambda ps: torch.optim.AdamW(ps, fused=True, **hp), shapes, dtype)]
        rows.append(bench("optim8 AdamW8bit", lambda ps: optim8.AdamW8bit(ps, **hp), shapes, dtype))
        rows.append(bench("optim8 AdamW32bit (same kernel, fp32 state)", lambda ps: optim8.AdamW32bit(ps, **hp), shapes, dtype))
        if bnb is not None:
            rows.append(bench(f"bitsandbytes {bnb.__version__} AdamW8bit", lambda ps: bnb.optim.AdamW8bit(ps, **hp), shapes, dtype))
        family = []
        if args.family == "all" and dtype_name == args.dtypes[0]:  # once: the GPU session caps this script at 60 s
            for name, make, states in FAMILY:
                ms_row = bench(name, make, shapes, dtype)
                own_floor = (n * (3 * esize + 2 * states) + 2 * 4 * states * sum((torch.Size(s).numel() + 255) // 256 for s in shapes)) / copy_gbs / 1e6
                family.append(ms_row[:4] + ((ms_row[4] or f"own floor {own_floor:.2f} ms: {ms_row[1] / own_floor:.2f}x") if states else ms_row[4],))
        lines += [
            f"## {dtype_name} parameters and gradients",
            "",
            f"Floor: {floor_bytes / n:.2f} B/param / {copy_gbs:.0f} GB/s = {floor_ms:.2f} ms.",
            "",
            "| optimizer | ms/step | x floor | host ms/step() | state B/param | note |",
            "| --- | --- | --- | --- | --- | --- |",
            f"| bandwidth floor (8-bit Adam) | {floor_ms:.2f} | 1.00 | | 2.03 | |",
        ]
        for name, ms, hms, sb, note in rows + family:
            lines.append(f"| {name} | {ms:.2f} | {ms / floor_ms:.2f} | {hms:.2f} | {sb:.2f} | {note} |")
        if bnb is None:
            lines.append("| bitsandbytes AdamW8bit | | | | | not installed |")
        lines.append("")
        short = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(dtype_name, dtype_name)
        torch_ms, o8_ms = rows[0][1], rows[1][1]
        headlines.append((f"optim step {short} {size}: optim8 vs copy floor", C.ratio(o8_ms, floor_ms), "<= 1.25x"))
        headlines.append((f"optim step {short} {size}: optim8 vs torch fused AdamW", C.ratio(o8_ms, torch_ms), "< 1.0x"))
    C.write_report(lines, C.report_path(args.out, "optim.md"))
    for what, value, bar in headlines:
        C.summary(what, value, bar)


if __name__ == "__main__":
    main()
