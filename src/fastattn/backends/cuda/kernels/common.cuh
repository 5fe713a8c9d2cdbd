// Device helpers shared by fastattn's CUDA kernels (flash_fwd.cu, flash_fwd_sm90.cu).
// No includes: NVRTC's built-ins are enough, so flash_fwd_sm90.cu compiles without the CUDA headers.
#pragma once

// NVRTC has no <math.h>: its INFINITY macro is spelled out here
#define FA_INF __int_as_float(0x7f800000)

// ------------------------------------------------------------------------------------------------
// small PTX helpers
// ------------------------------------------------------------------------------------------------

__device__ __forceinline__ unsigned smem_u32(const void* ptr) {
    return static_cast<unsigned>(__cvta_generic_to_shared(ptr));
}

// 16-byte global->shared copy; src_bytes < 16 zero-fills the rest (0 = pure zero fill).
__device__ __forceinline__ void cp_async_16(unsigned dst, const void* src, int src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void ldsm_x4(unsigned& r0, unsigned& r1, unsigned& r2, unsigned& r3, unsigned addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(addr));
}

__device__ __forceinline__ void ldsm_x4_trans(unsigned& r0, unsigned& r1, unsigned& r2, unsigned& r3,
                                              unsigned addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(addr));
}

__device__ __forceinline__ float exp2_approx(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

// m16n8k16 tensor-core MMA, fp32 accumulation: c (16 x 8) += a (16 x 16, 4 registers of 16-bit
// pairs) * b (16 x 8, 2 registers); BF16 selects bfloat16 operands, else float16.
template <bool BF16>
__device__ __forceinline__ void mma_m16n8k16(float* c, const unsigned* a, unsigned b0, unsigned b1) {
    if constexpr (BF16)
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
            "{%0, %1, %2, %3};\n"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    else
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
            "{%0, %1, %2, %3};\n"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// ------------------------------------------------------------------------------------------------
// 16-bit values by their bits (no CUDA header needed): exponent all ones = inf or NaN
// ------------------------------------------------------------------------------------------------

template <bool BF16>
__device__ __forceinline__ bool nonfinite16(unsigned short x) {
    constexpr unsigned E = BF16 ? 0x7f80u : 0x7c00u;
    return (x & E) == E;
}

// w with its non-finite 16-bit halves replaced by zero
template <bool BF16>
__device__ __forceinline__ unsigned zero_nonfinite16x2(unsigned w) {
    unsigned keep = 0u;
    if (!nonfinite16<BF16>((unsigned short)(w & 0xffffu))) keep |= 0xffffu;
    if (!nonfinite16<BF16>((unsigned short)(w >> 16))) keep |= 0xffff0000u;
    return w & keep;
}

// acc + w * 0 on both halves: stays +-0 while every w seen is finite and turns NaN (and stays NaN)
// at the first inf or NaN, so one packed FMA a word checks a tile; nonfinite_seen(acc) reads it
template <bool BF16>
__device__ __forceinline__ unsigned nonfinite_or16x2(unsigned acc, unsigned w) {
    unsigned r;
    if constexpr (BF16)
        asm("fma.rn.bf16x2 %0, %1, %2, %3;\n" : "=r"(r) : "r"(w), "r"(0u), "r"(acc));
    else
        asm("fma.rn.f16x2 %0, %1, %2, %3;\n" : "=r"(r) : "r"(w), "r"(0u), "r"(acc));
    return r;
}
__device__ __forceinline__ bool nonfinite_seen(unsigned acc) { return (acc & 0x7fff7fffu) != 0u; }

template <bool BF16>
__device__ __forceinline__ float float_of16(unsigned short x) {
    if constexpr (BF16) {
        return __uint_as_float((unsigned)x << 16);
    } else {
        float f;
        asm("{\n.reg .b16 h;\nmov.b16 h, %1;\ncvt.f32.f16 %0, h;\n}\n" : "=f"(f) : "h"(x));
        return f;
    }
}

// ------------------------------------------------------------------------------------------------
// Masks.  Masked keys never contribute: a key a query row does not see cannot change that row,
// whatever K and V hold there (inf and NaN included).  Scores of masked entries become -inf before
// the softmax (so K never reaches the row); V needs care only in the tensor-core P V, where a
// masked entry's p = 0 still multiplies V (0 * inf = 0 * NaN = NaN): see add_nonfinite_v.
// ------------------------------------------------------------------------------------------------

// Which keys a query row sees: keys < seq_kv and, with CAUSAL, keys j <= i (top-left).
template <bool CAUSAL>
struct key_mask {
    // can a loaded tile hold keys that some of the rows must not see (keys past seq_kv aside)?
    static constexpr bool hides_keys = CAUSAL;
    int seq_kv;
    __device__ __forceinline__ bool visible(int i, int j) const { return j < seq_kv && (!CAUSAL || j <= i); }
    // the keys of [kv0, kv0 + n) that row i sees are kv0 + lo .. kv0 + hi - 1 (none if hi <= lo)
    __device__ __forceinline__ void visible_span(int i, int kv0, int n, int& lo, int& hi) const {
        lo = 0;
        hi = min(n, seq_kv - kv0);
        if (CAUSAL) hi = min(hi, i - kv0 + 1);
    }
    // does some row >= r0 need masking in key tile [kv0, kv0 + n) (keys past seq_kv count)
    __device__ __forceinline__ bool tile_needs_mask(int r0, int kv0, int n) const {
        return kv0 + n > seq_kv || (CAUSAL && kv0 + n - 1 > r0);
    }
    // does the tile hold a key < seq_kv that some row >= r0 does not see?  Only those entries can
    // carry a non-finite V into a row that must not see it: the tile loads write zeros past seq_kv.
    __device__ __forceinline__ bool tile_hides_keys(int r0, int kv0, int n) const {
        return hides_keys && min(kv0 + n, seq_kv) - 1 > r0;
    }
    // does no row of [r0, r0 + rows) see any key of the tile (kv0 < seq_kv: the kernels' tiles)?
    __device__ __forceinline__ bool tile_hidden(int r0, int rows, int kv0) const {
        return hides_keys && kv0 > r0 + rows - 1;
    }
};

// ------------------------------------------------------------------------------------------------
// P V of one key tile on tensor cores when V holds inf or NaN and some of its keys are masked for
// some rows (the slow path; the kernels take it only after checking the tile).  Masked entries
// have p = 0, and 0 * inf = 0 * NaN = NaN on the tensor cores too, so:
//   1. the tile's P V with V's non-finite entries read as 0 (mma.sync), so nothing non-finite
//      reaches any row;
//   2. then, for each non-finite V entry and each row that sees its key, acc += p * v with p as
//      the tensor cores saw it (rounded to 16 bits): visible entries follow the formula (inf or
//      NaN), masked ones add nothing.
// Layout of mma.sync m16n8k16 and wgmma alike, per warp 16 rows: lane (g = lane / 4, t4 = lane % 4)
// holds rows g and g + 8 (r = 0, 1), columns 8 n + 2 t4 + {0, 1} of n-tile n in acc[4 n + 2 r + e],
// and P for keys 8 n + 2 t4 + {0, 1} of row g + 8 r as the 16-bit pair pw[2 n + r] (so the A
// fragment of k-step kb is pw[4 kb .. 4 kb + 3]).  Rolled loops and selects keep the registers
// this path needs few: the kernels' usual path is tight on registers.
//   v_addr(kb, np): this lane's ldmatrix.trans row address for keys 16 kb.., columns 16 np..
//   v_word(key, n): V's 16-bit pair at (key, 8 n + 2 t4 + {0, 1});  visible(r, key): row g + 8 r
// ------------------------------------------------------------------------------------------------
template <bool BF16, int NO, int NKEYS, class VAddr, class VWord, class Visible>
__device__ __forceinline__ void pv_tile_nonfinite_v(float* acc, const unsigned* pw, VAddr v_addr, VWord v_word,
                                                    Visible visible, int lane) {
    static_assert(NO % 2 == 0 && NKEYS % 16 == 0, "whole n-tile pairs and k-steps");
#pragma unroll 1
    for (int kb = 0; kb < NKEYS / 16; ++kb) {
        unsigned a[4] = {0u, 0u, 0u, 0u};
#pragma unroll
        for (int kk = 0; kk < NKEYS / 16; ++kk)
            if (kk == kb) a[0] = pw[4 * kk], a[1] = pw[4 * kk + 1], a[2] = pw[4 * kk + 2], a[3] = pw[4 * kk + 3];
#pragma unroll
        for (int np = 0; np < NO / 2; ++np) {
            unsigned b0, b1, b2, b3;
            ldsm_x4_trans(b0, b1, b2, b3, v_addr(kb, np));
            b0 = zero_nonfinite16x2<BF16>(b0);
            b1 = zero_nonfinite16x2<BF16>(b1);
            b2 = zero_nonfinite16x2<BF16>(b2);
            b3 = zero_nonfinite16x2<BF16>(b3);
            mma_m16n8k16<BF16>(acc + 8 * np, a, b0, b1);
            mma_m16n8k16<BF16>(acc + 8 * np + 4, a, b2, b3);
        }
    }
#pragma unroll 1
    for (int key = 0; key < NKEYS; ++key) {
        // p of (row g, key) and (row g + 8, key) sit in lane (g, (key % 8) / 2) of the quad
        const int n = key >> 3;
        unsigned w0 = 0u, w1 = 0u;
#pragma unroll
        for (int nn = 0; nn < NKEYS / 8; ++nn)
            if (nn == n) w0 = pw[2 * nn], w1 = pw[2 * nn + 1];
        const int src = (lane & ~3) | ((key & 7) >> 1);
        w0 = __shfl_sync(0xffffffffu, w0, src);
        w1 = __shfl_sync(0xffffffffu, w1, src);
        const int sh = (key & 1) * 16;
        const float p0 = float_of16<BF16>((unsigned short)(w0 >> sh));
        const float p1 = float_of16<BF16>((unsigned short)(w1 >> sh));
        const bool see0 = visible(0, key), see1 = visible(1, key);
#pragma unroll
        for (int nt = 0; nt < NO; ++nt) {
            const unsigned vw = v_word(key, nt);
            if (nonfinite_seen(nonfinite_or16x2<BF16>(0u, vw))) {
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const unsigned short vb = (unsigned short)(vw >> (16 * e));
                    if (nonfinite16<BF16>(vb)) {
                        const float vf = float_of16<BF16>(vb);
                        if (see0) acc[4 * nt + e] += p0 * vf;
                        if (see1) acc[4 * nt + 2 + e] += p1 * vf;
                    }
                }
            }
        }
    }
}

// ------------------------------------------------------------------------------------------------
// Running row sum l of the online softmax (SIMT kernel), in two levels: each tile's sum (formed from
// zero) goes into `group` (l.group = alpha * l.group + tile sum), and every few tiles fold() adds
// the group into `total` with TwoSum, the rounding error kept in `comp`, so l is about as accurate
// as a plain float32 sum over any length.  `total` and `comp` are rescaled only where the
// accumulator is (rescale()).  The tensor-core kernels keep one chain (their registers are spoken
// for; their output error is dominated by P rounded to 16 bits anyway).
// ------------------------------------------------------------------------------------------------

template <typename F>
__device__ __forceinline__ void two_sum(F a, F b, F& s, F& err) {
    s = a + b;
    const F bb = s - a;
    err = (a - (s - bb)) + (b - bb);
}

template <typename F>
struct row_sum {
    F total, comp, group;
    __device__ __forceinline__ void init() { total = comp = group = F(0); }
    __device__ __forceinline__ void rescale(F alpha) { total *= alpha, comp *= alpha; }
    __device__ __forceinline__ void fold() {
        F err;
        two_sum(total, group, total, err);
        comp += err;
        group = F(0);
    }
    __device__ __forceinline__ F value() const {
        F s, err;
        two_sum(total, group, s, err);
        return s + (comp + err);
    }
};
