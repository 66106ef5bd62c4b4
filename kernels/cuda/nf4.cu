// 4-bit (NF4 / FP4) weight kernels for Linear4bit. The PyTorch reference of every kernel is in
// kernels/nf4.py. Codes are packed two per byte, even elements in the high nibble; one absmax
// per `blocksize` elements, either fp32 (DQ = 0) or double-quantized (DQ = 1): a uint8 code
// into the 256-entry nested map, one fp32 nested absmax per 256 blocks, plus an fp32 offset:
//
//   absmax_b = fp32(nested_map[q_b] * nested_absmax[b / 256]) + offset
//   W_e      = fp32(code[nibble_e] * absmax_{e / blocksize})
//
// Both products and the sum are rounded with __fmul_rn / __fadd_rn, as the reference does, so
// dequantize_4bit matches it bit for bit.
//
//   dequantize_4bit  elements [start, start + n) of the flattened weight, in T
//   gemv_4bit        decode path (<= 16 tokens): out = x @ W^T + bias, the packed weight read
//                    directly and decoded in registers, fp32 accumulation
#include "common.cuh"

#define NESTED_BLOCK 256

template <int DQ>
__device__ __forceinline__ float block_absmax(const i64 b, const float* __restrict__ absmax,
                                              const u8* __restrict__ qabsmax, const float* __restrict__ nmap,
                                              const float* __restrict__ nabs, const float offset) {
    if (DQ) return __fadd_rn(__fmul_rn(nmap[qabsmax[b]], nabs[b / NESTED_BLOCK]), offset);
    return absmax[b];
}

__device__ __forceinline__ int nibble_at(const u8* __restrict__ packed, const i64 e) {
    const int byte = packed[e >> 1];
    return (e & 1) ? (byte & 15) : (byte >> 4);
}

// 8 elements per thread; a block of 256 threads covers 2048 output elements.
template <typename T, int DQ>
__global__ void __launch_bounds__(256)
dequantize_4bit(const u8* __restrict__ packed, const float* __restrict__ code, const float* __restrict__ absmax,
                const u8* __restrict__ qabsmax, const float* __restrict__ nmap, const float* __restrict__ nabs,
                const float offset, T* __restrict__ out, const i64 start, const i64 n, const int blocksize) {
    __shared__ float scode[16];
    if (threadIdx.x < 16) scode[threadIdx.x] = code[threadIdx.x];
    __syncthreads();
    const i64 i0 = ((i64)blockIdx.x * 256 + threadIdx.x) * 8;
    if (i0 >= n) return;
    i64 cached = -1;
    float a = 0.0f;
    for (int j = 0; j < 8 && i0 + j < n; ++j) {
        const i64 e = start + i0 + j;
        const i64 b = e / blocksize;
        if (b != cached) {
            a = block_absmax<DQ>(b, absmax, qabsmax, nmap, nabs, offset);
            cached = b;
        }
        out[i0 + j] = from_float<T>(__fmul_rn(scode[nibble_at(packed, e)], a));
    }
}

__device__ __forceinline__ float warp_sum4(float v) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    return v;
}

// Decode path. A CTA is 8 warps; each warp owns G4_R consecutive output rows and walks K in
// tiles of 256: lane l takes the 8 weights k0 + 8 l .. k0 + 8 l + 7 of each of its rows (one
// 32-bit load of 8 codes per row when `vec`: K % 8 == 0, so 8 consecutive elements of a row
// are one aligned word and lie in one absmax block), against the MT token rows of x staged as
// fp32 in shared memory, padded to 12 floats per 8 so that the lanes' float4 reads of a
// quarter-warp hit distinct banks. Weights are read once from their packed storage (a quarter
// of the bytes of fp16). out[m, n] = sum_k x[m, k] * W[n, k] + bias[n]: fp32 partial sums per
// lane with explicit FMAs (the module is compiled with --fmad=false), a butterfly over the
// warp, one rounding to T. The reference sums in another order (a matmul).
#define G4_R 2
#define G4_KT 256
#define G4_XS 384

template <typename T, int MT, int DQ>
__global__ void __launch_bounds__(256)
gemv_4bit(const T* __restrict__ x, const u8* __restrict__ w, const float* __restrict__ code,
          const float* __restrict__ absmax, const u8* __restrict__ qabsmax, const float* __restrict__ nmap,
          const float* __restrict__ nabs, const float offset, const float* __restrict__ bias, T* __restrict__ out,
          const int M, const int N, const int K, const int blocksize, const int vec) {
    __shared__ __align__(16) float xs[MT * G4_XS];
    __shared__ float scode[16];
    const int warp = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    const int row0 = (blockIdx.x * 8 + warp) * G4_R;
    if (threadIdx.x < 16) scode[threadIdx.x] = code[threadIdx.x];
    float acc[G4_R][MT];
#pragma unroll
    for (int r = 0; r < G4_R; ++r)
#pragma unroll
        for (int m = 0; m < MT; ++m) acc[r][m] = 0.0f;

    for (int k0 = 0; k0 < K; k0 += G4_KT) {
        __syncthreads();
        for (int i = threadIdx.x; i < MT * G4_KT; i += 256) {
            const int m = i / G4_KT;
            const int kk = i - m * G4_KT;
            const int k = k0 + kk;
            const float v = (m < M && k < K) ? to_float(x[(i64)m * K + k]) : 0.0f;
            xs[m * G4_XS + (kk / 8) * 12 + kk % 8] = v;
        }
        __syncthreads();
        const int kl = k0 + lane * 8;
        if (kl >= K) continue;
        float wf[G4_R][8];
#pragma unroll
        for (int r = 0; r < G4_R; ++r) {
            const int n = row0 + r;
            const i64 e0 = (i64)(n < N ? n : 0) * K + kl;
            if (vec) {
                const unsigned int word = n < N ? *reinterpret_cast<const unsigned int*>(w + (e0 >> 1)) : 0u;
                const float a = n < N ? block_absmax<DQ>(e0 / blocksize, absmax, qabsmax, nmap, nabs, offset) : 0.0f;
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    const unsigned int byte = (word >> (8 * j)) & 0xffu;
                    wf[r][2 * j] = __fmul_rn(scode[byte >> 4], a);
                    wf[r][2 * j + 1] = __fmul_rn(scode[byte & 15u], a);
                }
            } else {
#pragma unroll
                for (int j = 0; j < 8; ++j) {
                    const i64 e = e0 + j;
                    wf[r][j] = (n < N && kl + j < K)
                                   ? __fmul_rn(scode[nibble_at(w, e)],
                                               block_absmax<DQ>(e / blocksize, absmax, qabsmax, nmap, nabs, offset))
                                   : 0.0f;
                }
            }
        }
#pragma unroll
        for (int m = 0; m < MT; ++m) {
            const float4* xp = reinterpret_cast<const float4*>(xs + m * G4_XS + lane * 12);
            const float4 t0 = xp[0];
            const float4 t1 = xp[1];
            const float xv[8] = {t0.x, t0.y, t0.z, t0.w, t1.x, t1.y, t1.z, t1.w};
#pragma unroll
            for (int r = 0; r < G4_R; ++r)
#pragma unroll
                for (int j = 0; j < 8; ++j) acc[r][m] = __fmaf_rn(xv[j], wf[r][j], acc[r][m]);
        }
    }
#pragma unroll
    for (int r = 0; r < G4_R; ++r) {
        const int n = row0 + r;
#pragma unroll
        for (int m = 0; m < MT; ++m) {
            const float v = warp_sum4(acc[r][m]);
            if (lane == 0 && n < N && m < M) {
                const float o = bias != nullptr ? __fadd_rn(v, bias[n]) : v;
                out[(i64)m * N + n] = from_float<T>(o);
            }
        }
    }
}
