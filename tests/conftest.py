import os

# Ask NVML, not the CUDA runtime, whether a GPU exists: that check leaves no CUDA context in
# this process, so tests may still run in forked children (below).
os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_configure(config):
    """On machines without a GPU, run every test in a forked child (pytest-forked, in the dev extra).

    Why: on torch 2.13 (CPU build), long single-process runs that mix Hugging Face model loading
    and saving with optim8's custom ops intermittently crashed in later, unrelated custom-op calls
    (segfaults, std::bad_alloc / vector::reserve raised from the dispatcher): heap corruption whose
    source is not found yet (torch._int_mm on the CPU was one source and is no longer used). One
    child per test keeps one test's damage from failing another. GPU machines run in-process (a
    forked child cannot use CUDA once the parent has); ``-p no:forked`` or OPTIM8_TEST_NO_FORK=1
    turns it off.
    """
    if os.environ.get("OPTIM8_TEST_NO_FORK") or torch.cuda.is_available():
        return
    if config.pluginmanager.hasplugin("pytest_forked") and hasattr(config.option, "forked"):
        config.option.forked = True


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` need a CUDA GPU and CuPy; skip them (with the reason) elsewhere."""
    reason = None
    if not torch.cuda.is_available():
        reason = "needs a CUDA GPU"
    else:
        try:
            import cupy  # noqa: F401
        except ImportError:
            reason = "needs CuPy: pip install 'optim8[cuda12]' or 'optim8[cuda13]'"
    if reason is None:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
