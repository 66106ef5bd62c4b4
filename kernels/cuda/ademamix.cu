// AdEMAMix: the rule of kernels/update.py (_ademamix), on update.cuh's machinery.
#include "common.cuh"
#include "state8.cuh"
#include "update.cuh"

struct AdEMAMix {
    static constexpr int NS = 3, NC = 13;
    static constexpr unsigned SIGNED = 3u;  // exp_avg, exp_avg_slow signed; exp_avg_sq >= 0
    enum { GSIGN, BETA1, OMB1, BETA2, OMB2, BETA3, OMB3, INV_BC1, ALPHA, INV_BC2_SQRT, EPS, LR, DECAY };
    __device__ static __forceinline__ void apply(const float* c, float& p, float g, float* s) {
        g = __fmul_rn(g, c[GSIGN]);
        const float m1 = __fadd_rn(__fmul_rn(s[0], c[BETA1]), __fmul_rn(g, c[OMB1]));
        const float m2 = __fadd_rn(__fmul_rn(s[1], c[BETA3]), __fmul_rn(g, c[OMB3]));
        const float nu = __fadd_rn(__fmul_rn(__fmul_rn(g, g), c[OMB2]), __fmul_rn(s[2], c[BETA2]));
        const float denom = __fadd_rn(__fmul_rn(__fsqrt_rn(nu), c[INV_BC2_SQRT]), c[EPS]);
        const float u = __fdiv_rn(__fadd_rn(__fmul_rn(m1, c[INV_BC1]), __fmul_rn(m2, c[ALPHA])), denom);
        p = __fsub_rn(__fmul_rn(p, c[DECAY]), __fmul_rn(u, c[LR]));
        s[0] = m1;
        s[1] = m2;
        s[2] = nu;
    }
};
