// Pieces shared by the backward kernels (flash_bwd.cu, flash_bwd_sm90.cu): the launch arguments, the key
// block and its query-tile walk, the element math (P, dS' through the forward's hook), sm_90's bulk
// reductions.  No includes (common.cuh first): flash_bwd_sm90.cu compiles without the CUDA headers.
#pragma once

// The launch arguments of every backward kernel, in this order (the launcher packs them once per call
// geometry).  view_q / view_kv: the rows of the (batch, heads, seq, d) views (dq_acc and dbias index by
// them); dq_acc (float32, D columns a row) and dbias may be NULL.
#define FA_BWD_PARAMS(T, L)                                                                                  \
    const T *__restrict__ q, const T *__restrict__ k, const T *__restrict__ v, const T *__restrict__ dout,  \
        const L *__restrict__ lse, const L *__restrict__ dsum, T *__restrict__ dq_out, T *__restrict__ dk_out, \
        T *__restrict__ dv_out, float *__restrict__ dq_acc, L *__restrict__ dbias,                            \
        const unsigned char *__restrict__ attn_mask, const float *__restrict__ slopes,                        \
        const int *__restrict__ rag_q, const int *__restrict__ rag_kv, int heads, int group, int seq_q,        \
        int seq_kv, int d, int dv, int view_q, int view_kv, long long q_sb, long long q_sh, long long q_ss,    \
        long long q_sd, long long k_sb, long long k_sh, long long k_ss, long long k_sd, long long v_sb,        \
        long long v_sh, long long v_ss, long long v_sd, long long do_sb, long long do_sh, long long do_ss,      \
        long long do_sd, long long dq_sb, long long dq_sh, long long dq_ss, long long dk_sb, long long dk_sh,   \
        long long dk_ss, long long dv_sb, long long dv_sh, long long dv_ss, long long lse_sb, long long lse_sh, \
        long long m_sb, long long m_sh, long long m_si, long long m_sj, int slopes_sb, int num_blocks,         \
        int ragged, int mask_kind, int bottom_right, int win_left, int win_right

#define FA_BWD_MASK_ARGS(e) \
    e, bottom_right, win_left, win_right, attn_mask, m_sb, m_sh, m_si, m_sj, mask_kind, slopes, slopes_sb

// The key block of a kv-side kernel (one block per (key tile, batch * k/v head), heavy tiles first) and the
// query tiles it walks: [qt_begin, qt_begin + n_qt BQ) of each query head of the GQA group, n_iter in all,
// from the rows that see a key of the block (the forward's tile-skipping rule read the other way).
// e.h is the k/v head.
struct fa_bwd_key_block {
    fa_entry e;
    int kv_block, kv0, qt_begin, n_qt, n_iter;
};

template <bool INTERVAL, bool MODS, int BKV, int BQ>
__device__ __forceinline__ fa_bwd_key_block fa_bwd_key_block_of(
    int num_blocks, int heads, int group, int ragged, const int* rag_q, const int* rag_kv, int seq_q, int seq_kv,
    int bottom_right, int win_left, int win_right, const unsigned char* attn_mask, long long m_sb, long long m_sh,
    long long m_si, long long m_sj, int mask_kind, const float* slopes, int slopes_sb, float scale, float softcap) {
    fa_bwd_key_block kb;
    kb.kv_block = (int)(blockIdx.x % (unsigned)num_blocks);
    kb.e = fa_entry_of((int)(blockIdx.x / (unsigned)num_blocks), heads / group, ragged, rag_q, rag_kv, seq_q, seq_kv);
    kb.kv0 = kb.kv_block * BKV;
    int r_lo = 0, r_hi = 0;
    if (kb.kv0 < kb.e.lk) {
        fa_entry eq = kb.e;
        eq.h = kb.e.h * group;
        const fa_mask<INTERVAL, MODS> m0 = fa_mask_of<INTERVAL, MODS>(FA_BWD_MASK_ARGS(eq), scale, softcap);
        m0.query_range(kb.kv0, min(kb.kv0 + BKV, kb.e.lk), r_lo, r_hi);
    }
    kb.qt_begin = (r_lo / BQ) * BQ;
    kb.n_qt = r_hi > r_lo ? (r_hi - kb.qt_begin + BQ - 1) / BQ : 0;
    kb.n_iter = kb.n_qt * group;
    return kb;
}
#define FA_BWD_KEY_BLOCK(INTERVAL, MODS, BKV, BQ, scale, softcap)                                                \
    fa_bwd_key_block_of<INTERVAL, MODS, BKV, BQ>(num_blocks, heads, group, ragged, rag_q, rag_kv, seq_q, seq_kv,  \
                                                 bottom_right, win_left, win_right, attn_mask, m_sb, m_sh, m_si, \
                                                 m_sj, mask_kind, slopes, slopes_sb, scale, softcap)

// lse of a row as the exponent's offset, in log2 units: +inf for a row that sees no key (P = 0)
__device__ __forceinline__ float lse_log2(float l) { return l == -FA_INF ? FA_INF : l * FA_LOG2E; }

// P and dS' of one element (row i, key j) from its raw score s and dP (= dO_i . v_j): the hook, the mask,
// dropout, the softcap's derivative.  Returns dS' (without the scale); p becomes the dropped P z.
template <bool INTERVAL, bool MODS>
__device__ __forceinline__ float bwd_element(const fa_mask<INTERVAL, MODS>& mask, bool needs, float s, float dp,
                                             float l2, float dsum_i, int i, int j, float scale_log2, bool keep,
                                             float keep_scale, float& p, float* dbias_ij) {
    float x, dt = 1.0f;
    if constexpr (MODS) {
        if (mask.softcap) dt = mask.softcap_dtanh(s);
        x = mask.logit2(s, i, j);
    } else {
        x = s * scale_log2;
    }
    float pr = exp2_approx(x - l2);
    if (needs && !mask.visible(i, j)) pr = 0.0f;
    const float z = keep ? keep_scale : 0.0f;
    const float ds = pr == 0.0f ? 0.0f : pr * (dp * z - dsum_i);
    if (dbias_ij != nullptr) *dbias_ij = ds;
    p = pr * z;
    return ds * dt;
}

// ------------------------------------------------------------------------------------------------
// Local rows (the CPU backward's rule, docs/design.md "The backward"): a row whose keys [lo, hi) (the
// interval of the masking rule, before a boolean mask) lie in one chunk of C keys (chunks aligned at
// multiples of C) has its whole P in one key tile of every kernel whose key tiles are multiples of C.
// For such a row the kernels sum P over the chunk; when the sum is 1 but for the rounding of the lse
// passed in (and of the sum), P is divided by it and D = sum_j P_ij dP_ij (from that P and this dP)
// replaces the rounded dO . O, so a row that sees one key gets P = 1 and dS = 0 exactly and a row
// that sees two gets the accuracy of a plain implementation normalizing its own P.  A sum further
// from 1 means the lse covers keys this call does not hold (a ring-attention shard): P and D stay as
// given.  Rows that see no key (lse = -inf, P = 0) sum to 0 and stay as given (dS = 0).
//
// Every kernel that computes a row's P must agree on its P and D: dK / dV (key-major) and dQ
// (query-major) use the same C; the SIMT pair computes the sums once (flash_bwd.cu, fa_bwd_simt_kv) and
// hands them to the other kernel.
// ------------------------------------------------------------------------------------------------
template <int C, bool INTERVAL, bool MODS>
__device__ __forceinline__ bool bwd_row_local(const fa_mask<INTERVAL, MODS>& mask, int i) {
    if (i >= mask.lq) return false;
    const int lo = mask.lo(i), hi = mask.hi(i);
    return lo < hi && lo / C == (hi - 1) / C;
}
// a local row whose chunk starts in the key block [kv0, kv0 + n): the block that owns its sums
template <int C, bool INTERVAL, bool MODS>
__device__ __forceinline__ bool bwd_row_owned(const fa_mask<INTERVAL, MODS>& mask, int i, int kv0, int n) {
    if (!bwd_row_local<C>(mask, i)) return false;
    const int lo = mask.lo(i);
    return lo >= kv0 && lo < kv0 + n;
}
// a compile-time switch for generic lambdas: a loop written once, instantiated with and without the
// local rows' work, so tiles without local rows run the plain loop
template <bool B>
struct fa_flag {
    static constexpr bool value = B;
};
// is psum, the sum of P over a local row's keys, 1 but for rounding?  The lse passed in carries half
// an ulp of |lse| (an error common to the row's weights: 6e-8 |lse| in float32), the forward's scores
// were summed in another order, and the sum of up to C terms rounds: 8 eps (|lse| + 2 C + 16), the CPU
// kernel's tolerance with C for its vector width.  NaN and 0 (a row that sees nothing) fail.
template <typename F, int C>
__device__ __forceinline__ bool bwd_psum_is_one(F psum, F lse) {
    const double eps = sizeof(F) == 4 ? 0x1p-24 : 0x1p-53;
    const double tol = 8.0 * eps * (fabs((double)lse) + 2.0 * C + 16.0);
    return fabs((double)psum - 1.0) <= tol;
}

// sm_90's bulk asynchronous reduction (the TMA unit): dQ tiles leave shared memory as one float32 add per
// row instead of a red.global per pair of elements
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define FA_HAS_BULK_REDUCE 1
#else
#define FA_HAS_BULK_REDUCE 0
#endif
__device__ __forceinline__ void fence_proxy_async_shared() {
#if FA_HAS_BULK_REDUCE
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}
// global[dst .. dst + bytes) += shared[src .. src + bytes) (float32; 16-byte aligned, bytes % 16 == 0)
__device__ __forceinline__ void bulk_reduce_add_f32(float* dst, unsigned src, int bytes) {
#if FA_HAS_BULK_REDUCE
    asm volatile("cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], %2;\n" ::"l"(dst), "r"(src),
                 "r"(bytes)
                 : "memory");
#endif
}
__device__ __forceinline__ void bulk_commit() {
#if FA_HAS_BULK_REDUCE
    asm volatile("cp.async.bulk.commit_group;\n" ::: "memory");
#endif
}
// this thread's bulk operations have read their shared memory / have completed
__device__ __forceinline__ void bulk_wait_read() {
#if FA_HAS_BULK_REDUCE
    asm volatile("cp.async.bulk.wait_group.read 0;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void bulk_wait_all() {
#if FA_HAS_BULK_REDUCE
    asm volatile("cp.async.bulk.wait_group 0;\n" ::: "memory");
#endif
}

// 4-byte global->shared copy; src_bytes 0 writes a zero
__device__ __forceinline__ void cp_async_4(unsigned dst, const void* src, int src_bytes) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes));
}
