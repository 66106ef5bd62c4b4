// Fused multi-tensor Adam / AdamW step with 8-bit blockwise state (or fp32 state).
// The PyTorch reference is kernels/adam.py; every operation below is one correctly
// rounded fp32 operation (__fmul_rn & co. keep the compiler from contracting into FMAs),
// so both compute the same bits.
//
// One launch covers every tensor of a step. `table` holds, per tensor, 8 int64:
// p, g, m, v, m_absmax, v_absmax (pointers), n, aligned; then ntensors + 1 prefix sums of
// the tensors' chunk counts. A chunk is 256 consecutive elements of one tensor: one warp
// iteration, 8 elements per lane. Warps stride over all chunks (the grid is sized to the
// GPU), so the map tables (17.5 KB) are loaded into shared memory once per CTA.
//
// Per element, one pass over memory: load p, g, codes (or fp32 moments) and the block's
// absmax; dequantize; update the moments; reduce the new block absmax across the lanes
// that hold the block (a warp shuffle); requantize; update the parameter; store.
#include "common.cuh"
#include "state8.cuh"

template <typename T, bool STATE8, bool DECOUPLED, int BLOCK>
__global__ void __launch_bounds__(256)
adam_multi(const i64* __restrict__ table, const int ntensors, const i64 nchunks,
           const float* __restrict__ qmap1, const float* __restrict__ qmap2,
           const float* __restrict__ mid1, const float* __restrict__ mid2,
           const u8* __restrict__ lut1, const u8* __restrict__ lut2,
           const int zero1, const int zero2,
           const float beta1, const float omb1, const float beta2, const float omb2,
           const float eps, const float step_size, const float inv_bc2_sqrt,
           const float decay, const float weight_decay) {
    constexpr int TPB = BLOCK / E;  // lanes per quantization block (8, 16 or 32)
    static_assert(TPB <= 32 && CHUNK % BLOCK == 0, "a quantization block lives in one warp");
    __shared__ float smap1[256], smap2[256], smid1[256], smid2[256];
    __shared__ u8 slut1[LUT_SIZE], slut2[LUT_SIZE];
    if (STATE8) {
        for (int i = threadIdx.x; i < 256; i += blockDim.x) {
            smap1[i] = qmap1[i];
            smap2[i] = qmap2[i];
            if (i < 255) { smid1[i] = mid1[i]; smid2[i] = mid2[i]; }
        }
        for (int i = threadIdx.x; i < LUT_SIZE; i += blockDim.x) {
            slut1[i] = lut1[i];
            slut2[i] = lut2[i];
        }
        __syncthreads();
    }
    const i64* starts = table + (i64)ntensors * 8;
    const int lane = threadIdx.x & 31;
    const i64 warps = (i64)gridDim.x * (blockDim.x >> 5);

    for (i64 chunk = (i64)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5); chunk < nchunks; chunk += warps) {
        // the tensor holding this chunk: the last t with starts[t] <= chunk
        int lo = 0, hi = ntensors - 1;
        while (lo < hi) {
            const int mid = (lo + hi + 1) >> 1;
            if (starts[mid] <= chunk) lo = mid; else hi = mid - 1;
        }
        const i64* row = table + (i64)lo * 8;
        T* p = reinterpret_cast<T*>(row[0]);
        const T* g = reinterpret_cast<const T*>(row[1]);
        const i64 n = row[6];
        const bool aligned = row[7] != 0;
        const i64 base = (chunk - starts[lo]) * CHUNK + (i64)lane * E;
        // lanes past the end still join the block reduction (with zeros), then store nothing
        const bool vec = aligned && base + E <= n;

        float pv[E], gv[E], m[E], v[E];
        load_vals(p, base, n, vec, pv);
        load_vals(g, base, n, vec, gv);
        if (STATE8) {
            const float* ma = reinterpret_cast<const float*>(row[4]);
            const float* va = reinterpret_cast<const float*>(row[5]);
            const i64 q = base / BLOCK;  // a lane never straddles two blocks: BLOCK % 8 == 0
            const float am = base < n ? ma[q] : 0.0f;
            const float av = base < n ? va[q] : 0.0f;
            int cm[E], cv[E];
            load_codes(reinterpret_cast<const u8*>(row[2]), base, n, vec, cm);
            load_codes(reinterpret_cast<const u8*>(row[3]), base, n, vec, cv);
#pragma unroll
            for (int i = 0; i < E; ++i) {
                // past the end: exact zeros, as the reference pads (code 0 of the signed map
                // is -0.993, which would leak into the last block's new absmax)
                const bool in = base + i < n;
                m[i] = in ? __fmul_rn(smap1[cm[i]], am) : 0.0f;
                v[i] = in ? __fmul_rn(smap2[cv[i]], av) : 0.0f;
            }
        } else {
            load_vals(reinterpret_cast<const float*>(row[2]), base, n, vec, m);
            load_vals(reinterpret_cast<const float*>(row[3]), base, n, vec, v);
        }

#pragma unroll
        for (int i = 0; i < E; ++i) {
            float gi = gv[i];
            if (!DECOUPLED) gi = __fadd_rn(gi, __fmul_rn(pv[i], weight_decay));
            const float m1 = __fadd_rn(__fmul_rn(m[i], beta1), __fmul_rn(gi, omb1));
            const float v1 = __fadd_rn(__fmul_rn(v[i], beta2), __fmul_rn(__fmul_rn(gi, gi), omb2));
            if (finite(m1) && finite(v1)) {  // else: the element keeps p, m and v
                const float p1 = DECOUPLED ? __fmul_rn(pv[i], decay) : pv[i];
                const float denom = __fadd_rn(__fmul_rn(__fsqrt_rn(v1), inv_bc2_sqrt), eps);
                pv[i] = __fsub_rn(p1, __fdiv_rn(__fmul_rn(m1, step_size), denom));
                m[i] = m1;
                v[i] = v1;
            }
        }

        store_vals(p, base, n, vec, pv);
        if (STATE8) {
            int cm[E], cv[E];
            const float am = quantize8<TPB, true>(slut1, smid1, m, zero1, cm);
            const float av = quantize8<TPB, false>(slut2, smid2, v, zero2, cv);
            if (base < n) {
                store_codes(reinterpret_cast<u8*>(row[2]), base, n, vec, cm);
                store_codes(reinterpret_cast<u8*>(row[3]), base, n, vec, cv);
                if ((lane & (TPB - 1)) == 0) {
                    reinterpret_cast<float*>(row[4])[base / BLOCK] = am;
                    reinterpret_cast<float*>(row[5])[base / BLOCK] = av;
                }
            }
        } else {
            store_vals(reinterpret_cast<float*>(row[2]), base, n, vec, m);
            store_vals(reinterpret_cast<float*>(row[3]), base, n, vec, v);
        }
    }
}
