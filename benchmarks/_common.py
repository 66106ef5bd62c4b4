"""What the benchmarks share (run as ``python benchmarks/NAME.py``): where they run, timing, memory, reports.

A benchmark runs inside :func:`session`:

* a real run: on the CUDA GPU (``device()`` is ``cuda``), timed with CUDA events, memory from
  ``torch.cuda`` statistics, report written where ``--out`` says (``benchmarks/results/``);
* ``--dry-run``: no GPU. Tensors live on the CPU with the host device active
  (``optim8.kernels.hostdev``), so optim8's CUDA kernels really execute, compiled for the CPU.
  Times come from ``time.perf_counter`` (fewer iterations), memory statistics are n/a, and the
  report goes to ``$OUT/dry-run/`` (a temporary folder without ``$OUT``), never over
  ``benchmarks/results/``. A dry run proves the script works; its numbers are not speeds.

Headline ratios are printed as one line each, ``SUMMARY | <what> | <measured> | <bar>``
(:func:`summary`); ``benchmarks/gpu_session.sh`` gathers them into its summary table.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pathlib
import platform
import tempfile
import time

import torch

RESULTS = pathlib.Path(__file__).resolve().parent / "results"

_dry = False  # inside session(dry_run=True)


def add_dry_run_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dry-run", action="store_true",
        help="no GPU: tiny sizes on the CPU with the host device running optim8's CUDA kernels "
        "(checks the script; its numbers are not speeds)",
    )


@contextlib.contextmanager
def session(dry_run: bool, needs: str = "this benchmark needs a CUDA GPU (or --dry-run)"):
    """The benchmark's device for the block: the CUDA GPU, or (dry run) the CPU with the host device active."""
    global _dry
    if not dry_run:
        if not torch.cuda.is_available():
            raise SystemExit(needs)
        yield
        return
    from optim8.kernels import hostdev

    reason = hostdev.unavailable_reason()
    if reason is not None:
        raise SystemExit(f"--dry-run needs the host device: {reason}")
    with hostdev.active():
        _dry = True
        try:
            yield
        finally:
            _dry = False


def dry_run() -> bool:
    return _dry


def device() -> torch.device:
    return torch.device("cpu" if _dry else "cuda")


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), for a CPU benchmark's report."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def device_name() -> str:
    return "CPU, host device (dry run)" if _dry else torch.cuda.get_device_name()


def sync() -> None:
    if not _dry:
        torch.cuda.synchronize()


def empty_cache() -> None:
    if not _dry:
        torch.cuda.empty_cache()


def reset_peak_memory() -> None:
    if not _dry:
        torch.cuda.reset_peak_memory_stats()


def peak_memory_gib() -> float | None:
    """Peak allocated GPU memory since :func:`reset_peak_memory`, in GiB; None in a dry run."""
    return None if _dry else torch.cuda.max_memory_allocated() / 2**30


def _median(values: list[float]) -> float:
    values = sorted(values)
    return values[len(values) // 2]


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
    return _median(times)


def time_ms(fn, warmup: int = 3, iters: int = 20) -> float:
    """Median time of ``fn()`` in ms: CUDA events on the GPU; perf_counter over 1 + 2 calls in a dry run."""
    if not _dry:
        return cuda_time_ms(fn, warmup, iters)
    fn()
    times = []
    for _ in range(min(iters, 2)):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return _median(times)


def host_ms(fn, iters: int = 10) -> float:
    """Median CPU time of one ``fn()`` call in ms (launch overhead on a GPU), synchronizing between calls."""
    sync()
    times = []
    for _ in range(min(iters, 2) if _dry else iters):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
        sync()
    return _median(times)


def report_path(out: str | os.PathLike | None, default_name: str) -> pathlib.Path:
    """Where the report goes: ``out``, else ``benchmarks/results/<default_name>``.

    In a dry run: ``out`` unless it is inside ``benchmarks/results/``, else ``$OUT/dry-run/<name>``
    (a fresh temporary folder when ``$OUT`` is unset).
    """
    if not _dry:
        return pathlib.Path(out) if out else RESULTS / default_name
    if out and not pathlib.Path(out).resolve().is_relative_to(RESULTS):
        return pathlib.Path(out)
    base = os.environ.get("OUT") or tempfile.mkdtemp(prefix="optim8-dry-run-")
    return pathlib.Path(base) / "dry-run" / pathlib.Path(out or default_name).name


def write_report(lines: list[str], path: str | os.PathLike) -> str:
    """Print a markdown report and write it to ``path`` (folders created); returns the text."""
    text = "\n".join(lines).rstrip("\n") + "\n"
    print(text)
    out = pathlib.Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"report written to {out}", flush=True)
    return text


def summary(what: str, value: str, bar: str = "-") -> str:
    """Print one headline line, ``SUMMARY | what | value | bar`` (the value marked in a dry run)."""
    if _dry:
        value += " (dry run)"
    line = f"SUMMARY | {what} | {value} | {bar}"
    print(line, flush=True)
    return line


def params(n: int) -> str:
    """A parameter count as ``1.1B`` or ``0.17M``."""
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.0f}M" if n >= 1e7 else f"{n / 1e6:.2f}M"


def memory(gib: float) -> str:
    """A size in GiB as ``1.23 GiB``, or in MiB below 0.1 GiB (dry-run models are tiny)."""
    return f"{gib:.2f} GiB" if abs(gib) >= 0.1 else f"{gib * 1024:.2f} MiB"


def ratio(a: float | None, b: float | None, digits: int = 2) -> str:
    """``a / b`` as ``1.23x``, or ``n/a`` when either is missing or not finite."""
    if a is None or b is None or not (a == a and b == b) or b == 0:
        return "n/a"
    return f"{a / b:.{digits}f}x"
