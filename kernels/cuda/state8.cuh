// 8-bit state helpers shared by every optimizer kernel (adam.cu, update.cuh): the LUT encoder,
// 8-wide loads and stores, and the blockwise requantizer. Include after common.cuh.
#ifndef OPTIM8_STATE8_CUH
#define OPTIM8_STATE8_CUH

#define E 8
#define CHUNK 256

// torch.bucketize(v, mid) for finite v: `lut` (kernels/adam.py, _gpu_encode_table) maps
// the cell of v (sign, exponent field 103..128 or "tiny", top 7 mantissa bits) to the
// number of boundaries below the cell's lowest value; walking up past the boundaries
// inside the cell (rarely more than one) gives the exact count.
#define LUT_EXP0 102
#define LUT_NEXP 27
#define LUT_SIZE (2 * LUT_NEXP * 128)

__device__ __forceinline__ int encode(const u8* __restrict__ lut, const float* __restrict__ mid, float v) {
    const unsigned int b = __float_as_uint(v);
    int e = (int)((b >> 23) & 0xffu) - LUT_EXP0;
    e = e < 0 ? 0 : (e >= LUT_NEXP ? LUT_NEXP - 1 : e);
    const int m7 = e == 0 ? 0 : (int)((b >> 16) & 0x7fu);
    int c = lut[((int)(b >> 31) * LUT_NEXP + e) * 128 + m7];
    while (c < 255 && !(mid[c] >= v)) ++c;  // NaN counts every boundary, as torch.bucketize does
    return c;
}

__device__ __forceinline__ void load_codes(const u8* __restrict__ src, i64 base, i64 n, bool vec, int* c) {
    if (vec) {
        const uint2 packed = *reinterpret_cast<const uint2*>(src + base);
#pragma unroll
        for (int i = 0; i < 4; ++i) c[i] = (packed.x >> (8 * i)) & 0xff;
#pragma unroll
        for (int i = 0; i < 4; ++i) c[4 + i] = (packed.y >> (8 * i)) & 0xff;
    } else {
#pragma unroll
        for (int i = 0; i < E; ++i) c[i] = base + i < n ? src[base + i] : 0;
    }
}

template <typename T>
__device__ __forceinline__ void load_vals(const T* __restrict__ src, i64 base, i64 n, bool vec, float* x) {
    if (vec) {
        load8(src + base, x);
    } else {
#pragma unroll
        for (int i = 0; i < E; ++i) x[i] = base + i < n ? to_float(src[base + i]) : 0.0f;
    }
}

template <typename T>
__device__ __forceinline__ void store_vals(T* __restrict__ dst, i64 base, i64 n, bool vec, const float* x) {
    if (vec) {
        store8(dst + base, x);
    } else {
#pragma unroll
        for (int i = 0; i < E; ++i)
            if (base + i < n) dst[base + i] = from_float<T>(x[i]);
    }
}

// Quantize this lane's 8 values with the block scale shared by the TPB lanes of its
// quantization block; same algorithm as kernels/blockwise.py (SIGNED: the signed map's
// rules, else the unsigned map's). Returns the block's stored absmax.
template <int TPB, bool SIGNED>
__device__ __forceinline__ float quantize8(const u8* __restrict__ lut, const float* __restrict__ mid, const float* x, int zero, int* c) {
    float m = 0.0f;
    if (SIGNED) {
        unsigned int k = 0;
#pragma unroll
        for (int i = 0; i < E; ++i) k = umax(k, extreme_key(x[i]));
        m = extreme_value(group_umax<TPB>(k));
    } else {
#pragma unroll
        for (int i = 0; i < E; ++i) m = nanmax(m, fabsf(x[i]));
        m = group_nanmax<TPB>(m);
    }
    float a, inv;
    if (!block_scale(m, &a, &inv)) {  // NaN/Inf (only from corrupt old state) or a tiny block
#pragma unroll
        for (int i = 0; i < E; ++i) c[i] = zero;
    } else {
#pragma unroll
        for (int i = 0; i < E; ++i) {
            const float s = __fmul_rn(x[i], inv);
            c[i] = encode(lut, mid, s);
            if (!SIGNED && c[i] == 0 && s > 0.0f) c[i] = 1;  // a positive v never encodes to zero
        }
    }
    return a;
}

#endif  // OPTIM8_STATE8_CUH
