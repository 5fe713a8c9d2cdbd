// FlashAttention forward for fastattn's CUDA backend.
//
// Math (per query row i; raw scores s_ij = q_i . k_j, masked entries -inf; c = scale * log2 e):
//   m' = max(m, rowmax S)             running max of the raw scores (scale > 0 commutes with max)
//   l' = 2^((m - m') c) l + rowsum 2^((S - m') c)
//   O' = 2^((m - m') c) O + 2^((S - m') c) V    (dropout zeroes entries of 2^(...) here, not in l)
//   out = O / l * 1/(1 - p),  lse = m * scale + ln l   (of the undropped softmax)
// The exponent (s - m') c is <= 0 by construction and exactly 0 at the max, whatever the
// magnitude of the scores, so p <= 1, l >= 1 for a row that sees a key, and the rescale factor is
// exactly 1 while the max stays put.  A row that sees no key ends with l = 0: out 0, lse -inf.
// Masked keys never contribute (common.cuh: fa_mask, pv_tile_nonfinite_v): not even a NaN or
// inf in K or V at such a key reaches the row.
//
// Two kernels, one work split (FlashAttention-2): one block per (query tile, batch*head), the
// block walks the key/value tiles of its head; each warp owns 16 query rows of the tile and
// never shares a K/V split with another warp.
//
//   fa_fwd_mma  float16 / bfloat16: mma.sync m16n8k16 (fp32 accumulation), ldmatrix (.trans for V),
//               K/V tiles double-buffered in shared memory through cp.async, P re-packed from the
//               S accumulators as the A operand of P.V, exp2 of (s - m) * scale * log2(e).
//   fa_fwd_simt float32 / float64: plain FMA in the input precision (exact float32, no TF32);
//               float32 sums P V and l in two levels (see fa_fwd_simt).
//
// Both take arbitrary element strides for q, k, v and out (the caller's layout), lse is contiguous
// along the rows; head_dims d (q, k) and dv (v, out) are padded to the template D (DV) with zeros.
// Every variant (GQA, ragged / packed batches, intervals, logit hook): common.cuh, fa_entry / fa_mask.
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#include "common.cuh"
#include "elem.cuh"
#include "philox.cuh"


// Does an element that thread tid wrote through load_tile<T, ROWS, D, LDS, NT, VEC> hold inf or NaN?
// The loops visit exactly load_tile's elements for tid (keep the two in step): a thread's own
// copies are complete and visible to it once cp_async_wait has returned for the tile, so each
// thread checks its share with no barrier, and the tile's barrier ORs the answers.
template <typename T, int ROWS, int D, int LDS, int NT, bool VEC>
__device__ __forceinline__ bool own_elements_nonfinite(const T* smem, int tid) {
    constexpr bool BF16 = elem<T>::bf16;
    if constexpr (VEC) {
        constexpr int CHUNKS = D / 8;
        unsigned acc = 0u;
        auto check = [&](int r, int ch) {
            const uint4 w = *reinterpret_cast<const uint4*>(smem + r * LDS + ch * 8);
            acc = nonfinite_or16x2<BF16>(acc, w.x);
            acc = nonfinite_or16x2<BF16>(acc, w.y);
            acc = nonfinite_or16x2<BF16>(acc, w.z);
            acc = nonfinite_or16x2<BF16>(acc, w.w);
        };
        if constexpr (vec_load_walks_rows<ROWS, D, NT>()) {
            constexpr int RS = NT / CHUNKS;
#pragma unroll
            for (int i = 0; i < ROWS / RS; ++i) check(tid / CHUNKS + i * RS, tid % CHUNKS);
        } else {
#pragma unroll
            for (int c = tid; c < ROWS * CHUNKS; c += NT) check(c / CHUNKS, c % CHUNKS);
        }
        return nonfinite_seen(acc);
    } else {
        const unsigned short* bits = reinterpret_cast<const unsigned short*>(smem);
        bool any = false;
        for (int e = tid; e < ROWS * D; e += NT) any |= nonfinite16<BF16>(bits[(e / D) * LDS + e % D]);
        return any;
    }
}

// ------------------------------------------------------------------------------------------------
// fa_fwd_mma: float16 / bfloat16 on tensor cores
//   D       head_dim padded (multiple of 16: 32, 64, 96, 128, 192, 256)
//   NWARPS  warps per block
//   MT      16-row m-tiles per warp: a warp owns 16*MT query rows, block_q = 16 * MT * NWARPS.
//           MT = 2 reuses every K/V fragment read from shared memory for two mma (half the
//           ldmatrix traffic per mma) and gives each warp two independent accumulator chains.
//   BKV     block_kv (multiple of 16)
//   QREG    keep the warp's Q fragments in registers for the whole kernel (else re-read per tile)
//   STAGES  K/V tiles in flight (cp.async ring: tile it+STAGES-1 loads while tile it computes)
//   DV      head_dim of v (and out) padded (DV <= D)
//   INTERVAL causal and/or a window; MODS softcap / ALiBi / attn_mask (common.cuh: fa_mask)
// Shared memory (dynamic): Q tile block_q x (D+8), K tiles STAGES x block_kv x (D+8), V tiles
// STAGES x block_kv x (DV+8); the 8-element row pad makes the 8 row addresses of every ldmatrix
// fall in distinct banks.
// ------------------------------------------------------------------------------------------------

template <typename T, int D, int DV, int NWARPS, int MT, int BKV, int STAGES, bool QREG, bool INTERVAL, bool MODS,
          bool DROPOUT, bool VEC>
__global__ void __launch_bounds__(NWARPS * 32)
    fa_fwd_mma(FA_COMMON_PARAMS(T, float), float softcap, float scale_log2, float scale, unsigned long long seed,
               unsigned threshold, float keep_scale) {
    constexpr int WQ = 16 * MT;  // query rows per warp
    constexpr int BQ = WQ * NWARPS;
    constexpr int NT = NWARPS * 32;
    constexpr int LDS = D + 8;
    constexpr int LDV = DV + 8;
    constexpr int KT = D / 16;   // k-steps of Q.K^T
    constexpr int NS = BKV / 8;  // n-tiles of S
    constexpr int NO = DV / 8;   // n-tiles of O
    constexpr bool BF16 = elem<T>::bf16;
    static_assert(D % 16 == 0 && DV % 16 == 0 && DV <= D && BKV % 16 == 0 && STAGES >= 2, "tile sizes");

    extern __shared__ __align__(16) unsigned char smem_raw[];
    T* sQ = reinterpret_cast<T*>(smem_raw);
    T* sK = sQ + BQ * LDS;
    T* sV = sK + STAGES * BKV * LDS;

    // the query tiles of one head are adjacent in the grid, so the blocks resident together share
    // that head's K/V through L2 (each K/V byte comes from DRAM about once); within a head the
    // heavy (causal) tiles go first
    const int q_block = num_q_blocks - 1 - (int)(blockIdx.x % (unsigned)num_q_blocks);
    const fa_entry e = fa_entry_of((int)(blockIdx.x / (unsigned)num_q_blocks), heads, ragged, rag_q, rag_kv,
                                   seq_q, seq_kv);
    const int b = e.b, h = e.h;  // the entry (dropout counts rows and keys inside it)
    const int q0 = q_block * BQ;

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, t4 = lane & 3;
    const int row_w0 = q0 + warp * WQ;  // first query row of this warp
    const fa_mask<INTERVAL, MODS> mask = fa_mask_of<INTERVAL, MODS>(
        e, bottom_right, win_left, win_right, attn_mask, m_sb, m_sh, m_si, m_sj, mask_kind, slopes, slopes_sb,
        scale, softcap);
    // with MODS the hook hands the softmax logits in log2 units: exponent (s - m), lse m ln 2 + ln l
    const float sl2 = MODS ? 1.0f : scale_log2, lse_scale = MODS ? 0.6931471805599453f : scale;

    const T* qp = q + e.view_b * q_sb + h * q_sh + e.q_row * q_ss;
    const T* kp = k + e.view_b * k_sb + (h / group) * k_sh + e.kv_row * k_ss;
    const T* vp = v + e.view_b * v_sb + (h / group) * v_sh + e.kv_row * v_ss;
    const int lq = e.lq, lk = e.lk;

    // the key tiles this block needs (the one tile-skipping rule); none: every row sees no key
    int kv_lo = 0, kv_hi = 0;
    if (q0 < lq) mask.key_range(q0, min(q0 + BQ, lq), kv_lo, kv_hi);
    if (kv_hi <= kv_lo) {
        T* ob = out + e.view_b * o_sb + h * o_sh + e.q_row * o_ss;
        float* lb = lse + e.view_b * lse_sb + h * lse_sh + e.q_row;
        const int rows_out = ragged == 2 ? e.lq : seq_q;  // padded batches: rows past Lq get 0 / -inf
        write_empty_rows(ob, lb, o_ss, min(q0, rows_out), min(q0 + BQ, rows_out), dv, tid, NT);
        return;
    }
    const int kv_begin = (kv_lo / BKV) * BKV;
    const int n_tiles = (kv_hi - kv_begin + BKV - 1) / BKV;

    // prologue: Q and tiles 0 .. STAGES-2, one commit group per tile (empty groups keep the count)
    load_tile<T, BQ, D, LDS, NT, VEC>(sQ, qp, q_ss, q_sd, q0, lq, d, tid);
#pragma unroll
    for (int st = 0; st < STAGES - 1; ++st) {
        if (st < n_tiles) {
            const int row = kv_begin + st * BKV;
            load_tile<T, BKV, D, LDS, NT, VEC>(sK + st * BKV * LDS, kp, k_ss, k_sd, row, lk, d, tid);
            load_tile<T, BKV, DV, LDV, NT, VEC>(sV + st * BKV * LDV, vp, v_ss, v_sd, row, lk, dv, tid);
        }
        cp_async_commit();
    }

    unsigned qf[QREG ? MT : 1][QREG ? KT : 1][4];
    float acc_o[MT][NO][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int n = 0; n < NO; ++n) acc_o[mt][n][0] = acc_o[mt][n][1] = acc_o[mt][n][2] = acc_o[mt][n][3] = 0.0f;
    // raw-score row max (scale > 0 commutes with max) and this thread's share of the row sums (its
    // columns), one float chain each: l = alpha l + tile sum.  (The SIMT kernel's two-level row_sum
    // costs a register a row; here the registers are spoken for, and with alpha exactly 1 while
    // the max stays put, the chain keeps lse within about 2x a plain float32 logsumexp at 100k
    // keys: docs/cuda.md.)
    float m_i[MT][2], l_i[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) m_i[mt][0] = m_i[mt][1] = -FA_INF, l_i[mt][0] = l_i[mt][1] = 0.0f;

    // per-lane ldmatrix offsets (elements) inside a 16x16 block
    const int a_row = (lane & 7) + ((lane >> 3) & 1) * 8, a_col = (lane >> 4) * 8;  // Q (A) and V (.trans B)
    const int b_row = (lane & 7) + (lane >> 4) * 8, b_col = ((lane >> 3) & 1) * 8;  // K (B)
    const T* sQw = sQ + (warp * WQ + a_row) * LDS + a_col;

    int stage = 0;                // ring slot of tile it
    int fill = STAGES - 1;        // ring slot that tile it + STAGES - 1 goes to (the slot of tile it-1)
    for (int it = 0; it < n_tiles; ++it) {
        const int kv0 = kv_begin + it * BKV;
        // one barrier per tile: after it, tile `it` is visible to every warp and every warp is done
        // with tile it-1, whose slot the loads of tile it+STAGES-1 then refill.  On a tile whose keys
        // some row of the block must not see (the causal diagonal), the barrier also tells every
        // warp whether V holds inf or NaN (each thread checked what it copied itself).
        cp_async_wait<STAGES - 2>();
        bool v_nonfinite = false;
        if (fa_mask<INTERVAL, MODS>::hides_keys_ever && mask.tile_hides_keys(q0, BQ, kv0, BKV))
            v_nonfinite =
                __syncthreads_or(own_elements_nonfinite<T, BKV, DV, LDV, NT, VEC>(sV + stage * BKV * LDV, tid)) != 0;
        else
            __syncthreads();
        if (it + STAGES - 1 < n_tiles) {
            const int row = kv0 + (STAGES - 1) * BKV;
            load_tile<T, BKV, D, LDS, NT, VEC>(sK + fill * BKV * LDS, kp, k_ss, k_sd, row, lk, d, tid);
            load_tile<T, BKV, DV, LDV, NT, VEC>(sV + fill * BKV * LDV, vp, v_ss, v_sd, row, lk, dv, tid);
        }
        cp_async_commit();

        if constexpr (QREG) {
            if (it == 0) {
#pragma unroll
                for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                    for (int kt = 0; kt < KT; ++kt)
                        ldsm_x4(qf[mt][kt][0], qf[mt][kt][1], qf[mt][kt][2], qf[mt][kt][3],
                                smem_u32(sQw + mt * 16 * LDS + kt * 16));
            }
        }

        // a warp whose rows all precede this tile (causal) or lie past seq_q has nothing to add
        const bool warp_active = !mask.tile_hidden(row_w0, WQ, kv0, BKV);
        if (warp_active) {
            const T* sKs = sK + stage * BKV * LDS;
            const T* sVs = sV + stage * BKV * LDV;

            // S = Q K^T (WQ x BKV per warp)
            float s[MT][NS][4];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int n = 0; n < NS; ++n) s[mt][n][0] = s[mt][n][1] = s[mt][n][2] = s[mt][n][3] = 0.0f;
#pragma unroll
            for (int kt = 0; kt < KT; ++kt) {
                unsigned a[MT][4];
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    if constexpr (QREG) {
                        a[mt][0] = qf[mt][kt][0]; a[mt][1] = qf[mt][kt][1];
                        a[mt][2] = qf[mt][kt][2]; a[mt][3] = qf[mt][kt][3];
                    } else {
                        ldsm_x4(a[mt][0], a[mt][1], a[mt][2], a[mt][3], smem_u32(sQw + mt * 16 * LDS + kt * 16));
                    }
                }
#pragma unroll
                for (int np = 0; np < NS / 2; ++np) {
                    unsigned b0, b1, b2, b3;
                    ldsm_x4(b0, b1, b2, b3, smem_u32(sKs + (np * 16 + b_row) * LDS + kt * 16 + b_col));
#pragma unroll
                    for (int mt = 0; mt < MT; ++mt) {
                        elem<T>::mma(s[mt][2 * np], a[mt], b0, b1);
                        elem<T>::mma(s[mt][2 * np + 1], a[mt], b2, b3);
                    }
                }
            }

            // the mask hook (common.cuh: fa_mask): logits (MODS), -inf where the row does not see the key
            const bool needs = mask.tile_needs_mask(row_w0, WQ, kv0, BKV);
            if (MODS || needs) {
#pragma unroll
                for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                    for (int n = 0; n < NS; ++n)
#pragma unroll
                        for (int e2 = 0; e2 < 4; ++e2) {
                            const int j = kv0 + n * 8 + 2 * t4 + (e2 & 1);
                            const int i = row_w0 + mt * 16 + g + (e2 >> 1) * 8;
                            if constexpr (MODS) s[mt][n][e2] = mask.logit2(s[mt][n][e2], i, j);
                            if (needs && !mask.visible(i, j)) s[mt][n][e2] = -FA_INF;
                        }
            }

            // online softmax; per m-tile rows g (e = 0, 1) and g + 8 (e = 2, 3).  The exponent
            // (s - max) * scale_log2 is <= 0 by construction (0 at the max, whatever the magnitude),
            // so p <= 1, l >= 1 and alpha is exactly 1 while the max stays put.
            float alpha[MT][2];
            bool rescale = false;
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int r = 0; r < 2; ++r) {
                    float mx = m_i[mt][r];
#pragma unroll
                    for (int n = 0; n < NS; ++n) mx = fmaxf(mx, fmaxf(s[mt][n][2 * r], s[mt][n][2 * r + 1]));
                    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
                    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
                    const float m_use = (mx == -FA_INF) ? 0.0f : mx;  // no key seen yet: every p is 0
                    alpha[mt][r] = exp2_approx((m_i[mt][r] - m_use) * sl2);  // m_i = -inf -> 0
                    rescale |= mx != m_i[mt][r];
                    m_i[mt][r] = mx;
                    float tile_sum = 0.0f;
#pragma unroll
                    for (int n = 0; n < NS; ++n) {
                        const float p0 = exp2_approx((s[mt][n][2 * r] - m_use) * sl2);
                        const float p1 = exp2_approx((s[mt][n][2 * r + 1] - m_use) * sl2);
                        tile_sum += p0 + p1;
                        s[mt][n][2 * r] = p0;
                        s[mt][n][2 * r + 1] = p1;
                    }
                    l_i[mt][r] = l_i[mt][r] * alpha[mt][r] + tile_sum;
                }
            // once the running maxima settle, most tiles leave every row max unchanged (alpha = 1):
            // the warp then skips rescaling its accumulators
#ifdef FA_ALWAYS_RESCALE
            rescale = true;
#endif
            if (__any_sync(0xffffffffu, rescale)) {
#pragma unroll
                for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                    for (int n = 0; n < NO; ++n) {
                        acc_o[mt][n][0] *= alpha[mt][0];
                        acc_o[mt][n][1] *= alpha[mt][0];
                        acc_o[mt][n][2] *= alpha[mt][1];
                        acc_o[mt][n][3] *= alpha[mt][1];
                    }
            }

            if (DROPOUT && threshold != 0u) {  // mods kernels: dropout switched at run time
                // this thread's columns 2*t4, 2*t4+1 of n-tile n share one Philox group (j >> 2)
#pragma unroll
                for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                    for (int n = 0; n < NS; ++n)
#pragma unroll
                        for (int r = 0; r < 2; ++r) {
                            const int i = row_w0 + mt * 16 + g + r * 8;
                            const int j = kv0 + n * 8 + 2 * t4;
                            const uint4 w = dropout_words(seed, b, h, i, j);
                            const unsigned w0 = (t4 & 1) ? w.z : w.x;
                            const unsigned w1 = (t4 & 1) ? w.w : w.y;
                            if (w0 < threshold) s[mt][n][2 * r] = 0.0f;
                            if (w1 < threshold) s[mt][n][2 * r + 1] = 0.0f;
                        }
            }

            // O += P V: the S accumulators of n-tiles (2kb, 2kb+1) are the A fragment of k-step kb.
            // A V tile with inf or NaN where this warp has masked entries takes the slow path
            // (masked entries add nothing, visible ones follow the formula); the check rode on
            // the tile's barrier, so the usual path pays nothing for it.
            if (!(v_nonfinite && mask.tile_hides_keys(row_w0, WQ, kv0, BKV))) {
#pragma unroll
                for (int kb = 0; kb < BKV / 16; ++kb) {
                    unsigned a[MT][4];
#pragma unroll
                    for (int mt = 0; mt < MT; ++mt) {
                        acc_to_a_frag<T>(a[mt], s[mt][2 * kb], s[mt][2 * kb + 1]);
                    }
#pragma unroll
                    for (int np = 0; np < NO / 2; ++np) {
                        unsigned b0, b1, b2, b3;
                        ldsm_x4_trans(b0, b1, b2, b3, smem_u32(sVs + (kb * 16 + a_row) * LDV + np * 16 + a_col));
#pragma unroll
                        for (int mt = 0; mt < MT; ++mt) {
                            elem<T>::mma(acc_o[mt][2 * np], a[mt], b0, b1);
                            elem<T>::mma(acc_o[mt][2 * np + 1], a[mt], b2, b3);
                        }
                    }
                }
            } else {
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    unsigned pw[2 * NS];  // P as 16-bit pairs, pw[2 n + r] (common.cuh)
#pragma unroll
                    for (int n = 0; n < NS; ++n)
                        pw[2 * n] = elem<T>::pack2(s[mt][n][0], s[mt][n][1]),
                        pw[2 * n + 1] = elem<T>::pack2(s[mt][n][2], s[mt][n][3]);
                    pv_tile_nonfinite_v<BF16, NO, BKV>(
                        &acc_o[mt][0][0], pw,
                        [&](int kb, int np) { return smem_u32(sVs + (kb * 16 + a_row) * LDV + np * 16 + a_col); },
                        [&](int key, int n) {
                            return *reinterpret_cast<const unsigned*>(sVs + key * LDV + n * 8 + 2 * t4);
                        },
                        [&](int r, int key) { return mask.visible(row_w0 + mt * 16 + g + 8 * r, kv0 + key); },
                        lane);
                }
            }
        }
        stage = (stage + 1 == STAGES) ? 0 : stage + 1;
        fill = (fill + 1 == STAGES) ? 0 : fill + 1;
    }
    cp_async_wait<0>();
    __syncthreads();  // every warp is past its last read of sQ before the epilogue reuses it

    // epilogue: finish the row sums over the quad, normalize, write out and lse.  With d % 8 == 0
    // (VEC) the warp stages its rows in its own slice of sQ (only this warp ever read those rows, and
    // the loop's last barrier is behind us) and stores whole 16-byte chunks, coalesced.
    T* sO = sQ + warp * WQ * LDS;
    // where the rows go (worked out again here: nothing of it stays live through the loop)
    const fa_entry eo = fa_entry_of((int)(blockIdx.x / (unsigned)num_q_blocks), heads, ragged, rag_q, rag_kv,
                                    seq_q, seq_kv);
    T* ob = out + eo.view_b * o_sb + eo.h * o_sh + eo.q_row * o_ss;
    float* lb = lse + eo.view_b * lse_sb + eo.h * lse_sh + eo.q_row;
    const int rows_out = ragged == 2 ? eo.lq : seq_q;  // padded batches: rows past Lq get 0 / -inf
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            float l = l_i[mt][r];
            l += __shfl_xor_sync(0xffffffffu, l, 1);
            l += __shfl_xor_sync(0xffffffffu, l, 2);
            const int i = row_w0 + mt * 16 + g + r * 8;
            // l >= 1 for a row that saw a key, 0 for one that saw none (output exactly 0: no V value,
            // inf or NaN, reaches it), NaN for a NaN score
            const bool empty = l == 0.0f;
            const float inv = empty ? 0.0f : keep_scale / l;
            if constexpr (VEC) {
#pragma unroll
                for (int n = 0; n < NO; ++n)
                    *reinterpret_cast<unsigned*>(sO + (mt * 16 + g + r * 8) * LDS + n * 8 + 2 * t4) =
                        empty ? 0u : elem<T>::pack2(acc_o[mt][n][2 * r] * inv, acc_o[mt][n][2 * r + 1] * inv);
            } else if (i < rows_out) {
                T* op = ob + (long long)i * o_ss;
#pragma unroll
                for (int n = 0; n < NO; ++n) {
                    const int c = n * 8 + 2 * t4;
                    const float o0 = empty ? 0.0f : acc_o[mt][n][2 * r] * inv;
                    const float o1 = empty ? 0.0f : acc_o[mt][n][2 * r + 1] * inv;
                    if ((dv & 1) == 0) {
                        if (c < dv) *reinterpret_cast<unsigned*>(op + c) = elem<T>::pack2(o0, o1);
                    } else {
                        if (c < dv) op[c] = elem<T>::from_float(o0);
                        if (c + 1 < dv) op[c + 1] = elem<T>::from_float(o1);
                    }
                }
            }
            if (t4 == 0 && i < rows_out) lb[i] = empty ? -FA_INF : fmaf(m_i[mt][r], lse_scale, logf(l));
        }
    if constexpr (VEC) {
        __syncwarp();
        constexpr int CH = DV / 8;
#pragma unroll
        for (int c = lane; c < WQ * CH; c += 32) {
            const int rl = c / CH, ch = c % CH;
            const int i = row_w0 + rl;
            if (i < rows_out && ch * 8 < dv)
                *reinterpret_cast<uint4*>(ob + (long long)i * o_ss + ch * 8) =
                    *reinterpret_cast<const uint4*>(sO + rl * LDS + ch * 8);
        }
    }
}

// ------------------------------------------------------------------------------------------------
// fa_fwd_simt: float32 / float64, exact arithmetic in the input precision (no TF32).
//   D   head_dim padded (32, 64, 128, 256); BQ query rows per block, 4 threads per row;
//   BKV keys per tile.  Thread (row r, part) owns output columns part + 4u and scores j = part + 4u.
// Shared memory (dynamic): Q BQ x (D+1), K and V BKV x (D+1), P BQ x (BKV+1).
// Scores stay raw (q . k) and the max is taken on them; the exponent is (s - max) * scale, 0 at
// the max.  float32 sums P V in two levels: FOLD tiles accumulate (FMA) into acc_g from zero,
// then TwoSum adds acc_g into acc_o with the rounding error kept in acc_c, so a long key sequence
// loses no more than a blocked float32 matrix product does (one FMA chain over 100k keys was 12x
// worse); the row sum likewise (row_sum).  float64 keeps the single chain.
// ------------------------------------------------------------------------------------------------

// x * scale in the input precision.  float: scale as the factors sc0 * sc1 (sc1 = 1 unless scale
// lies outside [2^-100, 2^100], then a power of two), so every finite scale works; one beyond
// 2^+-200 acts as 2^+-200, which gives the same float weights (each nonzero gap of float scores
// times 2^200 is far below exp's range; any gap times 2^-200 rounds exp to exactly 1).
template <typename T>
struct simt_scale;
template <>
struct simt_scale<double> {
    double sc;
    __device__ __forceinline__ explicit simt_scale(double scale) : sc(scale) {}
    __device__ __forceinline__ double operator()(double x) const { return x * sc; }
};
template <>
struct simt_scale<float> {
    float sc0, sc1;
    __device__ __forceinline__ explicit simt_scale(double scale) {
        const double s = fmin(fmax(scale, 0x1p-200), 0x1p200);
        const double e = s > 0x1p100 ? 0x1p100 : (s < 0x1p-100 ? 0x1p-100 : 1.0);
        sc0 = (float)(s / e);
        sc1 = (float)e;
    }
    __device__ __forceinline__ float operator()(float x) const { return (x * sc0) * sc1; }
};

// lse = m * scale + log l, the product in double (a float scale may not hold the caller's scale)
__device__ __forceinline__ float simt_lse(float m, double scale, float l) {
    return (float)fma((double)m, scale, (double)logf(l));
}
__device__ __forceinline__ double simt_lse(double m, double scale, double l) { return fma(m, scale, log(l)); }

template <typename T, typename L, int D, int BQ, int BKV, bool INTERVAL, bool MODS, bool DROPOUT>
__global__ void __launch_bounds__(BQ * 4)
    fa_fwd_simt(FA_COMMON_PARAMS(T, L), double softcap, double scale, unsigned long long seed, unsigned threshold,
                double keep_scale) {
    constexpr int NT = BQ * 4;
    constexpr int LDS = D + 1;
    constexpr int LDP = BKV + 1;
    constexpr int NU = D / 4;
    constexpr int NJ = BKV / 4;
    constexpr bool TWO_LEVEL = sizeof(T) == 4;  // float32: P V in two levels (see above)
    constexpr int FOLD = 4;                     // tiles per group (acc_g, row_sum::group)

    extern __shared__ __align__(16) unsigned char smem_raw[];
    T* sQ = reinterpret_cast<T*>(smem_raw);
    T* sK = sQ + BQ * LDS;
    T* sV = sK + BKV * LDS;
    T* sP = sV + BKV * LDS;

    const int q_block = num_q_blocks - 1 - (int)(blockIdx.x % (unsigned)num_q_blocks);
    const fa_entry e = fa_entry_of((int)(blockIdx.x / (unsigned)num_q_blocks), heads, ragged, rag_q, rag_kv,
                                   seq_q, seq_kv);
    const int b = e.b, h = e.h;
    const int q0 = q_block * BQ;
    const int tid = threadIdx.x, r = tid >> 2, part = tid & 3;
    const int i = q0 + r;
    const fa_mask<INTERVAL, MODS> mask = fa_mask_of<INTERVAL, MODS>(
        e, bottom_right, win_left, win_right, attn_mask, m_sb, m_sh, m_si, m_sj, mask_kind, slopes, slopes_sb,
        (float)scale, (float)softcap);
    // with MODS the hook hands the softmax logits in natural units (the scale is applied there)
    const simt_scale<T> scaled(MODS ? 1.0 : scale);
    const double lse_scale = MODS ? 1.0 : scale;

    const T* qp = q + e.view_b * q_sb + h * q_sh + e.q_row * q_ss;
    const T* kp = k + e.view_b * k_sb + (h / group) * k_sh + e.kv_row * k_ss;
    const T* vp = v + e.view_b * v_sb + (h / group) * v_sh + e.kv_row * v_ss;
    T* ob = out + e.view_b * o_sb + h * o_sh + e.q_row * o_ss;
    L* lb = lse + e.view_b * lse_sb + h * lse_sh + e.q_row;
    const int rows_out = ragged == 2 ? e.lq : seq_q;  // padded batches: rows past Lq get 0 / -inf
    const int lq = e.lq, lk = e.lk;

    // the key tiles this block needs (the one tile-skipping rule); none: every row sees no key
    int kv_lo = 0, kv_hi = 0;
    if (q0 < lq) mask.key_range(q0, min(q0 + BQ, lq), kv_lo, kv_hi);
    if (kv_hi <= kv_lo) {
        write_empty_rows(ob, lb, o_ss, min(q0, rows_out), min(q0 + BQ, rows_out), dv, tid, NT);
        return;
    }
    const int kv_begin = (kv_lo / BKV) * BKV;

    load_tile_simt<T, BQ, D, LDS, NT>(sQ, qp, q_ss, q_sd, q0, lq, d, tid);

    T acc_o[NU], acc_c[TWO_LEVEL ? NU : 1], acc_g[TWO_LEVEL ? NU : 1];
#pragma unroll
    for (int u = 0; u < NU; ++u) acc_o[u] = T(0);
    if constexpr (TWO_LEVEL) {
#pragma unroll
        for (int u = 0; u < NU; ++u) acc_c[u] = acc_g[u] = T(0);
    }
    T m_i = -FA_INF;  // row max of the softmax's input (raw scores, or logits with MODS)
    row_sum<T> l_i;
    l_i.init();

    for (int kv0 = kv_begin, it = 0; kv0 < kv_hi; kv0 += BKV, ++it) {
        __syncthreads();
        load_tile_simt<T, BKV, D, LDS, NT>(sK, kp, k_ss, k_sd, kv0, lk, d, tid);
        load_tile_simt<T, BKV, D, LDS, NT>(sV, vp, v_ss, v_sd, kv0, lk, dv, tid);
        __syncthreads();

        T s[NJ];
        T mx = m_i;
#pragma unroll
        for (int u = 0; u < NJ; ++u) {
            const int jl = part + 4 * u, j = kv0 + jl;
            T acc = T(0);
            for (int c = 0; c < d; ++c) acc = fma(sQ[r * LDS + c], sK[jl * LDS + c], acc);
            // the mask hook (common.cuh: fa_mask): logits (MODS), -inf where the row does not see the key
            if constexpr (MODS) acc = mask.template logit<T>(acc, scale, softcap, i, j);
            if (!mask.visible(i, j)) acc = -FA_INF;
            s[u] = acc;
            mx = fmax(mx, acc);
        }
        mx = fmax(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmax(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const T m_use = (mx == -FA_INF) ? T(0) : mx;  // no key seen yet: every p is 0
        const T alpha = exp_t<T>(scaled(m_i - m_use));  // exactly 1 while the max stays put
        const bool moved = mx != m_i;
        m_i = mx;
        T tile_sum = T(0);
#pragma unroll
        for (int u = 0; u < NJ; ++u) {
            T p = exp_t<T>(scaled(s[u] - m_use));
            tile_sum += p;
            if (DROPOUT && threshold != 0u) {  // mods kernels: dropout switched at run time
                const int j = kv0 + part + 4 * u;
                if (!dropout_keep(seed, threshold, b, h, i, j)) p = T(0);
            }
            sP[r * LDP + part + 4 * u] = p;
        }
        tile_sum += __shfl_xor_sync(0xffffffffu, tile_sum, 1);
        tile_sum += __shfl_xor_sync(0xffffffffu, tile_sum, 2);
        l_i.group = fma(l_i.group, alpha, tile_sum);
        if (moved) {  // the 4 threads of a row agree
            l_i.rescale(alpha);
#pragma unroll
            for (int u = 0; u < NU; ++u) acc_o[u] *= alpha;
            if constexpr (TWO_LEVEL) {
#pragma unroll
                for (int u = 0; u < NU; ++u) acc_c[u] *= alpha, acc_g[u] *= alpha;
            }
        }
        __syncwarp();
        // only the keys this row sees: a masked key's V (inf or NaN included) never reaches it
        int lo, hi;
        mask.visible_span(i, kv0, BKV, lo, hi);
        for (int jl = lo; jl < hi; ++jl) {
            const T p = sP[r * LDP + jl];
            if (mask.bool_mask() && p == T(0) && !mask.visible(i, kv0 + jl)) continue;
#pragma unroll
            for (int u = 0; u < NU; ++u) {
                if constexpr (TWO_LEVEL)
                    acc_g[u] = fma(p, sV[jl * LDS + part + 4 * u], acc_g[u]);
                else
                    acc_o[u] = fma(p, sV[jl * LDS + part + 4 * u], acc_o[u]);
            }
        }
        if ((it & (FOLD - 1)) == FOLD - 1) {
            l_i.fold();
            if constexpr (TWO_LEVEL) {
#pragma unroll
                for (int u = 0; u < NU; ++u) {
                    T err;
                    two_sum(acc_o[u], acc_g[u], acc_o[u], err);
                    acc_c[u] += err;
                    acc_g[u] = T(0);
                }
            }
        }
    }

    if (i < rows_out) {
        const T l = l_i.value();  // >= 1 for a row that saw a key, 0 for none, NaN for a NaN score
        const T inv = l == T(0) ? T(0) : (T)keep_scale / l;
        T* op = ob + (long long)i * o_ss;
#pragma unroll
        for (int u = 0; u < NU; ++u) {
            const int c = part + 4 * u;
            T o = acc_o[u];
            if constexpr (TWO_LEVEL) {
                T err;
                two_sum(acc_o[u], acc_g[u], o, err);
                o += acc_c[u] + err;
            }
            if (c < dv) op[c] = l == T(0) ? T(0) : o * inv;  // a row that saw no key: exactly 0
        }
        if (part == 0) lb[i] = l == T(0) ? (L)(-FA_INF) : (L)simt_lse(m_i, lse_scale, l);
    }
}
