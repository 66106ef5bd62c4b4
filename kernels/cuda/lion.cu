// Lion with 8-bit or fp32 state: the rule of kernels/update.py (_lion), on update.cuh's machinery.
#include "common.cuh"
#include "state8.cuh"
#include "update.cuh"

struct Lion {
    static constexpr int NS = 1, NC = 7;
    static constexpr unsigned SIGNED = 1u;  // exp_avg
    enum { GSIGN, BETA1, OMB1, BETA2, OMB2, LR, DECAY };
    __device__ static __forceinline__ void apply(const float* c, float& p, float g, float* s) {
        g = __fmul_rn(g, c[GSIGN]);
        const float u = sign_of(__fadd_rn(__fmul_rn(s[0], c[BETA1]), __fmul_rn(g, c[OMB1])));
        p = __fsub_rn(__fmul_rn(p, c[DECAY]), __fmul_rn(u, c[LR]));
        s[0] = __fadd_rn(__fmul_rn(s[0], c[BETA2]), __fmul_rn(g, c[OMB2]));
    }
};
