// Blockwise dynamic quantization: one fp32 absmax per BLOCK consecutive elements,
// each element stored as the index of the nearest entry of a 256-entry map after
// division by its block's absmax. The PyTorch reference is kernels/blockwise.py;
// both compute the same function bit for bit.
//
// Each thread owns E = 8 consecutive elements (one or two 16-byte loads), so a block
// of BLOCK elements is BLOCK / 8 threads: a group inside one warp for BLOCK <= 256,
// a whole CTA above that.
#include "common.cuh"

#define E 8

// x: n elements; mid: the map's 255 decision boundaries (fp32, sorted);
// codes: n bytes; absmax: ceil(n / BLOCK) floats. `aligned` says x is 16-byte aligned.
// A block holding NaN or +-Inf gets absmax NaN or Inf and every code zero_code; so does a
// block whose absmax is below 2**-128 (1 / absmax overflows), keeping its tiny absmax.
template <typename T, int BLOCK>
__global__ void quantize_blockwise(const T* __restrict__ x, const float* __restrict__ mid,
                                   u8* __restrict__ codes, float* __restrict__ absmax,
                                   const i64 n, const int zero_code, const int aligned) {
    constexpr int TPB = BLOCK / E;                 // threads per quantization block
    constexpr int CTA = TPB >= 256 ? TPB : 256;
    constexpr int QPC = CTA / TPB;                 // quantization blocks per CTA
    __shared__ float smid[256];
    __shared__ float swarp[CTA / 32];

    for (int i = threadIdx.x; i < 255; i += CTA) smid[i] = mid[i];

    const i64 nblocks = (n + BLOCK - 1) / BLOCK;
    const i64 q = (i64)blockIdx.x * QPC + threadIdx.x / TPB;
    const int lane = threadIdx.x % TPB;
    const i64 base = q * BLOCK + (i64)lane * E;

    float v[E];
    if (aligned && base + E <= n) {
        load8(x + base, v);
    } else {
#pragma unroll
        for (int i = 0; i < E; ++i) v[i] = base + i < n ? to_float(x[base + i]) : 0.0f;
    }
    float m = 0.0f;
#pragma unroll
    for (int i = 0; i < E; ++i) m = nanmax(m, fabsf(v[i]));

    if constexpr (TPB <= 32) {
        m = group_nanmax<TPB>(m);
        __syncthreads();  // smid is complete
    } else {
        // a quantization block spans WPB whole warps; a CTA may hold several blocks (QPC)
        constexpr int WPB = TPB / 32;
        m = group_nanmax<32>(m);
        if ((threadIdx.x & 31) == 0) swarp[threadIdx.x >> 5] = m;
        __syncthreads();  // swarp and smid are complete
        const int w0 = (threadIdx.x / TPB) * WPB;  // this block's first warp
        m = swarp[w0];
#pragma unroll
        for (int w = 1; w < WPB; ++w) m = nanmax(m, swarp[w0 + w]);
    }
    if (q >= nblocks) return;
    if (lane == 0) absmax[q] = m;

    int c[E];
    const float inv = m > 0.0f ? 1.0f / m : 1.0f;
    if (!finite(m) || !finite(inv)) {  // NaN/Inf in the block, or m < 2**-128
#pragma unroll
        for (int i = 0; i < E; ++i) c[i] = zero_code;
    } else {
#pragma unroll
        for (int i = 0; i < E; ++i) c[i] = nearest_code(smid, v[i] * inv);
    }
    store_codes(codes, base, n, base + E <= n, c);
}

// codes: n bytes (8-byte aligned when `aligned`); qmap: 256 floats; out: n elements.
template <typename T, int BLOCK>
__global__ void __launch_bounds__(256)
dequantize_blockwise(const u8* __restrict__ codes, const float* __restrict__ qmap,
                     const float* __restrict__ absmax, T* __restrict__ out,
                     const i64 n, const int aligned) {
    __shared__ float smap[256];
    smap[threadIdx.x] = qmap[threadIdx.x];
    __syncthreads();

    const i64 base = ((i64)blockIdx.x * 256 + threadIdx.x) * E;
    if (base >= n) return;
    const float a = absmax[base / BLOCK];  // BLOCK % E == 0: a thread never straddles blocks
    float v[E];
    if (aligned && base + E <= n) {
        const uint2 packed = *reinterpret_cast<const uint2*>(codes + base);
#pragma unroll
        for (int i = 0; i < 4; ++i) v[i] = smap[(packed.x >> (8 * i)) & 0xff] * a;
#pragma unroll
        for (int i = 0; i < 4; ++i) v[4 + i] = smap[(packed.y >> (8 * i)) & 0xff] * a;
        store8(out + base, v);
    } else {
        for (int i = 0; i < E && base + i < n; ++i) out[base + i] = from_float<T>(smap[codes[base + i]] * a);
    }
}
