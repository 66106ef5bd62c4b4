// LLM.int8() kernels for Linear8bitLt. The PyTorch reference of every kernel is in
// kernels/int8.py; products are rounded with __fmul_rn / __fadd_rn (never contracted
// into an FMA) so that the CUDA path and the reference agree bit for bit where the
// reference computes the same sequence of fp32 operations.
//
//   outlier_columns   flags[k] = 1 where any |x[m, k]| >= threshold
//   select_outliers   flags -> slots of the first `cap` outlier columns (device side: the
//                     forward never waits on the host for the number of outlier columns)
//   quantize_rows     per token row: absmax over the non-outlier columns, int8 codes
//                     rint(x * 127 / absmax) (outlier columns -> 0), row scale absmax / 127,
//                     and the outlier columns' values copied out in fp32
//   gather_outlier_weights  the weight's outlier columns, transposed
//   int8_epilogue     out = acc * (row_scale[m] * SCB[n]) + (x_out @ q_out^T)[m, n] * SCB[n] + bias[n]
//   dequantize_rows   W[n, k] = q[n, k] * SCB[n], rounded once to the output dtype
//   gemv_int8         decode path (<= 16 tokens): out = (x @ q^T) * SCB + bias, x read in
//                     float, int8 weights dequantized in registers, fp32 accumulation
#include "common.cuh"

typedef signed char i8;

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    return v;
}

// x: [M, K] row-major; flags: K ints, zeroed by the caller. One thread per column, each
// CTA row of the grid scans `rows` token rows, so reads are coalesced across the warp.
template <typename T>
__global__ void outlier_columns(const T* __restrict__ x, int* __restrict__ flags, const i64 M, const int K,
                                const float threshold, const int rows) {
    const int k = blockIdx.x * blockDim.x + threadIdx.x;
    if (k >= K) return;
    const i64 m0 = (i64)blockIdx.y * rows;
    const i64 m1 = m0 + rows < M ? m0 + rows : M;
    bool found = false;
    for (i64 m = m0; m < m1 && !found; ++m) found = fabsf(to_float(x[m * K + k])) >= threshold;
    if (found) flags[k] = 1;  // every writer stores the same value: no atomic needed
}

// One CTA of 1024 threads turns the 0/1 column flags into slots, in column order: the
// first `cap` flagged columns get slots 0..cap-1 (cols[slot] = k), every other column -1;
// count = number of slots used. Flagged columns past the cap stay in the int8 path.
__global__ void select_outliers(int* __restrict__ flags, int* __restrict__ cols, int* __restrict__ count,
                                const int K, const int cap) {
    __shared__ int warp_total[32];
    __shared__ int base;
    const int lane = threadIdx.x % 32;
    const int warp = threadIdx.x / 32;
    if (threadIdx.x == 0) base = 0;
    __syncthreads();
    for (int k0 = 0; k0 < K; k0 += 1024) {
        const int k = k0 + threadIdx.x;
        const int f = (k < K && flags[k] != 0) ? 1 : 0;
        int v = f;  // inclusive scan within the warp
#pragma unroll
        for (int off = 1; off < 32; off <<= 1) {
            const int t = __shfl_up_sync(0xffffffffu, v, off);
            if (lane >= off) v += t;
        }
        if (lane == 31) warp_total[warp] = v;
        __syncthreads();
        if (warp == 0) {
            int w = warp_total[lane];
#pragma unroll
            for (int off = 1; off < 32; off <<= 1) {
                const int t = __shfl_up_sync(0xffffffffu, w, off);
                if (lane >= off) w += t;
            }
            warp_total[lane] = w;  // inclusive prefix over warps
        }
        __syncthreads();
        const int slot = base + (warp > 0 ? warp_total[warp - 1] : 0) + v - f;
        if (k < K) {
            const bool kept = f && slot < cap;
            flags[k] = kept ? slot : -1;
            if (kept) cols[slot] = k;
        }
        const int total = warp_total[31];
        __syncthreads();
        if (threadIdx.x == 0) base += total;
        __syncthreads();
    }
    if (threadIdx.x == 0) count[0] = base < cap ? base : cap;
}

// One CTA (256 threads) per token row. slots may be null (threshold 0: no outliers);
// otherwise slots[k] >= 0 marks an outlier column, whose value goes to xo[m, slots[k]]
// (fp32, the float half of the decomposition) and whose code is 0.
// xq: [M, Kp] with Kp >= K (columns K..Kp-1 are written as 0: padding for the int8 GEMM).
// `vec` (K % 8 == 0, Kp == K, x 16-byte aligned): 8 elements per thread and access.
// A row holding NaN/Inf outside the outlier columns gets row_scale NaN/Inf and codes 0,
// so its outputs are NaN, as in the reference.
template <typename T>
__global__ void quantize_rows(const T* __restrict__ x, const int* __restrict__ slots, i8* __restrict__ xq,
                              float* __restrict__ row_scale, float* __restrict__ xo, const int K, const int Kp,
                              const int cap, const int vec) {
    __shared__ float swarp[8];
    const i64 m = blockIdx.x;
    const T* row = x + m * K;
    i8* qrow = xq + m * Kp;
    float amax = 0.0f;
    if (vec) {
        for (int k = threadIdx.x * 8; k < K; k += 256 * 8) {
            float v[8];
            load8(row + k, v);
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                if (slots == nullptr || slots[k + i] < 0) {
                    amax = nanmax(amax, fabsf(v[i]));
                } else {
                    xo[m * cap + slots[k + i]] = v[i];
                }
            }
        }
    } else {
        for (int k = threadIdx.x; k < K; k += 256) {
            const float v = to_float(row[k]);
            if (slots == nullptr || slots[k] < 0) {
                amax = nanmax(amax, fabsf(v));
            } else {
                xo[m * cap + slots[k]] = v;
            }
        }
    }
    amax = group_nanmax<32>(amax);
    if (threadIdx.x % 32 == 0) swarp[threadIdx.x / 32] = amax;
    __syncthreads();
    amax = swarp[0];
#pragma unroll
    for (int w = 1; w < 8; ++w) amax = nanmax(amax, swarp[w]);
    // A usable row (finite, non-zero absmax) has only finite values outside the outlier columns.
    const bool usable = amax > 0.0f && finite(amax);
    const float inv = usable ? __fdiv_rn(127.0f, amax) : 0.0f;
    if (vec) {
        for (int k = threadIdx.x * 8; k < K; k += 256 * 8) {
            float v[8];
            load8(row + k, v);
            union { uint2 u; i8 b[8]; } pack;
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                const float p = __fmul_rn(v[i], inv);
                // finite(p): inv overflows for amax < 2**-128 and the reference's
                // nan_to_num then stores 0, as for NaN
                const bool kept = usable && (slots == nullptr || slots[k + i] < 0) && finite(p);
                const float t = kept ? fminf(fmaxf(rintf(p), -127.0f), 127.0f) : 0.0f;
                pack.b[i] = (i8)(int)t;
            }
            *reinterpret_cast<uint2*>(qrow + k) = pack.u;
        }
    } else {
        for (int k = threadIdx.x; k < Kp; k += 256) {
            const float p = k < K ? __fmul_rn(to_float(row[k]), inv) : 0.0f;
            const bool kept = usable && k < K && (slots == nullptr || slots[k] < 0) && finite(p);
            const float t = kept ? fminf(fmaxf(rintf(p), -127.0f), 127.0f) : 0.0f;
            qrow[k] = (i8)(int)t;
        }
    }
    if (threadIdx.x == 0) row_scale[m] = __fdiv_rn(amax, 127.0f);
}

// qo[j, n] = q[n, cols[j]] for j < count: the outlier columns of the weight, transposed so
// that the epilogue reads them coalesced along n.
__global__ void gather_outlier_weights(const i8* __restrict__ q, const int* __restrict__ cols,
                                       const int* __restrict__ count, i8* __restrict__ qo, const int N, const int K) {
    const int n = blockIdx.x * blockDim.x + threadIdx.x;
    if (n >= N) return;
    const int c = count[0];
    for (int j = 0; j < c; ++j) qo[(i64)j * N + n] = q[(i64)n * K + cols[j]];
}

// acc: [M, ldacc] int32 (ldacc >= N); bias: [N] fp32 or null. With count non-null, the
// float half: osum = sum_{j < count} xo[m, j] * qo[j, n] (fp32, in slot order).
// out = acc * (row_scale[m] * SCB[n]) + osum * SCB[n] + bias[n], rounded once to T.
// Grid: x over columns, y over rows (striding when M > gridDim.y).
template <typename T>
__global__ void int8_epilogue(const int* __restrict__ acc, const int ldacc, const float* __restrict__ row_scale,
                              const float* __restrict__ scb, const float* __restrict__ xo,
                              const i8* __restrict__ qo, const int* __restrict__ count, const int cap,
                              const float* __restrict__ bias, T* __restrict__ out, const i64 M, const int N) {
    const int c = count != nullptr ? count[0] : 0;
    for (i64 m = blockIdx.y; m < M; m += gridDim.y) {
        const float rs = row_scale[m];
        for (int n = blockIdx.x * blockDim.x + threadIdx.x; n < N; n += gridDim.x * blockDim.x) {
            const float s = scb[n];
            float v = __fmul_rn((float)acc[m * ldacc + n], __fmul_rn(rs, s));
            if (c > 0) {
                float osum = 0.0f;
                for (int j = 0; j < c; ++j) {
                    osum = __fadd_rn(osum, __fmul_rn(xo[m * cap + j], (float)qo[(i64)j * N + n]));
                }
                v = __fadd_rn(v, __fmul_rn(osum, s));
            }
            if (bias != nullptr) v = __fadd_rn(v, bias[n]);
            out[m * N + n] = from_float<T>(v);
        }
    }
}

// q: [rows, K] int8, scb: [rows] -> out: [rows, K] in T. Grid: x over K, y over rows.
template <typename T>
__global__ void dequantize_rows(const i8* __restrict__ q, const float* __restrict__ scb, T* __restrict__ out,
                                const i64 rows, const int K) {
    for (i64 r = blockIdx.y; r < rows; r += gridDim.y) {
        const float s = scb[r];
        for (int k = blockIdx.x * blockDim.x + threadIdx.x; k < K; k += gridDim.x * blockDim.x) {
            out[r * K + k] = from_float<T>(__fmul_rn((float)q[r * K + k], s));
        }
    }
}

// Decode path. A CTA is 8 warps; each warp owns R consecutive output rows and walks K in
// tiles of 512: lane l handles the 16 weights k0 + 16 l .. k0 + 16 l + 15 of each of its
// rows (one 16-byte load per row when `vec`), against the MT token rows of x staged as
// fp32 in shared memory. The staged tile is padded to 20 floats per 16 so that the
// lanes' float4 reads hit distinct banks. Weights are read once, straight from their
// int8 storage (half the bytes of fp16), which is why this beats an fp16 GEMV.
// out[m, n] = (sum_k x[m, k] * q[n, k]) * SCB[n] + bias[n], fp32 accumulation (per-lane
// partial sums, then a butterfly over the warp), rounded once to T. The accumulation uses
// explicit FMAs (the module is compiled with --fmad=false): at 16 tokens this loop, not the
// weight reads, bounds the kernel. The reference sums in another order anyway (a matmul).
// Four int8 (one 32-bit word) to exact floats without the slow I2F unit: flipping each
// byte's sign bit gives u = b + 128 in [0, 255]; the float with bit pattern 0x4B0000uu is
// 2^23 + u, and subtracting 2^23 + 128 leaves b. One PRMT and one FADD per value.
__device__ __forceinline__ void int8x4_to_float(unsigned int w, float* f) {
    const unsigned int u = w ^ 0x80808080u;
#pragma unroll
    for (int i = 0; i < 4; ++i) f[i] = __int_as_float(__byte_perm(u, 0x4B000000u, 0x7540u + i)) - 8388736.0f;
}

#define GEMV_WARPS 8
#define GEMV_KT 512
#define GEMV_XS 640

template <typename T, int MT, int R>
__global__ void __launch_bounds__(256) gemv_int8(const T* __restrict__ x, const i8* __restrict__ w,
                                                 const float* __restrict__ scb, const float* __restrict__ bias,
                                                 T* __restrict__ out, const int M, const int N, const int K,
                                                 const int vec) {
    __shared__ __align__(16) float xs[MT * GEMV_XS];
    const int warp = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    const int row0 = (blockIdx.x * GEMV_WARPS + warp) * R;
    float acc[R][MT];
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
        for (int m = 0; m < MT; ++m) acc[r][m] = 0.0f;

    for (int k0 = 0; k0 < K; k0 += GEMV_KT) {
        __syncthreads();
        for (int i = threadIdx.x; i < MT * GEMV_KT; i += 256) {
            const int m = i / GEMV_KT;
            const int kk = i - m * GEMV_KT;
            const int k = k0 + kk;
            const float v = (m < M && k < K) ? to_float(x[(i64)m * K + k]) : 0.0f;
            xs[m * GEMV_XS + (kk / 16) * 20 + kk % 16] = v;
        }
        __syncthreads();
        const int kl = k0 + lane * 16;
        if (kl >= K) continue;
        float wf[R][16];
#pragma unroll
        for (int r = 0; r < R; ++r) {
            const int n = row0 + r;
            const i8* wrow = w + (i64)(n < N ? n : 0) * K;
            if (vec) {
                union { int4 v; unsigned int w[4]; } pack;
                pack.v = n < N ? *reinterpret_cast<const int4*>(wrow + kl) : make_int4(0, 0, 0, 0);
#pragma unroll
                for (int j = 0; j < 4; ++j) int8x4_to_float(pack.w[j], &wf[r][4 * j]);
            } else {
#pragma unroll
                for (int j = 0; j < 16; ++j) wf[r][j] = (n < N && kl + j < K) ? (float)wrow[kl + j] : 0.0f;
            }
        }
#pragma unroll
        for (int m = 0; m < MT; ++m) {
            const float4* xp = reinterpret_cast<const float4*>(xs + m * GEMV_XS + lane * 20);
            float xv[16];
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const float4 t = xp[j];
                xv[4 * j] = t.x;
                xv[4 * j + 1] = t.y;
                xv[4 * j + 2] = t.z;
                xv[4 * j + 3] = t.w;
            }
#pragma unroll
            for (int r = 0; r < R; ++r)
#pragma unroll
                for (int j = 0; j < 16; ++j) acc[r][m] = __fmaf_rn(xv[j], wf[r][j], acc[r][m]);
        }
    }
#pragma unroll
    for (int r = 0; r < R; ++r) {
        const int n = row0 + r;
#pragma unroll
        for (int m = 0; m < MT; ++m) {
            const float v = warp_sum(acc[r][m]);
            if (lane == 0 && n < N && m < M) {
                float o = __fmul_rn(v, scb[n]);
                if (bias != nullptr) o = __fadd_rn(o, bias[n]);
                out[(i64)m * N + n] = from_float<T>(o);
            }
        }
    }
}
