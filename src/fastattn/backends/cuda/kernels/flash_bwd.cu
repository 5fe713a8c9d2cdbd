// FlashAttention backward for fastattn's CUDA backend (FlashAttention-2's algorithm).
//
// Math, per head, query row i and key j; x_ij the logit of the forward's hook (scale s_ij -> softcap
// c tanh(. / c) -> - ALiBi -> + bias, s_ij = q_i . k_j), P_ij = exp(x_ij - lse_i) the forward's softmax
// (recomputed from lse, never stored; 0 where row i does not see key j and for rows with lse = -inf),
// z_ij the dropout keep mask regenerated from the seed (philox.cuh) times 1/(1-p) (1 without dropout):
//   D_i    = rowsum(dO_i o O_i)                                     (fa_bwd_prep)
//   dV_j  += sum_i P_ij z_ij dO_i
//   dP_ij  = z_ij (dO_i . v_j)
//   dS_ij  = P_ij (dP_ij - D_i)             the gradient of the logit (dbias)
//   dS'_ij = dS_ij (1 - tanh^2(scale s_ij / c))                       (softcap c; else dS'_ij = dS_ij)
//   dK_j  += scale sum_i dS'_ij q_i,        dQ_i += scale sum_j dS'_ij k_j
// (sum_j P_ij dP_ij = dO_i . O_i = D_i holds with dropout too: O carries the same z.)  GQA: dK and dV
// of a k/v head sum over the query heads of its group.
//
// Kernels (the mask, the tile-skipping rule and the logit hook are the forward's: common.cuh fa_mask;
// query_range is key_range read the other way):
//   fa_bwd_prep        D_i (one warp a row), float32 (float64 for float64)
//   fa_bwd_split_mma   float16 / bfloat16 at padded head dims 64 / 128 (v's alike) where a block has
//                      ~210 KB of shared memory: fa_bwd_mma's work with FlashAttention-2's warp layouts
//                      (P and dS' through shared memory; see the kernel)
//   fa_bwd_mma         float16 / bfloat16, mma.sync m16n8k16 with fp32 accumulation.  One block per
//                      (key tile, batch * k/v head): each warp owns 16 * MT keys and keeps their dK and
//                      dV in registers while the block walks every query tile (of every query head of
//                      the group) that sees them.  Per query tile: dP^T = V dO^T and S^T = K Q^T (warp:
//                      its keys x the tile's queries), P and dS in registers, dV += P^T dO and
//                      dK += dS^T Q with P^T / dS^T re-packed as the A operand (never stored).  With a
//                      dq_acc buffer it also adds dQ = dS K (dS^T through shared memory, the block's
//                      warps split the query tile's rows and columns) into float32 with atomics (the
//                      fast, order-dependent path); fa_bwd_dq_convert then writes dq.
//   fa_bwd_dq_mma      the deterministic dQ: one block per (query tile, batch * head), warps own query
//                      rows and walk the key tiles (the forward's work split), recomputing S and dP.
//   fa_bwd_simt_kv / fa_bwd_simt_q   float32 / float64: the same two passes in exact FMA arithmetic; a
//                      row whose keys lie in one chunk has its P normalized and D = sum_j P_ij dP_ij
//                      (bwd.cuh "Local rows": fa_bwd_simt_kv computes the sums, fa_bwd_simt_q reads them).
// Hidden entries never reach a gradient through P: P = 0 there and dS is set to exactly 0 (not
// 0 * dP, which is NaN when V or dO holds inf / NaN at an entry the mask hides).
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#include "common.cuh"
#include "elem.cuh"
#include "philox.cuh"
#include "bwd.cuh"

// ------------------------------------------------------------------------------------------------
// element conversions (any input dtype to the float32 / float64 of the sums)
// ------------------------------------------------------------------------------------------------
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }

// ------------------------------------------------------------------------------------------------
// fa_bwd_prep: D = rowsum(dO o O) of every row of the (batch, heads, rows, dv) views, one warp a row;
// dsum is contiguous (batch, heads, rows) like lse.
// ------------------------------------------------------------------------------------------------
template <typename T, typename L>
__global__ void __launch_bounds__(256)
    fa_bwd_prep(const T* __restrict__ dout, const T* __restrict__ out, L* __restrict__ dsum, int heads, int rows,
                int dv, long long do_sb, long long do_sh, long long do_ss, long long do_sd, long long o_sb,
                long long o_sh, long long o_ss, long long o_sd, long long total_rows) {
    const long long rid = (long long)blockIdx.x * 8 + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (rid >= total_rows) return;
    const long long bh = rid / rows;
    const int s = (int)(rid - bh * rows);
    const int h = (int)(bh % heads);
    const long long b = bh / heads;
    const T* dop = dout + b * do_sb + h * do_sh + s * do_ss;
    const T* op = out + b * o_sb + h * o_sh + s * o_ss;
    L acc = L(0);
    for (int c = lane; c < dv; c += 32) acc += (L)to_acc(dop[c * do_sd]) * (L)to_acc(op[c * o_sd]);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
    if (lane == 0) dsum[rid] = acc;
}

// dq (input dtype, the caller's strides) = scale * dq_acc (float32, D columns a row), every row
template <typename T>
__global__ void __launch_bounds__(256)
    fa_bwd_dq_convert(const float* __restrict__ dq_acc, T* __restrict__ dq, int heads, int rows, int d, int D,
                      long long sb, long long sh, long long ss, float scale, long long total) {
    const long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= total) return;
    const int c = (int)(idx % d);
    const long long rest = idx / d;
    const int s = (int)(rest % rows);
    const long long bh = rest / rows;
    const int h = (int)(bh % heads);
    const long long b = bh / heads;
    dq[b * sb + h * sh + (long long)s * ss + c] = elem<T>::from_float(dq_acc[(bh * rows + s) * D + c] * scale);
}

// ------------------------------------------------------------------------------------------------
// shared pieces of the tensor-core kernels
// ------------------------------------------------------------------------------------------------

// rows [r0, r0 + 16 MT) of one (entry, head) of an output from m16n8 accumulators acc[mt][n][4]
// (columns 8 n + 2 t4 + {0, 1}, rows g and g + 8) times mul; rows >= rows_out and columns >= ncols are
// not written.  Unit stride along the columns (the launcher allocates the gradients).
template <typename T, int MT, int NN>
__device__ __forceinline__ void store_acc_rows(T* base, long long ss, int r0, int rows_out, int ncols,
                                               const float (&acc)[MT][NN][4], float mul, int lane) {
    const int g = lane >> 2, t4 = lane & 3;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const int row = r0 + mt * 16 + g + 8 * r;
            if (row >= rows_out) continue;
            T* p = base + (long long)row * ss;
#pragma unroll
            for (int n = 0; n < NN; ++n) {
                const int c = n * 8 + 2 * t4;
                const float x0 = acc[mt][n][2 * r] * mul, x1 = acc[mt][n][2 * r + 1] * mul;
                if ((ncols & 1) == 0) {
                    if (c < ncols) *reinterpret_cast<unsigned*>(p + c) = elem<T>::pack2(x0, x1);
                } else {
                    if (c < ncols) p[c] = elem<T>::from_float(x0);
                    if (c + 1 < ncols) p[c + 1] = elem<T>::from_float(x1);
                }
            }
        }
}

template <int MT, int NN>
__device__ __forceinline__ void zero_acc(float (&acc)[MT][NN][4]) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int n = 0; n < NN; ++n) acc[mt][n][0] = acc[mt][n][1] = acc[mt][n][2] = acc[mt][n][3] = 0.0f;
}

// p[0] += a, p[1] += b in global memory (p 8-byte aligned): one vector reduction on sm_90, else two atomics
__device__ __forceinline__ void red_add_f32x2(float* p, float a, float b) {
#if __CUDA_ARCH__ >= 900
    asm volatile("red.global.v2.f32.add [%0], {%1, %2};\n" ::"l"(p), "f"(a), "f"(b) : "memory");
#else
    atomicAdd(p, a);
    atomicAdd(p + 1, b);
#endif
}

// ------------------------------------------------------------------------------------------------
// fa_bwd_mma: dK, dV (and dQ through atomics) on tensor cores
//   D, DV   head dims of q/k and v, padded (multiples of 16)
//   NWARPS  warps per block; MT 16-key m-tiles per warp: block_kv = 16 * MT * NWARPS
//   BQ      query rows per tile (multiple of 16)
// Shared memory (dynamic): K block_kv x (D+8), V block_kv x (DV+8), two stages of Q BQ x (D+8) and
// dO BQ x (DV+8), two buffers of dS'^T block_kv x (BQ+8), two stages of BQ lse and D values (float).  Rows padded by
// 16 bytes: the 8 row addresses of every ldmatrix fall in distinct banks.
// ------------------------------------------------------------------------------------------------
template <typename T, int D, int DV, int NWARPS, int MT, int BQ, bool INTERVAL, bool MODS, bool DROPOUT, bool VEC>
__global__ void __launch_bounds__(NWARPS * 32)
    fa_bwd_mma(FA_BWD_PARAMS(T, float), float softcap, float scale_log2, float scale, unsigned long long seed,
               unsigned threshold, float keep_scale) {
    constexpr int WK = 16 * MT;        // keys per warp
    constexpr int BKV = WK * NWARPS;   // keys per block
    constexpr int NT = NWARPS * 32;
    constexpr int LDS = D + 8, LDV = DV + 8, LDP = BQ + 8;
    constexpr int NQ = BQ / 8;         // n-tiles of S^T (queries)
    constexpr int NK = D / 8, NV = DV / 8;
    constexpr int WM = BQ / 16;        // dQ: m-tiles of the query tile
    constexpr int WC = NWARPS / WM;    // dQ: warps per m-tile, each a slice of DC columns
    constexpr int DC = D / WC;
    static_assert(D % 16 == 0 && DV % 16 == 0 && BQ % 16 == 0, "tile sizes");
    static_assert(NWARPS % WM == 0 && DC % 16 == 0, "the dQ split: whole m-tiles and 16-column slices");

    extern __shared__ __align__(16) unsigned char smem_raw[];
    T* sK = reinterpret_cast<T*>(smem_raw);
    T* sV = sK + BKV * LDS;
    T* sQ = sV + BKV * LDV;             // 2 stages
    T* sdO = sQ + 2 * BQ * LDS;         // 2 stages
    T* sdS = sdO + 2 * BQ * LDV;        // dS'^T: [key][query], 2 buffers
    float* sL = reinterpret_cast<float*>(sdS + 2 * BKV * LDP);  // 2 stages
    float* sD = sL + 2 * BQ;                                // 2 stages

    const fa_bwd_key_block kb = FA_BWD_KEY_BLOCK(INTERVAL, MODS, BKV, BQ, scale, softcap);
    fa_entry e = kb.e;
    const int hkv = e.h, kv0 = kb.kv0, lq = e.lq, lk = e.lk;
    const int qt_begin = kb.qt_begin, n_qt = kb.n_qt, n_iter = kb.n_iter;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, t4 = lane & 3;
    const int kw0 = kv0 + warp * WK;  // first key of this warp
    const bool dropout = threshold != 0u;

    const T* kp = k + e.view_b * k_sb + hkv * k_sh + e.kv_row * k_ss;
    const T* vp = v + e.view_b * v_sb + hkv * v_sh + e.kv_row * v_ss;

    auto load_q_tile = [&](int it, int st) {
        const int gh = it / n_qt;
        const int h = hkv * group + gh;
        const int q0 = qt_begin + (it - gh * n_qt) * BQ;
        const T* qp = q + e.view_b * q_sb + h * q_sh + e.q_row * q_ss;
        const T* dop = dout + e.view_b * do_sb + h * do_sh + e.q_row * do_ss;
        load_tile<T, BQ, D, LDS, NT, VEC>(sQ + st * BQ * LDS, qp, q_ss, q_sd, q0, lq, d, tid);
        load_tile<T, BQ, DV, LDV, NT, VEC>(sdO + st * BQ * LDV, dop, do_ss, do_sd, q0, lq, dv, tid);
        const long long lrow = e.view_b * lse_sb + h * lse_sh + e.q_row;
        for (int r = tid; r < BQ; r += NT) {
            const int i = q0 + r;
            sL[st * BQ + r] = i < lq ? lse_log2(lse[lrow + i]) : FA_INF;
            sD[st * BQ + r] = i < lq ? dsum[lrow + i] : 0.0f;
        }
    };

    if (n_iter > 0) {
        load_tile<T, BKV, D, LDS, NT, VEC>(sK, kp, k_ss, k_sd, kv0, lk, d, tid);
        load_tile<T, BKV, DV, LDV, NT, VEC>(sV, vp, v_ss, v_sd, kv0, lk, dv, tid);
        load_q_tile(0, 0);
    }
    cp_async_commit();

    float acc_k[MT][NK][4], acc_v[MT][NV][4];
    zero_acc(acc_k);
    zero_acc(acc_v);

    // per-lane ldmatrix offsets inside a 16x16 block: a_* for A (and .trans B), b_* for B (and .trans A)
    const int a_row = (lane & 7) + ((lane >> 3) & 1) * 8, a_col = (lane >> 4) * 8;
    const int b_row = (lane & 7) + (lane >> 4) * 8, b_col = ((lane >> 3) & 1) * 8;

    // dQ of query tile `it` (BQ x D) += dS' (BQ x BKV) K (BKV x D), from dS'^T in buffer it & 1: warp -> m-tile
    // wm, columns [wc DC, wc DC + DC), added into dq_acc.  Deferred by one tile (run after the next tile's
    // barrier), so no barrier of its own: the warps' dQ overlaps other warps' work on the next tile.
    auto dq_tile = [&](int it) {
        const int gh = it / n_qt;
        const int h = hkv * group + gh;
        const int q0 = qt_begin + (it - gh * n_qt) * BQ;
        const T* sdSb = sdS + (it & 1) * BKV * LDP;
        const int wm = warp % WM, wc = warp / WM;
        float acc_q[1][DC / 8][4];
        zero_acc(acc_q);
#pragma unroll
        for (int kb = 0; kb < BKV / 16; ++kb) {
            unsigned a[4];
            ldsm_x4_trans(a[0], a[1], a[2], a[3], smem_u32(sdSb + (kb * 16 + b_row) * LDP + wm * 16 + b_col));
#pragma unroll
            for (int np = 0; np < DC / 16; ++np) {
                unsigned b0, b1, b2, b3;
                ldsm_x4_trans(b0, b1, b2, b3, smem_u32(sK + (kb * 16 + a_row) * LDS + wc * DC + np * 16 + a_col));
                elem<T>::mma(acc_q[0][2 * np], a, b0, b1);
                elem<T>::mma(acc_q[0][2 * np + 1], a, b2, b3);
            }
        }
        float* qa = dq_acc + ((long long)(e.view_b * heads + h) * view_q + e.q_row) * D + wc * DC;
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const int i = q0 + wm * 16 + g + 8 * r;
            if (i >= lq) continue;
            float* row = qa + (long long)i * D;
#pragma unroll
            for (int n = 0; n < DC / 8; ++n)
#ifdef FA_BWD_NO_RED  // experiment (tools/gpu_backward_probe.py): the dQ work without its reductions
                if (acc_q[0][n][2 * r] == 1234.5f)
#endif
                    red_add_f32x2(row + n * 8 + 2 * t4, acc_q[0][n][2 * r], acc_q[0][n][2 * r + 1]);
        }
    };

    for (int it = 0; it < n_iter; ++it) {
        const int st = it & 1;
        // tile `it` has landed and every warp is done with tile it-1: its Q / dO stage is free, and the
        // dS'^T buffer of tile it-1 is complete (the one of tile it-2, which this tile overwrites, was read)
        cp_async_wait<0>();
        __syncthreads();
        if (it + 1 < n_iter) load_q_tile(it + 1, st ^ 1);
        cp_async_commit();
        if (dq_acc != nullptr && it > 0) dq_tile(it - 1);

        const int gh = it / n_qt;
        const int h = hkv * group + gh;
        const int q0 = qt_begin + (it - gh * n_qt) * BQ;
        e.h = h;
        const fa_mask<INTERVAL, MODS> mask = fa_mask_of<INTERVAL, MODS>(FA_BWD_MASK_ARGS(e), scale, softcap);
        const T* sQs = sQ + st * BQ * LDS;
        const T* sdOs = sdO + st * BQ * LDV;
        const float* sLs = sL + st * BQ;
        const float* sDs = sD + st * BQ;
        T* sdSw = sdS + st * BKV * LDP + warp * WK * LDP;

        if (!mask.tile_hidden(q0, BQ, kw0, WK)) {
            // dP^T = V dO^T and S^T = K Q^T (this warp's keys x the tile's queries)
            float dp[MT][NQ][4], s[MT][NQ][4];
            zero_acc(dp);
            zero_acc(s);
#pragma unroll
            for (int kt = 0; kt < DV / 16; ++kt) {
                unsigned a[MT][4];
#pragma unroll
                for (int mt = 0; mt < MT; ++mt)
                    ldsm_x4(a[mt][0], a[mt][1], a[mt][2], a[mt][3],
                            smem_u32(sV + (warp * WK + mt * 16 + a_row) * LDV + kt * 16 + a_col));
#pragma unroll
                for (int np = 0; np < NQ / 2; ++np) {
                    unsigned b0, b1, b2, b3;
                    ldsm_x4(b0, b1, b2, b3, smem_u32(sdOs + (np * 16 + b_row) * LDV + kt * 16 + b_col));
#pragma unroll
                    for (int mt = 0; mt < MT; ++mt) {
                        elem<T>::mma(dp[mt][2 * np], a[mt], b0, b1);
                        elem<T>::mma(dp[mt][2 * np + 1], a[mt], b2, b3);
                    }
                }
            }
#pragma unroll
            for (int kt = 0; kt < D / 16; ++kt) {
                unsigned a[MT][4];
#pragma unroll
                for (int mt = 0; mt < MT; ++mt)
                    ldsm_x4(a[mt][0], a[mt][1], a[mt][2], a[mt][3],
                            smem_u32(sK + (warp * WK + mt * 16 + a_row) * LDS + kt * 16 + a_col));
#pragma unroll
                for (int np = 0; np < NQ / 2; ++np) {
                    unsigned b0, b1, b2, b3;
                    ldsm_x4(b0, b1, b2, b3, smem_u32(sQs + (np * 16 + b_row) * LDS + kt * 16 + b_col));
#pragma unroll
                    for (int mt = 0; mt < MT; ++mt) {
                        elem<T>::mma(s[mt][2 * np], a[mt], b0, b1);
                        elem<T>::mma(s[mt][2 * np + 1], a[mt], b2, b3);
                    }
                }
            }

            // P (dropped) into s, dS' into dp; element (key kw0 + 16 mt + g + 8 (e >> 1), query q0 + 8 n + 2 t4 + (e & 1))
            const bool needs = mask.tile_needs_mask(q0, BQ, kw0, WK);
            if (!MODS && !needs && !(DROPOUT && dropout) && dbias == nullptr) {
                // the usual tile: every entry visible, nothing else to apply (P = 2^(s c - lse log2 e))
#pragma unroll
                for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                    for (int n = 0; n < NQ; ++n)
#pragma unroll
                        for (int e2 = 0; e2 < 4; ++e2) {
                            const int il = n * 8 + 2 * t4 + (e2 & 1);
                            const float p = exp2_approx(fmaf(s[mt][n][e2], scale_log2, -sLs[il]));
                            dp[mt][n][e2] = p * (dp[mt][n][e2] - sDs[il]);
                            s[mt][n][e2] = p;
                        }
            } else {
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int n = 0; n < NQ; ++n)
#pragma unroll
                    for (int e2 = 0; e2 < 4; ++e2) {
                        const int il = n * 8 + 2 * t4 + (e2 & 1);
                        const int i = q0 + il, j = kw0 + mt * 16 + g + (e2 >> 1) * 8;
                        const bool keep = !(DROPOUT && dropout) || dropout_keep(seed, threshold, e.b, h, i, j);
                        float* db = nullptr;
                        if (MODS && dbias != nullptr && i < lq && j < lk)
                            db = dbias + ((long long)(e.view_b * heads + h) * view_q + e.q_row + i) * view_kv +
                                 e.kv_row + j;
                        float p;
                        dp[mt][n][e2] = bwd_element(mask, needs, s[mt][n][e2], dp[mt][n][e2], sLs[il], sDs[il], i, j,
                                                    scale_log2, keep, keep_scale, p, db);
                        s[mt][n][e2] = p;
                    }
            }

            // dV += (P z)^T dO and dK += dS'^T Q: the accumulators of n-tiles (2 kb, 2 kb + 1) are the
            // A fragment of k-step kb; dO and Q are the B operands through ldmatrix.trans
#pragma unroll
            for (int kb = 0; kb < BQ / 16; ++kb) {
                unsigned ap[MT][4], as[MT][4];
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    acc_to_a_frag<T>(ap[mt], s[mt][2 * kb], s[mt][2 * kb + 1]);
                    acc_to_a_frag<T>(as[mt], dp[mt][2 * kb], dp[mt][2 * kb + 1]);
                }
#pragma unroll
                for (int np = 0; np < NV / 2; ++np) {
                    unsigned b0, b1, b2, b3;
                    ldsm_x4_trans(b0, b1, b2, b3, smem_u32(sdOs + (kb * 16 + a_row) * LDV + np * 16 + a_col));
#pragma unroll
                    for (int mt = 0; mt < MT; ++mt) {
                        elem<T>::mma(acc_v[mt][2 * np], ap[mt], b0, b1);
                        elem<T>::mma(acc_v[mt][2 * np + 1], ap[mt], b2, b3);
                    }
                }
#pragma unroll
                for (int np = 0; np < NK / 2; ++np) {
                    unsigned b0, b1, b2, b3;
                    ldsm_x4_trans(b0, b1, b2, b3, smem_u32(sQs + (kb * 16 + a_row) * LDS + np * 16 + a_col));
#pragma unroll
                    for (int mt = 0; mt < MT; ++mt) {
                        elem<T>::mma(acc_k[mt][2 * np], as[mt], b0, b1);
                        elem<T>::mma(acc_k[mt][2 * np + 1], as[mt], b2, b3);
                    }
                }
                if (dq_acc != nullptr) {  // dS'^T rows of this warp, for the block's dQ (dq_tile)
#pragma unroll
                    for (int mt = 0; mt < MT; ++mt) {
                        T* row0 = sdSw + (mt * 16 + g) * LDP + kb * 16 + 2 * t4;
                        *reinterpret_cast<unsigned*>(row0) = as[mt][0];
                        *reinterpret_cast<unsigned*>(row0 + 8 * LDP) = as[mt][1];
                        *reinterpret_cast<unsigned*>(row0 + 8) = as[mt][2];
                        *reinterpret_cast<unsigned*>(row0 + 8 * LDP + 8) = as[mt][3];
                    }
                }
            }
        } else if (dq_acc != nullptr) {  // no entry of this warp is visible: its dS^T rows are 0
            for (int w = lane; w < WK * BQ / 2; w += 32) {
                const int r = w / (BQ / 2), c = (w % (BQ / 2)) * 2;
                *reinterpret_cast<unsigned*>(sdSw + r * LDP + c) = 0u;
            }
        }
    }
    cp_async_wait<0>();
    if (dq_acc != nullptr && n_iter > 0) {
        __syncthreads();  // the last tile's dS'^T is complete
        dq_tile(n_iter - 1);
    }

    // dK (times the scale) and dV of this warp's keys; keys past Lk (a padded batch) get 0
    const int rows_out = ragged == 2 ? lk : seq_kv;
    store_acc_rows<T, MT, NK>(dk_out + e.view_b * dk_sb + hkv * dk_sh + e.kv_row * dk_ss, dk_ss, kw0, rows_out, d,
                              acc_k, scale, lane);
    store_acc_rows<T, MT, NV>(dv_out + e.view_b * dv_sb + hkv * dv_sh + e.kv_row * dv_ss, dv_ss, kw0, rows_out, dv,
                              acc_v, 1.0f, lane);
}

// experiment switches of fa_bwd_split_mma (tools/gpu_backward_ab.py --options): P to shared memory before
// the dP product where the tile allows it; dQ by bulk reductions (sm_90) instead of red.global
#ifndef FA_BWD_SPLIT_EARLY_P
#define FA_BWD_SPLIT_EARLY_P 1
#endif
#ifndef FA_BWD_SPLIT_BULK_DQ
#define FA_BWD_SPLIT_BULK_DQ 1
#endif

// One warp's C (16 MT x 8 NN) += A B over KS k-steps of 16, both operands from shared memory:
//   A_KM: A stored [k][m] (read through ldmatrix.trans), else [m][k]   (row stride lda)
//   B_KN: B stored [k][n] (read through ldmatrix.trans), else [n][k]   (row stride ldb)
// S = Q K^T, dP = dO V^T: <false, false>; dV += P^T dO, dK += dS'^T Q: <true, true>; dQ = dS' K: <false, true>.
// Lane offsets inside a 16 x 16 block: a_* address A [m][k] and B [k][n], b_* B [n][k] and A [k][m].
template <typename T, int MT, int NN, int KS, bool A_KM, bool B_KN>
__device__ __forceinline__ void warp_gemm(float (&c)[MT][NN][4], const T* a, int lda, const T* b, int ldb, int lane) {
    const int a_row = (lane & 7) + ((lane >> 3) & 1) * 8, a_col = (lane >> 4) * 8;
    const int b_row = (lane & 7) + (lane >> 4) * 8, b_col = ((lane >> 3) & 1) * 8;
#pragma unroll
    for (int kt = 0; kt < KS; ++kt) {
        unsigned af[MT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
            if constexpr (A_KM)
                ldsm_x4_trans(af[mt][0], af[mt][1], af[mt][2], af[mt][3],
                              smem_u32(a + (kt * 16 + b_row) * lda + mt * 16 + b_col));
            else
                ldsm_x4(af[mt][0], af[mt][1], af[mt][2], af[mt][3],
                        smem_u32(a + (mt * 16 + a_row) * lda + kt * 16 + a_col));
        }
#pragma unroll
        for (int np = 0; np < NN / 2; ++np) {
            unsigned b0, b1, b2, b3;
            if constexpr (B_KN)
                ldsm_x4_trans(b0, b1, b2, b3, smem_u32(b + (kt * 16 + a_row) * ldb + np * 16 + a_col));
            else
                ldsm_x4(b0, b1, b2, b3, smem_u32(b + (np * 16 + b_row) * ldb + kt * 16 + b_col));
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                elem<T>::mma(c[mt][2 * np], af[mt], b0, b1);
                elem<T>::mma(c[mt][2 * np + 1], af[mt], b2, b3);
            }
        }
    }
}

// ROWS whole rows of D elements (16-byte aligned, unit column stride: load_tile's VEC case with every row
// and column inside the matrix) from g (row stride ss) into shared memory rows of LDS elements, by
// cp.async: no bounds checks, one source pointer a thread
template <typename T, int ROWS, int D, int LDS, int NT>
__device__ __forceinline__ void load_rows_whole(T* smem, const T* __restrict__ g, long long ss, int tid) {
    constexpr int CHUNKS = D / 8;
    static_assert(NT % CHUNKS == 0 && ROWS % (NT / CHUNKS) == 0, "whole passes of the block's threads");
    constexpr int RS = NT / CHUNKS;
    const int ch = tid % CHUNKS, r0 = tid / CHUNKS;
    const T* src = g + (long long)r0 * ss + ch * 8;
    const unsigned dst = smem_u32(smem + r0 * LDS + ch * 8);
#pragma unroll
    for (int i = 0; i < ROWS / RS; ++i) {
        cp_async_16(dst + i * RS * LDS * (int)sizeof(T), src, 16);
        src += (long long)RS * ss;
    }
}

// accumulators c[MT][NN][4] as 16-bit pairs into a [row][column] tile of shared memory (row stride ld):
// element (16 mt + g + 8 r, 8 n + 2 t4 + {0, 1})
template <typename T, int MT, int NN>
__device__ __forceinline__ void store_acc_pairs(T* base, int ld, const float (&c)[MT][NN][4], int lane) {
    const int g = lane >> 2, t4 = lane & 3;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int r = 0; r < 2; ++r)
#pragma unroll
            for (int n = 0; n < NN; ++n)
                *reinterpret_cast<unsigned*>(base + (mt * 16 + g + 8 * r) * ld + n * 8 + 2 * t4) =
                    elem<T>::pack2(c[mt][n][2 * r], c[mt][n][2 * r + 1]);
}

// ------------------------------------------------------------------------------------------------
// fa_bwd_split_mma: fa_bwd_mma's work (one block per (key tile, batch * k/v head), walking the query
// tiles that see it; dQ by atomics or not at all) with FlashAttention-2's warp layouts, so that each
// warp reads only part of the Q / dO / K / V tiles from shared memory per product:
//   S = Q K^T, dP = dO V^T   warps WQS (queries) x NWARPS / WQS (keys); P z and dS' go to shared memory
//   dV += (P z)^T dO, dK += dS'^T Q   warps WKD (keys) x NWARPS / WKD (columns of d / dv): each warp
//                            keeps its slice of dK and dV in registers over the whole walk
//   dQ = dS' K               warps WQQ (queries) x NWARPS / WQQ (columns of d), added into dq_acc
// Two barriers a query tile: the tile has landed (and every warp is done with the last one's P / dS'),
// and P / dS' are complete.  On sm_90 dQ leaves through a float32 tile in shared memory and bulk
// asynchronous reductions (one a row) issued after the next tile's first barrier.  Shared memory: K
// BKV x (D+8), V BKV x (DV+8), two stages of Q BQ x (D+8) and dO BQ x (DV+8), P and dS' BQ x (BKV+8)
// ([query][key]), two stages of BQ lse and D values, dQ BQ x (D+8) float32 (_specs.bwd_split_smem_bytes).
// ------------------------------------------------------------------------------------------------
template <typename T, int D, int DV, int NWARPS, int BQ, int BKV, int WQS, int WKD, int WQQ, bool INTERVAL,
          bool MODS, bool DROPOUT, bool VEC>
__global__ void __launch_bounds__(NWARPS * 32, 1)
    fa_bwd_split_mma(FA_BWD_PARAMS(T, float), float softcap, float scale_log2, float scale,
                     unsigned long long seed, unsigned threshold, float keep_scale) {
    constexpr int NT = NWARPS * 32;
    constexpr int LDS = D + 8, LDV = DV + 8, LDP = BKV + 8;
    constexpr int SM = BQ / WQS, SN = BKV / (NWARPS / WQS);  // S / dP warp tile: SM queries x SN keys
    constexpr int MS = SM / 16, NS = SN / 8;
    constexpr int KM = BKV / WKD, MK = KM / 16;              // dK / dV warp tile: KM keys x KC / VC columns
    constexpr int KC = D / (NWARPS / WKD), VC = DV / (NWARPS / WKD);
    constexpr int QM = BQ / WQQ, MQ = QM / 16;               // dQ warp tile: QM queries x QC columns
    constexpr int QC = D / (NWARPS / WQQ);
    static_assert(MS * 16 == SM && NS % 2 == 0 && MK * 16 == KM && MQ * 16 == QM, "whole m-tiles");
    static_assert(KC % 16 == 0 && VC % 16 == 0 && QC % 16 == 0, "16-column slices");

    extern __shared__ __align__(16) unsigned char smem_raw[];
    T* sK = reinterpret_cast<T*>(smem_raw);
    T* sV = sK + BKV * LDS;
    T* sQ = sV + BKV * LDV;             // 2 stages
    T* sdO = sQ + 2 * BQ * LDS;         // 2 stages
    T* sP = sdO + 2 * BQ * LDV;         // P z: [query][key]
    T* sdS = sP + BQ * LDP;             // dS': [query][key]
    float* sL = reinterpret_cast<float*>(sdS + BQ * LDP);  // 2 stages
    float* sD = sL + 2 * BQ;                                // 2 stages
    float* sdQ = sD + 2 * BQ;  // BULK_DQ: the tile's dQ, BQ x (D+8) float32
    constexpr int LDQ = D + 8;
    constexpr bool BULK_DQ = FA_BWD_SPLIT_BULK_DQ && FA_HAS_BULK_REDUCE;

    const fa_bwd_key_block kb = FA_BWD_KEY_BLOCK(INTERVAL, MODS, BKV, BQ, scale, softcap);
    fa_entry e = kb.e;
    const int hkv = e.h, kv0 = kb.kv0, lq = e.lq, lk = e.lk;
    const int qt_begin = kb.qt_begin, n_qt = kb.n_qt, n_iter = kb.n_iter;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, t4 = lane & 3;
    const bool dropout = threshold != 0u;

    const T* kp = k + e.view_b * k_sb + hkv * k_sh + e.kv_row * k_ss;
    const T* vp = v + e.view_b * v_sb + hkv * v_sh + e.kv_row * v_ss;

    // Q, dO, lse and D of the query tile at row q0 of head h into stage st; whole 16-byte rows inside
    // the entry (the usual tile) skip load_tile's per-row checks
    auto load_q_tile = [&](int h, int q0, int st) {
        const T* qp = q + e.view_b * q_sb + h * q_sh + e.q_row * q_ss;
        const T* dop = dout + e.view_b * do_sb + h * do_sh + e.q_row * do_ss;
        if (VEC && q0 + BQ <= lq && d == D && dv == DV) {
            load_rows_whole<T, BQ, D, LDS, NT>(sQ + st * BQ * LDS, qp + q0 * q_ss, q_ss, tid);
            load_rows_whole<T, BQ, DV, LDV, NT>(sdO + st * BQ * LDV, dop + q0 * do_ss, do_ss, tid);
        } else {
            load_tile<T, BQ, D, LDS, NT, VEC>(sQ + st * BQ * LDS, qp, q_ss, q_sd, q0, lq, d, tid);
            load_tile<T, BQ, DV, LDV, NT, VEC>(sdO + st * BQ * LDV, dop, do_ss, do_sd, q0, lq, dv, tid);
        }
        // lse (natural units, turned into log2 units where read) and D by cp.async too, so no warp waits on
        // them here; rows past Lq get 0 and 0 (only masked elements read them)
        static_assert(BQ <= NT, "one lse / D value a thread");
        if (tid < BQ) {
            const long long lrow = e.view_b * lse_sb + h * lse_sh + e.q_row;
            const int bytes = q0 + tid < lq ? 4 : 0;
            cp_async_4(smem_u32(sL + st * BQ + tid), lse + lrow + (bytes ? q0 + tid : 0), bytes);
            cp_async_4(smem_u32(sD + st * BQ + tid), dsum + lrow + (bytes ? q0 + tid : 0), bytes);
        }
    };

    // BULK_DQ: the dQ of the tile at row q0 of head h, complete in sdQ (written, fenced for the async proxy,
    // then a barrier), added into dq_acc
    // row by row (one bulk reduction a row, by threads 0 .. BQ-1; rows past Lq are left out)
    auto issue_dq = [&](int h, int q0) {
        if (tid < BQ && q0 + tid < lq) {
            bulk_reduce_add_f32(dq_acc + ((long long)(e.view_b * heads + h) * view_q + e.q_row + q0 + tid) * D,
                                smem_u32(sdQ + tid * LDQ), D * 4);
        }
        bulk_commit();
    };

    // the walk: the n_qt query tiles [qt_begin, q_end) of head h, then the next head of the group
    const int q_end = qt_begin + n_qt * BQ;
    int h = hkv * group, q0 = qt_begin;
    int h_prev = h, q0_prev = q0;  // the last tile's (BULK_DQ)
    if (n_iter > 0) {
        load_tile<T, BKV, D, LDS, NT, VEC>(sK, kp, k_ss, k_sd, kv0, lk, d, tid);
        load_tile<T, BKV, DV, LDV, NT, VEC>(sV, vp, v_ss, v_sd, kv0, lk, dv, tid);
        load_q_tile(h, q0, 0);
    }
    cp_async_commit();

    // this warp's tiles: S / dP rows qs0.. (of the query tile), keys ks0.. (of the block); dK / dV keys
    // kk0.., columns kc0 (d) / vc0 (dv); dQ rows qq0.., columns qc0
    const int qs0 = (warp % WQS) * SM, ks0 = (warp / WQS) * SN;
    const int kk0 = (warp % WKD) * KM, kc0 = (warp / WKD) * KC, vc0 = (warp / WKD) * VC;
    const int qq0 = (warp % WQQ) * QM, qc0 = (warp / WQQ) * QC;

    float acc_k[MK][KC / 8][4], acc_v[MK][VC / 8][4];
    zero_acc(acc_k);
    zero_acc(acc_v);

    for (int it = 0; it < n_iter; ++it) {
        const int st = it & 1;
        // tile `it` has landed; every warp is done with tile it-1 (its Q / dO stage, P and dS')
        cp_async_wait<0>();
        __syncthreads();
        const int q0_next = q0 + BQ < q_end ? q0 + BQ : qt_begin;
        const int h_next = q0 + BQ < q_end ? h : h + 1;
        if (it + 1 < n_iter) load_q_tile(h_next, q0_next, st ^ 1);
        cp_async_commit();
        if (BULK_DQ && dq_acc != nullptr && it > 0) issue_dq(h_prev, q0_prev);

        e.h = h;
        const fa_mask<INTERVAL, MODS> mask = fa_mask_of<INTERVAL, MODS>(FA_BWD_MASK_ARGS(e), scale, softcap);
        const T* sQs = sQ + st * BQ * LDS;
        const T* sdOs = sdO + st * BQ * LDV;
        const int i0 = q0 + qs0, j0 = kv0 + ks0;

        if (!mask.tile_hidden(i0, SM, j0, SN)) {
            // element (row i0 + 16 mt + g + 8 r, key j0 + 8 n + 2 t4 + c) of S, dP, P, dS: [mt][n][2 r + c]
            const bool needs = mask.tile_needs_mask(i0, SM, j0, SN);
            // without dropout or mods, P alone is known after S: it goes to shared memory while dP computes
            const bool early_p = FA_BWD_SPLIT_EARLY_P && !MODS && !(DROPOUT && dropout);
            float s[MS][NS][4], dp[MS][NS][4];
            zero_acc(s);
            warp_gemm<T, MS, NS, D / 16, false, false>(s, sQs + qs0 * LDS, LDS, sK + ks0 * LDS, LDS, lane);
            // lse (log2 units) and D of this thread's rows, each read where it is needed (registers are short)
            auto row_vals = [&](const float* v, float(&out)[MS][2]) {
#pragma unroll
                for (int mt = 0; mt < MS; ++mt)
#pragma unroll
                    for (int r = 0; r < 2; ++r) out[mt][r] = v[st * BQ + qs0 + mt * 16 + g + 8 * r];
            };
            float l2[MS][2], dsum_r[MS][2];
            row_vals(sL, l2);
#pragma unroll
            for (int mt = 0; mt < MS; ++mt) l2[mt][0] = lse_log2(l2[mt][0]), l2[mt][1] = lse_log2(l2[mt][1]);
            if (early_p) {
                if (!needs) {  // the usual tile: every entry visible
#pragma unroll
                    for (int mt = 0; mt < MS; ++mt)
#pragma unroll
                        for (int n = 0; n < NS; ++n)
#pragma unroll
                            for (int e2 = 0; e2 < 4; ++e2)
                                s[mt][n][e2] = exp2_approx(fmaf(s[mt][n][e2], scale_log2, -l2[mt][e2 >> 1]));
                } else {
#pragma unroll
                    for (int mt = 0; mt < MS; ++mt)
#pragma unroll
                        for (int n = 0; n < NS; ++n)
#pragma unroll
                            for (int e2 = 0; e2 < 4; ++e2) {
                                const int i = i0 + mt * 16 + g + 8 * (e2 >> 1), j = j0 + n * 8 + 2 * t4 + (e2 & 1);
                                const float p = exp2_approx(fmaf(s[mt][n][e2], scale_log2, -l2[mt][e2 >> 1]));
                                s[mt][n][e2] = mask.visible(i, j) ? p : 0.0f;
                            }
                }
                store_acc_pairs<T, MS, NS>(sP + qs0 * LDP + ks0, LDP, s, lane);
            }
            zero_acc(dp);
            warp_gemm<T, MS, NS, DV / 16, false, false>(dp, sdOs + qs0 * LDV, LDV, sV + ks0 * LDV, LDV, lane);

            // dS' into dp (and P z into s where not done above)
            row_vals(sD, dsum_r);
            if (early_p && !needs) {
#pragma unroll
                for (int mt = 0; mt < MS; ++mt)
#pragma unroll
                    for (int n = 0; n < NS; ++n)
#pragma unroll
                        for (int e2 = 0; e2 < 4; ++e2)
                            dp[mt][n][e2] = s[mt][n][e2] * (dp[mt][n][e2] - dsum_r[mt][e2 >> 1]);
            } else if (early_p) {
#pragma unroll
                for (int mt = 0; mt < MS; ++mt)
#pragma unroll
                    for (int n = 0; n < NS; ++n)
#pragma unroll
                        for (int e2 = 0; e2 < 4; ++e2) {  // hidden entries: exactly 0, whatever dP holds
                            const float p = s[mt][n][e2];
                            dp[mt][n][e2] = p == 0.0f ? 0.0f : p * (dp[mt][n][e2] - dsum_r[mt][e2 >> 1]);
                        }
            } else if (!MODS && !needs && !(DROPOUT && dropout) && dbias == nullptr) {
#pragma unroll
                for (int mt = 0; mt < MS; ++mt)
#pragma unroll
                    for (int n = 0; n < NS; ++n)
#pragma unroll
                        for (int e2 = 0; e2 < 4; ++e2) {
                            const float p = exp2_approx(fmaf(s[mt][n][e2], scale_log2, -l2[mt][e2 >> 1]));
                            dp[mt][n][e2] = p * (dp[mt][n][e2] - dsum_r[mt][e2 >> 1]);
                            s[mt][n][e2] = p;
                        }
            } else {
#pragma unroll
                for (int mt = 0; mt < MS; ++mt)
#pragma unroll
                    for (int r = 0; r < 2; ++r) {
                        const int i = i0 + mt * 16 + g + 8 * r;
#pragma unroll
                        for (int n = 0; n < NS; ++n) {
                            const int j = j0 + n * 8 + 2 * t4;
                            bool keep0 = true, keep1 = true;
                            if (DROPOUT && dropout) {  // keys j, j + 1 share one Philox group (j even)
                                const uint4 w = dropout_words(seed, e.b, h, i, j);
                                keep0 = ((t4 & 1) ? w.z : w.x) >= threshold;
                                keep1 = ((t4 & 1) ? w.w : w.y) >= threshold;
                            }
#pragma unroll
                            for (int c = 0; c < 2; ++c) {
                                float* db = nullptr;
                                if (MODS && dbias != nullptr && i < lq && j + c < lk)
                                    db = dbias + ((long long)(e.view_b * heads + h) * view_q + e.q_row + i) * view_kv +
                                         e.kv_row + j + c;
                                float p;
                                dp[mt][n][2 * r + c] = bwd_element(mask, needs, s[mt][n][2 * r + c], dp[mt][n][2 * r + c],
                                                                   l2[mt][r], dsum_r[mt][r], i, j + c, scale_log2,
                                                                   c ? keep1 : keep0, keep_scale, p, db);
                                s[mt][n][2 * r + c] = p;
                            }
                        }
                    }
            }
            if (!early_p) store_acc_pairs<T, MS, NS>(sP + qs0 * LDP + ks0, LDP, s, lane);
            store_acc_pairs<T, MS, NS>(sdS + qs0 * LDP + ks0, LDP, dp, lane);
        } else {  // no entry of this warp's tile is visible: P and dS' are 0
            for (int w = lane; w < SM * SN / 2; w += 32) {
                const int o = (qs0 + w / (SN / 2)) * LDP + ks0 + (w % (SN / 2)) * 2;
                *reinterpret_cast<unsigned*>(sP + o) = 0u;
                *reinterpret_cast<unsigned*>(sdS + o) = 0u;
            }
        }
        // BULK_DQ: sdQ is read (last tile's reductions) before any warp writes it again, after this barrier
        if (BULK_DQ && dq_acc != nullptr && tid < BQ) bulk_wait_read();
        __syncthreads();  // P and dS' of the tile are complete

        // dV += (P z)^T dO and dK += dS'^T Q (P^T / dS'^T as the A operand through ldmatrix.trans), then the
        // tile's dQ (rows q0 + qq0.., columns qc0..) = dS' K (measured: dQ last beats dQ between dV and dK)
        if (!mask.tile_hidden(q0, BQ, kv0 + kk0, KM)) {
            warp_gemm<T, MK, VC / 8, BQ / 16, true, true>(acc_v, sP + kk0, LDP, sdOs + vc0, LDV, lane);
            warp_gemm<T, MK, KC / 8, BQ / 16, true, true>(acc_k, sdS + kk0, LDP, sQs + kc0, LDS, lane);
        }
        if (dq_acc != nullptr) {
            const bool dq_part = !mask.tile_hidden(q0 + qq0, QM, kv0, BKV);
            float acc_q[MQ][QC / 8][4];
            zero_acc(acc_q);
            if (dq_part)
                warp_gemm<T, MQ, QC / 8, BKV / 16, false, true>(acc_q, sdS + qq0 * LDP, LDP, sK + qc0, LDS, lane);
            if (BULK_DQ) {  // into sdQ (every warp, zeros where hidden): issue_dq adds it after the next barrier
#pragma unroll
                for (int mt = 0; mt < MQ; ++mt)
#pragma unroll
                    for (int r = 0; r < 2; ++r)
#pragma unroll
                        for (int n = 0; n < QC / 8; ++n)
                            *reinterpret_cast<float2*>(sdQ + (qq0 + mt * 16 + g + 8 * r) * LDQ + qc0 + n * 8 + 2 * t4) =
                                make_float2(acc_q[mt][n][2 * r], acc_q[mt][n][2 * r + 1]);
                fence_proxy_async_shared();  // these writes, then a barrier, then the bulk reductions read them
            } else if (dq_part) {
                // this thread's rows q0 + qq0 + 16 mt + g + 8 r: one pointer and constant offsets
                const int i_first = q0 + qq0 + g;
                float* row0 =
                    dq_acc + ((long long)(e.view_b * heads + h) * view_q + e.q_row + i_first) * D + qc0 + 2 * t4;
                const bool rows_in = q0 + qq0 + QM <= lq;
#pragma unroll
                for (int mt = 0; mt < MQ; ++mt)
#pragma unroll
                    for (int r = 0; r < 2; ++r) {
                        if (!rows_in && i_first + mt * 16 + 8 * r >= lq) continue;
#pragma unroll
                        for (int n = 0; n < QC / 8; ++n)
                            red_add_f32x2(row0 + (mt * 16 + 8 * r) * D + n * 8, acc_q[mt][n][2 * r],
                                          acc_q[mt][n][2 * r + 1]);
                    }
            }
        }
        h_prev = h, q0_prev = q0;
        h = h_next;
        q0 = q0_next;
    }
    cp_async_wait<0>();
    if (BULK_DQ && dq_acc != nullptr && n_iter > 0) {
        __syncthreads();  // the last tile's dQ is complete in sdQ
        issue_dq(h_prev, q0_prev);
        if (tid < BQ) bulk_wait_all();
    }

    // dK (times the scale) and dV of this warp's keys and columns; keys past Lk (a padded batch) get 0
    const int rows_out = ragged == 2 ? lk : seq_kv;
    store_acc_rows<T, MK, KC / 8>(dk_out + e.view_b * dk_sb + hkv * dk_sh + e.kv_row * dk_ss + kc0, dk_ss,
                                  kv0 + kk0, rows_out, d - kc0, acc_k, scale, lane);
    store_acc_rows<T, MK, VC / 8>(dv_out + e.view_b * dv_sb + hkv * dv_sh + e.kv_row * dv_ss + vc0, dv_ss,
                                  kv0 + kk0, rows_out, dv - vc0, acc_v, 1.0f, lane);
}

// ------------------------------------------------------------------------------------------------
// fa_bwd_dq_mma: dQ alone, deterministic (no atomics).  The forward's work split: one block per
// (query tile, batch * head), each warp owns 16 * MT query rows and walks the key tiles the rule gives
// (K / V double-buffered through cp.async); per tile S = Q K^T and dP = dO V^T, dS' in registers,
// dQ += dS' K with dS' re-packed as the A operand.
// Shared memory: Q BQ x (D+8), dO BQ x (DV+8), two stages of K BKV x (D+8) and V BKV x (DV+8).
// ------------------------------------------------------------------------------------------------
template <typename T, int D, int DV, int NWARPS, int MT, int BKV, bool INTERVAL, bool MODS, bool DROPOUT,
          bool VEC>
__global__ void __launch_bounds__(NWARPS * 32)
    fa_bwd_dq_mma(FA_BWD_PARAMS(T, float), float softcap, float scale_log2, float scale, unsigned long long seed,
                  unsigned threshold, float keep_scale) {
    constexpr int WQ = 16 * MT;
    constexpr int BQ = WQ * NWARPS;
    constexpr int NT = NWARPS * 32;
    constexpr int LDS = D + 8, LDV = DV + 8;
    constexpr int NS = BKV / 8, NK = D / 8;
    static_assert(D % 16 == 0 && DV % 16 == 0 && BKV % 16 == 0, "tile sizes");

    extern __shared__ __align__(16) unsigned char smem_raw[];
    T* sQ = reinterpret_cast<T*>(smem_raw);
    T* sdO = sQ + BQ * LDS;
    T* sK = sdO + BQ * LDV;       // 2 stages
    T* sV = sK + 2 * BKV * LDS;   // 2 stages

    const int q_block = num_blocks - 1 - (int)(blockIdx.x % (unsigned)num_blocks);
    const fa_entry e = fa_entry_of((int)(blockIdx.x / (unsigned)num_blocks), heads, ragged, rag_q, rag_kv, seq_q,
                                   seq_kv);
    const int b = e.b, h = e.h;
    const int q0 = q_block * BQ;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, t4 = lane & 3;
    const int row_w0 = q0 + warp * WQ;
    const fa_mask<INTERVAL, MODS> mask = fa_mask_of<INTERVAL, MODS>(FA_BWD_MASK_ARGS(e), scale, softcap);
    const int lq = e.lq, lk = e.lk;
    const bool dropout = threshold != 0u;

    const T* qp = q + e.view_b * q_sb + h * q_sh + e.q_row * q_ss;
    const T* dop = dout + e.view_b * do_sb + h * do_sh + e.q_row * do_ss;
    const T* kp = k + e.view_b * k_sb + (h / group) * k_sh + e.kv_row * k_ss;
    const T* vp = v + e.view_b * v_sb + (h / group) * v_sh + e.kv_row * v_ss;

    int kv_lo = 0, kv_hi = 0;
    if (q0 < lq) mask.key_range(q0, min(q0 + BQ, lq), kv_lo, kv_hi);
    const int kv_begin = (kv_lo / BKV) * BKV;
    const int n_tiles = kv_hi > kv_lo ? (kv_hi - kv_begin + BKV - 1) / BKV : 0;

    if (n_tiles > 0) {
        load_tile<T, BQ, D, LDS, NT, VEC>(sQ, qp, q_ss, q_sd, q0, lq, d, tid);
        load_tile<T, BQ, DV, LDV, NT, VEC>(sdO, dop, do_ss, do_sd, q0, lq, dv, tid);
        load_tile<T, BKV, D, LDS, NT, VEC>(sK, kp, k_ss, k_sd, kv_begin, lk, d, tid);
        load_tile<T, BKV, DV, LDV, NT, VEC>(sV, vp, v_ss, v_sd, kv_begin, lk, dv, tid);
    }
    cp_async_commit();

    // this thread's rows: row_w0 + 16 mt + g + 8 r
    float l2[MT][2], dsum_r[MT][2];
    const long long lrow = e.view_b * lse_sb + h * lse_sh + e.q_row;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const int i = row_w0 + mt * 16 + g + 8 * r;
            l2[mt][r] = i < lq ? lse_log2(lse[lrow + i]) : FA_INF;
            dsum_r[mt][r] = i < lq ? dsum[lrow + i] : 0.0f;
        }

    float acc_q[MT][NK][4];
    zero_acc(acc_q);
    const int a_row = (lane & 7) + ((lane >> 3) & 1) * 8, a_col = (lane >> 4) * 8;
    const int b_row = (lane & 7) + (lane >> 4) * 8, b_col = ((lane >> 3) & 1) * 8;
    const T* sQw = sQ + (warp * WQ + a_row) * LDS + a_col;
    const T* sdOw = sdO + (warp * WQ + a_row) * LDV + a_col;

    for (int it = 0; it < n_tiles; ++it) {
        const int st = it & 1;
        const int kv0 = kv_begin + it * BKV;
        cp_async_wait<0>();
        __syncthreads();
        if (it + 1 < n_tiles) {
            load_tile<T, BKV, D, LDS, NT, VEC>(sK + (st ^ 1) * BKV * LDS, kp, k_ss, k_sd, kv0 + BKV, lk, d, tid);
            load_tile<T, BKV, DV, LDV, NT, VEC>(sV + (st ^ 1) * BKV * LDV, vp, v_ss, v_sd, kv0 + BKV, lk, dv, tid);
        }
        cp_async_commit();
        if (mask.tile_hidden(row_w0, WQ, kv0, BKV)) continue;
        const T* sKs = sK + st * BKV * LDS;
        const T* sVs = sV + st * BKV * LDV;

        float s[MT][NS][4], dp[MT][NS][4];
        zero_acc(s);
        zero_acc(dp);
#pragma unroll
        for (int kt = 0; kt < D / 16; ++kt) {
            unsigned a[MT][4];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
                ldsm_x4(a[mt][0], a[mt][1], a[mt][2], a[mt][3], smem_u32(sQw + mt * 16 * LDS + kt * 16));
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
#pragma unroll
        for (int kt = 0; kt < DV / 16; ++kt) {
            unsigned a[MT][4];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
                ldsm_x4(a[mt][0], a[mt][1], a[mt][2], a[mt][3], smem_u32(sdOw + mt * 16 * LDV + kt * 16));
#pragma unroll
            for (int np = 0; np < NS / 2; ++np) {
                unsigned b0, b1, b2, b3;
                ldsm_x4(b0, b1, b2, b3, smem_u32(sVs + (np * 16 + b_row) * LDV + kt * 16 + b_col));
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    elem<T>::mma(dp[mt][2 * np], a[mt], b0, b1);
                    elem<T>::mma(dp[mt][2 * np + 1], a[mt], b2, b3);
                }
            }
        }

        // dS' into s; element (row row_w0 + 16 mt + g + 8 r, key kv0 + 8 n + 2 t4 + c)
        const bool needs = mask.tile_needs_mask(row_w0, WQ, kv0, BKV);
        if (!MODS && !needs && !(DROPOUT && dropout)) {  // the usual tile (see fa_bwd_mma)
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int n = 0; n < NS; ++n)
#pragma unroll
                    for (int e2 = 0; e2 < 4; ++e2) {
                        const int r = e2 >> 1;
                        const float p = exp2_approx(fmaf(s[mt][n][e2], scale_log2, -l2[mt][r]));
                        s[mt][n][e2] = p * (dp[mt][n][e2] - dsum_r[mt][r]);
                    }
        } else
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int n = 0; n < NS; ++n)
#pragma unroll
                for (int r = 0; r < 2; ++r) {
                    const int i = row_w0 + mt * 16 + g + 8 * r;
                    const int j = kv0 + n * 8 + 2 * t4;
                    bool keep0 = true, keep1 = true;
                    if (DROPOUT && dropout) {  // keys j, j + 1 share one Philox group (j even)
                        const uint4 w = dropout_words(seed, b, h, i, j);
                        keep0 = ((t4 & 1) ? w.z : w.x) >= threshold;
                        keep1 = ((t4 & 1) ? w.w : w.y) >= threshold;
                    }
                    float p;
                    s[mt][n][2 * r] = bwd_element(mask, needs, s[mt][n][2 * r], dp[mt][n][2 * r], l2[mt][r],
                                                  dsum_r[mt][r], i, j, scale_log2, keep0, keep_scale, p, nullptr);
                    s[mt][n][2 * r + 1] = bwd_element(mask, needs, s[mt][n][2 * r + 1], dp[mt][n][2 * r + 1],
                                                      l2[mt][r], dsum_r[mt][r], i, j + 1, scale_log2, keep1,
                                                      keep_scale, p, nullptr);
                }

        // dQ += dS' K: K as the B operand through ldmatrix.trans (as V in the forward's P V)
#pragma unroll
        for (int kb = 0; kb < BKV / 16; ++kb) {
            unsigned a[MT][4];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                acc_to_a_frag<T>(a[mt], s[mt][2 * kb], s[mt][2 * kb + 1]);
            }
#pragma unroll
            for (int np = 0; np < NK / 2; ++np) {
                unsigned b0, b1, b2, b3;
                ldsm_x4_trans(b0, b1, b2, b3, smem_u32(sKs + (kb * 16 + a_row) * LDS + np * 16 + a_col));
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    elem<T>::mma(acc_q[mt][2 * np], a[mt], b0, b1);
                    elem<T>::mma(acc_q[mt][2 * np + 1], a[mt], b2, b3);
                }
            }
        }
    }
    cp_async_wait<0>();

    const int rows_out = ragged == 2 ? lq : seq_q;  // padded batches: rows past Lq get 0
    store_acc_rows<T, MT, NK>(dq_out + e.view_b * dq_sb + h * dq_sh + e.q_row * dq_ss, dq_ss, row_w0, rows_out, d,
                              acc_q, scale, lane);
}

// ------------------------------------------------------------------------------------------------
// SIMT kernels (float32, float64): exact FMA arithmetic in the input precision.  Four threads a row
// (a key in fa_bwd_simt_kv, a query in fa_bwd_simt_q), each owning the output columns part + 4 u and
// the partner elements part + 4 u of the other side's tile.  P and dS' pass through shared memory
// among the four threads of a row (one warp): __syncwarp.  An entry with P = 0 and dS' = 0 (every
// hidden one) is skipped, so no value behind the mask reaches a gradient.
// ------------------------------------------------------------------------------------------------

// P (before dropout) of one element in the input precision (natural units), and the softcap's derivative
template <typename F, bool INTERVAL, bool MODS>
__device__ __forceinline__ F bwd_prob_simt(const fa_mask<INTERVAL, MODS>& mask, F s, F lse_i, int i, int j,
                                           double scale, double softcap, F& dt) {
    F x;
    dt = F(1);
    if constexpr (MODS) x = mask.template logit_dtanh<F>(s, scale, softcap, i, j, dt);
    else x = s * (F)scale;
    return (lse_i == -FA_INF || !mask.visible(i, j)) ? F(0) : exp_t<F>(x - lse_i);
}

// P z and dS' of one element in the input precision (natural units)
// (psum_i: a local row's sum of P, which P is divided by; 0 for every other row)
template <typename F, bool INTERVAL, bool MODS>
__device__ __forceinline__ F bwd_element_simt(const fa_mask<INTERVAL, MODS>& mask, F s, F dp, F lse_i, F dsum_i,
                                              F psum_i, int i, int j, double scale, double softcap, bool keep,
                                              F keep_scale, F& p, F& dt) {
    F pr = bwd_prob_simt<F>(mask, s, lse_i, i, j, scale, softcap, dt);
    if (psum_i != F(0)) pr = pr / psum_i;
    const F z = keep ? keep_scale : F(0);
    const F ds = pr == F(0) ? F(0) : pr * (dp * z - dsum_i);
    p = pr * z;
    return ds;  // dS: the caller multiplies by dt (dbias wants dS itself)
}

// The SIMT pair's local rows (bwd.cuh): fa_bwd_simt_kv owns each one in the key block that holds its
// chunk (bwd_row_owned), sums its P there (ascending keys), and publishes psum (0: P not normalized) and
// the D to use at local_sums[2 x, 2 x + 1] (x the row's lse index; the launcher passes this float buffer
// of the lse's dtype as dq_acc, which the SIMT kernels have no other use for).  fa_bwd_simt_q, launched
// after it, reads them: both kernels divide the same P by the same psum, so dK / dV and dQ agree bit for
// bit, and fa_bwd_simt_q pays nothing but a compare per element (no second pass, no shared memory).
template <typename T, typename L, int D, int BKV, int BQ, bool INTERVAL, bool MODS>
__global__ void __launch_bounds__(BKV * 4)
    fa_bwd_simt_kv(FA_BWD_PARAMS(T, L), double softcap, double scale, unsigned long long seed, unsigned threshold,
                   double keep_scale) {
    constexpr int NT = BKV * 4;
    constexpr int LDS = D + 1, LDP = BQ + 1;
    constexpr int NU = D / 4, NI = BQ / 4;
    constexpr int LC = BKV < BQ ? BKV : BQ;  // local rows' key chunk (bwd.cuh), fa_bwd_simt_q's too

    extern __shared__ __align__(16) unsigned char smem_raw[];
    T* sK = reinterpret_cast<T*>(smem_raw);
    T* sV = sK + BKV * LDS;
    T* sQ = sV + BKV * LDS;
    T* sdO = sQ + BQ * LDS;
    T* sP = sdO + BQ * LDS;
    T* sS = sP + BKV * LDP;
    T* sL = sS + BKV * LDP;
    T* sD = sL + BQ;
    T* sN = sD + BQ;  // local rows: psum (0: P not normalized)
    L* local_sums = reinterpret_cast<L*>(dq_acc);

    const fa_bwd_key_block kb = FA_BWD_KEY_BLOCK(INTERVAL, MODS, BKV, BQ, (float)scale, (float)softcap);
    fa_entry e = kb.e;
    const int hkv = e.h, kv0 = kb.kv0, lq = e.lq, lk = e.lk;
    const int qt_begin = kb.qt_begin, n_qt = kb.n_qt, n_iter = kb.n_iter;
    const int tid = threadIdx.x, r = tid >> 2, part = tid & 3;
    const int j = kv0 + r;
    const bool dropout = threshold != 0u;

    T acc_k[NU], acc_v[NU];
#pragma unroll
    for (int u = 0; u < NU; ++u) acc_k[u] = acc_v[u] = T(0);

    if (n_iter > 0) {
        load_tile_simt<T, BKV, D, LDS, NT>(sK, k + e.view_b * k_sb + hkv * k_sh + e.kv_row * k_ss, k_ss, k_sd, kv0,
                                           lk, d, tid);
        load_tile_simt<T, BKV, D, LDS, NT>(sV, v + e.view_b * v_sb + hkv * v_sh + e.kv_row * v_ss, v_ss, v_sd, kv0,
                                           lk, dv, tid);
    }
    for (int it = 0; it < n_iter; ++it) {
        const int gh = it / n_qt;
        const int h = hkv * group + gh;
        const int q0 = qt_begin + (it - gh * n_qt) * BQ;
        e.h = h;
        const fa_mask<INTERVAL, MODS> mask =
            fa_mask_of<INTERVAL, MODS>(FA_BWD_MASK_ARGS(e), (float)scale, (float)softcap);
        __syncthreads();  // every thread is done with the last tile
        load_tile_simt<T, BQ, D, LDS, NT>(sQ, q + e.view_b * q_sb + h * q_sh + e.q_row * q_ss, q_ss, q_sd, q0, lq, d,
                                          tid);
        load_tile_simt<T, BQ, D, LDS, NT>(sdO, dout + e.view_b * do_sb + h * do_sh + e.q_row * do_ss, do_ss, do_sd,
                                          q0, lq, dv, tid);
        const long long lrow = e.view_b * lse_sb + h * lse_sh + e.q_row;
        bool owns = false;
        for (int rr = tid; rr < BQ; rr += NT) {
            const int i = q0 + rr;
            sL[rr] = i < lq ? (T)lse[lrow + i] : (T)(-FA_INF);
            sD[rr] = i < lq ? (T)dsum[lrow + i] : T(0);
            owns |= bwd_row_owned<LC>(mask, i, kv0, BKV);
        }
        // does this tile hold a local row of this block?  (the barrier the tile needs anyway)
        const bool tile_local = __syncthreads_or(owns);

        auto scores = [&](auto local_flag) {
            constexpr bool LOCAL = decltype(local_flag)::value;
#pragma unroll 1
            for (int u = 0; u < NI; ++u) {
                const int il = part + 4 * u, i = q0 + il;
                T s = T(0), dp = T(0);
                for (int c = 0; c < d; ++c) s = fma(sK[r * LDS + c], sQ[il * LDS + c], s);
                for (int c = 0; c < dv; ++c) dp = fma(sV[r * LDS + c], sdO[il * LDS + c], dp);
                const bool keep = !dropout || dropout_keep(seed, threshold, e.b, h, i, j);
                if constexpr (LOCAL) {
                    if (bwd_row_owned<LC>(mask, i, kv0, BKV)) {
                        // the raw score and dP z now (P and the softcap's derivative are recomputed from s,
                        // the same bits); dS once the row's sums are in
                        sP[r * LDP + il] = s;
                        sS[r * LDP + il] = keep ? dp * (T)keep_scale : T(0);
                        continue;
                    }
                }
                T p, dt;
                const T ds = bwd_element_simt<T>(mask, s, dp, sL[il], sD[il], T(0), i, j, scale, softcap, keep,
                                                 (T)keep_scale, p, dt);
                if (dbias != nullptr && i < lq && j < lk)
                    dbias[((long long)(e.view_b * heads + h) * view_q + e.q_row + i) * view_kv + e.kv_row + j] = ds;
                sP[r * LDP + il] = p;
                sS[r * LDP + il] = ds * dt;
            }
        };
        if (tile_local) scores(fa_flag<true>{});
        else scores(fa_flag<false>{});
        if (tile_local) {
            __syncthreads();
            // one thread a local row: psum and D over the block's keys, ascending
            for (int il = tid; il < BQ; il += NT) {
                const int i = q0 + il;
                if (!bwd_row_owned<LC>(mask, i, kv0, BKV)) continue;
                T psum = T(0), dt;
#pragma unroll 1
                for (int rr = 0; rr < BKV; ++rr)
                    psum += bwd_prob_simt<T>(mask, sP[rr * LDP + il], sL[il], i, kv0 + rr, scale, softcap, dt);
                if (bwd_psum_is_one<T, LC>(psum, sL[il])) {
                    T dd = T(0);
#pragma unroll 1
                    for (int rr = 0; rr < BKV; ++rr) {
                        const T pr = bwd_prob_simt<T>(mask, sP[rr * LDP + il], sL[il], i, kv0 + rr, scale, softcap, dt);
                        if (pr != T(0)) dd = fma(pr / psum, sS[rr * LDP + il], dd);  // dP z where P = 0: anything
                    }
                    sD[il] = dd;
                } else {
                    psum = T(0);
                }
                sN[il] = psum;
                local_sums[2 * (lrow + i)] = (L)psum;
                local_sums[2 * (lrow + i) + 1] = (L)sD[il];
            }
            __syncthreads();
#pragma unroll 1
            for (int u = 0; u < NI; ++u) {
                const int il = part + 4 * u, i = q0 + il;
                if (!bwd_row_owned<LC>(mask, i, kv0, BKV)) continue;
                T dt;
                const T pr = bwd_prob_simt<T>(mask, sP[r * LDP + il], sL[il], i, j, scale, softcap, dt);
                const T pn = sN[il] != T(0) ? pr / sN[il] : pr;
                const T ds = pn == T(0) ? T(0) : pn * (sS[r * LDP + il] - sD[il]);
                const bool keep = !dropout || dropout_keep(seed, threshold, e.b, h, i, j);
                if (dbias != nullptr && i < lq && j < lk)
                    dbias[((long long)(e.view_b * heads + h) * view_q + e.q_row + i) * view_kv + e.kv_row + j] = ds;
                sP[r * LDP + il] = keep ? pn * (T)keep_scale : T(0);
                sS[r * LDP + il] = ds * dt;
            }
        }
        __syncwarp();
        for (int il = 0; il < BQ; ++il) {
            const T p = sP[r * LDP + il], ds = sS[r * LDP + il];
            if (p == T(0) && ds == T(0)) continue;
#pragma unroll
            for (int u = 0; u < NU; ++u) {
                acc_v[u] = fma(p, sdO[il * LDS + part + 4 * u], acc_v[u]);
                acc_k[u] = fma(ds, sQ[il * LDS + part + 4 * u], acc_k[u]);
            }
        }
    }

    const int rows_out = ragged == 2 ? lk : seq_kv;
    if (j < rows_out) {
        T* dkp = dk_out + e.view_b * dk_sb + hkv * dk_sh + (e.kv_row + j) * dk_ss;
        T* dvp = dv_out + e.view_b * dv_sb + hkv * dv_sh + (e.kv_row + j) * dv_ss;
#pragma unroll
        for (int u = 0; u < NU; ++u) {
            const int c = part + 4 * u;
            if (c < d) dkp[c] = acc_k[u] * (T)scale;
            if (c < dv) dvp[c] = acc_v[u];
        }
    }
}

template <typename T, typename L, int D, int BQ, int BKV, bool INTERVAL, bool MODS>
__global__ void __launch_bounds__(BQ * 4)
    fa_bwd_simt_q(FA_BWD_PARAMS(T, L), double softcap, double scale, unsigned long long seed, unsigned threshold,
                  double keep_scale) {
    constexpr int NT = BQ * 4;
    constexpr int LDS = D + 1, LDP = BKV + 1;
    constexpr int NU = D / 4, NJ = BKV / 4;
    constexpr int LC = BKV < BQ ? BKV : BQ;  // local rows' key chunk (bwd.cuh), fa_bwd_simt_kv's too

    extern __shared__ __align__(16) unsigned char smem_raw[];
    T* sQ = reinterpret_cast<T*>(smem_raw);
    T* sdO = sQ + BQ * LDS;
    T* sK = sdO + BQ * LDS;
    T* sV = sK + BKV * LDS;
    T* sS = sV + BKV * LDS;

    const int q_block = num_blocks - 1 - (int)(blockIdx.x % (unsigned)num_blocks);
    const fa_entry e = fa_entry_of((int)(blockIdx.x / (unsigned)num_blocks), heads, ragged, rag_q, rag_kv, seq_q,
                                   seq_kv);
    const int b = e.b, h = e.h;
    const int q0 = q_block * BQ;
    const int tid = threadIdx.x, r = tid >> 2, part = tid & 3;
    const int i = q0 + r;
    const fa_mask<INTERVAL, MODS> mask =
        fa_mask_of<INTERVAL, MODS>(FA_BWD_MASK_ARGS(e), (float)scale, (float)softcap);
    const int lq = e.lq, lk = e.lk;
    const bool dropout = threshold != 0u;

    int kv_lo = 0, kv_hi = 0;
    if (q0 < lq) mask.key_range(q0, min(q0 + BQ, lq), kv_lo, kv_hi);
    const int kv_begin = (kv_lo / BKV) * BKV;

    const long long lrow = e.view_b * lse_sb + h * lse_sh + e.q_row;
    const T lse_i = i < lq ? (T)lse[lrow + i] : (T)(-FA_INF);
    T dsum_i = i < lq ? (T)dsum[lrow + i] : T(0), psum_i = T(0);
    if (bwd_row_local<LC>(mask, i)) {  // fa_bwd_simt_kv's sums of this local row
        const L* ls = reinterpret_cast<const L*>(dq_acc);
        psum_i = (T)ls[2 * (lrow + i)];
        dsum_i = (T)ls[2 * (lrow + i) + 1];
    }
    const T* kp = k + e.view_b * k_sb + (h / group) * k_sh + e.kv_row * k_ss;
    const T* vp = v + e.view_b * v_sb + (h / group) * v_sh + e.kv_row * v_ss;
    if (kv_hi > kv_lo) {
        load_tile_simt<T, BQ, D, LDS, NT>(sQ, q + e.view_b * q_sb + h * q_sh + e.q_row * q_ss, q_ss, q_sd, q0, lq, d,
                                          tid);
        load_tile_simt<T, BQ, D, LDS, NT>(sdO, dout + e.view_b * do_sb + h * do_sh + e.q_row * do_ss, do_ss, do_sd,
                                          q0, lq, dv, tid);
    }

    T acc_q[NU];
#pragma unroll
    for (int u = 0; u < NU; ++u) acc_q[u] = T(0);
    const bool block_local = __syncthreads_or(psum_i != T(0));  // some row's P is divided by its sum
    for (int kv0 = kv_begin; kv0 < kv_hi; kv0 += BKV) {
        __syncthreads();
        load_tile_simt<T, BKV, D, LDS, NT>(sK, kp, k_ss, k_sd, kv0, lk, d, tid);
        load_tile_simt<T, BKV, D, LDS, NT>(sV, vp, v_ss, v_sd, kv0, lk, dv, tid);
        __syncthreads();
        auto scores = [&](auto local_flag) {
#pragma unroll 1
            for (int u = 0; u < NJ; ++u) {
                const int jl = part + 4 * u, j = kv0 + jl;
                T s = T(0), dp = T(0);
                for (int c = 0; c < d; ++c) s = fma(sQ[r * LDS + c], sK[jl * LDS + c], s);
                for (int c = 0; c < dv; ++c) dp = fma(sdO[r * LDS + c], sV[jl * LDS + c], dp);
                const bool keep = !dropout || dropout_keep(seed, threshold, b, h, i, j);
                T p, dt;
                const T ds = bwd_element_simt<T>(mask, s, dp, lse_i, dsum_i,
                                                 decltype(local_flag)::value ? psum_i : T(0), i, j, scale, softcap,
                                                 keep, (T)keep_scale, p, dt);
                sS[r * LDP + jl] = ds * dt;
            }
        };
        if (block_local) scores(fa_flag<true>{});
        else scores(fa_flag<false>{});
        __syncwarp();
        for (int jl = 0; jl < BKV; ++jl) {
            const T ds = sS[r * LDP + jl];
            if (ds == T(0)) continue;
#pragma unroll
            for (int u = 0; u < NU; ++u) acc_q[u] = fma(ds, sK[jl * LDS + part + 4 * u], acc_q[u]);
        }
    }

    const int rows_out = ragged == 2 ? lq : seq_q;
    if (i < rows_out) {
        T* dqp = dq_out + e.view_b * dq_sb + h * dq_sh + (e.q_row + i) * dq_ss;
#pragma unroll
        for (int u = 0; u < NU; ++u) {
            const int c = part + 4 * u;
            if (c < d) dqp[c] = acc_q[u] * (T)scale;
        }
    }
}
