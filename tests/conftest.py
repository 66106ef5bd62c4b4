import pytest
import torch

from devices import GPU


def _host_reason():
    from optim8.kernels import hostdev

    return hostdev.unavailable_reason()


def pytest_collection_modifyitems(config, items):
    """Where the ``cuda`` tests run: the GPU, else the host device (tests/devices.py).

    On the host device, tests that also need real GPU hardware (marked ``gpu``) skip with that
    reason; without a C++ compiler every ``cuda`` test skips with the compiler's absence as reason.
    """
    if GPU:
        return
    host_reason = None
    for item in items:
        if item.get_closest_marker("cuda") is None and item.get_closest_marker("gpu") is None:
            continue
        if item.get_closest_marker("gpu") is not None:
            reason = "needs a real CUDA GPU with CuPy (streams, graphs, memory statistics or timing); the host device cannot stand in"
        else:
            if host_reason is None:
                host_reason = _host_reason() or ""
            reason = host_reason
        if reason:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _host_device(request):
    """A ``cuda`` test without a GPU runs with the host device active (CPU tensors run the CUDA kernels)."""
    if GPU or request.node.get_closest_marker("cuda") is None:
        yield
        return
    from optim8.kernels import hostdev

    with hostdev.active():
        yield
