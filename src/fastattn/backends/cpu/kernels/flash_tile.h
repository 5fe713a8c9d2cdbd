/* The flash-attention forward for one work item, written once and compiled once per ISA.
 *
 * Included by flash_cpu.cpp inside `namespace isa_<name>` under `#pragma GCC target(...)`,
 * with FA_VBYTES (vector width in bytes) and the register-block shape defined:
 *   FA_S_MR x FA_S_NR  rows x vectors of the S = Q.K^T micro-kernel,
 *   FA_O_MR x FA_O_ND  rows x vectors of the O += P.V micro-kernel.
 *
 * Math (base 2: Q is pre-scaled by scale*log2(e), so exp2 stands for exp):
 *   for each key tile t, for each query row i of the item's query tile:
 *     S_ij  = q_i . k_j                              (masked to -inf outside the causal prefix)
 *     m'_i  = max(m_i, max_j S_ij)
 *     P_ij  = 2^(S_ij - m'_i)
 *     l'_i  = 2^(m_i - m'_i) l_i + sum_j P_ij        (undropped: lse is the undropped one)
 *     O'_i  = 2^(m_i - m'_i) O_i + sum_j D_ij P_ij v_j  (D: dropout keep / (1-p), else 1)
 *   out_i = O_i / l_i,  lse_i = ln2 (m_i + log2 l_i)    (l_i = 0: out 0, lse -inf)
 *
 * Ownership: the item owns its query rows for all key tiles (no reduction across
 * threads, so results are independent of the thread count).  K^T and V of a head are
 * packed once, tile by tile (pack_tile, any thread), into a panel that every query tile
 * of that head then reads (run_item).
 */

template <typename T> struct vec_traits;
template <> struct vec_traits<float> {
    typedef float V __attribute__((vector_size(FA_VBYTES)));
    typedef float VU __attribute__((vector_size(FA_VBYTES), aligned(4), may_alias));
    typedef int32_t VI __attribute__((vector_size(FA_VBYTES)));
    typedef int32_t I;
    /* 2^f on [-1/2, 1/2]: a degree-5 near-minimax fit with p(0) = 1 exactly (so the row
     * maximum gets weight exactly 1 and a single key returns its value bit for bit);
     * relative error 1.8e-7 in float arithmetic */
    enum { MANT = 23, DEG = 5 };
    static inline float poly(int k) {
        static const float c[] = {1.0f, 0.6931470036506653f, 0.24022242426872253f,
                                  0.055507268756628036f, 0.009671512991189957f, 0.0013266687747091055f};
        return c[k];
    }
};
template <> struct vec_traits<double> {
    typedef double V __attribute__((vector_size(FA_VBYTES)));
    typedef double VU __attribute__((vector_size(FA_VBYTES), aligned(8), may_alias));
    typedef int64_t VI __attribute__((vector_size(FA_VBYTES)));
    typedef int64_t I;
    /* 2^f on [-1/2, 1/2]: Taylor series of e^(f ln 2) to degree 13 (ln2^k / k!), error ~1e-17 */
    enum { MANT = 52, DEG = 13 };
    static inline double poly(int k) {
        static const double c[] = {1.0, 0.6931471805599453, 0.24022650695910072, 0.05550410866482158,
                                   0.009618129107628477, 0.0013333558146428443, 0.0001540353039338161,
                                   1.5252733804059841e-05, 1.321548679014431e-06, 1.01780860092397e-07,
                                   7.054911620801123e-09, 4.4455382718708116e-10, 2.5678435993488206e-11,
                                   1.3691488853904128e-12};
        return c[k];
    }
};

/* Philox4x32-10 (philox.h) on FA_VBYTES/4 independent counters at once, one per 32-bit lane.
 * The 32x32 -> 64-bit products are taken in 64-bit lanes: even lanes as they are, odd lanes
 * shifted down, then the low and high halves are put back in place. */
typedef uint32_t philox_u32v __attribute__((vector_size(FA_VBYTES)));
typedef uint64_t philox_u64v __attribute__((vector_size(FA_VBYTES)));

static inline void philox_mulhilo(philox_u32v a, uint64_t m, philox_u32v *hi, philox_u32v *lo) {
    const philox_u64v low32 = philox_u64v{} + 0xFFFFFFFFull;
    const philox_u64v wide = (philox_u64v)a;
    const philox_u64v even = (wide & low32) * m;
    const philox_u64v odd = (wide >> 32) * m;
    *lo = (philox_u32v)((even & low32) | (odd << 32));
    *hi = (philox_u32v)((even >> 32) | (odd & ~low32));
}

static inline void philox4x32_10_vec(philox_u32v c[4], uint64_t seed) {
    uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
    for (int round = 0; round < 10; ++round) {
        philox_u32v hi0, lo0, hi1, lo1;
        philox_mulhilo(c[0], 0xD2511F53u, &hi0, &lo0);
        philox_mulhilo(c[2], 0xCD9E8D57u, &hi1, &lo1);
        const philox_u32v n0 = hi1 ^ c[1] ^ k0;
        const philox_u32v n2 = hi0 ^ c[3] ^ k1;
        c[0] = n0; c[1] = lo1; c[2] = n2; c[3] = lo0;
        k0 += 0x9E3779B9u; k1 += 0xBB67AE85u;
    }
}

/* The four word vectors of L generators (c[r][g]: word r of column group g) in column
 * order: out[4 g + r] = c[r][g], by two rounds of two-vector interleaves. */
typedef int32_t philox_i32v __attribute__((vector_size(FA_VBYTES)));

static inline void philox_columns(const philox_u32v c[4], uint32_t *out) {
    const int L = FA_VBYTES / 4;
    philox_i32v pair_lo, pair_hi, quad_lo, quad_hi;
    for (int m = 0; m < L / 2; ++m) {
        pair_lo[2 * m] = m;         pair_lo[2 * m + 1] = L + m;
        pair_hi[2 * m] = L / 2 + m; pair_hi[2 * m + 1] = L + L / 2 + m;
    }
    for (int n = 0; n < L / 4; ++n)
        for (int q = 0; q < 4; ++q) {
            quad_lo[4 * n + q] = (q < 2 ? 0 : L) + 2 * n + (q & 1);
            quad_hi[4 * n + q] = (q < 2 ? 0 : L) + L / 2 + 2 * n + (q & 1);
        }
    const philox_u32v w01_lo = __builtin_shuffle(c[0], c[1], pair_lo);
    const philox_u32v w01_hi = __builtin_shuffle(c[0], c[1], pair_hi);
    const philox_u32v w23_lo = __builtin_shuffle(c[2], c[3], pair_lo);
    const philox_u32v w23_hi = __builtin_shuffle(c[2], c[3], pair_hi);
    const philox_u32v cols[4] = {__builtin_shuffle(w01_lo, w23_lo, quad_lo), __builtin_shuffle(w01_lo, w23_lo, quad_hi),
                                 __builtin_shuffle(w01_hi, w23_hi, quad_lo), __builtin_shuffle(w01_hi, w23_hi, quad_hi)};
    __builtin_memcpy(out, cols, sizeof(cols));
}

template <typename T> struct kern {
    typedef typename vec_traits<T>::V V;
    typedef typename vec_traits<T>::VU VU;   /* unaligned, aliasing view for loads/stores */
    typedef typename vec_traits<T>::VI VI;
    typedef typename vec_traits<T>::I I;
    static const int W = FA_VBYTES / (int)sizeof(T);

    static inline V load(const T *p) { return *(const VU *)p; }
    static inline void store(T *p, V v) { *(VU *)p = v; }
    static inline V splat(T x) {   /* not V{} + x: adding +0 is not an identity (-0), so it would stay */
        V v = {x};
        return __builtin_shuffle(v, VI{});
    }

    /* 2^x for x <= 0 (or NaN): x = n + f, |f| <= 1/2, 2^f by a polynomial (vec_traits::poly),
     * times 2^n built in the exponent field.  Below -126 the result is 0 (-inf -> 0
     * exactly); NaN stays NaN (it flows through the multiply). */
    static inline V exp2v(V x) {
        const T magic = (T)1.5 * (T)((I)1 << vec_traits<T>::MANT);
        const V lo = splat((T)-126);
        V xc = x < lo ? lo : x;
        V t = xc + magic;                 /* rounds xc to an integer in t's low mantissa bits */
        V n = t - magic;
        V f = xc - n;
        V p = splat(vec_traits<T>::poly(vec_traits<T>::DEG));
        for (int k = vec_traits<T>::DEG - 1; k >= 0; --k) p = p * f + vec_traits<T>::poly(k);
        const int bias = vec_traits<T>::MANT == 23 ? 127 : 1023;
        VI ni = (VI)t - (VI)splat(magic) + bias;   /* n + bias, in 1 .. bias */
        V r = p * (V)(ni << (int)vec_traits<T>::MANT);
        return x < lo ? V{} : r;
    }

    /* S[r][0..NR*W) = sum_d Qp[r][d] * Kt[d][0..NR*W) for MR rows (broadcast FMA). */
    template <int MR, int NR>
    static inline void s_block(const T *qp, int64_t ldq, const T *kt, int64_t ldk, int64_t d,
                               T *s, int64_t lds) {
        V acc[MR][NR];
        for (int i = 0; i < MR; ++i)
            for (int j = 0; j < NR; ++j) acc[i][j] = V{};
        for (int64_t dd = 0; dd < d; ++dd) {
            V b[NR];
            for (int j = 0; j < NR; ++j) b[j] = load(kt + dd * ldk + j * W);
            for (int i = 0; i < MR; ++i) {
                V a = splat(qp[i * ldq + dd]);
                for (int j = 0; j < NR; ++j) acc[i][j] += a * b[j];
            }
        }
        for (int i = 0; i < MR; ++i)
            for (int j = 0; j < NR; ++j) store(s + i * lds + j * W, acc[i][j]);
    }

    template <int NR>
    static void s_rows(int mr, const T *qp, int64_t ldq, const T *kt, int64_t ldk, int64_t d, T *s, int64_t lds) {
        switch (mr) {
#define FA_CASE(M) case M: s_block<(M <= FA_S_MR ? M : 1), NR>(qp, ldq, kt, ldk, d, s, lds); break;
            FA_CASE(1) FA_CASE(2) FA_CASE(3) FA_CASE(4) FA_CASE(5) FA_CASE(6) FA_CASE(7) FA_CASE(8)
#undef FA_CASE
        }
    }

    /* O[r][0..ND*W) = alpha[r] * O[r] + sum_{c < nc} P[r][c] * Vp[c][0..ND*W) for MR rows. */
    template <int MR, int ND>
    static inline void o_block(const T *p, int64_t ldp, const T *vp, int64_t ldv, int64_t nc,
                               const T *alpha, T *o, int64_t ldo) {
        V acc[MR][ND];
        for (int i = 0; i < MR; ++i)
            for (int j = 0; j < ND; ++j) acc[i][j] = load(o + i * ldo + j * W) * alpha[i];
        for (int64_t c = 0; c < nc; ++c) {
            V b[ND];
            for (int j = 0; j < ND; ++j) b[j] = load(vp + c * ldv + j * W);
            for (int i = 0; i < MR; ++i) {
                V a = splat(p[i * ldp + c]);
                for (int j = 0; j < ND; ++j) acc[i][j] += a * b[j];
            }
        }
        for (int i = 0; i < MR; ++i)
            for (int j = 0; j < ND; ++j) store(o + i * ldo + j * W, acc[i][j]);
    }

    template <int ND>
    static void o_rows(int mr, const T *p, int64_t ldp, const T *vp, int64_t ldv, int64_t nc,
                       const T *alpha, T *o, int64_t ldo) {
        switch (mr) {
#define FA_CASE(M) case M: o_block<(M <= FA_O_MR ? M : 1), ND>(p, ldp, vp, ldv, nc, alpha, o, ldo); break;
            FA_CASE(1) FA_CASE(2) FA_CASE(3) FA_CASE(4) FA_CASE(5) FA_CASE(6) FA_CASE(7) FA_CASE(8)
#undef FA_CASE
        }
    }

    static inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

    /* The packed K/V of one head ("panel"), shared by the threads working on that head:
     * K^T tiles [n_kv_tiles][d][bkvp], then V tiles [n_kv_tiles][bkvp][dp]. */
    struct layout {
        int64_t dp, bkvp, n_kv_tiles;
        layout(const fa_params *p)
            : dp(round_up(p->head_dim, W)), bkvp(round_up(p->block_kv, W)),
              n_kv_tiles((p->seq_kv + p->block_kv - 1) / p->block_kv) {}
    };

    static int64_t panel_elems(const fa_params *p) {
        const layout L(p);
        return L.n_kv_tiles * L.bkvp * (p->head_dim + L.dp);
    }

    /* Per-thread scratch: the tiles of one work item. */
    struct scratch {
        T *qp, *s, *o, *m, *l, *alpha;
        void *block;
    };

    static scratch *scratch_new(const fa_params *p) {
        scratch *ws = (scratch *)calloc(1, sizeof(scratch));
        if (!ws) return NULL;
        const layout L(p);
        const int64_t d = p->head_dim, bq = p->block_q;
        const int64_t pad = 64 / sizeof(T);
        int64_t sizes[6] = {bq * d, bq * L.bkvp, bq * L.dp, bq, bq, bq};
        int64_t total = 0;
        for (int i = 0; i < 6; ++i) total += round_up(sizes[i], pad) + pad;
        ws->block = aligned_alloc(64, (size_t)round_up(total * (int64_t)sizeof(T), 64));
        if (!ws->block) { free(ws); return NULL; }
        T *cur = (T *)ws->block;
        T **slots[6] = {&ws->qp, &ws->s, &ws->o, &ws->m, &ws->l, &ws->alpha};
        for (int i = 0; i < 6; ++i) { *slots[i] = cur; cur += round_up(sizes[i], pad) + pad; }
        return ws;
    }

    static void scratch_free(scratch *ws) {
        if (ws) { free(ws->block); free(ws); }
    }

    /* Packs key/value tile t of head bh into that head's panel. */
    template <T (*LOAD)(const char *)>
    static void pack_tile(const fa_params *p, int64_t bh, int64_t t, T *panel) {
        const layout L(p);
        const int64_t d = p->head_dim, dp = L.dp, bkvp = L.bkvp;
        const int64_t b = bh / p->heads, h = bh % p->heads;
        const char *kbase = p->k + b * p->k_strides[0] + h * p->k_strides[1];
        const char *vbase = p->v + b * p->v_strides[0] + h * p->v_strides[1];
        const int64_t k0 = t * p->block_kv;
        const int64_t ncols = (p->seq_kv - k0 < p->block_kv) ? p->seq_kv - k0 : p->block_kv;
        T *kt = panel + t * d * bkvp;
        T *vp = panel + L.n_kv_tiles * d * bkvp + t * bkvp * dp;
        for (int64_t dd = 0; dd < d; ++dd)
            for (int64_t c = ncols; c < bkvp; ++c) kt[dd * bkvp + c] = 0;
        /* K^T: blocks of 16 keys, so the 16 source rows stay in L1 while d runs */
        for (int64_t c0 = 0; c0 < ncols; c0 += 16) {
            const int64_t c1 = c0 + 16 < ncols ? c0 + 16 : ncols;
            for (int64_t dd = 0; dd < d; ++dd) {
                const char *src = kbase + (k0 + c0) * p->k_strides[2] + dd * p->k_strides[3];
                T *dst = kt + dd * bkvp;
                for (int64_t c = c0; c < c1; ++c, src += p->k_strides[2]) dst[c] = LOAD(src);
            }
        }
        for (int64_t c = 0; c < ncols; ++c) {
            const char *vrow = vbase + (k0 + c) * p->v_strides[2];
            for (int64_t dd = 0; dd < d; ++dd) vp[c * dp + dd] = LOAD(vrow + dd * p->v_strides[3]);
            for (int64_t dd = d; dd < dp; ++dd) vp[c * dp + dd] = 0;
        }
        for (int64_t c = ncols; c < bkvp; ++c)
            for (int64_t dd = 0; dd < dp; ++dd) vp[c * dp + dd] = 0;
    }

    /* Number of keys of tile starting at k0 (ncols wide) that query i may see. */
    static inline int64_t visible(const fa_params *p, int64_t i, int64_t k0, int64_t ncols) {
        if (!p->causal) return ncols;
        int64_t v = i - k0 + 1;
        return v < 0 ? 0 : (v > ncols ? ncols : v);
    }

    /* Multiplies row i's probabilities P[0..nvis) of the tile at k0 by keep/(1-p) or 0.
     * The Philox words of L = FA_VBYTES/4 consecutive column groups (4 columns each) are drawn
     * at once, one generator per 32-bit lane (philox4x32_10_vec, the same bits as the scalar
     * philox4x32_10), then put in column order (philox_columns) so that the keep test and
     * the scaling run as plain vector loops. */
    static void apply_dropout(const fa_params *p, int64_t b, int64_t h, int64_t i, int64_t k0,
                              int64_t nvis, T *prow) {
        const int L = FA_VBYTES / 4;
        const T keep_scale = (T)p->drop_scale;
        const uint32_t threshold = p->drop_threshold;
        const int64_t g_first = k0 >> 2, g_last = (k0 + nvis - 1) >> 2;
        uint32_t words[4 * L];
        for (int64_t g0 = g_first; g0 <= g_last; g0 += L) {
            philox_u32v c[4];
            for (int l = 0; l < L; ++l) c[0][l] = (uint32_t)(g0 + l);
            c[1] = philox_u32v{} + (uint32_t)i;
            c[2] = philox_u32v{} + (uint32_t)h;
            c[3] = philox_u32v{} + (uint32_t)b;
            philox4x32_10_vec(c, p->seed);
            philox_columns(c, words);                       /* words[t]: column 4 g0 + t */
            const int64_t base = 4 * g0 - k0;               /* P index of words[0] */
            const int64_t t_begin = base < 0 ? -base : 0;
            const int64_t t_end = (nvis - base < 4 * L) ? nvis - base : 4 * L;
            T *pw = prow + base;
            for (int64_t t = t_begin; t < t_end; ++t) pw[t] = words[t] >= threshold ? pw[t] * keep_scale : (T)0;
        }
    }

    /* The online-softmax step for one row: turns S into P in place, updates m, l, alpha.
     * NaN: the max ignores NaN scores (maxps), but 2^(NaN - m) is NaN, so a NaN score still
     * makes the row sum, and so the output row and lse, NaN. */
    static void softmax_row(T *srow, int64_t nvis, int64_t nzero, T *m, T *l, T *alpha) {
        const int64_t nv = nvis > 0 ? round_up(nvis, W) : 0;
        for (int64_t c = nvis; c < nv; ++c) srow[c] = -__builtin_inf();
        V vmax0 = splat(-__builtin_inf()), vmax1 = vmax0;   /* two chains: max latency, not throughput */
        int64_t c = 0;
        for (; c + 2 * W <= nv; c += 2 * W) {
            V x0 = load(srow + c), x1 = load(srow + c + W);
            vmax0 = x0 > vmax0 ? x0 : vmax0;
            vmax1 = x1 > vmax1 ? x1 : vmax1;
        }
        if (c < nv) { V x0 = load(srow + c); vmax0 = x0 > vmax0 ? x0 : vmax0; }
        vmax0 = vmax1 > vmax0 ? vmax1 : vmax0;
        T row_max = vmax0[0];
        for (int j = 1; j < W; ++j) row_max = vmax0[j] > row_max ? vmax0[j] : row_max;
        const T m_new = row_max > *m ? row_max : *m;
        if (m_new == -__builtin_inf()) {
            /* nothing visible, or every visible score is -inf or NaN: P = 0 unless a NaN is there */
            T fill = 0;
            for (int64_t cc = 0; cc < nvis; ++cc) if (srow[cc] != srow[cc]) fill = srow[cc];
            for (int64_t cc = 0; cc < nzero; cc += W) store(srow + cc, splat(fill));
            if (fill != fill) *l = fill;
            *alpha = 1;
            return;
        }
        V vsum0 = V{}, vsum1 = V{};
        const V vm = splat(m_new);
        for (c = 0; c + 2 * W <= nv; c += 2 * W) {
            V e0 = exp2v(load(srow + c) - vm), e1 = exp2v(load(srow + c + W) - vm);
            store(srow + c, e0);
            store(srow + c + W, e1);
            vsum0 += e0;
            vsum1 += e1;
        }
        if (c < nv) { V e0 = exp2v(load(srow + c) - vm); store(srow + c, e0); vsum0 += e0; }
        for (c = nv; c < nzero; c += W) store(srow + c, V{});
        vsum0 += vsum1;
        T row_sum = 0;
        for (int j = 0; j < W; ++j) row_sum += vsum0[j];
        const T a = exp2v(splat(*m - m_new))[0];
        *alpha = a;
        *l = a * *l + row_sum;
        *m = m_new;
    }

    template <T (*LOAD)(const char *)>
    static void run_item(const fa_params *p, int64_t bh, int64_t qt, const T *panel, scratch *ws) {
        const layout L(p);
        const int64_t d = p->head_dim, dp = L.dp, bkvp = L.bkvp;
        const int64_t bq = p->block_q, bkv = p->block_kv;
        const int64_t b = bh / p->heads, h = bh % p->heads;
        const int64_t q0 = qt * bq;
        const int64_t rows = (p->seq_q - q0 < bq) ? p->seq_q - q0 : bq;

        /* key tiles this query tile needs (causal: up to its last row) */
        int64_t kv_end = p->seq_kv;
        if (p->causal && q0 + rows < kv_end) kv_end = q0 + rows;
        const int64_t n_tiles = (kv_end + bkv - 1) / bkv;

        const T qscale = (T)(p->scale * 1.4426950408889634074);   /* log2(e) */
        const char *qbase = p->q + b * p->q_strides[0] + h * p->q_strides[1];
        for (int64_t r = 0; r < rows; ++r) {
            const char *qrow = qbase + (q0 + r) * p->q_strides[2];
            for (int64_t dd = 0; dd < d; ++dd) ws->qp[r * d + dd] = LOAD(qrow + dd * p->q_strides[3]) * qscale;
            ws->m[r] = -__builtin_inf();
            ws->l[r] = 0;
            for (int64_t dd = 0; dd < dp; ++dd) ws->o[r * dp + dd] = 0;
        }

        for (int64_t t = 0; t < n_tiles; ++t) {
            const int64_t k0 = t * bkv;
            const int64_t ncols = (p->seq_kv - k0 < bkv) ? p->seq_kv - k0 : bkv;
            const T *kt = panel + t * d * bkvp;
            const T *vp = panel + L.n_kv_tiles * d * bkvp + t * bkvp * dp;
            const int64_t tile_vis = round_up(visible(p, q0 + rows - 1, k0, ncols), W);

            /* S = Q.K^T over the visible prefix of each row block.  Column strips outside, row
             * blocks inside: one strip of K^T (d x S_NR vectors) stays in L1 for the whole tile. */
            for (int64_t c = 0; c < tile_vis; c += FA_S_NR * W) {
                const bool full = c + FA_S_NR * W <= tile_vis;
                for (int64_t r0 = 0; r0 < rows; r0 += FA_S_MR) {
                    const int mr = (int)((rows - r0 < FA_S_MR) ? rows - r0 : FA_S_MR);
                    const int64_t ncomp = round_up(visible(p, q0 + r0 + mr - 1, k0, ncols), W);
                    if (c >= ncomp) continue;
                    const T *qblk = ws->qp + r0 * d;
                    T *sblk = ws->s + r0 * bkvp;
                    if (full && c + FA_S_NR * W <= ncomp) {
                        s_rows<FA_S_NR>(mr, qblk, d, kt + c, bkvp, d, sblk + c, bkvp);
                    } else {
                        for (int64_t cc = c; cc < ncomp && cc < c + FA_S_NR * W; cc += W)
                            s_rows<1>(mr, qblk, d, kt + cc, bkvp, d, sblk + cc, bkvp);
                    }
                }
            }

            /* P = 2^(S - m'), running max / sum, dropout */
            for (int64_t r = 0; r < rows; ++r) {
                const int64_t nvis = visible(p, q0 + r, k0, ncols);
                T *srow = ws->s + r * bkvp;
                softmax_row(srow, nvis, tile_vis, ws->m + r, ws->l + r, ws->alpha + r);
                if (p->dropout && nvis > 0) apply_dropout(p, b, h, q0 + r, k0, nvis, srow);
            }

            /* O = alpha O + P.V over the visible prefix of each row block */
            for (int64_t r0 = 0; r0 < rows; r0 += FA_O_MR) {
                const int mr = (int)((rows - r0 < FA_O_MR) ? rows - r0 : FA_O_MR);
                const int64_t nc = visible(p, q0 + r0 + mr - 1, k0, ncols);
                if (nc == 0) continue;           /* all rows of the block see nothing: alpha = 1 */
                const T *prow = ws->s + r0 * bkvp;
                T *orow = ws->o + r0 * dp;
                int64_t c = 0;
                for (; c + FA_O_ND * W <= dp; c += FA_O_ND * W)
                    o_rows<FA_O_ND>(mr, prow, bkvp, vp + c, dp, nc, ws->alpha + r0, orow + c, dp);
                for (; c < dp; c += W)
                    o_rows<1>(mr, prow, bkvp, vp + c, dp, nc, ws->alpha + r0, orow + c, dp);
            }
        }

        /* out = O / l, lse = ln2 (m + log2 l) */
        T *out = (T *)p->out + ((bh * p->seq_q) + q0) * d;
        T *lse = (T *)p->lse + bh * p->seq_q + q0;
        for (int64_t r = 0; r < rows; ++r) {
            const T l = ws->l[r];
            const T inv = l > 0 ? (T)1 / l : (l == 0 ? (T)0 : l);   /* l NaN stays NaN */
            for (int64_t dd = 0; dd < d; ++dd) out[r * d + dd] = ws->o[r * dp + dd] * inv;
            lse[r] = l > 0 ? (T)0.6931471805599453094 * (ws->m[r] + (T)log2((double)l))
                           : (l == 0 ? -(T)__builtin_inf() : l);
        }
    }
};

/* The entry points of this ISA: one scratch type per compute type, one loader per input dtype. */
static inline float ld_f32(const char *p) { return load_as<float>::f32(p); }
static inline float ld_f16(const char *p) { return load_as<float>::f16(p); }
static inline float ld_bf16(const char *p) { return load_as<float>::bf16(p); }
static inline double ld_f64(const char *p) { return load_as<double>::f64(p); }

static void *scratch_new(const fa_params *p) {
    if (p->in_dtype == FA_DTYPE_F64) return kern<double>::scratch_new(p);
    return kern<float>::scratch_new(p);
}

static void scratch_free(const fa_params *p, void *ws) {
    if (p->in_dtype == FA_DTYPE_F64) kern<double>::scratch_free((kern<double>::scratch *)ws);
    else kern<float>::scratch_free((kern<float>::scratch *)ws);
}

static int64_t panel_bytes(const fa_params *p) {
    if (p->in_dtype == FA_DTYPE_F64) return kern<double>::panel_elems(p) * 8;
    return kern<float>::panel_elems(p) * 4;
}

static void pack_tile(const fa_params *p, int64_t bh, int64_t t, void *panel) {
    switch (p->in_dtype) {
    case FA_DTYPE_F64: kern<double>::pack_tile<ld_f64>(p, bh, t, (double *)panel); break;
    case FA_DTYPE_F16: kern<float>::pack_tile<ld_f16>(p, bh, t, (float *)panel); break;
    case FA_DTYPE_BF16: kern<float>::pack_tile<ld_bf16>(p, bh, t, (float *)panel); break;
    default: kern<float>::pack_tile<ld_f32>(p, bh, t, (float *)panel); break;
    }
}

static void run_item(const fa_params *p, int64_t bh, int64_t qt, const void *panel, void *ws) {
    switch (p->in_dtype) {
    case FA_DTYPE_F64:
        kern<double>::run_item<ld_f64>(p, bh, qt, (const double *)panel, (kern<double>::scratch *)ws);
        break;
    case FA_DTYPE_F16:
        kern<float>::run_item<ld_f16>(p, bh, qt, (const float *)panel, (kern<float>::scratch *)ws);
        break;
    case FA_DTYPE_BF16:
        kern<float>::run_item<ld_bf16>(p, bh, qt, (const float *)panel, (kern<float>::scratch *)ws);
        break;
    default:
        kern<float>::run_item<ld_f32>(p, bh, qt, (const float *)panel, (kern<float>::scratch *)ws);
        break;
    }
}

#undef FA_VBYTES
#undef FA_S_MR
#undef FA_S_NR
#undef FA_O_MR
#undef FA_O_ND
