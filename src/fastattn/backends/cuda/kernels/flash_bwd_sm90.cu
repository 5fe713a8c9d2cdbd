// FlashAttention backward for Hopper (sm_90a): warpgroup MMA (wgmma) on swizzled shared-memory tiles.
//
// Same math, arguments and results as fa_bwd_split_mma (flash_bwd.cu; the element math, the mask and
// the walk are bwd.cuh's and common.cuh's): float16 / bfloat16, padded head dims 64 and 128 with v's
// equal to q/k's, 16-byte rows with unit stride along d, no dropout, no dbias, dQ into the float32
// buffer (deterministic=False).  The element type is a template flag over 16-bit storage, so NVRTC
// compiles it without the CUDA headers (as flash_fwd_sm90.cu).
//
// Work split: one block per (key tile of 128 keys, batch * k/v head), walking every query tile (of BQ
// rows, every query head of the GQA group) that sees its keys.  Each of the two warpgroups owns 64 keys
// and keeps their dK and dV (64 x D each) in registers over the whole walk.  Per query tile:
//   S^T  = K Q^T     wgmma m64nBQk16, A = the warpgroup's 64 K rows, B = Q, both K-major from shared memory
//   dP^T = V dO^T    likewise with V and dO
//   P, dS' in registers (the element math of fa_bwd_split_mma: lean loop where the tile needs no mask,
//                    bwd_element with the hook elsewhere); lse (log2 units, negated) and D from shared memory
//   dV  += P^T dO    wgmma m64nDk16, A = P^T from registers (the S^T accumulators re-packed to 16 bits),
//                    B = dO from shared memory, MN-major (the forward's P V)
//   dK  += dS'^T Q   likewise
//   dQ   = dS' K     dS'^T goes to shared memory as a [key][query] tile; wgmma with both operands MN-major
//                    (sst<1, 1>): each warpgroup 64 query rows x 64 columns of d (query tiles of 128 at
//                    D = 64: the warpgroups split the rows; of 64 at D = 128: the columns), over the 128 keys
// The tile's dQ goes to a float32 tile in shared memory and leaves by bulk asynchronous reductions (one a
// row, `cp.reduce.async.bulk ... .add.f32`) issued after the next tile's first barrier, as in
// fa_bwd_split_mma; fa_bwd_dq_convert then writes dq.
// Q, dO, lse and D of the next tile load with cp.async (the 128-byte-swizzle layout written directly)
// while the current one computes: two stages.  Two block barriers a tile: the tile landed (and every
// thread is done with the last one), and dS' is complete in shared memory.
#include "common.cuh"
#include "wgmma.cuh"
#include "sm90.cuh"
#include "bwd.cuh"

// ------------------------------------------------------------------------------------------------
// fa_bwd_sm90
//   BF16  bfloat16 (true) or float16 (false)
//   D     padded head dim of q, k and v (64 or 128)
//   BQ    query rows per tile (128 at D = 64, 64 at D = 128: the dQ product's warpgroups take 64 columns)
//   INTERVAL, MODS   the mask flags (common.cuh fa_mask; MODS: softcap / ALiBi / attn_mask through
//         bwd_element's hook)
// Shared memory (dynamic, 1024-byte aligned inside, _specs.bwd_sm90_smem_bytes): K and V 128 x D, two
// stages of Q and dO BQ x D (swizzled), dS'^T 128 x BQ (swizzled, [key][query]), dQ BQ x (D + 8) float32,
// two stages of BQ lse and D values.
// ------------------------------------------------------------------------------------------------
template <bool BF16, int D, int BQ, bool INTERVAL, bool MODS>
__global__ void __launch_bounds__(256, 1)
    fa_bwd_sm90(FA_BWD_PARAMS(unsigned short, float), float softcap, float scale_log2, float scale,
                unsigned long long seed, unsigned threshold, float keep_scale) {
    using namespace fa_sm90;
    constexpr int BKV = 128, NT = 256;
    constexpr int NS = BQ / 2;                 // S^T / dP^T accumulators a thread (64 keys x BQ queries)
    constexpr int NA = D / 2;                  // dK / dV accumulators a thread (64 keys x D)
    constexpr int NQ = BQ == 128 ? D : D / 2;  // dQ columns of a warpgroup
    static_assert((D == 64 && BQ == 128) || (D == 128 && BQ == 64), "tiles: D 64 with BQ 128, D 128 with BQ 64");
    static_assert(NQ == 64, "the dQ product: 64 x 64 a warpgroup");
    constexpr unsigned K_BYTES = BKV * D * 2, Q_BYTES = BQ * D * 2, S_BYTES = BKV * BQ * 2;
    constexpr int LDQ = D + 8;  // sdQ row (floats): the 8 rows of a float2 store spread over the banks

    extern __shared__ unsigned char smem_raw[];
    const unsigned raw = smem_u32(smem_raw);
    const unsigned sK = (raw + 1023u) & ~1023u;
    const unsigned sV = sK + K_BYTES;
    const unsigned sQ = sV + K_BYTES;        // 2 stages
    const unsigned sdO = sQ + 2 * Q_BYTES;   // 2 stages
    const unsigned sdS = sdO + 2 * Q_BYTES;  // dS'^T, [key][query]
    const unsigned sdQ = sdS + S_BYTES;      // BQ x LDQ float32
    const unsigned sL = sdQ + BQ * LDQ * 4;  // 2 stages of -lse (log2 units)
    const unsigned sDs = sL + 2 * BQ * 4;    // 2 stages of D

    const fa_bwd_key_block kb = FA_BWD_KEY_BLOCK(INTERVAL, MODS, BKV, BQ, scale, softcap);
    fa_entry e = kb.e;
    const int hkv = e.h, kv0 = kb.kv0, lq = e.lq, lk = e.lk;
    const int qt_begin = kb.qt_begin, n_qt = kb.n_qt, n_iter = kb.n_iter;
    const int tid = threadIdx.x, wg = tid >> 7, warp = (tid >> 5) & 3, lane = tid & 31;
    const int g = lane >> 2, t4 = lane & 3;
    const int kw0 = kv0 + wg * 64;                 // this warpgroup's first key
    const int j_thr = kw0 + warp * 16 + g;          // this thread's keys: j_thr, j_thr + 8

    const unsigned short* kp = k + e.view_b * k_sb + hkv * k_sh + e.kv_row * k_ss;
    const unsigned short* vp = v + e.view_b * v_sb + hkv * v_sh + e.kv_row * v_ss;

    // Q, dO, lse and D of the query tile at row q0 of head h into stage st (rows past Lq: zeros)
    auto load_q_tile = [&](int h, int q0, int st) {
        const unsigned short* qp = q + e.view_b * q_sb + h * q_sh + e.q_row * q_ss;
        const unsigned short* dop = dout + e.view_b * do_sb + h * do_sh + e.q_row * do_ss;
        load_tile<BQ, D, NT>(sQ + st * Q_BYTES, qp, q_ss, q0, lq, d, tid);
        load_tile<BQ, D, NT>(sdO + st * Q_BYTES, dop, do_ss, q0, lq, dv, tid);
        static_assert(BQ <= NT, "one lse / D value a thread");
        if (tid < BQ) {
            const long long lrow = e.view_b * lse_sb + h * lse_sh + e.q_row;
            const int bytes = q0 + tid < lq ? 4 : 0;
            cp_async_4(sL + (st * BQ + tid) * 4, lse + lrow + (bytes ? q0 + tid : 0), bytes);
            cp_async_4(sDs + (st * BQ + tid) * 4, dsum + lrow + (bytes ? q0 + tid : 0), bytes);
        }
    };
    // the dQ of the tile at row q0 of head h, complete in sdQ, added into dq_acc (threads 0 .. BQ-1, a row each)
    auto issue_dq = [&](int h, int q0) {
        if (tid < BQ && q0 + tid < lq)
            bulk_reduce_add_f32(dq_acc + ((long long)(e.view_b * heads + h) * view_q + e.q_row + q0 + tid) * D,
                                sdQ + tid * LDQ * 4, D * 4);
        bulk_commit();
    };

    const int q_end = qt_begin + n_qt * BQ;
    int h = hkv * group, q0 = qt_begin;
    int h_prev = h, q0_prev = q0;
    if (n_iter > 0) {
        load_tile<BKV, D, NT>(sK, kp, k_ss, kv0, lk, d, tid);
        load_tile<BKV, D, NT>(sV, vp, v_ss, kv0, lk, dv, tid);
        load_q_tile(h, q0, 0);
    }
    cp_async_commit();

    float acc_k[NA], acc_v[NA];
#pragma unroll
    for (int i = 0; i < NA; ++i) acc_k[i] = acc_v[i] = 0.0f;

    for (int it = 0; it < n_iter; ++it) {
        const int st = it & 1;
        cp_async_wait<0>();
        if (tid < BQ) {  // this thread's lse of the tile, landed: into -lse in log2 units (FFMA-ready)
            float l;
            asm volatile("ld.shared.f32 %0, [%1];\n" : "=f"(l) : "r"(sL + (st * BQ + tid) * 4) : "memory");
            asm volatile("st.shared.f32 [%0], %1;\n" ::"r"(sL + (st * BQ + tid) * 4), "f"(-lse_log2(l)) : "memory");
        }
        fence_proxy_async();  // the tile's copies, then the tensor cores read them
        __syncthreads();      // tile `it` has landed; every thread is done with tile it-1
        const int q0_next = q0 + BQ < q_end ? q0 + BQ : qt_begin;
        const int h_next = q0 + BQ < q_end ? h : h + 1;
        if (it + 1 < n_iter) load_q_tile(h_next, q0_next, st ^ 1);
        cp_async_commit();
        if (it > 0) issue_dq(h_prev, q0_prev);

        e.h = h;
        const fa_mask<INTERVAL, MODS> mask = fa_mask_of<INTERVAL, MODS>(FA_BWD_MASK_ARGS(e), scale, softcap);
        const unsigned sQs = sQ + st * Q_BYTES, sdOs = sdO + st * Q_BYTES;
        const unsigned sLs = sL + st * BQ * 4, sDss = sDs + st * BQ * 4;

        // S^T = K Q^T and dP^T = V dO^T, one commit group each: D/16 k-steps (panel kk / 4, 32 bytes a k-step
        // inside the 128-byte row) of this warpgroup's 64 keys against the tile's queries
        float s[NS], dp[NS];
        reg_fence(s);
        reg_fence(dp);
        wgmma_fence();
        const auto keys_by_queries = [&](float* acc, unsigned keys, unsigned queries) {
#pragma unroll
            for (int kk = 0; kk < D / 16; ++kk) {
                const unsigned a = keys + wg * 64 * 128 + (kk >> 2) * (BKV * 128) + (kk & 3) * 32;
                const unsigned b = queries + (kk >> 2) * (BQ * 128) + (kk & 3) * 32;
                wgmma<BF16, BQ>::ss(acc, desc_sw128(a, 16, 1024), desc_sw128(b, 16, 1024), kk > 0);
            }
            wgmma_commit();
        };
        keys_by_queries(s, sK, sQs);
        keys_by_queries(dp, sV, sdOs);

        // element (key j_thr + 8 r, query q0 + 8 n + 2 t4 + c) of S^T, dP^T: index 4 n + 2 r + c
        const bool needs = MODS || mask.tile_needs_mask(q0, BQ, kw0, 64);
        wgmma_wait<1>();  // S^T done; dP^T may still run
        reg_fence(s);
        if (!needs) {  // the usual tile: every entry visible; P while dP^T is still on the tensor cores
#pragma unroll
            for (int n = 0; n < BQ / 8; ++n) {
                float2 nl;
                asm volatile("ld.shared.v2.f32 {%0, %1}, [%2];\n" : "=f"(nl.x), "=f"(nl.y) : "r"(sLs + (8 * n + 2 * t4) * 4));
#pragma unroll
                for (int r = 0; r < 2; ++r) {
                    s[4 * n + 2 * r] = exp2_approx(fmaf(s[4 * n + 2 * r], scale_log2, nl.x));
                    s[4 * n + 2 * r + 1] = exp2_approx(fmaf(s[4 * n + 2 * r + 1], scale_log2, nl.y));
                }
            }
        }
        wgmma_wait<0>();
        reg_fence(dp);
        if (!needs) {
#pragma unroll
            for (int n = 0; n < BQ / 8; ++n) {
                float2 dd;
                asm volatile("ld.shared.v2.f32 {%0, %1}, [%2];\n" : "=f"(dd.x), "=f"(dd.y) : "r"(sDss + (8 * n + 2 * t4) * 4));
#pragma unroll
                for (int r = 0; r < 2; ++r) {
                    dp[4 * n + 2 * r] = s[4 * n + 2 * r] * (dp[4 * n + 2 * r] - dd.x);
                    dp[4 * n + 2 * r + 1] = s[4 * n + 2 * r + 1] * (dp[4 * n + 2 * r + 1] - dd.y);
                }
            }
        } else {  // the hook, the mask, the softcap's derivative: bwd_element (hidden entries exactly 0)
            const bool tneeds = mask.tile_needs_mask(q0, BQ, kw0, 64);
#pragma unroll
            for (int n = 0; n < BQ / 8; ++n) {
                float2 nl, dd;
                asm volatile("ld.shared.v2.f32 {%0, %1}, [%2];\n" : "=f"(nl.x), "=f"(nl.y) : "r"(sLs + (8 * n + 2 * t4) * 4));
                asm volatile("ld.shared.v2.f32 {%0, %1}, [%2];\n" : "=f"(dd.x), "=f"(dd.y) : "r"(sDss + (8 * n + 2 * t4) * 4));
#pragma unroll
                for (int r = 0; r < 2; ++r)
#pragma unroll
                    for (int c = 0; c < 2; ++c) {
                        const int x = 4 * n + 2 * r + c;
                        float p;
                        dp[x] = bwd_element(mask, tneeds, s[x], dp[x], -(c ? nl.y : nl.x), c ? dd.y : dd.x,
                                            q0 + 8 * n + 2 * t4 + c, j_thr + 8 * r, scale_log2, true, 1.0f, p,
                                            nullptr);
                        s[x] = p;
                    }
            }
        }
        // P^T and dS'^T as the A fragments of the next products (k-step kb: words 4 kb .. 4 kb + 3)
        unsigned pw[NS / 2], dsw[NS / 2];
#pragma unroll
        for (int w = 0; w < NS / 2; ++w) {
            pw[w] = pack2<BF16>(s[2 * w], s[2 * w + 1]);
            dsw[w] = pack2<BF16>(dp[2 * w], dp[2 * w + 1]);
        }
        reg_fence(acc_v);
        reg_fence(acc_k);
        wgmma_fence();
#pragma unroll
        for (int kb2 = 0; kb2 < BQ / 16; ++kb2)
            wgmma<BF16, D>::rs(acc_v, pw + 4 * kb2, desc_sw128(sdOs + kb2 * 2048, BQ * 128, 1024));
#pragma unroll
        for (int kb2 = 0; kb2 < BQ / 16; ++kb2)
            wgmma<BF16, D>::rs(acc_k, dsw + 4 * kb2, desc_sw128(sQs + kb2 * 2048, BQ * 128, 1024));
        wgmma_commit();
        // dS'^T into shared memory ([key][query], swizzled) for dQ, while dV and dK run
#pragma unroll
        for (int n = 0; n < BQ / 8; ++n)
#pragma unroll
            for (int r = 0; r < 2; ++r)
                asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(sdS + sw128_offset<BKV>(wg * 64 + warp * 16 + g + 8 * r, n) +
                                                                t4 * 4),
                             "r"(dsw[2 * n + r])
                             : "memory");
        fence_proxy_async();             // read next by the tensor cores
        if (tid < BQ) bulk_wait_read();  // the last tile's reductions have read sdQ
        __syncthreads();                 // dS'^T complete
        {
            // dQ rows mq0.. (of the tile) x columns nq0.. of d = dS' K over the 128 keys (8 k-steps of 16 keys:
            // 2048 bytes of every panel); A = dS' (M = queries, MN-major), B = K (N = d, MN-major)
            const int mq0 = BQ == 128 ? wg * 64 : 0, nq0 = BQ == 128 ? 0 : wg * 64;
            float acc_q[32];
            reg_fence(acc_q);
            wgmma_fence();
#pragma unroll
            for (int kb2 = 0; kb2 < BKV / 16; ++kb2) {
                const unsigned a = sdS + (mq0 / 64) * (BKV * 128) + kb2 * 2048;
                const unsigned b = sK + (nq0 / 64) * (BKV * 128) + kb2 * 2048;
                wgmma<BF16, 64>::template sst<1, 1>(acc_q, desc_sw128(a, BKV * 128, 1024),
                                                    desc_sw128(b, BKV * 128, 1024), kb2 > 0);
            }
            wgmma_commit();
            wgmma_wait<0>();
            reg_fence(acc_q);
            reg_fence(acc_k);
            reg_fence(acc_v);
            // into sdQ (element (mq0 + 16 warp + g + 8 r, nq0 + 8 n + 2 t4 + c) at 4 n + 2 r + c)
#pragma unroll
            for (int n = 0; n < 8; ++n)
#pragma unroll
                for (int r = 0; r < 2; ++r) {
                    const unsigned addr = sdQ + ((mq0 + warp * 16 + g + 8 * r) * LDQ + nq0 + 8 * n + 2 * t4) * 4;
                    asm volatile("st.shared.v2.f32 [%0], {%1, %2};\n" ::"r"(addr), "f"(acc_q[4 * n + 2 * r]),
                                 "f"(acc_q[4 * n + 2 * r + 1])
                                 : "memory");
                }
            fence_proxy_async();  // these writes, then a barrier, then the bulk reductions read them
        }
        h_prev = h, q0_prev = q0;
        h = h_next;
        q0 = q0_next;
    }
    cp_async_wait<0>();
    if (n_iter > 0) {
        __syncthreads();  // the last tile's dQ is complete in sdQ
        issue_dq(h_prev, q0_prev);
        if (tid < BQ) bulk_wait_all();
    }

    // dK (times the scale) and dV of this thread's keys j_thr, j_thr + 8; keys past Lk (a padded batch) get 0
    const int rows_out = ragged == 2 ? lk : seq_kv;
    unsigned short* dkb = dk_out + e.view_b * dk_sb + hkv * dk_sh + e.kv_row * dk_ss;
    unsigned short* dvb = dv_out + e.view_b * dv_sb + hkv * dv_sh + e.kv_row * dv_ss;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int j = j_thr + 8 * r;
        if (j < rows_out) {
#pragma unroll
            for (int n = 0; n < D / 8; ++n) {
                const int col = 8 * n + 2 * t4;
                if (col < d)
                    *reinterpret_cast<unsigned*>(dkb + (long long)j * dk_ss + col) =
                        pack2<BF16>(acc_k[4 * n + 2 * r] * scale, acc_k[4 * n + 2 * r + 1] * scale);
                if (col < dv)
                    *reinterpret_cast<unsigned*>(dvb + (long long)j * dv_ss + col) =
                        pack2<BF16>(acc_v[4 * n + 2 * r], acc_v[4 * n + 2 * r + 1]);
            }
        }
    }
}
