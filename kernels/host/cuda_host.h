// The host device: the CUDA subset optim8's kernels use, for the system C++ compiler.
//
// kernels/hostdev.py compiles each kernels/cuda/<file>.cu as C++17 after this header, plus a
// generated launch table, into a shared library. A launch runs the grid's CTAs on a pool of
// worker threads; inside a CTA every CUDA thread (lane) is its own fiber with its own stack, so
// __syncthreads and the __shfl_*_sync family really synchronize: a lane that reaches one blocks
// until the lanes it names arrive. The next lane to run is a random ready one (seeded), and a
// warp whose shuffle completes may run ahead of lanes that have not reached theirs, so a
// missing barrier shows up as a wrong result instead of hiding behind lock-step execution. A shuffle that names an exited lane, lanes blocked on different
// barriers, or any other state in which no lane can run is reported as an error, not a hang.
// __shared__ variables are per-worker thread_local statics: one instance per running CTA.
//
// Floating point is IEEE fp32 with no contraction (-ffp-contract=off) and no flush-to-zero,
// so the __f*_rn intrinsics are the plain operators and every result is the GPU's (the
// kernels are compiled without -ftz there too).
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include <link.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#define HD_ASAN 1
#endif

#define OPTIM8_HOST_DEVICE 1

// ------------------------------------------------------------------ language keywords
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __shared__ static thread_local
#define __align__(n) __attribute__((aligned(n)))

struct dim3 {
    unsigned int x = 1, y = 1, z = 1;
};

inline thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;
constexpr int warpSize = 32;

// ------------------------------------------------------------------ vector types
struct __attribute__((aligned(8))) uint2 { unsigned int x, y; };
struct __attribute__((aligned(16))) uint4 { unsigned int x, y, z, w; };
struct __attribute__((aligned(8))) int2 { int x, y; };
struct __attribute__((aligned(16))) int4 { int x, y, z, w; };
struct __attribute__((aligned(8))) float2 { float x, y; };
struct __attribute__((aligned(16))) float4 { float x, y, z, w; };
inline int4 make_int4(int x, int y, int z, int w) { return int4{x, y, z, w}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return uint2{x, y}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }

// ------------------------------------------------------------------ intrinsics
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline float __frcp_rn(float a) { return 1.0f / a; }
inline unsigned int __float_as_uint(float f) { unsigned int u; std::memcpy(&u, &f, 4); return u; }
inline int __float_as_int(float f) { int u; std::memcpy(&u, &f, 4); return u; }
inline float __uint_as_float(unsigned int u) { float f; std::memcpy(&f, &u, 4); return f; }
inline float __int_as_float(int u) { float f; std::memcpy(&f, &u, 4); return f; }
// PRMT: byte i of the result is byte (s >> 4i) & 7 of the 8-byte value {y:x}.
inline unsigned int __byte_perm(unsigned int x, unsigned int y, unsigned int s) {
    const uint64_t v = (uint64_t)x | ((uint64_t)y << 32);
    unsigned int r = 0;
    for (int i = 0; i < 4; ++i) r |= (unsigned int)((v >> (8 * ((s >> (4 * i)) & 7))) & 0xffu) << (8 * i);
    return r;
}
inline int __popc(unsigned int x) { return __builtin_popcount(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz((unsigned)x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
using std::fabs;

// ------------------------------------------------------------------ the fiber runtime
namespace hd {

constexpr size_t kStack = 256 * 1024;  // bytes per lane (plus a guard page below it)

enum class State { Ready, Barrier, Warp, Exited };
enum class WarpOp { Xor, Up, Down, Idx, Ballot, Sync };

struct Lane {
    ucontext_t ctx;
    char* stack = nullptr;
    State state = State::Ready;
    unsigned int tid = 0;  // linear thread index
    dim3 idx;
    // a pending warp collective
    WarpOp op = WarpOp::Sync;
    unsigned int mask = 0;
    int param = 0, width = 32;
    uint64_t value = 0, result = 0;
    int kind = 0;  // sizeof the shuffled value, for the error message
};

struct Worker {
    std::vector<Lane> lanes;
    ucontext_t sched;
    Lane* current = nullptr;
    std::string error;
    std::mt19937_64 rng;
    std::function<void()>* body = nullptr;
#ifdef HD_ASAN
    void* fake_stack = nullptr;
    const void* sched_stack_bottom = nullptr;
    size_t sched_stack_size = 0;
#endif
    ~Worker() {
        for (Lane& l : lanes)
            if (l.stack) munmap(l.stack - getpagesize(), kStack + getpagesize());
    }
};

inline thread_local Worker* tls_worker = nullptr;
inline thread_local char tls_probe = 0;

// GPU shared memory starts each CTA with arbitrary contents; here the __shared__ statics would
// keep the previous CTA's values (often the same table, which would hide a missing barrier after
// its load). So between CTAs every byte of this module's thread-local block (where the
// __shared__ statics live) is set to 0xFF (NaN as float, -1 as int), and the runtime's own
// thread-locals are put back.
struct TlsBlock { char* data = nullptr; size_t size = 0; };

inline int find_tls_block(struct dl_phdr_info* info, size_t, void* out) {
    TlsBlock* block = (TlsBlock*)out;
    if (!info->dlpi_tls_data) return 0;
    for (int i = 0; i < info->dlpi_phnum; ++i) {
        const ElfW(Phdr)& ph = info->dlpi_phdr[i];
        if (ph.p_type != PT_TLS) continue;
        char* lo = (char*)info->dlpi_tls_data;
        if (&tls_probe >= lo && &tls_probe < lo + ph.p_memsz) {
            block->data = lo;
            block->size = ph.p_memsz;
            return 1;
        }
    }
    return 0;
}

inline void poison_shared_memory() {
    static thread_local TlsBlock block;
    tls_probe = 1;  // make sure this thread's block is allocated
    if (!block.data) dl_iterate_phdr(find_tls_block, &block);
    if (!block.data) return;
    Worker* w = tls_worker;
    const dim3 bd = blockDim, gd = gridDim, bi = blockIdx;
    const TlsBlock keep = block;
    std::memset(keep.data, 0xFF, keep.size);
    block = keep;
    tls_worker = w;
    blockDim = bd;
    gridDim = gd;
    blockIdx = bi;
}

inline void fail(const std::string& msg) {
    Worker* w = tls_worker;
    if (w->error.empty()) w->error = msg;
}

// switch from a lane back to the scheduler (the lane's state says why)
inline void yield_to_scheduler() {
    Worker* w = tls_worker;
    Lane* me = w->current;
#ifdef HD_ASAN
    void* fake = nullptr;
    __sanitizer_start_switch_fiber(&fake, w->sched_stack_bottom, w->sched_stack_size);
#endif
    swapcontext(&me->ctx, &w->sched);
#ifdef HD_ASAN
    __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
    threadIdx = me->idx;  // the scheduler ran other lanes in between
}

inline void lane_entry() {
    Worker* w = tls_worker;
#ifdef HD_ASAN
    __sanitizer_finish_switch_fiber(nullptr, &w->sched_stack_bottom, &w->sched_stack_size);
#endif
    threadIdx = w->current->idx;
    (*w->body)();
    w->current->state = State::Exited;
    yield_to_scheduler();  // never resumed
}

inline void syncthreads() {
    Lane* me = tls_worker->current;
    me->state = State::Barrier;
    yield_to_scheduler();
}

template <typename T>
inline T warp_collective(WarpOp op, unsigned int mask, T var, int param, int width) {
    static_assert(sizeof(T) <= 8, "a shuffled value is at most 8 bytes");
    Lane* me = tls_worker->current;
    const unsigned int lane = me->tid % 32;
    if (!(mask & (1u << lane))) {
        fail("lane " + std::to_string(me->tid) + " executes a warp collective whose mask " + std::to_string(mask) +
             " does not name itself");
    }
    me->op = op;
    me->mask = mask;
    me->param = param;
    me->width = width;
    me->value = 0;
    std::memcpy(&me->value, &var, sizeof(T));
    me->kind = (int)sizeof(T);
    me->state = State::Warp;
    yield_to_scheduler();
    T out;
    std::memcpy(&out, &me->result, sizeof(T));
    return out;
}

// Complete the pending collective of the warp starting at lane `base` if every lane its mask
// names has arrived; returns the lanes released (a bit per lane of the warp, 0 if none).
inline unsigned int release_warp(Worker* w, size_t base) {
    const size_t n = w->lanes.size();
    const size_t end = std::min(n, base + 32);
    unsigned int waiting = 0, mask = 0;
    int first = -1;
    for (size_t i = base; i < end; ++i) {
        const Lane& l = w->lanes[i];
        if (l.state == State::Warp) {
            waiting |= 1u << (i - base);
            if (first < 0) first = (int)i;
            mask = l.mask;
        }
    }
    if (!waiting) return 0;
    for (size_t i = base; i < end; ++i)
        if (((waiting >> (i - base)) & 1u) && (w->lanes[i].mask != mask || w->lanes[i].op != w->lanes[first].op))
            return 0;  // lanes in different collectives: deadlock detection reports it
    if ((mask & waiting) != mask) return 0;  // not everyone has arrived (yet)
    const unsigned int group = mask;
    for (size_t i = base; i < end; ++i) {
        if (!((group >> (i - base)) & 1u)) continue;
        Lane& l = w->lanes[i];
        const int lane = (int)(i - base);
        const int width = l.width;
        const int seg = lane & ~(width - 1);
        int src = lane;
        switch (l.op) {
            case WarpOp::Xor: src = lane ^ l.param; if (src >= seg + width) src = lane; break;
            case WarpOp::Up: src = lane - l.param; if (src < seg) src = lane; break;
            case WarpOp::Down: src = lane + l.param; if (src >= seg + width) src = lane; break;
            case WarpOp::Idx: src = seg + (l.param & (width - 1)); break;
            case WarpOp::Ballot: case WarpOp::Sync: break;
        }
        if (l.op == WarpOp::Ballot) {
            unsigned int bits = 0;
            for (size_t j = base; j < end; ++j)
                if (((group >> (j - base)) & 1u) && w->lanes[j].value != 0) bits |= 1u << (j - base);
            l.result = bits;
        } else if (l.op == WarpOp::Sync) {
            l.result = 0;
        } else {
            if (src < 0 || src >= 32 || !((group >> src) & 1u)) {
                fail("lane " + std::to_string(l.tid) + " reads warp lane " + std::to_string(src) +
                     ", which is not in the shuffle's mask");
                return 0;
            }
            l.result = w->lanes[base + src].value;
        }
    }
    for (size_t i = base; i < end; ++i)
        if ((group >> (i - base)) & 1u) w->lanes[i].state = State::Ready;
    return group;
}

inline std::string describe_deadlock(Worker* w) {
    std::string s = "no lane of CTA (" + std::to_string(blockIdx.x) + "," + std::to_string(blockIdx.y) + "," +
                    std::to_string(blockIdx.z) + ") can proceed:";
    int at_barrier = 0, exited = 0;
    for (const Lane& l : w->lanes) {
        at_barrier += l.state == State::Barrier;
        exited += l.state == State::Exited;
    }
    s += " " + std::to_string(at_barrier) + " lanes wait at __syncthreads, " + std::to_string(exited) + " have exited";
    const size_t n = w->lanes.size();
    for (size_t base = 0; base < n; base += 32) {
        for (size_t i = base; i < std::min(n, base + 32); ++i) {
            const Lane& l = w->lanes[i];
            if (l.state != State::Warp) continue;
            for (size_t j = base; j < std::min(n, base + 32); ++j) {
                if (!((l.mask >> (j - base)) & 1u)) continue;
                const Lane& o = w->lanes[j];
                if (o.state == State::Warp) continue;
                s += "; lane " + std::to_string(l.tid) + " waits in a warp collective for lane " + std::to_string(o.tid) +
                     (o.state == State::Exited ? ", which has exited" : ", which waits at __syncthreads");
                return s;
            }
            s += "; lanes of warp " + std::to_string(base / 32) + " wait in warp collectives with different masks or kinds";
            return s;
        }
    }
    return s;
}

// Run one CTA: every lane a fiber, scheduled until all have exited.
inline void run_cta(Worker* w, unsigned int nthreads) {
    const long page = getpagesize();
    if (w->lanes.size() != nthreads) {
        for (Lane& l : w->lanes)
            if (l.stack) munmap(l.stack - page, kStack + page);
        w->lanes.assign(nthreads, Lane{});
        for (Lane& l : w->lanes) {
            char* mem = (char*)mmap(nullptr, kStack + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
            if (mem == MAP_FAILED) { fail("out of memory for lane stacks"); return; }
            mprotect(mem, page, PROT_NONE);  // a guard page: a stack overflow faults instead of corrupting
            l.stack = mem + page;
        }
    }
    for (unsigned int t = 0; t < nthreads; ++t) {
        Lane& l = w->lanes[t];
        l.tid = t;
        l.idx.x = t % blockDim.x;
        l.idx.y = (t / blockDim.x) % blockDim.y;
        l.idx.z = t / (blockDim.x * blockDim.y);
        l.state = State::Ready;
        getcontext(&l.ctx);
        l.ctx.uc_stack.ss_sp = l.stack;
        l.ctx.uc_stack.ss_size = kStack;
        l.ctx.uc_link = nullptr;
        makecontext(&l.ctx, (void (*)())lane_entry, 0);
    }
    // Run one ready lane, chosen at random, until it blocks or exits; complete what its arrival
    // completes (its warp's collective, or the barrier) right away, so that released lanes can
    // run ahead of lanes that have not reached their own synchronization point yet.
    // The policy differs between CTAs (seeded): last-released first (a warp whose shuffle just
    // completed runs on while other warps have not started: catches a missing __syncthreads
    // before a read of another warp's shared-memory writes), first-ready first, or random.
    const int policy = (int)(w->rng() % 3);  // 0: LIFO, 1: FIFO, 2: random
    std::vector<unsigned int> ready;
    {
        std::vector<unsigned int> warps((nthreads + 31) / 32);
        for (size_t i = 0; i < warps.size(); ++i) warps[i] = (unsigned int)i;
        std::shuffle(warps.begin(), warps.end(), w->rng);  // warps in random order, each warp's lanes together
        for (unsigned int wp : warps) {
            const size_t first = ready.size();
            for (unsigned int t = wp * 32; t < std::min(nthreads, wp * 32 + 32); ++t) ready.push_back(t);
            std::shuffle(ready.begin() + first, ready.end(), w->rng);
        }
    }
    if (policy == 2) std::shuffle(ready.begin(), ready.end(), w->rng);
    size_t head = 0;  // FIFO: ready[head..] are pending
    unsigned int live = nthreads, at_barrier = 0;
    auto make_ready = [&](size_t base, unsigned int group) {
        for (unsigned int j = 0; j < 32; ++j)
            if ((group >> j) & 1u) ready.push_back((unsigned int)(base + j));
    };
    while (live > 0) {
        if (ready.size() == head) {
            fail(describe_deadlock(w));
            return;
        }
        unsigned int t;
        if (policy == 0) {
            t = ready.back();
            ready.pop_back();
        } else if (policy == 1) {
            t = ready[head++];
            if (head == ready.size()) { ready.clear(); head = 0; }
        } else {
            const size_t pick = (size_t)(w->rng() % ready.size());
            t = ready[pick];
            ready[pick] = ready.back();
            ready.pop_back();
        }
        Lane& l = w->lanes[t];
        w->current = &l;
#ifdef HD_ASAN
        __sanitizer_start_switch_fiber(&w->fake_stack, l.stack, kStack);
#endif
        swapcontext(&w->sched, &l.ctx);
#ifdef HD_ASAN
        __sanitizer_finish_switch_fiber(w->fake_stack, nullptr, nullptr);
#endif
        if (!w->error.empty()) return;
        const size_t base = t - t % 32;
        if (l.state == State::Warp) {
            const unsigned int group = release_warp(w, base);
            if (!w->error.empty()) return;
            make_ready(base, group);
            for (size_t i = base; !group && i < std::min(w->lanes.size(), base + 32); ++i) {
                if (((l.mask >> (i - base)) & 1u) && w->lanes[i].state == State::Exited) {
                    fail("lane " + std::to_string(t) + " waits in a warp collective (mask " + std::to_string(l.mask) +
                         ") for lane " + std::to_string(i) + ", which has exited");
                    return;
                }
            }
        } else if (l.state == State::Barrier) {
            ++at_barrier;
        } else if (l.state == State::Exited) {
            --live;
            // a collective still waiting for this lane can never complete
            for (size_t i = base; i < std::min(w->lanes.size(), base + 32); ++i) {
                const Lane& o = w->lanes[i];
                if (o.state == State::Warp && ((o.mask >> (t - base)) & 1u)) {
                    fail("lane " + std::to_string(o.tid) + " waits in a warp collective (mask " + std::to_string(o.mask) +
                         ") for lane " + std::to_string(t) + ", which has exited");
                    return;
                }
            }
        }
        if (live > 0 && at_barrier == live) {  // every lane still running is at the barrier (exited lanes do not count)
            for (unsigned int i = 0; i < nthreads; ++i)
                if (w->lanes[i].state == State::Barrier) {
                    w->lanes[i].state = State::Ready;
                    ready.push_back(i);
                }
            at_barrier = 0;
        }
    }
}

// ------------------------------------------------------------------ the launch pool
struct Job {
    dim3 grid, block;
    std::function<void()>* body;
    std::atomic<uint64_t> next{0};
    uint64_t total = 0;
    uint64_t seed = 0;
    std::mutex mu;
    std::string error;
};

class Pool {
  public:
    static Pool& get() {
        static Pool* pool = new Pool();  // never destroyed: detached workers outlive static destruction
        return *pool;
    }

    // Run every CTA of the grid on the workers; returns the first error ("" when none).
    std::string run(dim3 grid, dim3 block, std::function<void()>& body, uint64_t seed) {
        std::lock_guard<std::mutex> one_launch_at_a_time(launch_mu_);
        Job job;
        job.grid = grid;
        job.block = block;
        job.body = &body;
        job.total = (uint64_t)grid.x * grid.y * grid.z;
        job.seed = seed;
        std::unique_lock<std::mutex> lk(mu_);
        job_ = &job;
        want_ = (size_t)std::min<uint64_t>(threads_, job.total);
        active_ = want_;
        generation_++;
        cv_.notify_all();
        done_cv_.wait(lk, [&] { return active_ == 0; });
        job_ = nullptr;
        return job.error;
    }

  private:
    Pool() {
        const char* env = std::getenv("OPTIM8_HOST_THREADS");
        threads_ = env ? (size_t)std::max(1, std::atoi(env)) : (size_t)std::max(1u, std::thread::hardware_concurrency());
        for (size_t i = 0; i < threads_; ++i) std::thread([this, i] { loop(i); }).detach();
    }

    void loop(size_t index) {
        Worker* worker = new Worker();  // kept for the process: its lane stacks are reused
        tls_worker = worker;
        uint64_t seen = 0;
        for (;;) {
            Job* job;
            {
                std::unique_lock<std::mutex> lk(mu_);
                cv_.wait(lk, [&] { return generation_ != seen; });
                seen = generation_;
                if (index >= want_) continue;  // this launch has fewer CTAs than workers
                job = job_;
            }
            work(worker, job);
            std::lock_guard<std::mutex> lk(mu_);
            if (--active_ == 0) done_cv_.notify_all();
        }
    }

    static void work(Worker* w, Job* job) {
        blockDim = job->block;
        gridDim = job->grid;
        const unsigned int nthreads = job->block.x * job->block.y * job->block.z;
        w->body = job->body;
        for (;;) {
            const uint64_t c = job->next.fetch_add(1);
            if (c >= job->total) return;
            {
                std::lock_guard<std::mutex> lk(job->mu);
                if (!job->error.empty()) return;
            }
            blockIdx.x = (unsigned)(c % job->grid.x);
            blockIdx.y = (unsigned)((c / job->grid.x) % job->grid.y);
            blockIdx.z = (unsigned)(c / ((uint64_t)job->grid.x * job->grid.y));
            w->rng.seed(job->seed * 0x9E3779B97F4A7C15ull + c);
            w->error.clear();
            poison_shared_memory();
            run_cta(w, nthreads);
            if (!w->error.empty()) {
                std::lock_guard<std::mutex> lk(job->mu);
                if (job->error.empty()) job->error = w->error;
                return;
            }
        }
    }

    size_t threads_ = 1, want_ = 0, active_ = 0;
    std::mutex mu_, launch_mu_;
    std::condition_variable cv_, done_cv_;
    Job* job_ = nullptr;
    uint64_t generation_ = 0;
};

// ------------------------------------------------------------------ kernel entries
template <typename F>
struct Entry;

template <typename... A>
struct Entry<void (*)(A...)> {
    template <size_t... I>
    static void call(void (*f)(A...), void** args, std::index_sequence<I...>) {
        f(*reinterpret_cast<std::remove_cv_t<std::remove_reference_t<A>>*>(args[I])...);
    }
    static constexpr size_t N = sizeof...(A);
    static int arity() { return (int)N; }
    static void sizes(int* out) {
        int i = 0;
        ((out[i++] = (int)sizeof(std::remove_cv_t<std::remove_reference_t<A>>)), ...);
        (void)out;
        (void)i;
    }
};

template <auto F>
int launch_entry(const unsigned int* dims, void** args, int nargs, const int* arg_sizes, uint64_t seed, char* err, int errlen) {
    using E = Entry<decltype(F)>;
    std::string error;
    if (nargs != E::arity()) {
        error = "kernel takes " + std::to_string(E::arity()) + " arguments, launched with " + std::to_string(nargs);
    } else {
        std::vector<int> want(E::arity() + 1);
        E::sizes(want.data());
        for (int i = 0; i < nargs; ++i)
            if (want[i] != arg_sizes[i])
                error = "argument " + std::to_string(i) + " is " + std::to_string(arg_sizes[i]) +
                        " bytes; the kernel's parameter is " + std::to_string(want[i]);
    }
    const unsigned int threads = dims[3] * dims[4] * dims[5];
    if (error.empty() && (threads == 0 || threads > 1024)) error = "block of " + std::to_string(threads) + " threads (1..1024)";
    if (error.empty() && (dims[0] == 0 || dims[1] == 0 || dims[2] == 0 || dims[1] > 65535 || dims[2] > 65535))
        error = "invalid grid";
    if (error.empty()) {
        std::function<void()> body = [&] { E::call(F, args, std::make_index_sequence<E::N>{}); };
        error = Pool::get().run(dim3{dims[0], dims[1], dims[2]}, dim3{dims[3], dims[4], dims[5]}, body, seed);
    }
    if (!error.empty()) {
        std::snprintf(err, (size_t)errlen, "%s", error.c_str());
        return 1;
    }
    return 0;
}

}  // namespace hd

#define __syncthreads() ::hd::syncthreads()

template <typename T>
inline T __shfl_xor_sync(unsigned int mask, T var, int lane_mask, int width = 32) {
    return ::hd::warp_collective(::hd::WarpOp::Xor, mask, var, lane_mask, width);
}
template <typename T>
inline T __shfl_up_sync(unsigned int mask, T var, unsigned int delta, int width = 32) {
    return ::hd::warp_collective(::hd::WarpOp::Up, mask, var, (int)delta, width);
}
template <typename T>
inline T __shfl_down_sync(unsigned int mask, T var, unsigned int delta, int width = 32) {
    return ::hd::warp_collective(::hd::WarpOp::Down, mask, var, (int)delta, width);
}
template <typename T>
inline T __shfl_sync(unsigned int mask, T var, int src_lane, int width = 32) {
    return ::hd::warp_collective(::hd::WarpOp::Idx, mask, var, src_lane, width);
}
inline unsigned int __ballot_sync(unsigned int mask, int pred) {
    return ::hd::warp_collective(::hd::WarpOp::Ballot, mask, (unsigned int)(pred != 0), 0, 32);
}
inline int __any_sync(unsigned int mask, int pred) { return (__ballot_sync(mask, pred) & mask) != 0; }
inline int __all_sync(unsigned int mask, int pred) { return (__ballot_sync(mask, pred) & mask) == mask; }
inline void __syncwarp(unsigned int mask = 0xffffffffu) { (void)::hd::warp_collective(::hd::WarpOp::Sync, mask, 0u, 0, 32); }
