"""benchmarks/kernel_report.py runs and reports every kernel instantiation the wrappers launch.

Needs NVRTC, cuobjdump and nvdisasm (the dev extra); skips without them. The budgets of the
report are not asserted here: today's adam_multi is known to be over them (issue 12), and
``python benchmarks/kernel_report.py --check`` is the gate for that.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("kernel_report", ROOT / "benchmarks" / "kernel_report.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


kr = _load()


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    try:
        kr.check_tools()
    except kr.Missing as exc:
        pytest.skip(str(exc))
    return kr.build(tmp_path_factory.mktemp("cubins"))


def test_a_row_for_every_registered_instantiation(rows):
    from optim8.kernels import _launch

    expected = {(name, expr) for name, exprs in _launch.SOURCES.items() for expr in exprs}
    got = [(r["file"], r["expr"]) for r in rows]
    assert len(got) == len(set(got))
    assert set(got) == expected
    for r in rows:
        assert r["regs"] > 0 and 1 <= r["ctas"] <= 32 and 0 < r["occupancy"] <= 1, r["expr"]
        assert r["static"] > 0, r["expr"]


def test_budgeted_kernels_have_a_common_path_count(rows):
    budgeted = [r for r in rows if r["budget"] is not None]
    # adam_multi, 8-bit state: fp32 and bf16 parameters, both decoupled flags, 3 block sizes
    assert len(budgeted) == 12
    for r in budgeted:
        assert r["common_per"] is not None and 20 < r["common_per"] < 1000, r["expr"]
        assert r["ok"] == (r["common_per"] <= r["budget"])


def test_occupancy_model():
    # 64 registers at 256 threads -> 4 CTAs (32 warps) per SM
    assert kr.occupancy(64, 17920, 256)["ctas"] == 4
    assert kr.occupancy(220, 40960, 256)["ctas"] == 1
    assert kr.occupancy(32, 0, 256)["ctas"] == 8  # warps limit
    assert kr.occupancy(16, 0, 32)["ctas"] == 32  # CTA limit
    assert kr.occupancy(32, 100 * 1024, 128)["ctas"] == 2  # shared memory limit


def test_markdown(rows):
    text = kr.markdown(rows, kr.DEFAULT_TENSORS)
    for r in rows:
        assert f"`{r['expr']}`" in text
    assert "## Budgets" in text


def test_bank_conflict_count():
    import torch

    same = torch.zeros(1, 32, dtype=torch.long)  # one word: a broadcast
    spread = torch.arange(32).view(1, 32)  # one word per bank
    one_bank = (torch.arange(32) * 32).view(1, 32)  # 32 words in bank 0
    assert kr._wavefronts(same) == 1 and kr._wavefronts(spread) == 1 and kr._wavefronts(one_bank) == 32
    assert kr._wavefronts(torch.cat([spread, one_bank])) == 16.5


def test_blockwise_copy_fraction(rows):
    fr = kr.copy_fraction_rows(rows)
    assert len(fr) == 2 * 3 * 7  # quantize and dequantize, 3 dtypes, 7 blocksizes
    for r, m in fr:
        assert 0 < m["fraction"] <= 1 and m["limiter"] in ("memory", "issue", "shared memory"), r["expr"]
        assert 1 / 32 <= m["lds"] <= 8 / 32, r["expr"]  # wavefronts per element: 1 to 8 per warp-wide load
        assert m["bytes"] == pytest.approx({"float": 5, "f16": 3, "bf16": 3}[r["args"][0]] + 4 / int(r["args"][1]))
