import pytest
import torch


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
