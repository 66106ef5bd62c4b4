"""benchmarks/gpu_session.sh --dry-run: every step of the GPU session runs to its end on the host device.

A GPU is lent for minutes at a time; a session script that fails on setup wastes it. The dry run
executes the same steps (install check, kernel tests, each benchmark, HF tests, e2e runs) at tiny
sizes without a GPU, and must end with the summary table and every step at exit 0.
"""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from optim8.kernels import hostdev

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(hostdev.unavailable_reason() is not None or shutil.which("bash") is None, reason="needs bash and the host device")
def test_gpu_session_dry_run(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), BUDGET_S="900")
    result = subprocess.run(["bash", "benchmarks/gpu_session.sh", "--dry-run"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    summary = (tmp_path / "summary.md").read_text()
    assert result.returncode == 0, summary + result.stdout[-4000:]
    steps = [line.split("\t") for line in (tmp_path / "steps.tsv").read_text().splitlines()]
    names = [s[0] for s in steps]
    assert names == ["kernel-tests", "bench-optim", "bench-linear8bit", "bench-blockwise", "hf-tests", "e2e-lora-fp16", "e2e-full-finetune", "distributed", "e2e-lora-bf16"]
    assert all(s[1] == "0" for s in steps), steps
    kernel = dict((s[0], s[3]) for s in steps)["kernel-tests"]
    assert "passed" in kernel and "failed" not in kernel, kernel
    assert summary.count("| SUMMARY") == 0 and "| benchmark | measured | bar |" in summary
    assert (tmp_path / "results.tgz").stat().st_size > 0
