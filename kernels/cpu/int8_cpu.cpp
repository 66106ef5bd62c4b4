// The passes of the int8 linear forward (LLM.int8()) for CPU tensors around the int8 GEMM:
// activation absmaxes, row quantization, and the epilogue. Built with adam_cpu.cpp into one
// library at first use (kernels/_cpu.py). Bit for bit kernels/int8.py's reference
// (int8_linear_reference): every value is one correctly rounded fp32 operation in the
// reference's order (-ffp-contract=off, no fast-math); torch.round is round-half-to-even.
//
// All matrices are row-major and contiguous. Rows are shared by up to `nthreads` threads.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

namespace {

inline float bits_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }

// The largest |x| as an integer maximum over the magnitude bits (vectorizes, unlike a float
// maximum with a NaN rule): for non-negative floats bit order is value order, and a NaN's bits
// lie above +inf's, so a NaN wins, as torch.amax's NaN rule has it. Returned canonical.
inline float magnitude(uint32_t bits) { return bits > 0x7f800000u ? NAN : bits_float(bits); }

// Threads worth starting for m rows of work_per_row elements: below ~256K elements of work a
// thread costs more than it saves.
inline int workers_for(int64_t m, int64_t work_per_row, int nthreads) {
    const int64_t useful = std::max<int64_t>(1, (m * work_per_row) / (1 << 18));
    return (int)std::max<int64_t>(1, std::min<int64_t>({(int64_t)std::max(nthreads, 1), useful, m}));
}

template <typename F>
void parallel_rows(int64_t m, int64_t work_per_row, int nthreads, F&& fn) {
    const int workers = workers_for(m, work_per_row, nthreads);
    if (workers <= 1) {
        fn(0, m);
        return;
    }
    std::vector<std::thread> threads;
    const int64_t per = (m + workers - 1) / workers;
    for (int w = 1; w < workers; ++w) {
        const int64_t r0 = w * per, r1 = std::min(m, r0 + per);
        if (r0 < r1) threads.emplace_back([&fn, r0, r1] { fn(r0, r1); });
    }
    fn(0, std::min(m, per));
    for (auto& t : threads) t.join();
}

}  // namespace

namespace {

// The largest |x| of one row over the columns with skip[c] == 0 (skip may be null).
float row_max(const uint32_t* __restrict__ row, int64_t k, const uint8_t* __restrict__ skip) {
    uint32_t mx = 0;
    if (skip) {
        for (int64_t c = 0; c < k; ++c) {
            const uint32_t a = row[c] & (((uint32_t)skip[c] - 1u) & 0x7fffffffu);  // skipped: 0
            mx = a > mx ? a : mx;
        }
    } else {
        for (int64_t c = 0; c < k; ++c) {
            const uint32_t a = row[c] & 0x7fffffffu;
            mx = a > mx ? a : mx;
        }
    }
    return magnitude(mx);
}

}  // namespace

// rowmax[r] = amax(|x[r, c]|) over the columns with skip[c] == 0 (skip may be null), NaN
// propagating as in torch.amax.
extern "C" void optim8_int8_rowmax(const float* x, int64_t m, int64_t k, const uint8_t* skip,
                                   float* rowmax, int nthreads) {
    const uint32_t* xb = reinterpret_cast<const uint32_t*>(x);
    parallel_rows(m, k, nthreads, [=](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) rowmax[r] = row_max(xb + r * k, k, skip);
    });
}

// One read of x: rowmax as optim8_int8_rowmax (every column), and flags[c] = 1 where any
// |x[r, c]| >= threshold (NaN never is), 0 elsewhere: the reference's flagged columns.
extern "C" void optim8_int8_scan(const float* x, int64_t m, int64_t k, float threshold, uint8_t* flags,
                                 float* rowmax, int nthreads) {
    const uint32_t* xb = reinterpret_cast<const uint32_t*>(x);
    uint32_t tb;
    std::memcpy(&tb, &threshold, 4);  // threshold > 0 and finite: bit order is value order
    const int workers = workers_for(m, k, nthreads);
    std::vector<std::vector<uint8_t>> partial(workers, std::vector<uint8_t>(k, 0));
    const int64_t per = (m + workers - 1) / workers;
    auto body = [=, &partial](int w) {
        uint8_t* __restrict__ f = partial[w].data();
        const int64_t r0 = w * per, r1 = std::min(m, r0 + per);
        for (int64_t r = r0; r < r1; ++r) {
            const uint32_t* __restrict__ row = xb + r * k;
            for (int64_t c = 0; c < k; ++c) {
                const uint32_t a = row[c] & 0x7fffffffu;
                f[c] |= (uint8_t)((a >= tb) & (a <= 0x7f800000u));
            }
            rowmax[r] = row_max(row, k, nullptr);
        }
    };
    std::vector<std::thread> threads;
    for (int w = 1; w < workers; ++w) threads.emplace_back(body, w);
    body(0);
    for (auto& t : threads) t.join();
    for (int64_t c = 0; c < k; ++c) {
        uint8_t v = 0;
        for (int w = 0; w < workers; ++w) v |= partial[w][c];
        flags[c] = v;
    }
}

namespace {

// One row of the quantization; its own function so k and the pointers are locals (int8 stores may
// alias anything, so a captured k would be re-read per element and the loop would not vectorize).
void quantize_row(const float* __restrict__ row, int64_t k, float s, const uint8_t* skip, int8_t* __restrict__ out) {
    for (int64_t c = 0; c < k; ++c) {
        float v = row[c] * s;
        v = std::fabs(v) <= 3.402823466e38f ? v : 0.0f;  // and NaN -> 0
        // clamp, then round half to even by the 1.5 * 2**23 trick (exact for |v| <= 127): the
        // same as the reference's round-then-clamp for every v
        v = v > 127.0f ? 127.0f : (v < -127.0f ? -127.0f : v);
        v = (v + 12582912.0f) - 12582912.0f;
        out[c] = (int8_t)(int)v;
    }
    if (skip)
        for (int64_t c = 0; c < k; ++c)
            if (skip[c]) out[c] = 0;
}

// One row of the epilogue (see optim8_int8_epilogue). The accumulators are read into registers
// before out (which may alias them) is written, element by element.
void epilogue_row(const int32_t* a, int64_t n, float rs, const float* __restrict__ scb, const float* xo,
                  const float* __restrict__ qo, int64_t nout, const float* __restrict__ bias,
                  float* __restrict__ osum, float* o) {  // o may be a (same index: read, then written)
    if (nout > 0) {
        const float x0 = xo[0];
        for (int64_t c = 0; c < n; ++c) osum[c] = 0.0f + x0 * qo[c];
        for (int64_t j = 1; j < nout; ++j) {
            const float xj = xo[j];
            const float* __restrict__ qj = qo + j * n;
            for (int64_t c = 0; c < n; ++c) osum[c] = osum[c] + xj * qj[c];
        }
        for (int64_t c = 0; c < n; ++c) {
            const float v = (float)a[c] * (rs * scb[c]);
            o[c] = v + osum[c] * scb[c];
        }
    } else {
        for (int64_t c = 0; c < n; ++c) o[c] = (float)a[c] * (rs * scb[c]);
    }
    if (bias)
        for (int64_t c = 0; c < n; ++c) o[c] = o[c] + bias[c];
}

}  // namespace

// From the row absmaxes amax (non-outlier columns): inv = 127 / amax where amax is finite and
// > 0, else 0; row_scale[r] = amax / 127 (IEEE divisions: correctly rounded, as the reference's);
// xq[r, c] = round_half_even(x[r, c] * inv) as int8, 0 where skip[c] (may be null) or where the
// product is not finite (the reference's nan_to_num), clamped to [-127, 127].
extern "C" void optim8_int8_quantize_rows(const float* x, int64_t m, int64_t k, const float* amax,
                                          const uint8_t* skip, int8_t* xq, float* row_scale, int nthreads) {
    parallel_rows(m, k, nthreads, [=](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
            const float a = amax[r];
            const float inv = (a > 0.0f && a <= 3.402823466e38f) ? 127.0f / a : 0.0f;
            row_scale[r] = a / 127.0f;
            quantize_row(x + r * k, k, inv, skip, xq + r * k);
        }
    });
}

// out[r, c] = float(acc[r, c]) * (row_scale[r] * scb[c]), then + osum[r, c] * scb[c] where
// osum[r, c] = sum over j < nout, in order, of xo[r, j] * qo[j, c] (xo [m, nout], qo [nout, n],
// both fp32; absent when nout == 0), then + bias[c] (may be null): the reference's epilogue, one
// pass. out may be acc itself (each row is read before it is written).
extern "C" void optim8_int8_epilogue(const int32_t* acc, int64_t m, int64_t n, const float* row_scale,
                                     const float* scb, const float* xo, const float* qo, int64_t nout,
                                     const float* bias, float* out, int nthreads) {
    parallel_rows(m, n * (1 + nout), nthreads, [=](int64_t r0, int64_t r1) {
        std::vector<float> osum(nout > 0 ? n : 0);
        for (int64_t r = r0; r < r1; ++r) epilogue_row(acc + r * n, n, row_scale[r], scb,
                                                         nout > 0 ? xo + r * nout : nullptr, qo, nout,
                                                         bias, osum.data(), out + r * n);
    });
}
