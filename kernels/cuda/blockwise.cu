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
// codes: n bytes; absmax: ceil(n / BLOCK) floats. `aligned` says x is 16-byte aligned;
// `signed_map` selects the signed map's rules (absmax = the block's extreme value) or the
// unsigned one's (absmax = the largest magnitude; a positive value never takes code 0).
// A block holding NaN or +-Inf gets absmax NaN and every code zero_code; a block whose
// largest magnitude is below 2**-104 gets absmax 0 and every code zero_code.
template <typename T, int BLOCK>
__global__ void quantize_blockwise(const T* __restrict__ x, const float* __restrict__ mid,
                                   u8* __restrict__ codes, float* __restrict__ absmax,
                                   const i64 n, const int zero_code, const int aligned,
                                   const int signed_map) {
    constexpr int TPB = BLOCK / E;                 // threads per quantization block
    constexpr int CTA = TPB >= 256 ? TPB : 256;
    constexpr int QPC = CTA / TPB;                 // quantization blocks per CTA
    __shared__ float smid[256];
    __shared__ unsigned int swarp[CTA / 32];

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
    // the block's scale: its extreme value (signed map: reduced as extreme_key) or its
    // largest magnitude (unsigned map: the same integer max over |x| bits, NaN the largest)
    unsigned int k = 0;
    if (signed_map) {
#pragma unroll
        for (int i = 0; i < E; ++i) k = umax(k, extreme_key(v[i]));
    } else {
#pragma unroll
        for (int i = 0; i < E; ++i) k = umax(k, __float_as_uint(v[i]) & 0x7fffffffu);
    }

    if constexpr (TPB <= 32) {
        k = group_umax<TPB>(k);
        __syncthreads();  // smid is complete
    } else {
        // a quantization block spans WPB whole warps; a CTA may hold several blocks (QPC)
        constexpr int WPB = TPB / 32;
        k = group_umax<32>(k);
        if ((threadIdx.x & 31) == 0) swarp[threadIdx.x >> 5] = k;
        __syncthreads();  // swarp and smid are complete
        const int w0 = (threadIdx.x / TPB) * WPB;  // this block's first warp
        k = swarp[w0];
#pragma unroll
        for (int w = 1; w < WPB; ++w) k = umax(k, swarp[w0 + w]);
    }
    const float m = signed_map ? extreme_value(k) : __uint_as_float(k);
    if (q >= nblocks) return;
    float a, inv;
    const bool ok = block_scale(m, &a, &inv);
    if (lane == 0) absmax[q] = a;

    int c[E];
    if (!ok) {
#pragma unroll
        for (int i = 0; i < E; ++i) c[i] = zero_code;
    } else {
#pragma unroll
        for (int i = 0; i < E; ++i) {
            const float s = v[i] * inv;
            c[i] = nearest_code(smid, s);
            if (!signed_map && c[i] == 0 && s > 0.0f) c[i] = 1;  // positive values never encode to zero
        }
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
