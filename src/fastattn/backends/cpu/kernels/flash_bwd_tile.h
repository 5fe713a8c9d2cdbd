/* The flash-attention backward, written once; included inside kern<T> of flash_tile.h (one copy per ISA),
 * so it uses the forward's micro-kernels (fma_chunk, scores_tile), its exp2, its units, and its mask: the
 * logit hook (logit_row), the visible-key intervals (visible_keys), key-padding bounds and tile skipping
 * (tile_hidden).
 *
 * Math (FlashAttention-2's backward; P is recomputed from the forward's lse, never stored):
 *   for each query tile (rows r = i * G + g as in the forward), for each key tile t some row may see:
 *     S_ij  = q_i . k_j, in the forward's summation order (so bit for bit its scores) -> with a hook, the
 *             logit L_ij = hook(scale S_ij) (softcap, ALiBi, bias, boolean mask), else L_ij = scale S_ij
 *     P_ij  = 2^((S_ij - lse_i / scale) c)  or  2^((L_ij - lse_i) log2 e)   (the forward's units, c = scale
 *             log2 e; lse / unit is split into two floats hi + lo, subtracted one after the other, so the
 *             largest weights, whose S is near hi, lose nothing to lse's size; 0 outside the row's visible
 *             keys and when lse_i = -inf)
 *     Pd_ij = P_ij keep_ij / (1 - p)                     (dropout: the forward's Philox mask; else Pd = P)
 *     dP_ij = (dO_i . v_j) keep_ij / (1 - p)
 *     dS_ij = P_ij (dP_ij - D_i),  D_i = dO_i . O_i      (0 wherever P_ij = 0: a hidden key never contributes;
 *                                                          dS is the bias's gradient)
 *     dZ_ij = scale dS_ij (1 - tanh^2(scale S_ij / cap))  (softcap; else scale dS_ij): dL/dS
 *     dV_j += sum_i Pd_ij dO_i     dK_j += sum_i dZ_ij q_i     dQ_i += sum_j dZ_ij k_j
 *   (every product summed in chunks of FA_O_CHUNK terms, each from zero, as the forward's P.V)
 *
 * Ownership: a work item is (batch entry, k/v head, chunk): the chunk owns the query tiles
 * rt = chunk, chunk + nchunk, ... (interleaved, so causal chunks get equal work) and so their dQ rows; it
 * adds its dK/dV into the output rows (chunk 0) or into its own partial rows (chunk c > 0: parts), which
 * bwd_reduce adds to the output in chunk order.  No atomics: the result is the same on every run (for a
 * given chunk count, which the caller derives from the thread count).
 *
 * The panel of one (batch entry, k/v head), packed once per call and shared by its chunks: per key tile,
 * K^T (d x bkvp, the S product), V^T (dv x bkvp, the dP product), K (bkvp x dp, the dQ product), then one
 * flag per tile (1: that K tile holds a non-finite value, so dQ skips hidden keys one by one) and each
 * tile's largest |k|.
 *
 * Huge values: when max|q| max|k| d may overflow the raw product q.k (the forward then recomputes with q
 * pre-multiplied by scale), the query tile is computed in the forward's fallback units: q packed times
 * scale, S in logit units (c = log2 e), dZ = dS (softcap'), and dQ multiplied by scale at the end.
 */

struct bwd_layout {
    int64_t dp, dvp, bkvp, n_kv_tiles, per_tile;
    bwd_layout(const fa_params *p)
        : dp(round_up(p->head_dim, W)), dvp(round_up(p->head_dim_v, W)), bkvp(round_up(p->block_kv, W)),
          n_kv_tiles(p->seq_kv / p->block_kv + (p->seq_kv % p->block_kv != 0)),
          per_tile(bkvp * (p->head_dim + p->head_dim_v + dp)) {}
    T *kt(T *panel, int64_t t) const { return panel + t * per_tile; }
    T *vt(T *panel, int64_t t, const fa_params *p) const { return kt(panel, t) + p->head_dim * bkvp; }
    T *kr(T *panel, int64_t t, const fa_params *p) const { return kt(panel, t) + (p->head_dim + p->head_dim_v) * bkvp; }
    T *flags(T *panel) const { return panel + n_kv_tiles * per_tile; }
    T *kmax(T *panel) const { return flags(panel) + n_kv_tiles; }
};

/* elements of one backward panel, or -1 if that does not fit in int64 bytes */
static int64_t bwd_panel_elems(const fa_params *p) {
    const int64_t bkvp = round_up(p->block_kv, W), dp = round_up(p->head_dim, W);
    const int64_t n = p->seq_kv / p->block_kv + (p->seq_kv % p->block_kv != 0);
    const int64_t per_tile = mul_checked(bkvp, add_checked(add_checked(p->head_dim, p->head_dim_v), dp));
    const int64_t elems = add_checked(mul_checked(n, per_tile), mul_checked(n, 2));
    return mul_checked(elems, (int64_t)sizeof(T)) < 0 ? -1 : elems;
}

/* elements of one (batch entry, k/v head)'s partial dK/dV rows for nchunk chunks (chunk 0 adds into the
 * output), or -1 if too large */
static int64_t bwd_parts_elems(const fa_params *p, int64_t nchunk) {
    const int64_t row = add_checked(round_up(p->head_dim, W), round_up(p->head_dim_v, W));
    const int64_t elems = mul_checked(mul_checked(nchunk - 1, p->seq_kv), row);
    return mul_checked(elems, (int64_t)sizeof(T)) < 0 ? -1 : elems;
}

/* Packs key tile t of (batch entry, k/v head) bh: K^T, V^T, K (zero-padded), and the tile's K flag. */
template <T (*LOAD)(const char *)>
static void bwd_pack_tile(const fa_params *p, int64_t bh, int64_t t, T *panel) {
    const bwd_layout L(p);
    const int64_t d = p->head_dim, dv = p->head_dim_v, dp = L.dp, bkvp = L.bkvp;
    const int64_t b = bh / p->heads_kv, h = bh % p->heads_kv;
    const fa_entry e = entry(p, b);
    const int64_t k0 = t * p->block_kv;
    if (k0 >= e.len_kv) return;
    const int64_t ncols = (e.len_kv - k0 < p->block_kv) ? e.len_kv - k0 : p->block_kv;
    T *kt = L.kt(panel, t), *vt = L.vt(panel, t, p), *kr = L.kr(panel, t, p);
    for (int64_t dd = 0; dd < d; ++dd)
        for (int64_t c = ncols; c < bkvp; ++c) kt[dd * bkvp + c] = 0;
    for (int64_t dd = 0; dd < dv; ++dd)
        for (int64_t c = ncols; c < bkvp; ++c) vt[dd * bkvp + c] = 0;
    for (int64_t c = ncols * dp; c < bkvp * dp; ++c) kr[c] = 0;
    pack_transposed<LOAD>(p, p->k, p->k_strides, e, h, k0, ncols, d, kt, bkvp);   /* K^T */
    pack_transposed<LOAD>(p, p->v, p->v_strides, e, h, k0, ncols, dv, vt, bkvp);  /* V^T */
    pack_rows<LOAD>(p, p->k, p->k_strides, e, h, k0, ncols, d, kr, dp);           /* K */
    VI bad = VI{};
    V big = V{};
    for (int64_t i = 0; i < ncols * dp; i += W) {   /* x - x is NaN exactly when x is NaN or +-inf */
        const V x = load(kr + i);
        const V z = x - x;
        bad |= (VI)(z != z);
        big = vmax(big, finite_abs(x));   /* the largest finite |k| (inf and NaN are not overflows) */
    }
    L.flags(panel)[t] = lane_bits(bad) ? (T)1 : (T)0;
    L.kmax(panel)[t] = hmax(big);
}

/* C[i][0..N*W) += sum_{k < nk} A(i, k) B[k][0..N*W) for MR rows, A(i, k) = a[i sa + k sk], in chunks of
 * FA_O_CHUNK terms, each from zero */
template <int MR, int N>
static inline void acc_block(const T *a, int64_t sa, int64_t sk, const T *b, int64_t ldb, int64_t nk, T *c,
                             int64_t ldc) {
    for (int64_t k0 = 0; k0 < nk; k0 += FA_O_CHUNK) {
        V acc[MR][N];
        fma_chunk<MR, N>(acc, a, sa, b, ldb, k0, k0 + FA_O_CHUNK < nk ? k0 + FA_O_CHUNK : nk, sk);
        for (int i = 0; i < MR; ++i)
            for (int j = 0; j < N; ++j) store(c + i * ldc + j * W, load(c + i * ldc + j * W) + acc[i][j]);
    }
}

template <int N>
static void acc_rows(int mr, const T *a, int64_t sa, int64_t sk, const T *b, int64_t ldb, int64_t nk, T *c,
                     int64_t ldc) {
    switch (mr) {
#define FA_CASE(M) case M: acc_block<(M <= FA_O_MR ? M : 1), N>(a, sa, sk, b, ldb, nk, c, ldc); break;
        FA_CASE(1) FA_CASE(2) FA_CASE(3) FA_CASE(4) FA_CASE(5) FA_CASE(6) FA_CASE(7) FA_CASE(8)
#undef FA_CASE
    }
}

/* mr (<= FA_O_MR) rows of C (ncols, a multiple of W) += A.B: column strips of FA_O_ND, then 2, then 1 vectors */
static void acc_strips(int mr, const T *a, int64_t sa, int64_t sk, const T *b, int64_t ldb, int64_t nk,
                       int64_t ncols, T *c, int64_t ldc) {
    if (nk <= 0) return;
    int64_t cd = 0;
    for (; cd + FA_O_ND * W <= ncols; cd += FA_O_ND * W) acc_rows<FA_O_ND>(mr, a, sa, sk, b + cd, ldb, nk, c + cd, ldc);
    for (; cd + 2 * W <= ncols; cd += 2 * W) acc_rows<2>(mr, a, sa, sk, b + cd, ldb, nk, c + cd, ldc);
    if (cd < ncols) acc_rows<1>(mr, a, sa, sk, b + cd, ldb, nk, c + cd, ldc);
}

/* Per-thread scratch of the backward: the query tile's packed rows and the score-sized tiles. */
struct bscratch {
    T *qp, *dop, *s, *ds, *pd, *z, *dq, *lse_hi, *lse_lo, *dd, *obuf;
    int64_t *lo, *hi, *row_i, *row_h;
    void *block;
};

static bscratch *bwd_scratch_new(const fa_params *p) {
    const bwd_layout L(p);
    const int64_t bq = p->block_q, pad = 64 / (int64_t)sizeof(T);
    const int64_t wide = (int64_t)(sizeof(double) / sizeof(T));
    const int64_t sizes[15] = {mul_checked(bq, L.dp), mul_checked(bq, L.dvp), mul_checked(bq, L.bkvp),
                               mul_checked(bq, L.bkvp), mul_checked(bq, L.bkvp), mul_checked(bq, L.bkvp),
                               mul_checked(bq, L.dp), bq, bq, bq, mul_checked(bq, wide), mul_checked(bq, wide),
                               mul_checked(bq, wide), mul_checked(bq, wide), mul_checked(L.dvp + 1, W)};
    int64_t total = 0;
    for (int i = 0; i < 15; ++i) total = add_checked(total, add_checked(round_up(sizes[i] < 0 ? -1 : sizes[i], pad), pad));
    const int64_t bytes = mul_checked(total, (int64_t)sizeof(T));
    if (total < 0 || bytes < 0 || bytes > INT64_MAX - 64) return NULL;
    bscratch *ws = (bscratch *)calloc(1, sizeof(bscratch));
    if (!ws) return NULL;
    ws->block = aligned_alloc(64, (size_t)round_up(bytes, 64));
    if (!ws->block) { free(ws); return NULL; }
    memset(ws->block, 0, (size_t)round_up(bytes, 64));
    T *cur = (T *)ws->block;
    T *starts[15];
    for (int i = 0; i < 15; ++i) { starts[i] = cur; cur += round_up(sizes[i], pad) + pad; }
    ws->qp = starts[0]; ws->dop = starts[1]; ws->s = starts[2]; ws->ds = starts[3]; ws->pd = starts[4];
    ws->z = starts[5]; ws->dq = starts[6]; ws->lse_hi = starts[7]; ws->lse_lo = starts[8]; ws->dd = starts[9];
    ws->lo = (int64_t *)starts[10]; ws->hi = (int64_t *)starts[11];
    ws->row_i = (int64_t *)starts[12]; ws->row_h = (int64_t *)starts[13];
    ws->obuf = starts[14];
    return ws;
}

static void bwd_scratch_free(bscratch *ws) {
    if (ws) { free(ws->block); free(ws); }
}

/* One query tile rt of (batch entry b, k/v head hkv): dQ of its rows, its dK/dV added at dk_acc / dv_acc
 * (rows of the entry's keys, row strides ldk / ldv). */
template <T (*LOAD)(const char *)>
static void bwd_tile(const fa_params *p, const fa_bwd *g, int64_t b, int64_t hkv, const fa_entry &e, int64_t rt,
                     const T *panel, const item_mask &km, T *dk_acc, int64_t ldk, T *dv_acc, int64_t ldv,
                     bscratch *ws) {
    const bwd_layout L(p);
    const int64_t d = p->head_dim, dv = p->head_dim_v, dp = L.dp, dvp = L.dvp, bkvp = L.bkvp;
    const int64_t bq = p->block_q, bkv = p->block_kv, G = p->group;
    const int64_t r0 = rt * bq;
    const int64_t rows = (e.rows * G - r0 < bq) ? e.rows * G - r0 : bq;
    const int64_t live = clamp64(e.len_q * G - r0, 0, rows > 0 ? rows : 0);
    if (live <= 0) return;   /* the padding rows of a padded batch: their dQ stays 0 */
    const T *flags = L.flags((T *)panel);
    const bool hook = p->softcap > 0 || p->alibi || km.hook;
    const bool bool_mask = km.hook && p->mask_dtype == FA_MASK_BOOL;
    const units u(p, hook);   /* the forward's: c, the score multiplier of the hook, lse's unit */
    const T inv_cap = p->softcap > 0 ? (T)(1.0 / p->softcap) : (T)0;
    fa_params capp = *p;   /* the softcap alone (no ALiBi, no mask): cap tanh(z / cap), for its derivative */
    capp.alibi = NULL;
    capp.mask = NULL;

    for (int64_t r = 0; r < live; ++r) {
        const int64_t i = G == 1 ? r0 + r : (r0 + r) / G, h = G == 1 ? hkv : hkv * G + (r0 + r) % G;
        ws->row_i[r] = i;
        ws->row_h[r] = h;
        visible_keys(p, e, i, km.lo, km.hi, ws->lo + r, ws->hi + r);
        const char *qrow = p->q + e.src * p->q_strides[0] + h * p->q_strides[1] + (e.row_q + i) * p->q_strides[2];
        const char *dorow = g->dout + e.src * g->dout_strides[0] + h * g->dout_strides[1]
                            + (e.row_q + i) * g->dout_strides[2];
        const char *orow = g->o + e.src * g->o_strides[0] + h * g->o_strides[1] + (e.row_q + i) * g->o_strides[2];
        for (int64_t dd = 0; dd < d; ++dd) ws->qp[r * dp + dd] = LOAD(qrow + dd * p->q_strides[3]);
        for (int64_t dd = d; dd < dp; ++dd) ws->qp[r * dp + dd] = 0;
        /* D = dO.O by the very micro-kernel that sums dP = dO.v (O in lane 0 of a one-vector-wide "V^T"):
         * a row that sees one key has O = v, so D = dP bit for bit and dS = 0 exactly, as it is, whatever
         * the compiler does with FMA contraction */
        for (int64_t dd = 0; dd < dv; ++dd) {
            ws->dop[r * dvp + dd] = LOAD(dorow + dd * g->dout_strides[3]);
            ws->obuf[dd * W] = LOAD(orow + dd * g->o_strides[3]);
        }
        for (int64_t dd = dv; dd < dvp; ++dd) ws->dop[r * dvp + dd] = 0;
        s_rows<1>(1, ws->dop + r * dvp, dvp, ws->obuf, W, dv, ws->obuf + dvp * W, W);
        ws->dd[r] = ws->obuf[dvp * W];
        for (int64_t dd = 0; dd < dp; ++dd) ws->dq[r * dp + dd] = 0;
    }
    const int64_t kv_lo = ws->lo[0], kv_hi = ws->hi[live - 1];

    /* the units: the forward's (raw S, c = scale log2 e, unless a hook), or its fallback when q.k may overflow */
    bool prescaled = false;
    if (fallback_can_help(p)) {   /* the forward's rule (may_overflow), on the packed rows and this head's tiles */
        const double qmax = max_finite_abs_n(ws->qp, live * dp);
        double kmax = 0;
        for (int64_t t = kv_lo / bkv; t * bkv < kv_hi; ++t)
            kmax = (double)L.kmax((T *)panel)[t] > kmax ? (double)L.kmax((T *)panel)[t] : kmax;
        prescaled = raw_product_may_overflow(qmax, kmax, d);
    }
    const T c = prescaled ? (T)units::log2e : u.c_raw, smul = prescaled ? (T)1 : u.smul;
    const double unit = prescaled ? 1.0 : u.unit;
    const T dscale = prescaled ? (T)1 : u.smul;   /* dL/dS (times the softcap's derivative) */
    if (prescaled)
        for (int64_t x = 0; x < live * dp; ++x) ws->qp[x] *= (T)p->scale;
    for (int64_t r = 0; r < live; ++r) {
        /* lse / unit as hi + lo (lse -inf: no key seen, hi -inf; NaN stays NaN) */
        const double t = g->lse[(e.src * p->heads + ws->row_h[r]) * p->lse_rows + e.row_q + ws->row_i[r]] / unit;
        const T hi = (T)t;
        ws->lse_hi[r] = hi;
        ws->lse_lo[r] = (hi == hi && hi != -__builtin_inf() && hi != __builtin_inf()) ? (T)(t - (double)hi) : (T)0;
    }

    for (int64_t t = kv_lo / bkv; t * bkv < kv_hi; ++t) {
        const int64_t k0 = t * bkv;
        const int64_t ncols = (e.len_kv - k0 < bkv) ? e.len_kv - k0 : bkv;
        const int64_t u0 = clamp64(kv_lo - k0, 0, ncols), u1 = clamp64(kv_hi - k0, 0, ncols);
        if (u0 >= u1 || tile_hidden(p, b, hkv, k0, u0, u1)) continue;
        const int64_t a0 = round_down(u0, W), a1 = round_up(u1, W);
        const T *kt = L.kt((T *)panel, t), *vt = L.vt((T *)panel, t, p), *kr = L.kr((T *)panel, t, p);

        scores_tile(live, ws->lo, ws->hi, k0, ncols, a0, a1, ws->qp, dp, kt, bkvp, d, ws->s);     /* S */
        scores_tile(live, ws->lo, ws->hi, k0, ncols, a0, a1, ws->dop, dvp, vt, bkvp, dv, ws->ds);  /* dP */

        /* per row: logits (the hook), P, dropout, dS, softcap's derivative; 0 outside the row's keys */
        for (int64_t r = 0; r < live; ++r) {
            const int64_t c0 = clamp64(ws->lo[r] - k0, 0, ncols), c1 = clamp64(ws->hi[r] - k0, 0, ncols);
            const int64_t i = ws->row_i[r], h = ws->row_h[r];
            T *srow = ws->s + r * bkvp, *dsrow = ws->ds + r * bkvp, *zrow = ws->z + r * bkvp;
            const T lse_hi = ws->lse_hi[r], lse_lo = ws->lse_lo[r];
            const bool sees = c0 < c1 && lse_hi != -__builtin_inf();
            const int64_t e0 = sees ? round_down(c0, W) : a0, e1 = sees ? round_up(c1, W) : a0;
            /* A row whose visible keys all lie in this tile (rows up to a tile long) has its whole P here.
             * When P sums to 1 but for the rounding of the lse passed in (rounded to the input's precision:
             * float32 about 6e-8 |lse|, 1e-6 of every weight at lse = 16, an error common to the row's
             * weights that a plain implementation, normalizing its own P, does not make), P is divided by
             * its sum ("local").  A sum further from 1 means the lse and out passed in cover keys this call
             * does not hold (a shard of ring attention: a part of the row's mass is elsewhere); such rows
             * keep P and D as given.  (A shard missing less mass than the tolerance below is normalized: its
             * weights move by at most that much, the size of the rounding the lse itself carries.) */
            bool local = sees && ws->lo[r] / bkv == (ws->hi[r] - 1) / bkv;
            if (sees) {
                if (p->softcap > 0) for (int64_t c = c0; c < c1; ++c) zrow[c] = srow[c];
                if (hook) logit_row(p, e, b, h, i, k0, c0, c1, smul, srow);
                const V vh = splat(lse_hi), vl = splat(lse_lo), vc = splat(c);
                for (int64_t c = e0; c < e1; c += W) store(srow + c, exp2v(((load(srow + c) - vh) - vl) * vc));
                for (int64_t c = e0; c < c0; ++c) srow[c] = 0;
                for (int64_t c = c1; c < e1; ++c) srow[c] = 0;
                if (local) {   /* whole vectors over [e0, e1): P is 0 around [c0, c1) */
                    V acc = V{};
                    for (int64_t c = e0; c < e1; c += W) acc += load(srow + c);
                    const double psum = (double)hsum(acc);
                    /* the rounding of the lse passed in (half an ulp of |lse|), of the sum, and of scores that
                     * the forward computed in another order than S here (the decode route sums q.k along d:
                     * a few ulps of |lse|; 1.5e-5 measured at lse = 35 in float32) */
                    const double eps = sizeof(T) == 4 ? 0x1p-24 : 0x1p-53;
                    const double tol = 8 * eps * (fabs((double)lse_hi * unit) + 2 * W + 16);
                    local = fabs(psum - 1.0) <= tol;
                    if (local) {
                        const V inv = splat((T)(1.0 / psum));
                        for (int64_t c = e0; c < e1; c += W) store(srow + c, load(srow + c) * inv);
                    }
                }
            }
            for (int64_t c = a0; c < e0; c += W) store(srow + c, V{});
            for (int64_t c = e1; c < a1; c += W) store(srow + c, V{});
            if (p->dropout) {
                T *pdrow = ws->pd + r * bkvp;
                for (int64_t c = a0; c < a1; c += W) store(pdrow + c, load(srow + c));
                if (sees) {
                    apply_dropout(p, b, h, i, k0, c0, c1, pdrow);
                    apply_dropout(p, b, h, i, k0, c0, c1, dsrow);
                }
            }
            /* ... and D = sum_j P_ij dP_ij from the P and dP just computed, not dO.O: the same
             * value in exact arithmetic, but consistent with this P and dP, so the rounding of the forward's
             * output and of each dP no longer enters dS = P (dP - D) on its own (dS sums to 0 over the row and
             * cancels most in short rows). */
            if (local) {   /* dP outside the row's keys may hold anything (inf, NaN): P = 0 there selects 0 */
                V acc = V{};
                for (int64_t c = e0; c < e1; c += W) {
                    const V pv = load(srow + c);
                    acc += pv == V{} ? V{} : pv * load(dsrow + c);
                }
                ws->dd[r] = hsum(acc);
            }
            /* dS = P (dP - D); where P is 0 (hidden, or underflowed) dS is 0 whatever dP holds */
            const V vd = splat(ws->dd[r]);
            for (int64_t c = a0; c < a1; c += W) {
                const V pv = load(srow + c);
                const V x = pv * (load(dsrow + c) - vd);
                store(dsrow + c, pv == V{} ? V{} : x);
            }
            const V vscale = splat(dscale);
            if (g->dbias && sees) {   /* the bias's gradient is dS (it is added after the softcap) */
                T *dst = (T *)g->dbias + e.src * g->dbias_strides[0] + h * g->dbias_strides[1]
                         + (e.row_q + i) * g->dbias_strides[2] + e.row_kv + k0;
                for (int64_t c = c0; c < c1; ++c) dst[c] = dsrow[c];
            }
            if (p->softcap > 0 && sees) {
                logit_row(&capp, e, b, h, i, k0, c0, c1, smul, zrow);   /* zrow = cap tanh(scale S / cap) */
                for (int64_t c = c0; c < c1; ++c) {
                    const T th = zrow[c] * inv_cap;
                    dsrow[c] *= dscale * ((T)1 - th * th);
                }
            } else {
                for (int64_t c = a0; c < a1; c += W) store(dsrow + c, load(dsrow + c) * vscale);
            }
        }

        /* dV and dK of the tile's keys [u0, u1): key blocks of FA_O_MR, each over the rows that see one of
         * its keys (the rows' intervals never move back, so those rows are one range) */
        const T *pdt = p->dropout ? ws->pd : ws->s;
        int64_t r_begin = 0, r_end = 0;
        for (int64_t j = u0; j < u1; j += FA_O_MR) {
            const int mr = (int)((u1 - j < FA_O_MR) ? u1 - j : FA_O_MR);
            const int64_t key_lo = k0 + j, key_hi = k0 + j + mr;
            while (r_begin < live && ws->hi[r_begin] <= key_lo) ++r_begin;
            if (r_end < r_begin) r_end = r_begin;
            while (r_end < live && ws->lo[r_end] < key_hi) ++r_end;
            if (r_end <= r_begin) continue;
            const int64_t nk = r_end - r_begin;
            acc_strips(mr, pdt + r_begin * bkvp + j, 1, bkvp, ws->dop + r_begin * dvp, dvp, nk, dvp,
                       dv_acc + (k0 + j) * ldv, ldv);
            acc_strips(mr, ws->ds + r_begin * bkvp + j, 1, bkvp, ws->qp + r_begin * dp, dp, nk, dp,
                       dk_acc + (k0 + j) * ldk, ldk);
        }

        /* dQ += dZ.K over each row block's keys; a K tile with a non-finite value goes key by key, leaving
         * out the keys a row does not see (0 * inf would make the row NaN) */
        if (flags[t] != (T)0) {
            for (int64_t r = 0; r < live; ++r) {
                const int64_t c0 = clamp64(ws->lo[r] - k0, 0, ncols), c1 = clamp64(ws->hi[r] - k0, 0, ncols);
                const int64_t i = ws->row_i[r], h = ws->row_h[r];
                const char *mrow = bool_mask ? p->mask + b * p->mask_strides[0] + h * p->mask_strides[1]
                                               + i * p->mask_strides[2] + k0 * p->mask_strides[3] : NULL;
                for (int64_t c = c0; c < c1; ++c) {
                    if (mrow && !mrow[c * p->mask_strides[3]]) continue;
                    const V a = splat(ws->ds[r * bkvp + c]);
                    for (int64_t dd = 0; dd < dp; dd += W)
                        store(ws->dq + r * dp + dd, load(ws->dq + r * dp + dd) + a * load(kr + c * dp + dd));
                }
            }
            continue;
        }
        for (int64_t rb = 0; rb < live; rb += FA_O_MR) {
            const int mr = (int)((live - rb < FA_O_MR) ? live - rb : FA_O_MR);
            const int64_t p0 = clamp64(ws->lo[rb] - k0, 0, ncols), p1 = clamp64(ws->hi[rb + mr - 1] - k0, 0, ncols);
            if (p0 >= p1) continue;
            acc_strips(mr, ws->ds + rb * bkvp + p0, bkvp, 1, kr + p0 * dp, dp, p1 - p0, dp, ws->dq + rb * dp, dp);
        }
    }

    for (int64_t r = 0; r < live; ++r) {
        T *dq = (T *)g->dq + e.src * g->dq_strides[0] + ws->row_h[r] * g->dq_strides[1]
                + (e.row_q + ws->row_i[r]) * g->dq_strides[2];
        const T dq_scale = prescaled ? (T)p->scale : (T)1;
        for (int64_t dd = 0; dd < dp; ++dd) dq[dd] = ws->dq[r * dp + dd] * dq_scale;
    }
}

/* Work item (bh, chunk): the chunk's query tiles of (batch entry, k/v head) bh.  parts: this bh's partial
 * rows ([nchunk - 1][seq_kv][dp + dvp], zeroed by the caller), unused for chunk 0. */
template <T (*LOAD)(const char *)>
static void bwd_item(const fa_params *p, const fa_bwd *g, int64_t bh, int64_t chunk, const T *panel, T *parts,
                     bscratch *ws) {
    const bwd_layout L(p);
    const int64_t b = bh / p->heads_kv, hkv = bh % p->heads_kv;
    const fa_entry e = entry(p, b);
    item_mask km;
    const int whole = key_mask_bounds(p, b, hkv, e.len_kv, &km.lo, &km.hi);
    km.hook = p->mask && !whole;
    T *dk_acc, *dv_acc;
    int64_t ldk, ldv;
    if (chunk == 0) {
        dk_acc = (T *)g->dk + e.src * g->dk_strides[0] + hkv * g->dk_strides[1] + e.row_kv * g->dk_strides[2];
        dv_acc = (T *)g->dv + e.src * g->dv_strides[0] + hkv * g->dv_strides[1] + e.row_kv * g->dv_strides[2];
        ldk = g->dk_strides[2];
        ldv = g->dv_strides[2];
    } else {
        dk_acc = parts + (chunk - 1) * p->seq_kv * (L.dp + L.dvp);
        dv_acc = dk_acc + p->seq_kv * L.dp;
        ldk = L.dp;
        ldv = L.dvp;
    }
    const int64_t n_q = (e.rows * p->group + p->block_q - 1) / p->block_q;
    for (int64_t rt = chunk; rt < n_q; rt += g->nchunk)
        bwd_tile<LOAD>(p, g, b, hkv, e, rt, panel, km, dk_acc, ldk, dv_acc, ldv, ws);
}

/* Adds the partial dK/dV rows of chunks 1 .. nchunk-1 into key row j of bh's output, in chunk order. */
static void bwd_reduce(const fa_params *p, const fa_bwd *g, int64_t bh, int64_t j, const T *parts) {
    const bwd_layout L(p);
    const int64_t b = bh / p->heads_kv, hkv = bh % p->heads_kv;
    const fa_entry e = entry(p, b);
    if (j >= e.len_kv) return;
    T *dk = (T *)g->dk + e.src * g->dk_strides[0] + hkv * g->dk_strides[1] + (e.row_kv + j) * g->dk_strides[2];
    T *dv = (T *)g->dv + e.src * g->dv_strides[0] + hkv * g->dv_strides[1] + (e.row_kv + j) * g->dv_strides[2];
    for (int64_t c = 1; c < g->nchunk; ++c) {
        const T *pk = parts + (c - 1) * p->seq_kv * (L.dp + L.dvp) + j * L.dp;
        const T *pv = parts + (c - 1) * p->seq_kv * (L.dp + L.dvp) + p->seq_kv * L.dp + j * L.dvp;
        for (int64_t dd = 0; dd < L.dp; dd += W) store(dk + dd, load(dk + dd) + load(pk + dd));
        for (int64_t dd = 0; dd < L.dvp; dd += W) store(dv + dd, load(dv + dd) + load(pv + dd));
    }
}
