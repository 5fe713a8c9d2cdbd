// Hopper (sm_90a) helpers of the wgmma kernels (flash_fwd_sm90.cu, flash_bwd_sm90.cu): matrix descriptors,
// wgmma ordering, mbarriers, named barriers, the 128-byte-swizzled tile layout and its cp.async loads.
// No includes (common.cuh first).
#pragma once

namespace fa_sm90 {

// shared-memory matrix descriptor for wgmma: start address, leading / stride byte offsets (16-byte
// units), 128-byte swizzle (mode 1 in bits 62-63); every swizzle atom (8 rows x 128 bytes) starts
// 1024-byte aligned, so the base-offset field stays 0
__device__ __forceinline__ unsigned long long desc_sw128(unsigned addr, unsigned lbo, unsigned sbo) {
    return (unsigned long long)((addr & 0x3FFFFu) >> 4) | ((unsigned long long)(lbo >> 4) << 16) |
           ((unsigned long long)(sbo >> 4) << 32) | (1ull << 62);
}

__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// keeps the compiler from moving register reads/writes of an accumulator across wgmma issue/wait
template <int N>
__device__ __forceinline__ void reg_fence(float (&r)[N]) {
#pragma unroll
    for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}
// two floats rounded to one 32-bit word of 16-bit values (lo in the low half)
template <bool BF16>
__device__ __forceinline__ unsigned pack2(float lo, float hi) {
    unsigned r;
    if constexpr (BF16)
        asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
    else
        asm("cvt.rn.f16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

__device__ __forceinline__ void named_barrier(int id, int threads) {
    asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
// named barrier that also ORs a predicate over the threads taking part
__device__ __forceinline__ bool named_barrier_or(int id, int threads, bool pred) {
    unsigned r;
    asm volatile(
        "{\n.reg .pred p, q;\nsetp.ne.u32 p, %1, 0;\nbar.red.or.pred q, %2, %3, p;\nselp.u32 %0, 1, 0, q;\n}\n"
        : "=r"(r)
        : "r"((unsigned)pred), "r"(id), "r"(threads)
        : "memory");
    return r != 0u;
}

// mbarriers (shared::cta): init by one thread; arrive; arrive when this thread's cp.asyncs land; wait
__device__ __forceinline__ void mbar_init(unsigned bar, unsigned count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_arrive(unsigned bar) {
    asm volatile("{\n.reg .b64 state;\nmbarrier.arrive.shared::cta.b64 state, [%0];\n}\n" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void mbar_arrive_cp_async(unsigned bar) {
    asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void mbar_wait(unsigned bar, unsigned parity) {
    asm volatile(
        "{\n.reg .pred done;\nWAIT:\n"
        "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
        "@!done bra.uni WAIT;\n}\n" ::"r"(bar),
        "r"(parity)
        : "memory");
}

// byte offset of 16-byte chunk ch (of D/8) in row r of a swizzled R-row tile
template <int R>
__device__ __forceinline__ unsigned sw128_offset(int r, int ch) {
    return (unsigned)((ch >> 3) * (R * 128) + r * 128 + (((ch & 7) ^ (r & 7)) << 4));
}

// R x D tile of a (seq, d) matrix (element row stride ss, unit column stride, 16-byte aligned rows)
// into the swizzled layout at shared address sbase; rows >= seq and columns >= d become zero
template <int R, int D, int NT>
__device__ __forceinline__ void load_tile(unsigned sbase, const unsigned short* __restrict__ g, long long ss, int row0, int seq,
                                          int d, int tid) {
    constexpr int CPR = D / 8, TOTAL = R * CPR;
#pragma unroll
    for (int i = 0; i < (TOTAL + NT - 1) / NT; ++i) {
        const int c = tid + i * NT;
        if (TOTAL % NT == 0 || c < TOTAL) {
            const int r = c / CPR, ch = c % CPR;
            const bool ok = row0 + r < seq && ch * 8 < d;
            cp_async_16(sbase + sw128_offset<R>(r, ch), ok ? g + (long long)(row0 + r) * ss + ch * 8 : g,
                        ok ? 16 : 0);
        }
    }
}

}  // namespace fa_sm90
