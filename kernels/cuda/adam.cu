// Fused multi-tensor Adam / AdamW step with 8-bit blockwise state (or fp32 state).
// The PyTorch reference is kernels/adam.py; every operation below is one correctly
// rounded fp32 operation (__fmul_rn & co. keep the compiler from contracting into FMAs),
// so both compute the same bits.
//
// One launch covers every tensor of a step. `table` holds, per row (a tensor, or 2**30 of its
// elements: kernels/adam.py _ROW_ELEMENTS), 8 int64: p, g, m, v, m_absmax, v_absmax (pointers),
// n, vend (n rounded down to whole chunks when the pointers are aligned for vector accesses,
// else 0); then ntensors (rows) + 1 prefix sums of the rows' chunk counts. A chunk is 256 consecutive elements of one tensor: one warp
// iteration, 8 elements per lane. Warps stride over all chunks in increasing order (the grid
// is sized to the GPU), so each warp carries its tensor: the outer loop finds the tensor of
// the warp's next chunk (a binary search from the current one) and reads its row once, the
// inner loop runs the warp's chunks of that tensor. The map and encoder tables (47 KB) are
// loaded into shared memory once per CTA. A non-finite m' or v' (rare) shows in the lane's
// block-scale keys, which send the lane to a per-element select (state8.cuh lane_keys).
//
// Per element, one pass over memory: load p, g, codes (or fp32 moments) and the block's
// absmax; dequantize; update the moments; reduce the new block absmax across the lanes
// that hold the block (a warp shuffle, or REDUX for a whole-warp block); requantize
// (state8.cuh quantize8_packed: one table read per value); update the parameter; store.
#include "common.cuh"
#include "state8.cuh"

template <bool B> struct BoolConst { static constexpr bool value = B; };

template <typename T, bool STATE8, bool DECOUPLED, int BLOCK>
__global__ void __launch_bounds__(256, 3)
adam_multi(const i64* __restrict__ table, const int ntensors, const i64 nchunks, const int stride_,
           const float* __restrict__ qmap1, const float* __restrict__ qmap2,
           const int* __restrict__ enc1, const int* __restrict__ enc2,
           const int zero1, const int zero2,  // the maps' zero codes, in each byte of the int
           const float beta1, const float omb1, const float beta2, const float omb2,
           const float eps, const float step_size, const float inv_bc2_sqrt,
           const float decay, const float weight_decay) {
    constexpr int TPB = BLOCK / E;  // lanes per quantization block (8, 16 or 32)
    static_assert(TPB <= 32 && CHUNK % BLOCK == 0, "a quantization block lives in one warp");
    __shared__ float smap[512];  // the signed map, then the unsigned one (one base address)
    float* smap1 = smap;
    float* smap2 = smap + 256;
    __shared__ int2 senc1[STATE8 ? ENC_S_CELLS : 1], senc2[STATE8 ? ENC_U_CELLS : 1];
    if (STATE8) {
        for (int i = threadIdx.x; i < 256; i += blockDim.x) {
            smap1[i] = qmap1[i];
            smap2[i] = qmap2[i];
        }
        for (int i = threadIdx.x; i < ENC_S_CELLS; i += blockDim.x) senc1[i] = reinterpret_cast<const int2*>(enc1)[i];
        for (int i = threadIdx.x; i < ENC_U_CELLS; i += blockDim.x) senc2[i] = reinterpret_cast<const int2*>(enc2)[i];
        __syncthreads();
    }
    const i64* starts = table + (i64)ntensors * 8;
    const int lane = threadIdx.x & 31;
    // elements between a warp's chunks: CHUNK times every warp of the grid (gridDim.x * blockDim.x / 32)
    const unsigned int stride = (unsigned int)stride_;
    const i64 warps = stride / CHUNK;
    i64 chunk = (i64)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    int t = 0;

    while (chunk < nchunks) {
        // the tensor holding this chunk: the last t with starts[t] <= chunk (never below the
        // current one: a warp's chunks ascend)
        int hi = ntensors - 1;
        while (t < hi) {
            const int mid = (t + hi + 1) >> 1;
            if (starts[mid] <= chunk) t = mid; else hi = mid - 1;
        }
        const i64* row = table + (i64)t * 8;
        T* p = reinterpret_cast<T*>(row[0]);
        const T* g = reinterpret_cast<const T*>(row[1]);
        const i64 n = row[6];
        const unsigned int vend = (unsigned int)row[7];
        const i64 first = starts[t], end = starts[t + 1];
        u8* mc = reinterpret_cast<u8*>(row[2]);
        u8* vc = reinterpret_cast<u8*>(row[3]);
        float* mf = reinterpret_cast<float*>(row[2]);
        float* vf = reinterpret_cast<float*>(row[3]);
        float* ma = reinterpret_cast<float*>(row[4]);
        float* va = reinterpret_cast<float*>(row[5]);
        ASSUME_GLOBAL(p);  // (ptxas then uses global loads and stores: see state8.cuh)
        ASSUME_GLOBAL(g);
        ASSUME_GLOBAL(mc);
        ASSUME_GLOBAL(vc);
        ASSUME_GLOBAL(ma);
        ASSUME_GLOBAL(va);

        // The warp's chunks of this tensor (a row holds at most 2**30 elements: kernels/adam.py
        // _ROW_ELEMENTS, so offsets are 32-bit): cbase, the first element of the chunk, steps by
        // `warps` chunks; this lane's elements start lane * E further (the pointers below).
        const unsigned int lo = (unsigned int)lane * E;
        const unsigned int climit = (unsigned int)(end - first) * CHUNK;
        const unsigned int nn = (unsigned int)n;
        // vectorized: the whole chunk in bounds (cbase < vend: warp-uniform; a tensor's last,
        // partial chunk takes the bounds-checked path) and the tensor's pointers aligned
        unsigned int cbase = (unsigned int)(chunk - first) * CHUNK;
        // this lane's pointers into the current chunk, advanced with it
        T* pl = p + lo + cbase;
        const T* gl = g + lo + cbase;
        u8* mcl = mc + lo + cbase;
        u8* vcl = vc + lo + cbase;
        float* mfl = mf + lo + cbase;
        float* vfl = vf + lo + cbase;
        float* mal = ma + (lo + cbase) / BLOCK;  // a lane never straddles two blocks: BLOCK % 8 == 0
        float* val = va + (lo + cbase) / BLOCK;
        for (; cbase < climit; cbase += stride, pl += stride, gl += stride, mcl += STATE8 ? stride : 0, vcl += STATE8 ? stride : 0,
                               mfl += STATE8 ? 0 : stride, vfl += STATE8 ? 0 : stride,
                               mal += STATE8 ? stride / BLOCK : 0, val += STATE8 ? stride / BLOCK : 0) {
          // one copy of the chunk's work per path: vectorized (vec) or bounds-checked
          auto work = [&](auto path) {
            constexpr bool vec = decltype(path)::value;
            // this lane's elements left in the tensor (the bounds-checked path; may be <= 0;
            // lanes past the end still join the block reduction with zeros, then store nothing)
            const i64 rem = vec ? (i64)E : (i64)nn - (i64)(cbase + lo);
            constexpr unsigned int q = 0;

            float pv[E], gv[E], m[E], v[E];
            uint2 cmw = make_uint2(0u, 0u), cvw = make_uint2(0u, 0u);  // the old codes (STATE8)
            float am = 0.0f, av = 0.0f;
            if (vec) {
                load8_param(pl, pv);
                load8_param(gl, gv);
                if (STATE8) {
                    cmw = *reinterpret_cast<const uint2*>(mcl);
                    cvw = *reinterpret_cast<const uint2*>(vcl);
                    am = mal[q];
                    av = val[q];
#pragma unroll
                    for (int i = 0; i < E; ++i) {
                        m[i] = __fmul_rn(smap1[byte_of(i < 4 ? cmw.x : cmw.y, i & 3)], am);
                        v[i] = __fmul_rn(smap2[byte_of(i < 4 ? cvw.x : cvw.y, i & 3)], av);
                    }
                } else {
                    load8(mfl, m);
                    load8(vfl, v);
                }
            } else {
                load_vals(pl, 0, rem, false, pv);
                load_vals(gl, 0, rem, false, gv);
                if (STATE8) {
                    am = rem > 0 ? mal[q] : 0.0f;
                    av = rem > 0 ? val[q] : 0.0f;
                    int cm[E], cv[E];
                    load_codes(mcl, 0, rem, false, cm);
                    load_codes(vcl, 0, rem, false, cv);
                    cmw = make_uint2(pack4(cm[0], cm[1], cm[2], cm[3]), pack4(cm[4], cm[5], cm[6], cm[7]));
                    cvw = make_uint2(pack4(cv[0], cv[1], cv[2], cv[3]), pack4(cv[4], cv[5], cv[6], cv[7]));
#pragma unroll
                    for (int i = 0; i < E; ++i) {
                        // past the end: exact zeros, as the reference pads (code 0 of the signed
                        // map is -0.993, which would leak into the last block's new absmax)
                        const bool in = i < rem;
                        m[i] = in ? __fmul_rn(smap1[cm[i]], am) : 0.0f;
                        v[i] = in ? __fmul_rn(smap2[cv[i]], av) : 0.0f;
                    }
                } else {
                    load_vals(mfl, 0, rem, false, m);
                    load_vals(vfl, 0, rem, false, v);
                }
            }

            // the update of every element, finite or not (selected below)
            float p1[E], m1[E], v1[E];
#pragma unroll
            for (int i = 0; i < E; ++i) {
                float gi = gv[i];
                if (!DECOUPLED) gi = __fadd_rn(gi, __fmul_rn(pv[i], weight_decay));
                m1[i] = __fadd_rn(__fmul_rn(m[i], beta1), __fmul_rn(gi, omb1));
                v1[i] = __fadd_rn(__fmul_rn(v[i], beta2), __fmul_rn(__fmul_rn(gi, gi), omb2));
            }
            float den[E];
#pragma unroll
            for (int i = 0; i < E; ++i) den[i] = __fsqrt_rn(v1[i]);
#pragma unroll
            for (int i = 0; i < E; ++i) {
                const float pd = DECOUPLED ? __fmul_rn(pv[i], decay) : pv[i];
                const float denom = __fadd_rn(__fmul_rn(den[i], inv_bc2_sqrt), eps);
                p1[i] = __fsub_rn(pd, __fdiv_rn(__fmul_rn(m1[i], step_size), denom));
            }

            if (STATE8) {
                // this lane's keys of the new block scales (state8.cuh lane_keys); a
                // non-finite (or negative) m' or v' shows in them
                unsigned int km, kv;
                if (!lane_keys(m1, v1, &km, &kv)) {
                    // rare: an element whose m' or v' is not finite keeps p, m and v (read
                    // again: p is still in memory, m and v are the codes and scales above)
                    float p0[E];
                    load_vals(pl, 0, rem, vec, p0);
#pragma unroll
                    for (int i = 0; i < E; ++i) {
                        if (!(finite(m1[i]) && finite(v1[i]))) {
                            const bool in = i < rem;
                            p1[i] = p0[i];
                            m1[i] = in ? __fmul_rn(smap1[byte_of(i < 4 ? cmw.x : cmw.y, i & 3)], am) : 0.0f;
                            // + 0: a -0 (from a -0 scale) as +0, the same codes and scale
                            v1[i] = in ? __fadd_rn(__fmul_rn(smap2[byte_of(i < 4 ? cvw.x : cvw.y, i & 3)], av), 0.0f) : 0.0f;
                        }
                    }
                    lane_keys_general(m1, v1, &km, &kv);
                }
                uint2 cm, cv;
                const float am = quantize8_packed<TPB, true>(senc1, m1, km, (unsigned int)zero1, &cm);
                const float av = quantize8_packed<TPB, false>(senc2, v1, kv, (unsigned int)zero2, &cv);
                if (vec) {
                    store8_param(pl, p1);
                    *reinterpret_cast<uint2*>(mcl) = cm;
                    *reinterpret_cast<uint2*>(vcl) = cv;
                    // every lane of a block holds its absmax (the butterfly): all store it
                    mal[q] = am;
                    val[q] = av;
                } else {
                    store_vals(pl, 0, rem, false, p1);
#pragma unroll
                    for (int i = 0; i < E; ++i) {
                        if (i < rem) {
                            mcl[i] = (u8)byte_of(i < 4 ? cm.x : cm.y, i & 3);
                            vcl[i] = (u8)byte_of(i < 4 ? cv.x : cv.y, i & 3);
                        }
                    }
                    if (rem > 0 && (lane & (TPB - 1)) == 0) {
                        mal[q] = am;
                        val[q] = av;
                    }
                }
            } else {
#pragma unroll
                for (int i = 0; i < E; ++i) {
                    const bool ok = finite(m1[i]) && finite(v1[i]);  // else: the element keeps p, m and v
                    p1[i] = ok ? p1[i] : pv[i];
                    m1[i] = ok ? m1[i] : m[i];
                    v1[i] = ok ? v1[i] : v[i];
                }
                store_vals(pl, 0, rem, vec, p1);
                store_vals(mfl, 0, rem, vec, m1);
                store_vals(vfl, 0, rem, vec, v1);
            }
          };
            if (cbase < vend) work(BoolConst<true>()); else work(BoolConst<false>());
        }
        chunk = first + (i64)(cbase / CHUNK);
    }
}
