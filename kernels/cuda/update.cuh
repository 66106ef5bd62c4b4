// The one optimizer-step machinery for every update rule (kernels/update.py): a rule is a struct
// (lion.cu, sgd.cu, rmsprop.cu, adagrad.cu, ademamix.cu) passed as the template parameter RULE:
//
//   struct Rule {
//       static constexpr int NS;          // state tensors per parameter (0..3)
//       static constexpr unsigned SIGNED; // bit k: state k takes either sign (signed map), else >= 0
//       static constexpr int NC;          // fp32 scalars, in kernels/update.py's Rule.scalars order
//       __device__ static void apply(const float* c, float& p, float g, float* s);  // one element
//   };
//
// `apply` is the rule's math, every operation one correctly rounded fp32 operation
// (__fmul_rn & co.) in the order of the PyTorch reference, so both compute the same bits.
// Include after common.cuh and state8.cuh; a rule file ends with its struct.
//
// One launch covers every tensor of a step. `table` holds, per tensor, 4 + 2 * NS int64:
// p, g, the NS state pointers, their NS absmax pointers (8-bit), n, aligned; then ntensors + 1
// prefix sums of the tensors' chunk counts. A chunk is 256 consecutive elements of one tensor:
// one warp iteration, 8 elements per lane; warps stride over all chunks, so the maps and encoder
// tables (17.5 KB) are loaded into shared memory once per CTA. The scalars are a device array
// (a GPU tensor lr never reaches the host), read once per thread.
//
// Per element, one pass over memory: load p, g and the state (codes and the block's absmax:
// dequantize); apply the rule; keep the old values where the new parameter or any new state is
// not finite; reduce each state's new block absmax across the lanes holding the block (a warp
// shuffle); requantize; store.
#ifndef OPTIM8_UPDATE_CUH
#define OPTIM8_UPDATE_CUH

__device__ __forceinline__ float sign_of(float x) { return x > 0.0f ? 1.0f : (x < 0.0f ? -1.0f : 0.0f); }

template <typename T, bool STATE8, int BLOCK, typename RULE>
__global__ void __launch_bounds__(256)
update_multi(const i64* __restrict__ table, const int ntensors, const i64 nchunks,
             const float* __restrict__ qmap1, const float* __restrict__ qmap2,
             const float* __restrict__ mid1, const float* __restrict__ mid2,
             const u8* __restrict__ lut1, const u8* __restrict__ lut2,
             const int zero1, const int zero2, const float* __restrict__ scalars) {
    constexpr int NS = RULE::NS;
    constexpr int NSA = NS > 0 ? NS : 1;  // array extent (no zero-length arrays)
    constexpr int ROW = 4 + 2 * NS;
    constexpr int TPB = BLOCK / E;  // lanes per quantization block (8, 16 or 32)
    static_assert(TPB <= 32 && CHUNK % BLOCK == 0, "a quantization block lives in one warp");
    static_assert(!STATE8 || NS > 0, "8-bit state needs a state");
    // [0]: the signed map, [1]: the unsigned one
    __shared__ float smap[2][256], smid[2][256];
    __shared__ u8 slut[2][LUT_SIZE];
    if (STATE8) {
        for (int i = threadIdx.x; i < 256; i += blockDim.x) {
            smap[0][i] = qmap1[i];
            smap[1][i] = qmap2[i];
            if (i < 255) { smid[0][i] = mid1[i]; smid[1][i] = mid2[i]; }
        }
        for (int i = threadIdx.x; i < LUT_SIZE; i += blockDim.x) {
            slut[0][i] = lut1[i];
            slut[1][i] = lut2[i];
        }
        __syncthreads();
    }
    float c[RULE::NC];
#pragma unroll
    for (int k = 0; k < RULE::NC; ++k) c[k] = scalars[k];
    const i64* starts = table + (i64)ntensors * ROW;
    const int lane = threadIdx.x & 31;
    const i64 warps = (i64)gridDim.x * (blockDim.x >> 5);

    for (i64 chunk = (i64)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5); chunk < nchunks; chunk += warps) {
        // the tensor holding this chunk: the last t with starts[t] <= chunk
        int lo = 0, hi = ntensors - 1;
        while (lo < hi) {
            const int mid = (lo + hi + 1) >> 1;
            if (starts[mid] <= chunk) lo = mid; else hi = mid - 1;
        }
        const i64* row = table + (i64)lo * ROW;
        T* p = reinterpret_cast<T*>(row[0]);
        const T* g = reinterpret_cast<const T*>(row[1]);
        const i64 n = row[2 + 2 * NS];
        const bool aligned = row[3 + 2 * NS] != 0;
        const i64 base = (chunk - starts[lo]) * CHUNK + (i64)lane * E;
        // lanes past the end still join the block reductions (with zeros), then store nothing
        const bool vec = aligned && base + E <= n;

        float pv[E], gv[E], s[NSA][E];
        load_vals(p, base, n, vec, pv);
        load_vals(g, base, n, vec, gv);
#pragma unroll
        for (int k = 0; k < NS; ++k) {
            if (STATE8) {
                const int sg = ((RULE::SIGNED >> k) & 1u) ? 0 : 1;
                const float a = base < n ? reinterpret_cast<const float*>(row[2 + NS + k])[base / BLOCK] : 0.0f;
                int code[E];
                load_codes(reinterpret_cast<const u8*>(row[2 + k]), base, n, vec, code);
#pragma unroll
                for (int i = 0; i < E; ++i)  // past the end: exact zeros, as the reference pads
                    s[k][i] = base + i < n ? __fmul_rn(smap[sg][code[i]], a) : 0.0f;
            } else {
                load_vals(reinterpret_cast<const float*>(row[2 + k]), base, n, vec, s[k]);
            }
        }

#pragma unroll
        for (int i = 0; i < E; ++i) {
            float p1 = pv[i], s1[NSA];
#pragma unroll
            for (int k = 0; k < NS; ++k) s1[k] = s[k][i];
            RULE::apply(c, p1, gv[i], s1);
            bool ok = finite(p1);
#pragma unroll
            for (int k = 0; k < NS; ++k) ok = ok && finite(s1[k]);
            if (ok) {  // else: the element keeps its parameter and state
                pv[i] = p1;
#pragma unroll
                for (int k = 0; k < NS; ++k) s[k][i] = s1[k];
            }
        }

        store_vals(p, base, n, vec, pv);
#pragma unroll
        for (int k = 0; k < NS; ++k) {
            if (STATE8) {
                int code[E];
                const bool sgn = (RULE::SIGNED >> k) & 1u;
                const float a = sgn ? quantize8<TPB, true>(slut[0], smid[0], s[k], zero1, code)
                                    : quantize8<TPB, false>(slut[1], smid[1], s[k], zero2, code);
                if (base < n) {
                    store_codes(reinterpret_cast<u8*>(row[2 + k]), base, n, vec, code);
                    if ((lane & (TPB - 1)) == 0) reinterpret_cast<float*>(row[2 + NS + k])[base / BLOCK] = a;
                }
            } else {
                store_vals(reinterpret_cast<float*>(row[2 + k]), base, n, vec, s[k]);
            }
        }
    }
}

#endif  // OPTIM8_UPDATE_CUH
