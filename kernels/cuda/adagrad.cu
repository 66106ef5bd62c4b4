// Adagrad: the rule of kernels/update.py (_adagrad), on update.cuh's machinery.
#include "common.cuh"
#include "state8.cuh"
#include "update.cuh"

struct Adagrad {
    static constexpr int NS = 1, NC = 4;
    static constexpr unsigned SIGNED = 0u;  // sum >= 0
    enum { GSIGN, WD, EPS, CLR };
    __device__ static __forceinline__ void apply(const float* c, float& p, float g, float* s) {
        g = __fadd_rn(__fmul_rn(g, c[GSIGN]), __fmul_rn(p, c[WD]));
        const float acc = __fadd_rn(s[0], __fmul_rn(g, g));
        const float std_ = __fadd_rn(__fsqrt_rn(acc), c[EPS]);
        p = __fsub_rn(p, __fmul_rn(__fdiv_rn(g, std_), c[CLR]));
        s[0] = acc;
    }
};
