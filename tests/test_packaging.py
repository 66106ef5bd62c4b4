"""One namespace: optim8's ``kernels/`` and ``layers/`` directories are ``optim8.kernels`` and
``optim8.layers``, and finding them as top-level modules (the checkout's root on sys.path) must
never run their code a second time."""

import pathlib
import subprocess
import sys
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_python(code: str, cwd=ROOT) -> subprocess.CompletedProcess:
    # ``python -c`` puts cwd first on sys.path, as ``python -m pytest`` does (ROOT: a checkout root).
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def test_installed_package_does_not_put_kernels_or_layers_on_the_path():
    code = """
        import importlib.util, sys
        sys.path = [p for p in sys.path if p not in ("", ".", sys.argv[0])]
        import optim8, optim8.kernels, optim8.layers
        assert importlib.util.find_spec("layers") is None, importlib.util.find_spec("layers")
        spec = importlib.util.find_spec("kernels")
        assert spec is None or "optim8" not in str(spec.origin), spec
    """
    result = run_python(code, cwd="/")
    assert result.returncode == 0, result.stderr[-3000:]


def test_top_level_kernels_from_a_checkout_leaves_the_ops_alone():
    """``import transformers`` probes for Hugging Face's ``kernels`` package with
    ``importlib.import_module("kernels")``; from a checkout's root that finds our directory. It once
    re-defined the ``optim8::`` torch.library ops, freeing the registrations that existing op
    handles pointed at: later calls segfaulted or raised ``vector::reserve`` at random."""
    code = """
        import torch
        import optim8
        from torch._library import custom_ops

        libs = getattr(custom_ops, "OPDEF_TO_LIB", None)
        before = dict(libs) if libs is not None else None
        x = torch.randn(1000)
        expected = optim8.kernels.quantize_blockwise(x)

        import kernels  # what transformers' probe does
        assert kernels.__name__ == "kernels" and not hasattr(kernels, "quantize_blockwise"), dir(kernels)
        for sub in ("blockwise", "int8"):
            try:
                __import__("kernels." + sub)
            except ImportError as e:
                # our submodule refusing, or Hugging Face's kernels (loaded in our place) lacking it
                assert "import optim8.kernels" in str(e) or "No module named" in str(e), e
            else:
                raise AssertionError("kernels." + sub + " ran a second time")
        try:
            import layers.linear8bit
        except ImportError:
            pass
        else:
            raise AssertionError("layers.linear8bit ran outside optim8")

        if before is not None:
            changed = [k for k in before if k.startswith("optim8::") and libs.get(k) is not before[k]]
            assert not changed, changed
        codes, absmax = optim8.kernels.quantize_blockwise(x)
        assert torch.equal(codes, expected[0]) and torch.equal(absmax, expected[1])
        w = optim8.kernels.quantize_rowwise(torch.randn(33, 65))
        assert optim8.kernels.dequantize_rowwise(*w, dtype=torch.float32).shape == (33, 65)
    """
    result = run_python(code)
    assert result.returncode == 0, result.stderr[-3000:]


def test_transformers_import_from_a_checkout_sees_no_hub_kernels():
    pytest.importorskip("transformers")
    # transformers >= 5.25 depends on Hugging Face's ``kernels``: from a checkout it must get that
    # package, not our directory (whose ``from kernels import CUDAProperties`` failed in
    # ``from_pretrained``); without it installed, our directory stays an empty stub.
    code = """
        import importlib.metadata, os
        import optim8
        from transformers.utils import import_utils
        try:
            importlib.metadata.version("kernels")
            hub_kernels_installed = True
        except importlib.metadata.PackageNotFoundError:
            hub_kernels_installed = False
        assert import_utils.is_kernels_available() == hub_kernels_installed
        import transformers.integrations.hub_kernels
        import kernels
        assert not hasattr(kernels, "adam_step")
        if hub_kernels_installed:
            assert os.path.dirname(os.path.dirname(os.path.abspath(kernels.__file__))) != os.getcwd(), kernels.__file__
            from kernels import CUDAProperties, LayerRepository
    """
    result = run_python(code)
    assert result.returncode == 0, result.stderr[-3000:]
