// The fused Adam / AdamW step for CPU tensors: the CPU twin of cuda/adam.cu, compiled at first
// use by the system C++ compiler (kernels/_cpu.py). Bit for bit the PyTorch reference of
// kernels/adam.py: every operation is one correctly rounded fp32 operation in the reference's
// order (built with -ffp-contract=off, no fast-math), the square root is the hardware's IEEE
// sqrt (correctly rounded, as the reference's fp64-and-round is), and the quantizer is
// kernels/blockwise.py's algorithm with the reference's table-driven encoder.
//
// One call covers every tensor of a step: `table` holds 7 int64 per tensor (p, g, m, v,
// m_absmax, v_absmax, n). The work is cut into chunks of whole quantization blocks, shared by
// up to `nthreads` threads. Per block, one pass: load p, g and the state (dequantize codes),
// update, take the block's new scale, encode, store.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

typedef uint16_t u16;
struct f16 { u16 bits; };
struct bf16 { u16 bits; };

inline float bits_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline uint32_t float_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }

inline float to_float(float x) { return x; }
inline float to_float(bf16 x) { return bits_float((uint32_t)x.bits << 16); }
inline float to_float(f16 x) { _Float16 h; std::memcpy(&h, &x.bits, 2); return (float)h; }

// Round-to-nearest-even, as torch's .to(dtype) does (NaN: torch's scalar bf16 NaN).
template <typename T> inline T from_float(float x);
template <> inline float from_float<float>(float x) { return x; }
template <> inline bf16 from_float<bf16>(float x) {  // branch-free, so the store loop vectorizes
    const uint32_t u = float_bits(x);
    const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    bf16 r;
    r.bits = (u16)((u & 0x7fffffffu) > 0x7f800000u ? 0x7fc0u : rounded);
    return r;
}
template <> inline f16 from_float<f16>(float x) {
    const _Float16 h = (_Float16)x;
    f16 r;
    std::memcpy(&r.bits, &h, 2);
    return r;
}

inline bool finite(float x) { return std::fabs(x) <= 3.402823466e38f; }

struct Args {
    const int64_t* table;
    const float* qmap1;
    const float* qmap2;
    const int32_t* lut1;  // the encoder's table per cell (kernels/adam.py _compiled_encode_table)
    const int32_t* lut2;
    int zero1, zero2, blocksize;
    float beta1, omb1, beta2, omb2, eps, step_size, inv_bc2_sqrt, decay, weight_decay;
};

// #(boundaries < s) for finite s, branch-free (so the loops below vectorize). The cell of s
// (sign, exponent field 103..128 or "tiny", top 7 mantissa bits: the cells of the table
// cuda/adam.cu uses) indexes `table` (kernels/adam.py _compiled_encode_table): bits 0-7 the
// boundaries below the cell, bit 8 whether one lies inside it, bits 16-31 that boundary's low
// 16 bits (it shares the cell's top 16). s is above it when s's low 16 bits are above its
// (below, for negative s: float order is the reverse of bit order there).
inline int cell_of(uint32_t b) {
    int e = (int)((b >> 23) & 0xffu) - 102;
    e = e < 0 ? 0 : (e > 26 ? 26 : e);
    const int m7 = e == 0 ? 0 : (int)((b >> 16) & 0x7fu);
    return ((int)(b >> 31) * 27 + e) * 128 + m7;
}

inline int encode(const int32_t* table, float s) {
    const uint32_t b = float_bits(s);
    const uint32_t t = (uint32_t)table[cell_of(b)];
    const uint32_t low = b & 0xffffu, bound = t >> 16;
    const bool above = (b >> 31) ? bound > low : bound < low;
    return (int)(t & 0xffu) + (int)(((t >> 8) & 1u) & (uint32_t)above);
}

// Quantize one block of n values into codes; returns its stored absmax (kernels/blockwise.py:
// the signed map's scale is the block's extreme value with its sign, the unsigned map's the
// largest magnitude; non-finite blocks NaN, blocks below 2**-104 zero; a positive value never
// takes the unsigned map's code 0).
template <bool SIGNED>
inline float quantize_block(const float* x, int n, const int32_t* lut, int zero, uint8_t* codes) {
    uint32_t k = 0;
    for (int i = 0; i < n; ++i) {
        const uint32_t b = float_bits(x[i]);
        const uint32_t key = SIGNED ? ((b & 0x7fffffffu) << 1) | ((b >> 31) ^ 1u) : (b & 0x7fffffffu);
        k = key > k ? key : k;
    }
    const float m = SIGNED ? bits_float((k >> 1) | (((k & 1u) ^ 1u) << 31)) : bits_float(k);
    const float amax = std::fabs(m);
    if (!(finite(amax) && amax >= 0x1p-104f)) {
        for (int i = 0; i < n; ++i) codes[i] = (uint8_t)zero;
        return finite(amax) ? 0.0f : bits_float(0x7fc00000u);
    }
    const float inv = 1.0f / m;
    int i = 0;
#if defined(__AVX512F__)
    // 16 at a time: the same cell index, one gather from the same table, the same compares
    const __m512 vinv = _mm512_set1_ps(inv);
    const __m512i one = _mm512_set1_epi32(1), zero_i = _mm512_setzero_si512();
    for (; i + 16 <= n; i += 16) {
        const __m512 sv = _mm512_mul_ps(_mm512_loadu_ps(x + i), vinv);
        const __m512i b = _mm512_castps_si512(sv);
        __m512i e = _mm512_sub_epi32(_mm512_and_si512(_mm512_srli_epi32(b, 23), _mm512_set1_epi32(0xff)), _mm512_set1_epi32(102));
        e = _mm512_min_epi32(_mm512_max_epi32(e, zero_i), _mm512_set1_epi32(26));
        __m512i m7 = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(0x7f));
        m7 = _mm512_maskz_mov_epi32(_mm512_cmpneq_epi32_mask(e, zero_i), m7);
        const __m512i sign = _mm512_srli_epi32(b, 31);
        const __m512i cell = _mm512_add_epi32(_mm512_mullo_epi32(sign, _mm512_set1_epi32(27)), e);
        const __m512i idx = _mm512_add_epi32(_mm512_slli_epi32(cell, 7), m7);
        const __m512i t = _mm512_i32gather_epi32(idx, lut, 4);
        const __m512i low = _mm512_and_si512(b, _mm512_set1_epi32(0xffff));
        const __m512i bound = _mm512_srli_epi32(t, 16);
        const __mmask16 neg = _mm512_cmpneq_epi32_mask(sign, zero_i);
        const __mmask16 above = (neg & _mm512_cmpgt_epi32_mask(bound, low)) | (~neg & _mm512_cmplt_epi32_mask(bound, low));
        const __mmask16 inside = _mm512_test_epi32_mask(t, _mm512_set1_epi32(0x100));
        __m512i c = _mm512_and_si512(t, _mm512_set1_epi32(0xff));
        c = _mm512_mask_add_epi32(c, above & inside, c, one);
        if (!SIGNED) {
            const __mmask16 up = _mm512_cmpeq_epi32_mask(c, zero_i) & _mm512_cmp_ps_mask(sv, _mm512_setzero_ps(), _CMP_GT_OQ);
            c = _mm512_mask_mov_epi32(c, up, one);
        }
        _mm_storeu_si128(reinterpret_cast<__m128i*>(codes + i), _mm512_cvtepi32_epi8(c));
    }
#endif
    for (; i < n; ++i) {
        const float s = x[i] * inv;
        int c = encode(lut, s);
        if (!SIGNED) c = (c == 0 && s > 0.0f) ? 1 : c;
        codes[i] = (uint8_t)c;
    }
    return m;
}

constexpr int MAXB = 256;

template <typename T, bool STATE8, bool DECOUPLED>
void run(const Args& a, int t, int64_t start, int64_t end) {
    const int64_t* row = a.table + 7 * (int64_t)t;
    T* p = reinterpret_cast<T*>(row[0]);
    const T* g = reinterpret_cast<const T*>(row[1]);
    const int B = STATE8 ? a.blocksize : MAXB;
    alignas(64) float pv[MAXB], gv[MAXB], mv[MAXB], vv[MAXB];
    for (int64_t b0 = start; b0 < end; b0 += B) {
        const int n = (int)std::min<int64_t>(B, end - b0);
        for (int i = 0; i < n; ++i) pv[i] = to_float(p[b0 + i]);
        for (int i = 0; i < n; ++i) gv[i] = to_float(g[b0 + i]);
        if (STATE8) {
            const uint8_t* mc = reinterpret_cast<const uint8_t*>(row[2]) + b0;
            const uint8_t* vc = reinterpret_cast<const uint8_t*>(row[3]) + b0;
            const float am = reinterpret_cast<const float*>(row[4])[b0 / B];
            const float av = reinterpret_cast<const float*>(row[5])[b0 / B];
            const float* __restrict__ q1 = a.qmap1;
            const float* __restrict__ q2 = a.qmap2;
            int i = 0;
#if defined(__AVX512F__)
            const __m512 vam = _mm512_set1_ps(am), vav = _mm512_set1_ps(av);
            for (; i + 16 <= n; i += 16) {
                const __m512i cm = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(mc + i)));
                const __m512i cv = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(vc + i)));
                _mm512_storeu_ps(mv + i, _mm512_mul_ps(_mm512_i32gather_ps(cm, q1, 4), vam));
                _mm512_storeu_ps(vv + i, _mm512_mul_ps(_mm512_i32gather_ps(cv, q2, 4), vav));
            }
#endif
            for (int j = i; j < n; ++j) mv[j] = q1[mc[j]] * am;
            for (int j = i; j < n; ++j) vv[j] = q2[vc[j]] * av;
        } else {
            std::memcpy(mv, reinterpret_cast<const float*>(row[2]) + b0, sizeof(float) * n);
            std::memcpy(vv, reinterpret_cast<const float*>(row[3]) + b0, sizeof(float) * n);
        }
        for (int i = 0; i < n; ++i) {
            float gi = gv[i];
            if (!DECOUPLED) gi = gi + pv[i] * a.weight_decay;
            const float m1 = mv[i] * a.beta1 + gi * a.omb1;
            const float v1 = (gi * gi) * a.omb2 + vv[i] * a.beta2;
            float den = std::sqrt(v1);  // IEEE sqrt: correctly rounded, as the reference's fp64 route
            den = den * a.inv_bc2_sqrt;
            den = den + a.eps;
            const float step = (m1 * a.step_size) / den;
            const float p1 = (DECOUPLED ? pv[i] * a.decay : pv[i]) - step;
            const bool ok = finite(m1) && finite(v1);  // else: the element keeps p, m and v
            pv[i] = ok ? p1 : pv[i];
            mv[i] = ok ? m1 : mv[i];
            vv[i] = ok ? v1 : vv[i];
        }
        for (int i = 0; i < n; ++i) p[b0 + i] = from_float<T>(pv[i]);
        if (STATE8) {
            uint8_t* mc = reinterpret_cast<uint8_t*>(row[2]) + b0;
            uint8_t* vc = reinterpret_cast<uint8_t*>(row[3]) + b0;
            reinterpret_cast<float*>(row[4])[b0 / B] = quantize_block<true>(mv, n, a.lut1, a.zero1, mc);
            reinterpret_cast<float*>(row[5])[b0 / B] = quantize_block<false>(vv, n, a.lut2, a.zero2, vc);
        } else {
            std::memcpy(reinterpret_cast<float*>(row[2]) + b0, mv, sizeof(float) * n);
            std::memcpy(reinterpret_cast<float*>(row[3]) + b0, vv, sizeof(float) * n);
        }
    }
}

typedef void (*RunFn)(const Args&, int, int64_t, int64_t);

template <typename T>
RunFn pick(bool state8, bool decoupled) {
    if (state8) return decoupled ? run<T, true, true> : run<T, true, false>;
    return decoupled ? run<T, false, true> : run<T, false, false>;
}

struct Item { int t; int64_t start, end; };

}  // namespace

// dtype: 0 float32, 1 float16, 2 bfloat16. scalars: beta1, 1 - beta1, beta2, 1 - beta2, eps,
// step_size, inv_bc2_sqrt, decay, weight_decay (fp32 values, kernels/adam.py adam_scalars).
// Returns 0, or -1 for an unknown dtype / blocksize.
extern "C" int optim8_adam_step(int dtype, int state8, int decoupled, int blocksize, int ntensors,
                                const int64_t* table, const float* qmap1, const float* qmap2,
                                const int32_t* lut1, const int32_t* lut2,
                                int zero1, int zero2, const float* scalars, int nthreads) {
    if (blocksize <= 0 || blocksize > MAXB || blocksize % 8) return -1;
    RunFn fn = dtype == 0 ? pick<float>(state8, decoupled)
             : dtype == 1 ? pick<f16>(state8, decoupled)
             : dtype == 2 ? pick<bf16>(state8, decoupled) : nullptr;
    if (!fn) return -1;
    Args a{table, qmap1, qmap2, lut1, lut2, zero1, zero2, state8 ? blocksize : MAXB,
           scalars[0], scalars[1], scalars[2], scalars[3], scalars[4], scalars[5], scalars[6], scalars[7], scalars[8]};
    // chunks of whole blocks: 64K elements (a few hundred KB of traffic) per work item
    const int64_t chunk = 1 << 16;
    std::vector<Item> items;
    int64_t total = 0;
    for (int t = 0; t < ntensors; ++t) {
        const int64_t n = table[7 * (int64_t)t + 6];
        total += n;
        for (int64_t s = 0; s < n; s += chunk) items.push_back({t, s, std::min(n, s + chunk)});
    }
    int workers = (int)std::min<int64_t>({(int64_t)std::max(nthreads, 1), (int64_t)items.size(), total / (1 << 17) + 1});
    std::atomic<size_t> next{0};
    auto work = [&]() {
        for (size_t i = next++; i < items.size(); i = next++) fn(a, items[i].t, items[i].start, items[i].end);
    };
    std::vector<std::thread> threads;
    for (int w = 1; w < workers; ++w) threads.emplace_back(work);
    work();
    for (auto& th : threads) th.join();
    return 0;
}
