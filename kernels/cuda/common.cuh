// Shared device helpers for optim8's kernels. Compiled by NVRTC (kernels/_nvrtc.py) with no
// system or CUDA headers, and by the system C++ compiler for the host device: half and
// bfloat16 travel as their 16-bit patterns and are converted here, so the sources build the
// same under every CUDA toolkit.
#pragma once

typedef unsigned char u8;
typedef unsigned short u16;
typedef long long i64;

// Storage types for the three floating dtypes a kernel is instantiated for.
struct f16 { u16 bits; };
struct bf16 { u16 bits; };

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(bf16 x) {
    return __uint_as_float(((unsigned int)x.bits) << 16);
}

// Round-to-nearest-even, as torch's .to(dtype) does.
template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }

// fp16 conversions: the one place where the GPU build and the host device
// (kernels/host/cuda_host.h) differ. PTX cvt on the GPU, the compiler's IEEE _Float16 on the
// host; both widen exactly and narrow with round-to-nearest-even.
#if defined(OPTIM8_HOST_DEVICE)
__device__ __forceinline__ float to_float(f16 x) {
    _Float16 h;
    __builtin_memcpy(&h, &x.bits, 2);
    return (float)h;
}
template <> __device__ __forceinline__ f16 from_float<f16>(float x) {
    const _Float16 h = (_Float16)x;
    f16 r;
    __builtin_memcpy(&r.bits, &h, 2);
    return r;
}
#else
__device__ __forceinline__ float to_float(f16 x) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x.bits));
    return f;
}
template <> __device__ __forceinline__ f16 from_float<f16>(float x) {
    f16 r;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r.bits) : "f"(x));
    return r;
}
#endif
template <> __device__ __forceinline__ bf16 from_float<bf16>(float x) {
    bf16 r;
    unsigned int u = __float_as_uint(x);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        r.bits = (u16)((u >> 16) | 0x40u);  // NaN stays a (quiet) NaN
    } else {
        u += 0x7fffu + ((u >> 16) & 1u);
        r.bits = (u16)(u >> 16);
    }
    return r;
}

// 8 consecutive elements of T <-> 8 floats through 16-byte vector accesses; p must be
// 16-byte aligned (32 for float). Every kernel gives each thread 8 elements.
template <typename T>
__device__ __forceinline__ void load8(const T* __restrict__ p, float* v) {
    constexpr int N = sizeof(T) * 8 / 16;
    union { uint4 u[N]; T t[8]; } buf;
#pragma unroll
    for (int i = 0; i < N; ++i) buf.u[i] = reinterpret_cast<const uint4*>(p)[i];
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = to_float(buf.t[i]);
}

template <typename T>
__device__ __forceinline__ void store8(T* __restrict__ p, const float* v) {
    constexpr int N = sizeof(T) * 8 / 16;
    union { uint4 u[N]; T t[8]; } buf;
#pragma unroll
    for (int i = 0; i < 8; ++i) buf.t[i] = from_float<T>(v[i]);
#pragma unroll
    for (int i = 0; i < N; ++i) reinterpret_cast<uint4*>(p)[i] = buf.u[i];
}

// 8 codes (one per int) to bytes: one 8-byte store when `vec`, else bounds-checked bytes.
__device__ __forceinline__ void store_codes(u8* __restrict__ dst, i64 base, i64 n, bool vec, const int* c) {
    if (vec) {
        uint2 packed;
        packed.x = c[0] | (c[1] << 8) | (c[2] << 16) | ((unsigned int)c[3] << 24);
        packed.y = c[4] | (c[5] << 8) | (c[6] << 16) | ((unsigned int)c[7] << 24);
        *reinterpret_cast<uint2*>(dst + base) = packed;
    } else {
#pragma unroll
        for (int i = 0; i < 8; ++i)
            if (base + i < n) dst[base + i] = (u8)c[i];
    }
}

// false for NaN and +-Inf
__device__ __forceinline__ bool finite(float x) { return fabsf(x) <= 3.402823466e38f; }

// max that propagates NaN (fmaxf drops it): a block holding a NaN must report NaN.
__device__ __forceinline__ float nanmax(float a, float b) {
    return (a > b || a != a) ? a : b;
}

// Number of the 255 sorted decision boundaries `mid` that lie strictly below v:
// the index of v's nearest entry in the 256-entry map (ties go to the lower entry).
// Same answer as torch.bucketize(v, mid, right=False), NaN included (255).
__device__ __forceinline__ int nearest_code(const float* __restrict__ mid, float v) {
    int idx = 0;
#pragma unroll
    for (int step = 128; step > 0; step >>= 1) {
        if (!(mid[idx + step - 1] >= v)) idx += step;
    }
    return idx;
}

// NaN-propagating max over the `width` lanes of each aligned group of a warp.
template <int WIDTH>
__device__ __forceinline__ float group_nanmax(float m) {
#pragma unroll
    for (int off = WIDTH / 2; off > 0; off >>= 1) {
        m = nanmax(m, __shfl_xor_sync(0xffffffffu, m, off));
    }
    return m;
}

// The signed map's block scale (kernels/blockwise.py) is the block's value of largest
// magnitude, +a over -a on a tie, NaN over everything. As an unsigned key, (|x| bits << 1)
// plus 1 for a positive sign, that order is the integers' order: one max per step of the
// reduction, commutative (every lane of a group ends its butterfly with the same key).
__device__ __forceinline__ unsigned int extreme_key(float x) {
    const unsigned int b = __float_as_uint(x);
    return ((b & 0x7fffffffu) << 1) | ((b >> 31) ^ 1u);
}
__device__ __forceinline__ float extreme_value(unsigned int k) {
    return __uint_as_float((k >> 1) | (((k & 1u) ^ 1u) << 31));
}
__device__ __forceinline__ unsigned int umax(unsigned int a, unsigned int b) { return a > b ? a : b; }

template <int WIDTH>
__device__ __forceinline__ unsigned int group_umax(unsigned int k) {
#pragma unroll
    for (int off = WIDTH / 2; off > 0; off >>= 1) {
        k = umax(k, __shfl_xor_sync(0xffffffffu, k, off));
    }
    return k;
}

// A block's stored absmax and the multiplier of its values from its scale `m` (the extreme
// of the signed map, the largest magnitude of the unsigned one). Returns whether its codes
// are encoded: a block with a NaN or Inf is stored as NaN, one whose largest magnitude is
// below 2**-104 as zero (both with every code at the zero entry).
__device__ __forceinline__ bool block_scale(float m, float* absmax, float* inv) {
    const float amax = fabsf(m);
    if (finite(amax) && amax >= 0x1p-104f) {
        *absmax = m;
        *inv = 1.0f / m;
        return true;
    }
    *absmax = finite(amax) ? 0.0f : __uint_as_float(0x7fc00000u);
    *inv = 1.0f;
    return false;
}
