// RMSprop (not centered; without and with momentum): the rules of kernels/update.py (_rmsprop,
// _rmsprop_momentum), on update.cuh's machinery.
#include "common.cuh"
#include "state8.cuh"
#include "update.cuh"

struct RMSprop {
    static constexpr int NS = 1, NC = 6;
    static constexpr unsigned SIGNED = 0u;  // square_avg >= 0
    enum { GSIGN, WD, ALPHA, OMA, EPS, LR };
    __device__ static __forceinline__ void apply(const float* c, float& p, float g, float* s) {
        g = __fadd_rn(__fmul_rn(g, c[GSIGN]), __fmul_rn(p, c[WD]));
        const float sq = __fadd_rn(__fmul_rn(s[0], c[ALPHA]), __fmul_rn(__fmul_rn(g, g), c[OMA]));
        const float avg = __fadd_rn(__fsqrt_rn(sq), c[EPS]);
        p = __fsub_rn(p, __fmul_rn(__fdiv_rn(g, avg), c[LR]));
        s[0] = sq;
    }
};

struct RMSpropMomentum {
    static constexpr int NS = 2, NC = 7;
    static constexpr unsigned SIGNED = 2u;  // square_avg >= 0, momentum_buffer signed
    enum { GSIGN, WD, ALPHA, OMA, EPS, MOMENTUM, LR };
    __device__ static __forceinline__ void apply(const float* c, float& p, float g, float* s) {
        g = __fadd_rn(__fmul_rn(g, c[GSIGN]), __fmul_rn(p, c[WD]));
        const float sq = __fadd_rn(__fmul_rn(s[0], c[ALPHA]), __fmul_rn(__fmul_rn(g, g), c[OMA]));
        const float avg = __fadd_rn(__fsqrt_rn(sq), c[EPS]);
        const float b = __fadd_rn(__fmul_rn(s[1], c[MOMENTUM]), __fdiv_rn(g, avg));
        p = __fsub_rn(p, __fmul_rn(b, c[LR]));
        s[0] = sq;
        s[1] = b;
    }
};
