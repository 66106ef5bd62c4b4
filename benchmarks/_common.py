"""Timing and reporting shared by the benchmarks (run as `python benchmarks/NAME.py`)."""

from __future__ import annotations

import pathlib

import torch


def cuda_time_ms(fn, warmup: int = 3, iters: int = 20) -> float:
    """Median GPU time of ``fn()`` in milliseconds, from CUDA events around each call."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(iters):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def write_report(lines: list[str], path: str) -> str:
    """Print a markdown report and write it to ``path`` (folders created); returns the text."""
    text = "\n".join(lines).rstrip("\n") + "\n"
    print(text)
    out = pathlib.Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return text
