// SGD (with and without momentum): the rules of kernels/update.py (_sgd, _sgd_plain), on
// update.cuh's machinery.
#include "common.cuh"
#include "state8.cuh"
#include "update.cuh"

// g * gsign + p * weight_decay: maximize, then the L2 penalty (torch.optim.SGD's order)
__device__ __forceinline__ float decayed_grad(float p, float g, float gsign, float wd) {
    return __fadd_rn(__fmul_rn(g, gsign), __fmul_rn(p, wd));
}

struct SGDMomentum {
    static constexpr int NS = 1, NC = 7;
    static constexpr unsigned SIGNED = 1u;  // momentum_buffer
    enum { GSIGN, WD, MOMENTUM, DAMPENED, NESTEROV_G, NESTEROV_B, LR };
    __device__ static __forceinline__ void apply(const float* c, float& p, float g, float* s) {
        g = decayed_grad(p, g, c[GSIGN], c[WD]);
        const float b = __fadd_rn(__fmul_rn(s[0], c[MOMENTUM]), __fmul_rn(g, c[DAMPENED]));
        const float d = __fadd_rn(__fmul_rn(g, c[NESTEROV_G]), __fmul_rn(b, c[NESTEROV_B]));
        p = __fsub_rn(p, __fmul_rn(d, c[LR]));
        s[0] = b;
    }
};

struct SGDPlain {
    static constexpr int NS = 0, NC = 3;
    static constexpr unsigned SIGNED = 0u;
    enum { GSIGN, WD, LR };
    __device__ static __forceinline__ void apply(const float* c, float& p, float g, float*) {
        g = decayed_grad(p, g, c[GSIGN], c[WD]);
        p = __fsub_rn(p, __fmul_rn(g, c[LR]));
    }
};
