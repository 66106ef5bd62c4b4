"""The host device catches the bugs it exists to catch (deliberately broken kernels), and runs clean.

Each broken kernel below is a bug a CUDA kernel can have that lock-step CPU emulation would
hide: a missing ``__syncthreads``, a shuffle that waits for a lane that has returned, lanes
stopped at different barriers, an out-of-bounds store, a misaligned vector load. The host
device must turn each into a failing result or an error. The sanitizer cases run in a child
process with libasan preloaded.
"""

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from optim8.kernels import _launch, hostdev

pytestmark = pytest.mark.skipif(hostdev.unavailable_reason() is not None, reason=str(hostdev.unavailable_reason()))

BROKEN = r"""
// Thread 0 publishes a value in shared memory that every thread then reads.
template <bool SYNC>
__global__ void broadcast(const float* __restrict__ x, float* __restrict__ out) {
    __shared__ float v;
    if (threadIdx.x == 0) v = x[blockIdx.x];
    if (SYNC) __syncthreads();
    out[blockIdx.x * blockDim.x + threadIdx.x] = v;
}

// Sum over a warp; lanes past n leave early when EARLY (the bug), else contribute zeros.
template <bool EARLY>
__global__ void warp_sum(const float* __restrict__ x, float* __restrict__ out, const int n) {
    const int i = threadIdx.x;
    if (EARLY && i >= n) return;
    float s = i < n ? x[i] : 0.0f;
    for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
    if (i == 0) out[0] = s;
}

// Half a warp waits at the CTA barrier, the other half in a shuffle that needs the first half.
__global__ void split_barrier(float* __restrict__ out) {
    if (threadIdx.x < 16) {
        __syncthreads();
    } else {
        out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0f, 1);
    }
}

// One element past the end.
__global__ void store_past_end(float* __restrict__ out, const int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i <= n) out[i] = 1.0f;
}

// A 16-byte load from an address that is only 4-byte aligned.
__global__ void misaligned(const float* __restrict__ x, float* __restrict__ out) {
    const uint4 v = *reinterpret_cast<const uint4*>(x + 1);
    out[0] = __uint_as_float(v.x);
}

// Every warp primitive the kernels use, for a check against plain Python.
__global__ void warp_ops(const int* __restrict__ x, int* __restrict__ out) {
    const int i = threadIdx.x;
    const int v = x[i];
    out[0 * 64 + i] = __shfl_xor_sync(0xffffffffu, v, 5);
    out[1 * 64 + i] = __shfl_up_sync(0xffffffffu, v, 3);
    out[2 * 64 + i] = __shfl_down_sync(0xffffffffu, v, 3);
    out[3 * 64 + i] = __shfl_sync(0xffffffffu, v, 7);
    out[4 * 64 + i] = __shfl_xor_sync(0xffffffffu, v, 2, 8);
    out[5 * 64 + i] = (int)__ballot_sync(0xffffffffu, v & 1);
}
"""
EXPRS = (
    "broadcast<false>",
    "broadcast<true>",
    "warp_sum<true>",
    "warp_sum<false>",
    "split_barrier",
    "store_past_end",
    "misaligned",
    "warp_ops",
)


@pytest.fixture(scope="module")
def lib():
    return hostdev.load_source("broken_kernels", BROKEN, EXPRS)


def run(lib, kernel, grid, block, *args):
    hostdev.HostBackend().launch(hostdev.Function(lib, kernel), (grid,), (block,), args, torch.device("cpu"))


def test_missing_syncthreads_gives_wrong_results(lib):
    x = torch.rand(16) + 1
    for kernel, ok in (("broadcast<true>", True), ("broadcast<false>", False)):
        out = torch.zeros(16 * 256)
        run(lib, kernel, 16, 256, _launch.ptr(x), _launch.ptr(out))
        right = out.view(16, 256) == x[:, None]
        assert bool(right.all()) == ok, kernel
        if not ok:  # lanes run in a seeded varying order: many read v before thread 0 wrote it
            assert right.float().mean() < 0.9


def test_shuffle_waiting_for_an_exited_lane_is_an_error(lib):
    x = torch.rand(32)
    out = torch.zeros(1)
    run(lib, "warp_sum<false>", 1, 32, _launch.ptr(x), _launch.ptr(out), np.int32(20))
    assert torch.allclose(out, x[:20].sum().view(1))
    with pytest.raises(RuntimeError, match="exited"):
        run(lib, "warp_sum<true>", 1, 32, _launch.ptr(x), _launch.ptr(out), np.int32(20))


def test_lanes_at_different_barriers_are_an_error(lib):
    out = torch.zeros(64)
    with pytest.raises(RuntimeError, match="can proceed.*which waits at __syncthreads"):
        run(lib, "split_barrier", 1, 32, _launch.ptr(out))


def test_launch_arguments_are_checked(lib):
    out = torch.zeros(64)
    with pytest.raises(RuntimeError, match="arguments"):
        run(lib, "store_past_end", 1, 64, _launch.ptr(out))
    with pytest.raises(RuntimeError, match="bytes"):
        run(lib, "store_past_end", 1, 64, _launch.ptr(out), np.int64(3))
    with pytest.raises(RuntimeError, match="threads"):
        run(lib, "store_past_end", 1, 2048, _launch.ptr(out), np.int32(3))


def test_warp_primitives_match_their_definition(lib):
    x = torch.randint(0, 1000, (64,), dtype=torch.int32)
    out = torch.zeros(6 * 64, dtype=torch.int32)
    run(lib, "warp_ops", 1, 64, _launch.ptr(x), _launch.ptr(out))
    got = out.view(6, 64).tolist()
    v = x.tolist()
    for i in range(64):
        lane, base = i % 32, i - i % 32
        assert got[0][i] == v[base + (lane ^ 5)]
        assert got[1][i] == (v[i - 3] if lane >= 3 else v[i])
        assert got[2][i] == (v[i + 3] if lane + 3 < 32 else v[i])
        assert got[3][i] == v[base + 7]
        assert got[4][i] == v[base + (lane & ~7) + ((lane & 7) ^ 2)]
        assert got[5][i] & 0xFFFFFFFF == sum(1 << j for j in range(32) if v[base + j] & 1)


ASAN_CHILD = textwrap.dedent(
    """
    import sys, numpy as np, torch
    sys.path.insert(0, {tests!r})
    import test_host_device as t
    from optim8.kernels import _launch, hostdev
    lib = hostdev.load_source("broken_kernels", t.BROKEN, t.EXPRS, sanitize=True)
    case = sys.argv[1]
    if case == "past_end":
        out = torch.zeros(100)
        t.run(lib, "store_past_end", 1, 128, _launch.ptr(out), np.int32(100))
    elif case == "misaligned":
        x = torch.rand(64)
        out = torch.zeros(1)
        t.run(lib, "misaligned", 1, 1, _launch.ptr(x), _launch.ptr(out))
    elif case == "clean":
        out = torch.zeros(101)
        t.run(lib, "store_past_end", 1, 128, _launch.ptr(out), np.int32(100))
    print("finished")
    """
)


def _asan_child(case):
    import os

    code = ASAN_CHILD.format(tests=os.path.dirname(__file__))
    return subprocess.run([sys.executable, "-c", code, case], env=hostdev.asan_env(), capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("case,report", [("past_end", "heap-buffer-overflow"), ("misaligned", "misaligned address")])
def test_sanitizer_build_catches_bad_accesses(case, report):
    result = _asan_child(case)
    assert result.returncode != 0 and report in result.stderr, result.stderr[-3000:]
    assert "finished" not in result.stdout


def test_sanitizer_build_runs_a_correct_kernel_clean():
    result = _asan_child("clean")
    assert result.returncode == 0 and "finished" in result.stdout, result.stderr[-3000:]


def test_removing_a_barrier_from_a_real_kernel_is_caught():
    """blockwise.cu without the barrier after its shared-memory table load: wrong codes, seen."""
    from optim8.kernels import blockwise
    from optim8.kernels.quant_map import zero_code

    line = "    __syncthreads();  // stab is complete"
    text = _launch.source("blockwise.cu")
    assert line in text
    expr = "quantize_blockwise<float,64>"
    lib = hostdev.load_source("blockwise_no_barrier", text.replace(line, ""), (expr,))
    x = torch.randn(64 * 257)
    codes, absmax = torch.empty(x.shape, dtype=torch.uint8), torch.empty(257)
    args = (
        _launch.ptr(x), _launch.ptr(blockwise._encoder_table(True, x.device)), _launch.ptr(codes), _launch.ptr(absmax),
        np.int64(x.numel()), np.int32(zero_code(True)), np.int32(1), np.int32(1),
    )
    run(lib, expr, 2, 1024, *args)  # 2 CTAs striding over 3 steps of 8192 elements
    expected, _ = blockwise.quantize_blockwise_reference(x, 64, True)
    assert not torch.equal(codes, expected)
