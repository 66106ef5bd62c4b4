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

// The tensors' pointers come from the launch table as integers, so they are generic pointers;
// ptxas proves them global (LDG/STG) in simple code but not around inline PTX (store8_param),
// where it falls back to generic LD/ST. This tells it.
#if defined(OPTIM8_HOST_DEVICE)
#define ASSUME_GLOBAL(ptr) ((void)0)
#else
#define ASSUME_GLOBAL(ptr) __builtin_assume(__isGlobal(ptr))
#endif

// store8 for the parameter update: bf16 through the hardware's round-to-nearest-even pair
// conversion (cvt.rn.bf16x2.f32, the same bits as from_float<bf16> for every value but NaN)
// unless a value of the warp is NaN (then from_float's NaN); other types: store8. Every lane of
// the warp must call it.
template <typename T>
__device__ __forceinline__ void store8_param(T* __restrict__ p, const float* v) { store8(p, v); }
#if !defined(OPTIM8_HOST_DEVICE) && __CUDA_ARCH__ >= 800  // (cvt.rn.bf16x2.f32: sm_80 on)
template <>
__device__ __forceinline__ void store8_param<bf16>(bf16* __restrict__ p, const float* v) {
    bool nan = false;
#pragma unroll
    for (int i = 0; i < 8; i += 2) nan |= (v[i] != v[i]) | (v[i + 1] != v[i + 1]);
    if (__any_sync(0xffffffffu, nan)) {  // (warp-uniform: no reconvergence barrier)
        store8(p, v);
        return;
    }
    unsigned int w[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(w[i]) : "f"(v[2 * i + 1]), "f"(v[2 * i]));
    *reinterpret_cast<uint4*>(p) = make_uint4(w[0], w[1], w[2], w[3]);
}
#endif

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

// ---------------------------------------------------------------- the packed encoder
// torch.bucketize(s, mid) (the unsigned map: raised to 1 for s > 0) with one shared-memory
// read and no loop, for a value s normalized by its block scale (|s| < 1 + 2**-21: s is x
// times the correctly rounded reciprocal of the block's largest magnitude). The tables are
// kernels/adam.py's _gpu_packed_table: one 8-byte entry per cell (the top 16 bits of s, cells
// of magnitude ENC_*_LO .. 1.0, smaller magnitudes clamped into the first cell). The boundary
// inside a cell (at most one) shares the cell's top 16 bits, so the entry needs only its low 16.
#define ENC_S_KEY0 0x3480  // first cell of the signed map: 2**-22
#define ENC_U_KEY0 0x3400  // first cell of the unsigned map: 2**-23
#define ENC_KEY_LAST 0x3f80  // 1.0's cell
#define ENC_S_CELLS (ENC_KEY_LAST - ENC_S_KEY0 + 1)
#define ENC_U_CELLS (ENC_KEY_LAST - ENC_U_KEY0 + 1)

// All ones when a > b, else 0 (a NaN: 0): one FSET where the compiler would select.
__device__ __forceinline__ unsigned int gt_mask(float a, float b) {
#if defined(OPTIM8_HOST_DEVICE)
    return a > b ? 0xffffffffu : 0u;
#else
    unsigned int r;
    asm("set.gt.u32.f32 %0, %1, %2;" : "=r"(r) : "f"(a), "f"(b));
    return r;
#endif
}

// Signed map: entry .x for s >= +0, .y for s <= -0 (by the sign bit): the count of boundaries
// below the cell (bits 0-7) and the low 16 bits of the boundary B inside it (bits 16-31; a
// value no member exceeds when none is). Returns the code in bits 0-7 (bits 8-31: garbage).
__device__ __forceinline__ unsigned int encode_signed(const int2* __restrict__ enc, float s) {
    const unsigned int b = __float_as_uint(s);
    const float r = fmaxf(fabsf(s), __uint_as_float((unsigned int)ENC_S_KEY0 << 16));
    const int2 e = enc[(__float_as_uint(r) >> 16) - ENC_S_KEY0];
    const unsigned int t = (int)b < 0 ? (unsigned int)e.y : (unsigned int)e.x;
    const float bound = __uint_as_float(__byte_perm(t, b, 0x7632));  // s's top 16 bits, B's low 16
    return t - gt_mask(s, bound);
}

// Unsigned map (s >= +0 or below -0, never -0 itself; a negative s takes code 0, as bucketize
// gives it): entry .x the code of
// the cell's members up to the boundary inside it, .y the mask of B = (bits(s) | 0xffff) & .y:
// the boundary, all ones (B >= s: no boundary inside), or 0 in the first cell (it holds 0 and
// the clamped tiny values: code (s > 0)). Returns the code (0..255).
__device__ __forceinline__ unsigned int encode_unsigned(const int2* __restrict__ enc, float s) {
    const unsigned int b = __float_as_uint(s);
    const float r = fmaxf(s, __uint_as_float((unsigned int)ENC_U_KEY0 << 16));
    const int2 e = enc[(__float_as_uint(r) >> 16) - ENC_U_KEY0];
    const unsigned int bound = (b | 0xffffu) & (unsigned int)e.y;
    // s > B: for s >= +0 (B >= +0 too) the bits compare as the values; a negative s (below
    // -0) stays at 0 (its cell is the first, B = 0, and 0 - b has its sign bit clear)
    return (unsigned int)e.x + ((bound - b) >> 31);
}

// Byte 0 of each of 4 words, packed (little-endian).
__device__ __forceinline__ unsigned int pack4(unsigned int a, unsigned int b, unsigned int c, unsigned int d) {
    return __byte_perm(__byte_perm(a, b, 0x0040), __byte_perm(c, d, 0x0040), 0x5410);
}

// Byte i of w, zero-extended.
__device__ __forceinline__ unsigned int byte_of(unsigned int w, int i) {
    return __byte_perm(w, 0u, 0x4440u | (unsigned int)i);
}

// The lane's key of the signed map's block scale (extreme_key) and of the unsigned map's
// (the magnitude's bits: NaN above +Inf above every finite value).
__device__ __forceinline__ unsigned int magnitude_key(float x) { return __float_as_uint(x) & 0x7fffffffu; }

// This lane's keys of its blocks' new scales (quantize8_packed), for m' (the signed map:
// extreme_key's order) and v' (the unsigned map: magnitude_key's), in the common case: every
// m' finite and every v' finite and not negative (v' = v * beta2 + g * g * (1 - beta2) is
// never -0 or below 0, unless the old state was). Returns false when that is not so (then
// use lane_keys_general on the values kept). v' >= 0: its bits order as its values; m': the
// signed maximum of its bits is its largest positive value (if any), the unsigned maximum its
// negative value of largest magnitude (if any); the lane's extreme is the one of larger
// magnitude (the positive on a tie).
__device__ __forceinline__ bool lane_keys(const float* m, const float* v, unsigned int* km, unsigned int* kv) {
    int pmax = __float_as_int(m[0]);
    unsigned int nmax = __float_as_uint(m[0]), vmax = __float_as_uint(v[0]);
#pragma unroll
    for (int i = 1; i < E; ++i) {
        pmax = pmax > __float_as_int(m[i]) ? pmax : __float_as_int(m[i]);
        nmax = umax(nmax, __float_as_uint(m[i]));
        vmax = umax(vmax, __float_as_uint(v[i]));
    }
    const float pf = __int_as_float(pmax), nf = __uint_as_float(nmax);
    *km = extreme_key(fabsf(nf) > pf ? nf : pf);  // (used only when all are finite)
    *kv = vmax;
    // One finite test for all: +Inf/NaN show in pf (or nf), -Inf/-NaN in nf, a NaN or Inf v'
    // in vmax, a negative v' (or -0) as its sign bit, turned into NaN here. pf - nf is finite
    // otherwise (|pf| + |nf| at most; an overflow only sends the lane to the general path).
    const float vf = __int_as_float((int)vmax >> 31 | (int)vmax);
    return finite(__fadd_rn(__fsub_rn(pf, nf), vf));
}

// The keys of any values (NaN above Inf above every finite value, as kernels/blockwise.py).
__device__ __forceinline__ void lane_keys_general(const float* m, const float* v, unsigned int* km, unsigned int* kv) {
    unsigned int a = 0, b = 0;
#pragma unroll
    for (int i = 0; i < E; ++i) {
        a = umax(a, extreme_key(m[i]));
        b = umax(b, magnitude_key(v[i]));
    }
    *km = a;
    *kv = b;
}

// load8 for the parameters and gradients (bf16: each half of a word by one instruction).
template <typename T>
__device__ __forceinline__ void load8_param(const T* __restrict__ p, float* v) { load8(p, v); }
template <>
__device__ __forceinline__ void load8_param<bf16>(const bf16* __restrict__ p, float* v) {
    const uint4 w = *reinterpret_cast<const uint4*>(p);
    const unsigned int u[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        v[2 * i] = __uint_as_float(u[i] << 16);
        v[2 * i + 1] = __uint_as_float(u[i] & 0xffff0000u);
    }
}

// group_umax through the warp-wide reduction instruction (REDUX) for a whole warp (WIDTH 32:
// one instruction instead of five shuffles and maxima); else shuffles.
template <int WIDTH>
__device__ __forceinline__ unsigned int group_umax_redux(unsigned int k) {
#if !defined(OPTIM8_HOST_DEVICE) && __CUDA_ARCH__ >= 800  // (REDUX: sm_80 on)
    if (WIDTH == 32) return __reduce_max_sync(0xffffffffu, k);
#endif
    return group_umax<WIDTH>(k);
}

// quantize8 with the packed encoder: codes of this lane's 8 values under the block scale made
// from `key` (this lane's key, reduced here over the TPB lanes of its block), packed 4 a word
// (zero4: the zero code in each byte).
// Returns the block's stored absmax.
template <int TPB, bool SIGNED>
__device__ __forceinline__ float quantize8_packed(const int2* __restrict__ enc, const float* x, unsigned int key, unsigned int zero4, uint2* packed) {
    key = group_umax_redux<TPB>(key);
    const unsigned int kk = key ^ 1u;  // extreme_value(key), as a rotate
    const float m = SIGNED ? __uint_as_float((kk >> 1) | (kk << 31)) : __uint_as_float(key);
    float a, inv;
    if (!block_scale(m, &a, &inv)) {  // NaN/Inf (only from corrupt old state) or a tiny block
        packed->x = zero4;
        packed->y = zero4;
    } else {
        unsigned int c[E];
#pragma unroll
        for (int i = 0; i < E; ++i) {
            const float s = __fmul_rn(x[i], inv);
            c[i] = SIGNED ? encode_signed(enc, s) : encode_unsigned(enc, s);
        }
        packed->x = pack4(c[0], c[1], c[2], c[3]);
        packed->y = pack4(c[4], c[5], c[6], c[7]);
    }
    return a;
}

#endif  // OPTIM8_STATE8_CUH
