// Blockwise dynamic quantization: one fp32 absmax per BLOCK consecutive elements,
// each element stored as the index of the nearest entry of a 256-entry map after
// division by its block's absmax. The PyTorch reference is kernels/blockwise.py;
// both compute the same function bit for bit.
//
// Each thread owns E = 8 consecutive elements per step (one or two 16-byte loads of x, one
// 8-byte store of codes), so a block of BLOCK elements is BLOCK / 8 threads: a group inside
// one warp for BLOCK <= 256 (its absmax reduced with shuffles), whole warps above that
// (shuffles, then the warps' maxima through shared memory). Both kernels stride over the
// tensor with a grid sized to the GPU (kernels/blockwise.py), so their tables are loaded
// into shared memory once per CTA, not once per 2048 elements.
#include "common.cuh"
#include "state8.cuh"

// quantize_blockwise's threads per CTA: 1024 (two CTAs per SM at <= 32 registers, so two copies of
// the table per SM and one fill per 8192 elements of a CTA's first step, not eight copies filled
// per 2048 elements; kernels/blockwise.py launches the same number)
#define QB_THREADS 1024

// quantize_blockwise's copy of the table (27 KB per CTA), at file
// scope so that the encoder addresses it directly (a pointer to it costs a shared-window
// address computation per step on sm_90)
__shared__ __align__(16) unsigned int stab[LUT_SIZE];

// The encoder of this kernel: state8.cuh's table cells (sign, exponent field LUT_EXP0..128 or
// "tiny", top 7 mantissa bits; kernels/adam.py _gpu_encode_table) with one 32-bit word per cell
// (kernels/blockwise.py, _encoder_table): bits 16-23 the code of the cell's lowest value, bits
// 0-15 q = 0xffff - key(b) for the one boundary b inside the cell (q = 0: none), where key() is
// the low 16 bits of a value, inverted for negative values (larger key = larger value inside a
// cell). Adding key(v) carries into the code exactly when v > b: the in-cell walk is an integer
// add, and the element costs one shared load (state8.cuh's encode() takes two). The values
// encoded here are finite with |v| < 2, so the exponent needs only the lower clamp (fmaxf of
// |v| with 2**-25, the tiny row: none of its cells holds a boundary). The unsigned map's table
// already gives every positive cell at least code 1, and +0 (the only value of its positive tiny
// row that must stay 0) is sent to the negative half. Returns the word whose byte 2 is the code.
// kernels/blockwise.py _check_encoder proves this equal to torch.bucketize for every |v| < 4.
template <bool SIGNED>
__device__ __forceinline__ unsigned int encode_word(float v) {
    const unsigned int b = __float_as_uint(v);
    const unsigned int t = __float_as_uint(fmaxf(fabsf(v), 0x1p-25f)) >> 16;
    // all ones: the negative half. The unsigned map sends +0 there too (its tiny row holds code
    // 0, the positive one code 1: a positive value never encodes to zero, +0 does)
    const unsigned int sm = SIGNED ? (unsigned int)((int)b >> 31) : ((int)b > 0 ? 0u : ~0u);
    return stab[t - (LUT_EXP0 << 7) + (sm & (LUT_NEXP * 128))] + ((b ^ sm) & 0xffffu);
}

// The codes (byte 2) of four encode_word results as the bytes of one word, lowest first.
__device__ __forceinline__ unsigned int pack4_byte2(const unsigned int* w) {
    return __byte_perm(__byte_perm(w[0], w[1], 0x0062), __byte_perm(w[2], w[3], 0x0062), 0x5410);
}

// 8 codes packed in `p` (byte i = element i): one 8-byte store when `vec`, else bounds-checked bytes.
__device__ __forceinline__ void store_packed(u8* __restrict__ dst, i64 base, i64 n, bool vec, uint2 p) {
    if (vec) {
        *reinterpret_cast<uint2*>(dst + base) = p;
    } else {
#pragma unroll
        for (int i = 0; i < E; ++i)
            if (base + i < n) dst[base + i] = (u8)((i < 4 ? p.x : p.y) >> (8 * (i & 3)));
    }
}

// The grid-stride loop of quantize_blockwise for one map (SIGNED: the signed map's rules,
// else the unsigned one's). A step of the CTA covers CTA * 8 consecutive elements.
template <typename T, int BLOCK, bool SIGNED>
__device__ __forceinline__ void quantize_steps(const T* __restrict__ x, u8* __restrict__ codes,
                                               float* __restrict__ absmax, const i64 n, const int zero_code,
                                               const bool aligned, unsigned int* swarp) {
    constexpr int TPB = BLOCK / E;  // threads per quantization block
    constexpr int CTA = QB_THREADS;
    constexpr int STEP = CTA * E;
    static_assert(STEP % BLOCK == 0, "a step holds whole quantization blocks");
    // this thread's first element, and the pointers and count of the rest, advanced by the
    // grid's stride each step (cheaper than recomputing 64-bit offsets from the step index)
    const i64 first = (i64)blockIdx.x * STEP + (i64)threadIdx.x * E;
    const i64 stride = (i64)gridDim.x * STEP;
    const T* xp = x + first;
    u8* cp = codes + first;
    float* ap = absmax + first / BLOCK;
    i64 rem = n - first;  // elements from this thread's first one to the end
    // blocks of more than 32 threads: where this warp writes its maximum and where this block's
    // warps' maxima are read, in the half `half` (0 or CTA / 32) of the double buffer
    unsigned int* const wmine = swarp + (threadIdx.x >> 5);
    const unsigned int* const wblock = swarp + (threadIdx.x / TPB) * (TPB / 32);
    int half = 0;
    for (i64 s0 = (i64)blockIdx.x * STEP; s0 < n; s0 += stride, xp += stride, cp += stride, ap += stride / BLOCK, rem -= stride) {
        // lanes past the end join the block reduction with zeros, then store nothing
        const bool vec = aligned && rem >= E;
        float v[E];
        load_vals(xp, 0, rem, vec, v);
        // the block's scale: its extreme value (signed map: reduced as extreme_key) or its
        // largest magnitude (unsigned map: the integer max over |x| bits, NaN the largest)
        unsigned int k = 0;
#pragma unroll
        for (int i = 0; i < E; ++i)
            k = umax(k, SIGNED ? extreme_key(v[i]) : __float_as_uint(v[i]) & 0x7fffffffu);
        if constexpr (TPB <= 32) {
            k = group_umax<TPB>(k);
        } else {
            // a quantization block spans WPB whole warps; a CTA may hold several blocks.
            // swarp is double-buffered: a warp can reach the next step's write only after
            // every warp has passed this step's barrier, i.e. has read the other half
            constexpr int WPB = TPB / 32;
            k = group_umax<32>(k);
            if ((threadIdx.x & 31) == 0) wmine[half] = k;
            __syncthreads();
            k = wblock[half];
#pragma unroll
            for (int w = 1; w < WPB; ++w) k = umax(k, wblock[half + w]);
            half ^= CTA / 32;
        }
        if (rem > 0) {
            const float m = SIGNED ? extreme_value(k) : __uint_as_float(k);
            float a, inv;
            const bool ok = block_scale(m, &a, &inv);
            if ((threadIdx.x & (TPB - 1)) == 0) *ap = a;
            uint2 packed;
            if (ok) {
                unsigned int w[E];
#pragma unroll
                for (int i = 0; i < E; ++i) {
                    const float sc = __fmul_rn(v[i], inv);
                    w[i] = encode_word<SIGNED>(sc);
                }
                packed.x = pack4_byte2(w);
                packed.y = pack4_byte2(w + 4);
            } else {
                packed.x = packed.y = (unsigned int)zero_code * 0x01010101u;
            }
            store_packed(cp, 0, rem, vec, packed);
        }
    }
}

// x: n elements; tab: the encoder table of kernels/blockwise.py (_encoder_table: LUT_SIZE
// words, 16-byte aligned) for the map; codes: n bytes; absmax: ceil(n / BLOCK) floats.
// `aligned` says x is 16-byte aligned; `signed_map` selects the signed map's rules (absmax =
// the block's extreme value) or the unsigned one's (absmax = the largest magnitude; a positive
// value never takes code 0). A block holding NaN or +-Inf gets absmax NaN and every code
// zero_code; a block whose largest magnitude is below 2**-104 gets absmax 0 and every code
// zero_code.
template <typename T, int BLOCK>
__global__ void __launch_bounds__(QB_THREADS, 2)
quantize_blockwise(const T* __restrict__ x, const unsigned int* __restrict__ tab,
                   u8* __restrict__ codes, float* __restrict__ absmax,
                   const i64 n, const int zero_code, const int aligned, const int signed_map) {
    constexpr int TPB = BLOCK / E;
    constexpr int CTA = QB_THREADS;
    static_assert(TPB <= CTA, "a quantization block lives in one CTA");
    __shared__ __align__(16) unsigned int swarp[2 * (CTA / 32)];

    static_assert(LUT_SIZE % 4 == 0, "the table is copied in 16-byte pieces");
    for (int i = threadIdx.x; i < LUT_SIZE / 4; i += CTA)
        reinterpret_cast<uint4*>(stab)[i] = reinterpret_cast<const uint4*>(tab)[i];
    __syncthreads();  // stab is complete

    if (signed_map)
        quantize_steps<T, BLOCK, true>(x, codes, absmax, n, zero_code, aligned != 0, swarp);
    else
        quantize_steps<T, BLOCK, false>(x, codes, absmax, n, zero_code, aligned != 0, swarp);
}

// codes: n bytes (8-byte aligned when `aligned`); qmap: 256 floats; out: n elements.
// A step of the CTA covers 2048 elements: one 8-byte load of 8 codes and 8 elements stored
// with 16-byte stores per thread.
template <typename T, int BLOCK>
__global__ void __launch_bounds__(256)
dequantize_blockwise(const u8* __restrict__ codes, const float* __restrict__ qmap,
                     const float* __restrict__ absmax, T* __restrict__ out,
                     const i64 n, const int aligned) {
    __shared__ float smap[256];
    smap[threadIdx.x] = qmap[threadIdx.x];
    __syncthreads();

    constexpr int STEP = 256 * E;
    const i64 nsteps = (n + STEP - 1) / STEP;
    for (i64 s = blockIdx.x; s < nsteps; s += gridDim.x) {
        const i64 base = s * STEP + (i64)threadIdx.x * E;
        if (base >= n) continue;
        const float a = absmax[base / BLOCK];  // BLOCK % E == 0: a thread never straddles blocks
        float v[E];
        if (aligned && base + E <= n) {
            int c[E];
            load_codes(codes, base, n, true, c);
#pragma unroll
            for (int i = 0; i < E; ++i) v[i] = smap[c[i]] * a;
            store8(out + base, v);
        } else {
#pragma unroll
            for (int i = 0; i < E; ++i)
                if (base + i < n) out[base + i] = from_float<T>(smap[codes[base + i]] * a);
        }
    }
}
