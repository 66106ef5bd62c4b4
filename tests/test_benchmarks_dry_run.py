"""The kernel benchmarks' ``--dry-run``: each runs to its end on the host device and prints its headlines.

A GPU is lent for minutes at a time (``benchmarks/gpu_session.sh``); a benchmark that fails on
its first line wastes them. The dry run is the same script at tiny sizes on the CPU, with the
host device running optim8's CUDA kernels; its numbers are not speeds, so only the exit status,
the ``SUMMARY | what | value | bar`` lines and where the report went are checked. (The e2e and
distributed dry runs need the Hugging Face stack and run in tests/test_gpu_session.py.)
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from optim8.kernels import hostdev

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

# script -> the number of SUMMARY lines it prints
BENCHMARKS = {"bench_optim.py": 4, "bench_blockwise.py": 4, "bench_linear8bit.py": 3, "bench_linear8bit_cpu.py": 2}
REPORTS = {"bench_optim.py": "optim.md", "bench_blockwise.py": "blockwise.md", "bench_linear8bit.py": "linear8bit.md", "bench_linear8bit_cpu.py": "cpu_linear8bit.md"}


@pytest.mark.skipif(hostdev.unavailable_reason() is not None, reason=hostdev.unavailable_reason() or "")
@pytest.mark.parametrize("script", sorted(BENCHMARKS))
def test_dry_run(script, tmp_path):
    before = {p.name: p.stat().st_mtime_ns for p in RESULTS.glob("*")}
    env = dict(os.environ, OUT=str(tmp_path), PYTHONUNBUFFERED="1")
    result = subprocess.run(
        [sys.executable, f"benchmarks/{script}", "--dry-run"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = [line for line in result.stdout.splitlines() if line.startswith("SUMMARY |")]
    assert len(summary) == BENCHMARKS[script], result.stdout[-3000:]
    for line in summary:
        fields = [f.strip() for f in line.split("|")]
        assert len(fields) == 4 and all(fields), line
        assert fields[2].endswith("(dry run)") and not fields[2].startswith("n/a"), line
    assert (tmp_path / "dry-run" / REPORTS[script]).read_text().startswith("# ")
    assert {p.name: p.stat().st_mtime_ns for p in RESULTS.glob("*")} == before, "a dry run wrote to benchmarks/results/"
