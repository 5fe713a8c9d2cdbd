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

// e^x in the compute type of the float32 / float64 kernels (the SIMT paths and the split merges)
template <typename T>
__device__ __forceinline__ T exp_t(T x);
template <>
__device__ __forceinline__ float exp_t<float>(float x) { return expf(x); }
template <>
__device__ __forceinline__ double exp_t<double>(double x) { return exp(x); }

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
// The mask, one hook for every kernel (fastattn._masks states the rules).  For batch entry b with
// Lq query rows and Lk keys (padded lengths, seqlens, or a packed sequence's lengths), query row i
// sees the keys of ONE interval [lo(i), hi(i)):
//     lo(i) = max(0, i + off - left),   hi(i) = min(Lk, i + off + right + 1)     (i < Lq; else none)
// with off = Lk - Lq under bottom-right alignment (else 0), right = 0 for causal (min with the
// window's right), left / right = FA_UNBOUNDED where unbounded.  lo and hi never decrease with i,
// so a query tile needs the key tiles of [lo(first row), hi(last row)) and no other: that is the
// one tile-skipping rule (fa_mask::key_range).  A boolean attn_mask only thins the interval.
// With MODS the scores also become logits: scale * s -> softcap * tanh(. / softcap) -> - ALiBi ->
// + bias, kept in log2 units (times log2 e) so the softmax runs with scale_log2 = 1.
// Masked keys never contribute: a key a query row does not see cannot change that row, whatever
// K and V hold there (inf and NaN included).  Masked scores become -inf before the softmax (so K
// never reaches the row); V needs care only in the tensor-core P V, where a masked entry's p = 0
// still multiplies V (0 * inf = 0 * NaN = NaN): see pv_tile_nonfinite_v.  Key rows past Lk are
// loaded as zeros, so only keys < Lk that the interval or the boolean mask hides need that care.
// ------------------------------------------------------------------------------------------------

#define FA_UNBOUNDED (1 << 29)  // window side without bound (the launcher keeps lengths < 2^29)
#define FA_LOG2E 1.4426950408889634f

// Where one (batch entry, query head) lives in the (batch, heads, seq, dim) views.
// ragged: 0 none (lengths seq_q / seq_kv), 1 padded (rag_q / rag_kv hold seqlens), 2 packed
// (rag_q / rag_kv hold cu_seqlens; the views have one batch entry, entry b's rows start at cu[b]).
struct fa_entry {
    int b, h, lq, lk, view_b;
    long long q_row, kv_row;  // first row of the entry in the views
};

__device__ __forceinline__ fa_entry fa_entry_of(int bh, int heads, int ragged, const int* rag_q, const int* rag_kv,
                                                int seq_q, int seq_kv) {
    fa_entry e;
    e.b = bh / heads;
    e.h = bh - e.b * heads;
    e.view_b = e.b;
    e.q_row = e.kv_row = 0;
    e.lq = seq_q;
    e.lk = seq_kv;
    if (ragged == 1) {
        e.lq = rag_q[e.b];
        e.lk = rag_kv[e.b];
    } else if (ragged == 2) {
        const int q0 = rag_q[e.b], k0 = rag_kv[e.b];
        e.lq = rag_q[e.b + 1] - q0;
        e.lk = rag_kv[e.b + 1] - k0;
        e.q_row = q0;
        e.kv_row = k0;
        e.view_b = 0;
    }
    return e;
}

// float of a 16-bit value by its bits, with the type chosen at run time (attn_mask's dtype)
__device__ __forceinline__ float float_of_f16_bits(unsigned short x) {
    float f;
    asm("{\n.reg .b16 h;\nmov.b16 h, %1;\ncvt.f32.f16 %0, h;\n}\n" : "=f"(f) : "h"(x));
    return f;
}

// mask_kind: 0 none, 1 bool (True = may attend), 2 float16, 3 bfloat16, 4 float32, 5 float64 bias
enum { FA_MASK_NONE = 0, FA_MASK_BOOL = 1, FA_MASK_F16 = 2, FA_MASK_BF16 = 3, FA_MASK_F32 = 4, FA_MASK_F64 = 5 };

__device__ __forceinline__ double tanh_t(double y) { return tanh(y); }
__device__ __forceinline__ float tanh_t(float y) { return tanhf(y); }

// INTERVAL: causal and/or a window (else every key < Lk is in the interval);
// MODS: softcap / ALiBi / attn_mask, switched at run time (one specialization serves them all)
template <bool INTERVAL, bool MODS>
struct fa_mask {
    static constexpr bool hides_keys_ever = INTERVAL || MODS;  // can a key < Lk be hidden from a row?
    int lq, lk, lo_off, hi_off;  // lo(i) = i + lo_off, hi(i) = i + hi_off (then clamped)
    // MODS (the *_l2 factors are the natural-unit ones times log2 e)
    float scale_l2, sc_k, sc_c2, sc_y, slope, slope_l2;
    int alibi_off, mask_kind;
    bool alibi, softcap;
    const unsigned char* m;
    long long m_si, m_sj;

    __device__ __forceinline__ int lo(int i) const { return INTERVAL ? max(0, i + lo_off) : 0; }
    __device__ __forceinline__ int hi(int i) const { return INTERVAL ? min(lk, i + hi_off) : lk; }
    __device__ __forceinline__ bool bool_mask() const { return MODS && mask_kind == FA_MASK_BOOL; }
    __device__ __forceinline__ bool mask_bit(int i, int j) const {
        return m[(long long)i * m_si + (long long)j * m_sj] != 0;
    }
    // inside the interval (rows < Lq, keys < Lk): before a boolean mask
    __device__ __forceinline__ bool in_interval(int i, int j) const { return i < lq && j >= lo(i) && j < hi(i); }
    __device__ __forceinline__ bool visible(int i, int j) const {
        return in_interval(i, j) && (!bool_mask() || mask_bit(i, j));
    }
    // keys the rows [r0, r1) (r1 <= Lq) need: [kv_lo, kv_hi), empty if kv_hi <= kv_lo
    __device__ __forceinline__ void key_range(int r0, int r1, int& kv_lo, int& kv_hi) const {
        kv_lo = lo(r0);
        kv_hi = hi(r1 - 1);
    }
    // the query rows that see some key of [kv0, kv1) (kv0 < kv1 <= Lk): [r_lo, r_hi), empty if
    // r_hi <= r_lo.  The same rule read the other way (the backward's key tiles walk query tiles):
    // hi(i) > kv0 and lo(i) < kv1, both monotone in i, so the rows form one interval.
    __device__ __forceinline__ void query_range(int kv0, int kv1, int& r_lo, int& r_hi) const {
        if (!INTERVAL) {
            r_lo = 0;
            r_hi = lq;
            return;
        }
        r_lo = max(0, kv0 - hi_off + 1);
        r_hi = min(lq, kv1 - lo_off);
    }
    // does some element of rows [r0, r0 + rows) x keys [kv0, kv0 + n) need masking (rows past Lq,
    // keys past Lk or outside the interval, or a boolean mask)?
    __device__ __forceinline__ bool tile_needs_mask(int r0, int rows, int kv0, int n) const {
        return tile_needs_interval(r0, rows, kv0, n) || bool_mask();
    }
    // the same without the boolean mask: does some element lie outside the interval (or the entry)?
    __device__ __forceinline__ bool tile_needs_interval(int r0, int rows, int kv0, int n) const {
        const int r1 = r0 + rows - 1;
        return r1 >= lq || kv0 + n > hi(r0) || kv0 < lo(r1);
    }
    // does the tile hold a key < Lk that some row of [r0, r0 + rows) (< Lq) does not see?  Only those
    // can carry a non-finite V into a row that must not see it (loads write zeros past Lk).
    __device__ __forceinline__ bool tile_hides_keys(int r0, int rows, int kv0, int n) const {
        if (!hides_keys_ever) return false;
        const int r1 = min(r0 + rows, lq) - 1;
        if (r1 < r0) return false;
        return kv0 < lo(r1) || min(kv0 + n, lk) > hi(r0) || bool_mask();
    }
    // does no row of [r0, r0 + rows) see any key of [kv0, kv0 + n)?
    __device__ __forceinline__ bool tile_hidden(int r0, int rows, int kv0, int n) const {
        if (r0 >= lq) return true;
        if (!INTERVAL) return false;
        const int r1 = min(r0 + rows, lq) - 1;
        return kv0 >= hi(r1) || kv0 + n <= lo(r0);
    }
    // the keys of [kv0, kv0 + n) that row i sees (before a boolean mask): kv0 + lo .. kv0 + hi - 1
    __device__ __forceinline__ void visible_span(int i, int kv0, int n, int& a, int& b) const {
        if (i >= lq) {
            a = b = 0;
            return;
        }
        a = max(0, lo(i) - kv0);
        b = min(n, hi(i) - kv0);
    }
    __device__ __forceinline__ float bias(int i, int j) const {
        const long long o = (long long)i * m_si + (long long)j * m_sj;
        switch (mask_kind) {
            case FA_MASK_F16: return float_of_f16_bits(reinterpret_cast<const unsigned short*>(m)[o]);
            case FA_MASK_BF16: return __uint_as_float((unsigned)reinterpret_cast<const unsigned short*>(m)[o] << 16);
            case FA_MASK_F32: return reinterpret_cast<const float*>(m)[o];
            case FA_MASK_F64: return (float)reinterpret_cast<const double*>(m)[o];
            default: return 0.0f;
        }
    }
    __device__ __forceinline__ double bias_f64(int i, int j) const {
        const long long o = (long long)i * m_si + (long long)j * m_sj;
        if (mask_kind == FA_MASK_F64) return reinterpret_cast<const double*>(m)[o];
        return (double)bias(i, j);
    }
    // softcap: r = 1 / (1 + 2^(2 y log2 e)) of raw score s (y = scale s / c), so tanh(y) = 1 - 2 r
    __device__ __forceinline__ float softcap_r(float s) const {
        float e, r;
        asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(e) : "f"(s * sc_k));
        asm("rcp.approx.ftz.f32 %0, %1;\n" : "=f"(r) : "f"(1.0f + e));
        return r;
    }
    // softcap: tanh(scale s / c) by tanh.approx (one MUFU op, relative error ~2^-11)
    __device__ __forceinline__ float softcap_t(float s) const {
        float t;
        asm("tanh.approx.f32 %0, %1;\n" : "=f"(t) : "f"(s * sc_y));
        return t;
    }
    // softcap (backward): d tanh(y) / dy = 1 - tanh(y)^2 = 4 r (1 - r) at raw score s
    __device__ __forceinline__ float softcap_dtanh(float s) const {
        const float r = softcap_r(s);
        return 4.0f * r * (1.0f - r);
    }
    // MODS (tensor-core kernels): the logit of raw score s at (i, j), in log2 units, with the
    // run-time switches as template flags (SC softcap, AL ALiBi, BI a float bias): the kernels pick
    // one of the eight forms once per tile (logit2_any), not per element.  Softcap c: with
    // y = scale s / c, c tanh(y) log2 e = c log2 e (1 - 2 / (1 + 2^(2 y log2 e))): one FMUL, two
    // MUFU (ex2, rcp), one FADD, one FFMA (absolute error ~1e-7 c: ex2.approx and
    // rcp.approx err by ~2^-22 relative; inf -> c, -inf -> -c, NaN -> NaN).
    // bias: attn_mask's value at (i, j) when it is a float bias (BI), read by the caller
    template <bool SC, bool AL, bool BI>
    __device__ __forceinline__ float logit2_t(float s, int i, int j, float bias_ij = 0.0f) const {
        return logit2_d<SC, AL, BI, false>(s, (float)(i + alibi_off - j), bias_ij);
    }
    // the same with ALiBi's signed distance i + alibi_off - j given as a float (callers that walk a
    // tile form it with one FADD from a per-row base instead of an integer-to-float conversion per
    // element, which runs at the MUFU's rate); TANH: the softcap as c log2 e tanh.approx(scale s / c),
    // one MUFU op instead of two (ex2, rcp), relative error ~2^-11 (the Hopper kernel: its float16 and
    // bfloat16 outputs stay within the error of a plain implementation in their precision)
    template <bool SC, bool AL, bool BI, bool TANH>
    __device__ __forceinline__ float logit2_d(float s, float dist, float bias_ij) const {
        float x;
        if constexpr (SC && TANH) {
            x = sc_c2 * softcap_t(s);
        } else if constexpr (SC) {
            x = fmaf(-2.0f * sc_c2, softcap_r(s), sc_c2);
        } else {
            x = s * scale_l2;
        }
        if constexpr (AL) x = fmaf(-slope_l2, fabsf(dist), x);
        if constexpr (BI) x = fmaf(bias_ij, FA_LOG2E, x);
        return x;
    }
    // a float bias at (i, j); 0 outside the entry (rows >= Lq, keys >= Lk: never read past the mask)
    __device__ __forceinline__ float bias_at(int i, int j) const {
        return (mask_kind >= FA_MASK_F16 && i < lq && j < lk) ? bias(i, j) : 0.0f;
    }
    // the generic form (fa_fwd_mma): switches per element
    __device__ __forceinline__ float logit2(float s, int i, int j) const {
        const float bij = bias_at(i, j);
        if (softcap) return alibi ? logit2_t<true, true, true>(s, i, j, bij) : logit2_t<true, false, true>(s, i, j, bij);
        return alibi ? logit2_t<false, true, true>(s, i, j, bij) : logit2_t<false, false, true>(s, i, j, bij);
    }
    // which form of the logit: bit 0 softcap, bit 1 ALiBi (attn_mask's kind apart)
    __device__ __forceinline__ int mods_form() const { return (softcap ? 1 : 0) | (alibi ? 2 : 0); }
    // hint the L1 cache with this warp's rows [r0, r0 + 16) of attn_mask at keys [kv0, kv0 + n):
    // the hook's loads of the tile then hit L1 (issued a tile's MMAs ahead of them).  Rows with a
    // unit key stride only; rows and keys past the entry are left alone.
    __device__ __forceinline__ void prefetch_rows(int r0, int kv0, int n, int lane) const {
        if (m == nullptr || m_sj != 1) return;
        const int row = r0 + (lane & 15);
        if (row >= lq || kv0 >= lk) return;
        const int es = mask_kind == FA_MASK_BOOL ? 1 : (mask_kind <= FA_MASK_BF16 ? 2 : (mask_kind == FA_MASK_F32 ? 4 : 8));
        const int keys = min(n, lk - kv0);
        const int half = (keys * es + 1) / 2;
        const unsigned char* base = m + ((long long)row * m_si + kv0) * es + (lane >> 4) * half;
        for (int off = 0; off < half; off += 128) asm volatile("prefetch.global.L1 [%0];\n" ::"l"(base + off));
    }
    // MODS (SIMT kernel): the logit in natural units, in the input precision
    template <typename F>
    __device__ __forceinline__ F logit(F s, double scale_, double softcap_, int i, int j) const {
        F dtanh;
        return logit_dtanh<F>(s, scale_, softcap_, i, j, dtanh);
    }
    // the same, and d logit / d (scale s): 1 - tanh^2 under a softcap, else 1 (the backward)
    template <typename F>
    __device__ __forceinline__ F logit_dtanh(F s, double scale_, double softcap_, int i, int j, F& dtanh) const {
        F x = s * (F)scale_;
        dtanh = F(1);
        if (softcap_ > 0.0) {
            const F t = tanh_t(x / (F)softcap_);
            dtanh = F(1) - t * t;
            x = (F)softcap_ * t;
        }
        if (alibi) x -= (F)slope * (F)fabs((double)(i + alibi_off - j));
        if (mask_kind >= FA_MASK_F16 && i < lq && j < lk) x += (F)bias_f64(i, j);
        return x;
    }
};

// The launch arguments every kernel takes, in this order (the launcher packs them once per call
// geometry): arrays, then where rows live, then the mask.
#define FA_COMMON_PARAMS(T, L)                                                                              \
    const T *__restrict__ q, const T *__restrict__ k, const T *__restrict__ v, T *__restrict__ out,          \
        L *__restrict__ lse, const unsigned char *__restrict__ attn_mask, const float *__restrict__ slopes,   \
        const int *__restrict__ rag_q, const int *__restrict__ rag_kv, const int *__restrict__ v_flag,      \
        int heads, int group, int seq_q,                                                                     \
        int seq_kv, int d, int dv, long long q_sb, long long q_sh, long long q_ss, long long q_sd,            \
        long long k_sb, long long k_sh, long long k_ss, long long k_sd, long long v_sb, long long v_sh,       \
        long long v_ss, long long v_sd, long long o_sb, long long o_sh, long long o_ss, long long lse_sb,     \
        long long lse_sh, long long m_sb, long long m_sh, long long m_si, long long m_sj, int slopes_sb,      \
        int num_q_blocks, int ragged, int mask_kind, int bottom_right, int win_left, int win_right

// the mask of entry e (rows and keys local to the entry); scale / softcap used by MODS only
template <bool INTERVAL, bool MODS>
__device__ __forceinline__ fa_mask<INTERVAL, MODS> fa_mask_of(const fa_entry& e, int bottom_right, int win_left,
                                                              int win_right, const unsigned char* attn_mask,
                                                              long long m_sb, long long m_sh, long long m_si,
                                                              long long m_sj, int mask_kind, const float* slopes,
                                                              int slopes_sb, float scale, float softcap) {
    fa_mask<INTERVAL, MODS> mk;
    mk.lq = e.lq;
    mk.lk = e.lk;
    const int off = bottom_right ? e.lk - e.lq : 0;
    mk.lo_off = off - win_left;
    mk.hi_off = off + win_right + 1;
    mk.scale_l2 = scale * FA_LOG2E;
    mk.softcap = softcap > 0.0f;
    mk.sc_k = mk.softcap ? scale * (2.0f * FA_LOG2E) / softcap : 0.0f;
    mk.sc_c2 = softcap * FA_LOG2E;
    mk.sc_y = mk.softcap ? scale / softcap : 0.0f;
    mk.alibi = MODS && slopes != nullptr;
    mk.slope = mk.alibi ? slopes[(long long)e.b * slopes_sb + e.h] : 0.0f;
    mk.slope_l2 = mk.slope * FA_LOG2E;
    mk.alibi_off = e.lk - e.lq;
    mk.mask_kind = MODS ? mask_kind : 0;
    mk.m_si = m_si;
    mk.m_sj = m_sj;
    const int esize = mask_kind == FA_MASK_BOOL ? 1 : (mask_kind <= FA_MASK_BF16 ? 2 : (mask_kind == FA_MASK_F32 ? 4 : 8));
    mk.m = (MODS && attn_mask != nullptr) ? attn_mask + ((long long)e.b * m_sb + (long long)e.h * m_sh) * esize : nullptr;
    return mk;
}

// out / lse of rows [r0, r1) of one (entry, head) that see no key: 0 and -inf (out, lse at row 0)
template <typename T, typename L>
__device__ __forceinline__ void write_empty_rows(T* out, L* lse, long long o_ss, int r0, int r1, int dv, int tid,
                                                 int nt) {
    for (int e = tid; e < (r1 - r0) * dv; e += nt) {
        const int r = r0 + e / dv, c = e % dv;
        T* p = out + (long long)r * o_ss + c;
        if constexpr (sizeof(T) == 2) *reinterpret_cast<unsigned short*>(p) = 0;
        else if constexpr (sizeof(T) == 4) *reinterpret_cast<unsigned*>(p) = 0u;
        else *reinterpret_cast<unsigned long long*>(p) = 0ull;
    }
    for (int r = r0 + tid; r < r1; r += nt) lse[r] = (L)(-FA_INF);
}

// ROWS x D elements of a (seq, d) matrix with element strides (ss, sd) into shared-memory rows of LDS
// elements, rows >= seq and columns >= d zero (the SIMT kernels' tile load)
template <typename T, int ROWS, int D, int LDS, int NT>
__device__ __forceinline__ void load_tile_simt(T* smem, const T* __restrict__ g, long long ss, long long sd,
                                               int row0, int seq, int d, int tid) {
    for (int e = tid; e < ROWS * D; e += NT) {
        const int r = e / D, c = e % D;
        const int gr = row0 + r;
        smem[r * LDS + c] = (gr < seq && c < d) ? g[(long long)gr * ss + (long long)c * sd] : T(0);
    }
}

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
