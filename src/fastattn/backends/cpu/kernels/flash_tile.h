/* The flash-attention forward for one work item, written once and compiled once per ISA.
 *
 * Included by flash_cpu.cpp inside `namespace isa_<name>` under `#pragma GCC target(...)`,
 * with FA_VBYTES (vector width in bytes) and the register-block shape defined:
 *   FA_S_MR x FA_S_NR  rows x vectors of the S = Q.K^T micro-kernel,
 *   FA_O_MR x FA_O_ND  rows x vectors of the O += P.V micro-kernel.
 *
 * Math (base 2, c = scale * log2(e) > 0; S is the raw product q.k, so the row max commutes with c):
 *   for each key tile t, for each query row i of the item's query tile:
 *     S_ij  = q_i . k_j                              (-inf outside the row's visible keys: the mask)
 *     m'_i  = max(m_i, max_j S_ij)
 *     P_ij  = 2^((S_ij - m'_i) c)                    (the exponent is <= 0 by construction: never +inf)
 *     A_i   = sum_j D_ij P_ij v_j                    (fresh accumulators per FA_O_CHUNK keys)
 *     l'_i  = 2^((m_i - m'_i) c) l_i + sum_j P_ij    (undropped, in double: lse is the undropped one)
 *     O'_i  = 2^((m_i - m'_i) c) O_i + A_i           (D: dropout keep / (1-p), else 1)
 *   out_i = O_i / l_i,  lse_i = scale m_i + ln l_i    (l_i = 0: out 0, lse -inf)
 * If a raw product overflows while scale < 1 (|q.k| > FLT_MAX although scale.q.k fits: a row max of
 * +inf, or a NaN row sum from inf - inf), the item is recomputed with q pre-multiplied by scale
 * (S = scale q.k, c = log2 e, lse = m + ln l).
 *
 * Masked keys never contribute: a key outside row i's visible range gets P_ij = 0 and is left out
 * of row i's P.V product whenever its V holds a non-finite value (pack_tile flags such tiles), so a
 * NaN or inf behind the mask never reaches the row, whatever the tile sizes.
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

    /* One bit per lane (bit j: lane j of m is true, i.e. -1): any/all tests without a horizontal loop. */
    static inline unsigned lane_bits(VI m) {
#if FA_VBYTES == 64
        return sizeof(T) == 4 ? (unsigned)_mm512_movepi32_mask((__m512i)m) : (unsigned)_mm512_movepi64_mask((__m512i)m);
#elif FA_VBYTES == 32
        return sizeof(T) == 4 ? (unsigned)_mm256_movemask_ps((__m256)m) : (unsigned)_mm256_movemask_pd((__m256d)m);
#else
        return sizeof(T) == 4 ? (unsigned)_mm_movemask_ps((__m128)m) : (unsigned)_mm_movemask_pd((__m128d)m);
#endif
    }
    static const unsigned all_lanes = (1u << W) - 1;

    /* Lane j + S (mod W) in lane j: the steps of a horizontal reduction (log2 W shuffles, not W extracts). */
    template <int S> static inline V rotate(V x) {
        VI idx;
        for (int j = 0; j < W; ++j) idx[j] = (j + S) % W;
        return __builtin_shuffle(x, idx);
    }
    /* The largest lane, NaN lanes ignored (as `x > m ? x : m` does); -inf if every lane is NaN or -inf. */
    static inline T hmax(V x) {
        if (W >= 16) { const V y = rotate<W / 2 < 8 ? 0 : 8>(x); x = y > x ? y : x; }
        if (W >= 8) { const V y = rotate<W / 2 < 4 ? 0 : 4>(x); x = y > x ? y : x; }
        if (W >= 4) { const V y = rotate<W / 2 < 2 ? 0 : 2>(x); x = y > x ? y : x; }
        const V y = rotate<1>(x);
        x = y > x ? y : x;
        return x[0];
    }
    /* The sum of the lanes, pairwise (a tree: no longer a chain of W - 1 roundings). */
    static inline T hsum(V x) {
        if (W >= 16) x += rotate<W / 2 < 8 ? 0 : 8>(x);
        if (W >= 8) x += rotate<W / 2 < 4 ? 0 : 4>(x);
        if (W >= 4) x += rotate<W / 2 < 2 ? 0 : 2>(x);
        x += rotate<1>(x);
        return x[0];
    }

    static inline V load(const T *p) { return *(const VU *)p; }
    static inline void store(T *p, V v) { *(VU *)p = v; }
    static inline V splat(T x) {   /* not V{} + x: adding +0 is not an identity (-0), so it would stay */
        V v = {x};
        return __builtin_shuffle(v, VI{});
    }
    static inline V iota() {   /* lane j holds j */
        V v;
        for (int j = 0; j < W; ++j) v[j] = (T)j;
        return v;
    }

    /* 2^x for x <= 0 (or NaN): x = n + f, |f| <= 1/2, 2^f by a polynomial (vec_traits::poly),
     * times 2^n built in the exponent field.  -inf -> 0 exactly; NaN stays NaN (it flows through
     * the multiply).  float: results below 2^-126 are 0 (no subnormal weights, so no slow
     * subnormal arithmetic in the products that follow).  double: the whole range down to the
     * smallest subnormal, 2^-1074, with 2^n built as 2^(n - n/2) 2^(n/2) (both normal). */
    static inline V exp2v(V x) {
#if FA_VBYTES == 64
        if constexpr (sizeof(T) == 4) {
            /* AVX-512: the same n (round to nearest even), f and polynomial, with 2^n applied by
             * vscalefps and the zero below 2^-126 by its zero-masking: bit for bit the result of
             * the portable form below, in 9 vector operations instead of 16 */
            const __m512 xv = (__m512)x;
            const __mmask16 keep = _mm512_cmp_ps_mask(xv, _mm512_set1_ps(-126.0f), _CMP_NLT_UQ);  /* NaN kept */
            const __m512 nv = _mm512_mask_roundscale_ps(xv, (__mmask16)0xFFFF, xv, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            const V f = x - (V)nv;
            V p = splat(vec_traits<T>::poly(vec_traits<T>::DEG));
            for (int k = vec_traits<T>::DEG - 1; k >= 0; --k) p = p * f + vec_traits<T>::poly(k);
            return (V)_mm512_maskz_scalef_ps(keep, (__m512)p, nv);
        }
#endif
        const T magic = (T)1.5 * (T)((I)1 << vec_traits<T>::MANT);
        const bool wide = vec_traits<T>::MANT == 52;
        const V lo = splat(wide ? (T)-1075 : (T)-126);
        /* float: below 2^-126 x becomes -127, whose biased exponent 0 makes 2^n, and so the
         * result, +0 with no select at the end */
        V xc = x < lo ? (wide ? lo : splat((T)-127)) : x;
        V t = xc + magic;                 /* rounds xc to an integer in t's low mantissa bits */
        V n = t - magic;
        V f = xc - n;
        V p = splat(vec_traits<T>::poly(vec_traits<T>::DEG));
        for (int k = vec_traits<T>::DEG - 1; k >= 0; --k) p = p * f + vec_traits<T>::poly(k);
        const int bias = wide ? 1023 : 127;
        VI ni = (VI)t - (VI)splat(magic);           /* n, in lo .. 0 */
        V r;
        if (wide) {
            VI half = ni >> 1;                        /* floor(n / 2) >= -538 */
            r = p * (V)((ni - half + bias) << (int)vec_traits<T>::MANT) * (V)((half + bias) << (int)vec_traits<T>::MANT);
        } else {
            r = p * (V)((ni + bias) << (int)vec_traits<T>::MANT);
        }
        return wide ? (x < lo ? V{} : r) : r;
    }

    /* acc[r][0..N*W) = sum_{k0 <= k < k1} A[r][k] * B[k][0..N*W) for MR rows, from zero (broadcast FMA):
     * one chunk of any product below.  A[r][k] = a[r * lda + k * ska] (ska = 1: row-major; the backward
     * also reads a tile transposed, ska = its row length). */
    template <int MR, int N>
    static inline __attribute__((always_inline)) void fma_chunk(V (&acc)[MR][N], const T *a, int64_t lda,
                                                                const T *b, int64_t ldb, int64_t k0, int64_t k1,
                                                                int64_t ska = 1) {
        for (int i = 0; i < MR; ++i)
            for (int j = 0; j < N; ++j) acc[i][j] = V{};
        for (int64_t k = k0; k < k1; ++k) {
            V bk[N];
            for (int j = 0; j < N; ++j) bk[j] = load(b + k * ldb + j * W);
            for (int i = 0; i < MR; ++i) {
                V ai = splat(a[i * lda + k * ska]);
                for (int j = 0; j < N; ++j) acc[i][j] += ai * bk[j];
            }
        }
    }

    /* S[r][0..NR*W) = sum_d Qp[r][d] * Kt[d][0..NR*W) for MR rows.  The sum over d runs in chunks of
     * FA_S_CHUNK terms, each from zero, added to S as it ends (blocked summation: chains of
     * d / FA_S_CHUNK and FA_S_CHUNK roundings, not one of d). */
    template <int MR, int NR>
    static inline void s_block(const T *qp, int64_t ldq, const T *kt, int64_t ldk, int64_t d,
                               T *s, int64_t lds) {
        for (int64_t d0 = 0; d0 < d; d0 += FA_S_CHUNK) {
            V acc[MR][NR];
            fma_chunk<MR, NR>(acc, qp, ldq, kt, ldk, d0, d0 + FA_S_CHUNK < d ? d0 + FA_S_CHUNK : d);
            for (int i = 0; i < MR; ++i)
                for (int j = 0; j < NR; ++j)
                    store(s + i * lds + j * W, d0 == 0 ? acc[i][j] : load(s + i * lds + j * W) + acc[i][j]);
        }
    }

    template <int NR>
    static void s_rows(int mr, const T *qp, int64_t ldq, const T *kt, int64_t ldk, int64_t d, T *s, int64_t lds) {
        switch (mr) {
#define FA_CASE(M) case M: s_block<(M <= FA_S_MR ? M : 1), NR>(qp, ldq, kt, ldk, d, s, lds); break;
            FA_CASE(1) FA_CASE(2) FA_CASE(3) FA_CASE(4) FA_CASE(5) FA_CASE(6) FA_CASE(7) FA_CASE(8)
#undef FA_CASE
        }
    }

    /* O[r][0..ND*W) = alpha[r] * O[r] + sum_{c < nc} P[r][c] * Vp[c][0..ND*W) for MR rows.  The
     * sum runs in chunks of FA_O_CHUNK keys, each from zero, joining O as it ends: the long sum
     * over every key of the row is a sum of chunk sums (blocked summation), not one running chain. */
    template <int MR, int ND>
    static inline void o_block(const T *p, int64_t ldp, const T *vp, int64_t ldv, int64_t nc,
                               const T *alpha, T *o, int64_t ldo) {
        for (int64_t c0 = 0; c0 == 0 || c0 < nc; c0 += FA_O_CHUNK) {   /* nc = 0: O = alpha O */
            V acc[MR][ND];
            fma_chunk<MR, ND>(acc, p, ldp, vp, ldv, c0, c0 + FA_O_CHUNK < nc ? c0 + FA_O_CHUNK : nc);
            for (int i = 0; i < MR; ++i) {
                const T a = c0 == 0 ? alpha[i] : (T)1;
                for (int j = 0; j < ND; ++j) store(o + i * ldo + j * W, load(o + i * ldo + j * W) * a + acc[i][j]);
            }
        }
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
    static inline int64_t round_down(int64_t x, int64_t m) { return x / m * m; }
    static inline int64_t clamp64(int64_t x, int64_t lo, int64_t hi) { return x < lo ? lo : (x > hi ? hi : x); }

    /* a * b, or -1 when it does not fit in int64 (every size below goes through this) */
    static inline int64_t mul_checked(int64_t a, int64_t b) {
        int64_t r;
        return (a < 0 || b < 0 || __builtin_mul_overflow(a, b, &r)) ? -1 : r;
    }
    static inline int64_t add_checked(int64_t a, int64_t b) {
        int64_t r;
        return (a < 0 || b < 0 || __builtin_add_overflow(a, b, &r)) ? -1 : r;
    }

    /* The packed K/V of one k/v head of one batch entry ("panel"), shared by the threads working
     * on the query heads of its group: K^T tiles [n_kv_tiles][d][bkvp], then V tiles
     * [n_kv_tiles][bkvp][dvp], then one flag per tile (1: that V tile holds a non-finite value), then each tile's max |k|. */
    struct layout {
        int64_t dvp, bkvp, n_kv_tiles;
        layout(const fa_params *p)
            : dvp(round_up(p->head_dim_v, W)), bkvp(round_up(p->block_kv, W)),
              n_kv_tiles(p->seq_kv / p->block_kv + (p->seq_kv % p->block_kv != 0)) {}
        T *kt(T *panel, int64_t t, int64_t d) const { return panel + t * d * bkvp; }
        T *v(T *panel, int64_t t, int64_t d) const { return panel + n_kv_tiles * d * bkvp + t * bkvp * dvp; }
        T *flags(T *panel, int64_t d) const { return panel + n_kv_tiles * bkvp * (d + dvp); }
        T *kmax(T *panel, int64_t d) const { return flags(panel, d) + n_kv_tiles; }   /* each tile's max |k| */
    };

    /* elements of one panel, or -1 if that does not fit in int64 bytes */
    static int64_t panel_elems(const fa_params *p) {
        const layout L(p);
        const int64_t per_tile = mul_checked(L.bkvp, add_checked(p->head_dim, L.dvp));
        const int64_t elems = add_checked(mul_checked(L.n_kv_tiles, per_tile), mul_checked(L.n_kv_tiles, 2));
        return mul_checked(elems, (int64_t)sizeof(T)) < 0 ? -1 : elems;
    }

    /* Per-thread scratch: the tiles of one work item (l in double: the running row sum) and each
     * row's visible key interval [lo, hi). */
    struct scratch {
        T *qp, *s, *o, *m, *alpha;
        double *l;
        int64_t *lo, *hi, *row_i, *row_h;   /* per packed row: visible keys [lo, hi), position, head */
        void *block;
    };

    static scratch *scratch_new(const fa_params *p) {
        const layout L(p);
        const int64_t d = p->head_dim, bq = p->block_q;
        const int64_t pad = 64 / (int64_t)sizeof(T);
        const int64_t wide = (int64_t)(sizeof(double) / sizeof(T));  /* T slots per double / int64 */
        const int64_t sizes[10] = {mul_checked(bq, d), mul_checked(bq, L.bkvp), mul_checked(bq, L.dvp), bq, bq,
                                   mul_checked(bq, wide), mul_checked(bq, wide), mul_checked(bq, wide),
                                   mul_checked(bq, wide), mul_checked(bq, wide)};
        int64_t total = 0;
        for (int i = 0; i < 10; ++i) total = add_checked(total, add_checked(round_up(sizes[i] < 0 ? -1 : sizes[i], pad), pad));
        const int64_t bytes = mul_checked(total, (int64_t)sizeof(T));
        if (total < 0 || bytes < 0 || bytes > INT64_MAX - 64) return NULL;
        scratch *ws = (scratch *)calloc(1, sizeof(scratch));
        if (!ws) return NULL;
        ws->block = aligned_alloc(64, (size_t)round_up(bytes, 64));
        if (!ws->block) { free(ws); return NULL; }
        T *cur = (T *)ws->block;
        T *starts[10];
        for (int i = 0; i < 10; ++i) { starts[i] = cur; cur += round_up(sizes[i], pad) + pad; }
        ws->qp = starts[0]; ws->s = starts[1]; ws->o = starts[2]; ws->m = starts[3]; ws->alpha = starts[4];
        ws->l = (double *)starts[5];
        ws->lo = (int64_t *)starts[6];
        ws->hi = (int64_t *)starts[7];
        ws->row_i = (int64_t *)starts[8];
        ws->row_h = (int64_t *)starts[9];
        return ws;
    }

    static void scratch_free(scratch *ws) {
        if (ws) { free(ws->block); free(ws); }
    }

    /* Batch entry b: its query/key lengths and where its rows start (see fa_entry). */
    static inline fa_entry entry(const fa_params *p, int64_t b) {
        fa_entry e;
        fa_get_entry(p, b, &e);
        return e;
    }

    /* Packs key/value tile t of (batch entry, k/v head) bh into its panel and flags a V tile that
     * holds a non-finite value.  Tiles past the entry's keys are left alone (never read). */
    /* W x W transpose in registers: log2 W stages, stage B swapping the off-diagonal B x B blocks of the
     * row pairs (i, i + B) (all shuffle masks are constants). */
    template <int B> static inline void transpose_stage(V (&r)[W]) {
        VI lo, hi;   /* __builtin_shuffle(a, b, m): m[j] < W takes a[m[j]], else b[m[j] - W] */
        for (int j = 0; j < W; ++j) {
            lo[j] = (j & B) ? j - B + W : j;
            hi[j] = (j & B) ? j + W : j + B;
        }
#pragma GCC unroll 16
        for (int i = 0; i < W; ++i)
            if (!(i & B)) {
                const V a = r[i], b = r[i + B];
                r[i] = __builtin_shuffle(a, b, lo);
                r[i + B] = __builtin_shuffle(a, b, hi);
            }
    }
    static inline void transpose(V (&r)[W]) {
        if (W >= 16) transpose_stage<W >= 16 ? 8 : 1>(r);
        if (W >= 8) transpose_stage<W >= 8 ? 4 : 1>(r);
        if (W >= 4) transpose_stage<W >= 4 ? 2 : 1>(r);
        transpose_stage<1>(r);
    }

    /* Are the inputs already in T (float32 for T = float, float64 for double)?  Then rows with unit element
     * stride are copied or transposed by whole vectors; anything else converts element by element. */
    static inline bool native_input(const fa_params *p) {
        return p->in_dtype == (sizeof(T) == 8 ? FA_DTYPE_F64 : FA_DTYPE_F32);
    }
    /* ... and are the rows of this array (base, byte strides) T values at unit stride, each at an address T
     * may be read from (the driver hands over strides that are multiples of the item size, so the base
     * decides; a view into a byte buffer may start anywhere)? */
    static inline bool native_rows(const fa_params *p, const char *base, const int64_t *strides) {
        return native_input(p) && strides[3] == (int64_t)sizeof(T) && (uintptr_t)base % sizeof(T) == 0
               && strides[0] % (int64_t)sizeof(T) == 0 && strides[1] % (int64_t)sizeof(T) == 0
               && strides[2] % (int64_t)sizeof(T) == 0;
    }

    /* dst[dd * ld + c] = row(k0 + c)[dd] for keys c < ncols and dims dd < n (rows of K or V of entry e, head
     * h, through fa_kv_row): a tile transposed into the panel. */
    template <T (*LOAD)(const char *)>
    static void pack_transposed(const fa_params *p, const char *base, const int64_t *strides, const fa_entry &e,
                                int64_t h, int64_t k0, int64_t ncols, int64_t n, T *dst, int64_t ld) {
        int64_t cfast = 0, nfast = 0;   /* keys [0, cfast) x dims [0, nfast) by W x W register transposes */
        if (native_rows(p, base, strides)) {
            cfast = round_down(ncols, W);
            nfast = round_down(n, W);
            for (int64_t c0 = 0; c0 < cfast; c0 += W) {
                const T *rows[W];
                for (int c = 0; c < W; ++c) rows[c] = (const T *)fa_kv_row(p, base, strides, &e, h, k0 + c0 + c);
                for (int64_t dd0 = 0; dd0 < nfast; dd0 += W) {
                    V r[W];
                    for (int c = 0; c < W; ++c) r[c] = load(rows[c] + dd0);
                    transpose(r);
                    for (int j = 0; j < W; ++j) store(dst + (dd0 + j) * ld + c0, r[j]);
                }
            }
        }
        /* the rest: blocks of 16 keys, so the 16 source rows stay in L1 while the dims run */
        for (int64_t c0 = 0; c0 < ncols; c0 += 16) {
            const int64_t c1 = c0 + 16 < ncols ? c0 + 16 : ncols;
            const char *row[16];
            for (int64_t c = c0; c < c1; ++c) row[c - c0] = fa_kv_row(p, base, strides, &e, h, k0 + c);
            for (int64_t dd = 0; dd < n; ++dd) {
                const int64_t cs = dd < nfast && c0 < cfast ? (cfast < c1 ? cfast : c1) : c0;
                for (int64_t c = cs; c < c1; ++c) dst[dd * ld + c] = LOAD(row[c - c0] + dd * strides[3]);
            }
        }
    }

    /* dst[c * ld + dd] = row(k0 + c)[dd] for c < ncols, dd < n, and 0 for n <= dd < ld: a tile's rows copied. */
    template <T (*LOAD)(const char *)>
    static void pack_rows(const fa_params *p, const char *base, const int64_t *strides, const fa_entry &e,
                          int64_t h, int64_t k0, int64_t ncols, int64_t n, T *dst, int64_t ld) {
        const bool fast = native_input(p) && strides[3] == (int64_t)sizeof(T);
        for (int64_t c = 0; c < ncols; ++c) {
            const char *row = fa_kv_row(p, base, strides, &e, h, k0 + c);
            T *out = dst + c * ld;
            if (fast) memcpy(out, row, (size_t)n * sizeof(T));
            else for (int64_t dd = 0; dd < n; ++dd) out[dd] = LOAD(row + dd * strides[3]);
            for (int64_t dd = n; dd < ld; ++dd) out[dd] = 0;
        }
    }

    template <T (*LOAD)(const char *)>
    static void pack_tile(const fa_params *p, int64_t bh, int64_t t, T *panel) {
        const layout L(p);
        const int64_t d = p->head_dim, dv = p->head_dim_v, dvp = L.dvp, bkvp = L.bkvp;
        const int64_t b = bh / p->heads_kv, h = bh % p->heads_kv;
        const fa_entry e = entry(p, b);
        const int64_t k0 = t * p->block_kv;
        if (k0 >= e.len_kv) return;
        const int64_t ncols = (e.len_kv - k0 < p->block_kv) ? e.len_kv - k0 : p->block_kv;
        T *kt = L.kt(panel, t, d);
        T *vp = L.v(panel, t, d);
        for (int64_t dd = 0; dd < d; ++dd)
            for (int64_t c = ncols; c < bkvp; ++c) kt[dd * bkvp + c] = 0;
        pack_transposed<LOAD>(p, p->k, p->k_strides, e, h, k0, ncols, d, kt, bkvp);   /* K^T */
        pack_rows<LOAD>(p, p->v, p->v_strides, e, h, k0, ncols, dv, vp, dvp);          /* V */
        for (int64_t c = ncols; c < bkvp; ++c)
            for (int64_t dd = 0; dd < dvp; ++dd) vp[c * dvp + dd] = 0;
        /* x - x is NaN exactly when x is NaN or +-inf; one pass over the tile while it is in cache.
         * Only a mask that hides some keys of a tile from some rows needs to know. */
        const bool hides = p->causal || p->window_left >= 0 || p->window_right >= 0
                           || (p->mask && p->mask_dtype == FA_MASK_BOOL);
        VI bad = VI{};
        for (int64_t i = 0; hides && i < ncols * dvp; i += W) {
            const V z = load(vp + i) - load(vp + i);
            bad |= (VI)(z != z);
        }
        L.flags(panel, d)[t] = lane_bits(bad) ? (T)1 : (T)0;
        /* the tile's largest finite |k| (an inf or NaN key is not an overflow): run_item's overflow test */
        L.kmax(panel, d)[t] = (T)max_finite_abs_n(kt, d * bkvp);
    }

    /* The overflow rule of the forward and the backward: a raw product q.k may overflow when max|q| max|k| d
     * (the largest finite values) reaches half the largest value; only with 0 < scale < 1 do the fallback
     * units (q times scale) help. */
    static inline bool fallback_can_help(const fa_params *p) { return p->scale < 1.0 && (T)p->scale > (T)0; }
    static inline double largest_value() { return sizeof(T) == 8 ? __DBL_MAX__ : (double)__FLT_MAX__; }
    static inline double max_finite_abs(double m, double x) {   /* inf and NaN are not overflows */
        x = fabs(x);
        return (x > m && x <= largest_value()) ? x : m;
    }
    /* max_finite_abs over an array of T, by whole vectors: the largest finite |x[j]|, j < n, folded into the
     * lanes of *big and (the elements past the last whole vector) into *m.  Four independent maxima, so
     * the loop is not one chain of compares. */
    static inline V finite_abs(V x) {
        const V ax = (V)((VI)x & ~(VI)splat((T)-0.0));
        return ax < splat((T)__builtin_inf()) ? ax : V{};   /* inf and NaN lanes: 0 */
    }
    static inline V vmax(V a, V b) { return a > b ? a : b; }
    static void fold_finite_abs(const T *x, int64_t n, V *big, double *m) {
        V b0 = *big, b1 = V{}, b2 = V{}, b3 = V{};
        int64_t j = 0;
        for (; j + 4 * W <= n; j += 4 * W) {
            b0 = vmax(b0, finite_abs(load(x + j)));
            b1 = vmax(b1, finite_abs(load(x + j + W)));
            b2 = vmax(b2, finite_abs(load(x + j + 2 * W)));
            b3 = vmax(b3, finite_abs(load(x + j + 3 * W)));
        }
        for (; j + W <= n; j += W) b0 = vmax(b0, finite_abs(load(x + j)));
        for (; j < n; ++j) *m = max_finite_abs(*m, (double)x[j]);
        *big = vmax(vmax(b0, b1), vmax(b2, b3));
    }
    static double max_finite_abs_n(const T *x, int64_t n) {
        V big = V{};
        double m = 0;
        fold_finite_abs(x, n, &big, &m);
        const double h = (double)hmax(big);
        return h > m ? h : m;
    }
    static inline bool raw_product_may_overflow(double qmax, double kmax, int64_t d) {
        return qmax * kmax * (double)d >= 0.5 * largest_value();
    }

    /* Could a raw product q.k of the item's rows overflow?  Then the item runs in the fallback units from the
     * start (q times scale): the logit hook (a softcap saturates an infinite score) could otherwise hide the
     * overflow from the retry below. */
    template <T (*LOAD)(const char *)>
    static bool may_overflow(const fa_params *p, int64_t bh, int64_t rt, const T *panel) {
        if (!fallback_can_help(p)) return false;
        const layout L(p);
        const int64_t d = p->head_dim, G = p->group, bq = p->block_q;
        const int64_t b = bh / p->heads_kv, hkv = bh % p->heads_kv;
        const fa_entry e = entry(p, b);
        double kmax = 0, qmax = 0;
        const T *km = L.kmax((T *)panel, d);
        for (int64_t t = 0; t * p->block_kv < e.len_kv; ++t) kmax = (double)km[t] > kmax ? (double)km[t] : kmax;
        const int64_t r0 = rt * bq, live = clamp64(e.len_q * G - r0, 0, bq);
        const bool native = native_rows(p, p->q, p->q_strides);
        /* one head's rows one after another (G = 1, rows d apart): one run of live x d values */
        const bool run = native && G == 1 && p->q_strides[2] == d * (int64_t)sizeof(T);
        V big = V{};
        for (int64_t r = 0; r < (run ? (live > 0 ? 1 : 0) : live); ++r) {
            const int64_t i = (r0 + r) / G, h = hkv * G + (r0 + r) % G;
            const char *qrow = p->q + e.src * p->q_strides[0] + h * p->q_strides[1] + (e.row_q + i) * p->q_strides[2];
            if (native)
                fold_finite_abs((const T *)qrow, run ? live * d : d, &big, &qmax);
            else
                for (int64_t dd = 0; dd < d; ++dd) qmax = max_finite_abs(qmax, (double)LOAD(qrow + dd * p->q_strides[3]));
        }
        const double h = (double)hmax(big);
        return raw_product_may_overflow(h > qmax ? h : qmax, kmax, d);
    }

    /* Multiplies P[c] for c in [c0, c1) (keys k0 + c of query i, head h) by keep/(1-p) or 0.
     * The Philox words of L = FA_VBYTES/4 consecutive column groups (4 columns each) are drawn
     * at once, one generator per 32-bit lane (philox4x32_10_vec, the same bits as the scalar
     * philox4x32_10), then put in column order (philox_columns) so that the keep test and
     * the scaling run as plain vector loops. */
    static void apply_dropout(const fa_params *p, int64_t b, int64_t h, int64_t i, int64_t k0,
                              int64_t c0, int64_t c1, T *prow) {
        const int L = FA_VBYTES / 4;
        const T keep_scale = (T)p->drop_scale;
        const uint32_t threshold = p->drop_threshold;
        const int64_t g_first = (k0 + c0) >> 2, g_last = (k0 + c1 - 1) >> 2;
        uint32_t words[4 * L];
        for (int64_t g0 = g_first; g0 <= g_last; g0 += L) {
            philox_u32v groups = philox_u32v{} + (uint32_t)g0;
            for (int l = 0; l < L; ++l) groups[l] += (uint32_t)l;
            philox_u32v c[4] = {groups, philox_u32v{} + (uint32_t)i, philox_u32v{} + (uint32_t)h,
                                philox_u32v{} + (uint32_t)b};
            philox4x32_10_vec(c, p->seed);
            philox_columns(c, words);                       /* words[t]: column 4 g0 + t */
            const int64_t base = 4 * g0 - k0;               /* P index of words[0] */
            const int64_t t_begin = base < c0 ? c0 - base : 0;
            const int64_t t_end = (c1 - base < 4 * L) ? c1 - base : 4 * L;
            T *pw = prow + base;
            for (int64_t t = t_begin; t < t_end; ++t) pw[t] = words[t] >= threshold ? pw[t] * keep_scale : (T)0;
        }
    }

    /* Mask rows are asked for ahead of their use: a mask or bias row is a short stream of its own, which the
     * hardware prefetchers do not see coming, and the hook reads a whole tile of them in a short burst.  So
     * the next tile's rows go into L2 a row block at a time during this tile's P.V (the longest stretch of
     * arithmetic between two bursts); the logit hook asks for the row mask_ahead rows below its own and an
     * item for its first mask_ahead rows before a tile's products, into L1.  With 2 threads on the Zen 5, a
     * float32 bias (1, 8, 1024, 1024) kept 0.79 of the unmasked rate with the hook alone asking 4 rows ahead
     * and 0.82-0.86 with the item's first rows too; with the next tile's rows as well, one thread kept
     * 0.89-0.90 whether the other core was idle or busy compiling (0.82-0.91 without: a busy neighbour took
     * the bandwidth of the burst), two threads 0.88-0.89 (0.83-0.90 without). */
    static const int64_t mask_ahead = 8;
    template <int LOCALITY = 3>
    static inline void prefetch_mask_row(const fa_params *p, const char *mrow, int64_t c0, int64_t c1) {
        static const int64_t bytes[] = {0, 1, 2, 2, 4, 8};   /* by FA_MASK_* */
        const int64_t sj = p->mask_strides[3];
        if (p->mask_dtype < FA_MASK_BOOL || p->mask_dtype > FA_MASK_F64 || sj != bytes[p->mask_dtype]) return;
        const char *end = mrow + c1 * sj;
        for (const char *x = (const char *)((uintptr_t)(mrow + c0 * sj) & ~(uintptr_t)63); x < end; x += 64)
            __builtin_prefetch(x, 0, LOCALITY);
    }

    /* The mask rows [r0, r1) of an item's rows for the tile of keys k0 .. k0 + ncols, each over its visible columns */
    template <int LOCALITY>
    static inline void prefetch_tile_masks(const fa_params *p, const scratch *ws, int64_t b, int64_t r0, int64_t r1,
                                           int64_t k0, int64_t ncols) {
        for (int64_t r = r0; r < r1; ++r)
            prefetch_mask_row<LOCALITY>(p, p->mask + b * p->mask_strides[0] + ws->row_h[r] * p->mask_strides[1]
                                     + ws->row_i[r] * p->mask_strides[2] + k0 * p->mask_strides[3],
                              clamp64(ws->lo[r] - k0, 0, ncols), clamp64(ws->hi[r] - k0, 0, ncols));
    }

    /* The logit hook, one row of a tile: S[c] for the row's visible columns [c0, c1) (keys k0 + c)
     * becomes the logit of fastattn._masks: smul.S (smul = scale, or 1 when q was pre-scaled), then
     * softcap.tanh(./softcap), minus the ALiBi distance term, plus the float bias; a boolean mask
     * sends its False entries to -inf.  Only called when the call has one of these.  The columns of
     * the W-aligned span around [c0, c1) outside it may be overwritten (every caller treats them as
     * scratch and clears them after). */
    static void logit_row(const fa_params *p, const fa_entry &e, int64_t b, int64_t h, int64_t i, int64_t k0,
                          int64_t c0, int64_t c1, T smul, T *srow) {
        int64_t c;
        const V vsmul = splat(smul);
        /* scale first: fused into the softcap or ALiBi pass when there is one */
        if (!(p->softcap > 0) && !p->alibi) {
            for (c = c0; c + W <= c1; c += W) store(srow + c, load(srow + c) * vsmul);
            for (; c < c1; ++c) srow[c] *= smul;
        }
        if (p->softcap > 0) {
            const T cap = (T)p->softcap, inv = (T)(smul / p->softcap);
            c = c0;
            if (sizeof(T) == 4) {
                /* tanh in float, to about an ulp: |y| < 1/2 y + y^3 P(y^2), P of degree 4 fitted to
                 * tanh's relative error on [0, 1/2] (6.2e-8 at most evaluated in float, as the Taylor
                 * series to y^15 it replaces: two FMAs fewer), else sign(y) (1 - t) / (1 + t) with
                 * t = e^(-2|y|) <= e^-1;
                 * each branch only where some lane needs it.  Whole vectors over the W-aligned span
                 * of [c0, c1): the columns around it are scratch that the caller overwrites. */
                const V two_log2e = splat((T)(2.0 * 1.4426950408889634074)), half = splat((T)0.5);
                const V vinv = splat(inv), vcap = splat(cap);
                const int64_t cend = round_up(c1, W);
                for (c = round_down(c0, W); c < cend; c += W) {
                    const V y = load(srow + c) * vinv;
                    const V ay = y < V{} ? -y : y;
                    const VI small = (VI)(ay < half);
                    const unsigned small_bits = lane_bits(small);
                    V th = V{};
                    if (small_bits) {
                        const V y2 = y * y;
                        V poly = splat((T)-0.006721202598516385);
                        poly = poly * y2 + (T)0.021339145661131948;
                        poly = poly * y2 + (T)-0.05390700816732824;
                        poly = poly * y2 + (T)0.1333302172144636;
                        poly = poly * y2 + (T)-0.33333328157612047;
                        th = y + y * y2 * poly;
                    }
                    if (small_bits != all_lanes) {
                        const V t = exp2v(-(ay < half ? half : ay) * two_log2e);
                        const V far = (splat((T)1) - t) / (splat((T)1) + t);
                        th = small ? th : (y < V{} ? -far : far);
                    }
                    store(srow + c, th * vcap);
                }
            }
            for (; c < c1; ++c) srow[c] = cap * (T)tanh((double)(srow[c] * inv));
        }
        const V vmul = p->softcap > 0 ? splat((T)1) : vsmul;   /* the scale, if not applied yet */
        if (p->alibi) {
            /* - slope |j - (i + len_kv - len_q)| for key j = k0 + c: exact in T (distances < 2^24) */
            const T slope = (T)p->alibi[b * p->alibi_sb + h];
            const T rel0 = (T)(i + e.len_kv - e.len_q - k0);
            const V lanes = iota();
            const V vslope = splat(slope), vrel0 = splat(rel0);
            const T mul = vmul[0];
            for (c = c0; c + W <= c1; c += W) {
                const V dist = vrel0 - (lanes + (T)c);
                store(srow + c, load(srow + c) * vmul - vslope * (dist < V{} ? -dist : dist));
            }
            for (; c < c1; ++c) {
                const T dist = rel0 - (T)c;
                srow[c] = srow[c] * mul - slope * (dist < 0 ? -dist : dist);
            }
        }
        if (p->mask) {
            const char *mrow = p->mask + b * p->mask_strides[0] + h * p->mask_strides[1] + i * p->mask_strides[2]
                               + k0 * p->mask_strides[3];
            const int64_t sj = p->mask_strides[3];
            prefetch_mask_row(p, mrow + mask_ahead * p->mask_strides[2], c0, c1);
            c = c0;
            switch (p->mask_dtype) {
            case FA_MASK_BOOL:
                if (sj == 0) {                       /* one value for the whole row */
                    if (!mrow[0]) for (; c < c1; ++c) srow[c] = -__builtin_inf();
                    break;
                }
                if (sj == 1) {
                    typedef uint8_t VB __attribute__((vector_size(W), aligned(1), may_alias));
                    const V ninf = splat(-__builtin_inf());
                    for (; c + W <= c1; c += W) {
                        const VI keep = __builtin_convertvector(*(const VB *)(mrow + c), VI) != 0;
                        store(srow + c, keep ? load(srow + c) : ninf);
                    }
                }
                for (; c < c1; ++c)
                    if (!mrow[c * sj]) srow[c] = -__builtin_inf();
                break;
            case FA_MASK_F32:
                if (sj == 4 && sizeof(T) == 4)
                    for (; c + W <= c1; c += W) store(srow + c, load(srow + c) + load((const T *)(mrow + 4 * c)));
                for (; c < c1; ++c) srow[c] += load_as<T>::f32(mrow + c * sj);
                break;
            case FA_MASK_BF16:
                if (sj == 2 && sizeof(T) == 4) {
                    typedef uint16_t VH __attribute__((vector_size(W * 2), aligned(2), may_alias));
                    for (; c + W <= c1; c += W) {
                        const VI bits = __builtin_convertvector(*(const VH *)(mrow + 2 * c), VI) << 16;
                        store(srow + c, load(srow + c) + (V)bits);
                    }
                }
                for (; c < c1; ++c) srow[c] += load_as<T>::bf16(mrow + c * sj);
                break;
            case FA_MASK_F16: for (; c < c1; ++c) srow[c] += load_as<T>::f16(mrow + c * sj); break;
            default: for (; c < c1; ++c) srow[c] += load_as<T>::f64(mrow + c * sj); break;
            }
        }
    }

    /* The online-softmax step for one row over the tile's columns [a0, a1) (W-aligned): P = 0
     * outside the row's visible [c0, c1), P = 2^((S - m') c) inside (in place); updates m, l,
     * alpha.  S - m' <= 0 and c > 0, so no weight can overflow, however large the scores.  NaN:
     * the max ignores NaN scores, but 2^(NaN) is NaN, so a NaN score still makes the row sum,
     * and so the output row and lse, NaN.  Returns 1 when the row max is +inf. */
    static int softmax_row(T *srow, int64_t a0, int64_t a1, int64_t c0, int64_t c1, T c, T *m, double *l,
                           T *alpha) {
        const int64_t e0 = c0 < c1 ? round_down(c0, W) : a0, e1 = c0 < c1 ? round_up(c1, W) : a0;
        if (e0 < e1 && (c0 > e0 || c1 < e1)) {   /* -inf in the edge vectors' columns outside [c0, c1) */
            const V lanes = iota();
            const V ninf = splat(-__builtin_inf()), lo = splat((T)(c0 - e0)), hi = splat((T)(c1 - e0));
            const V first = lanes, last = lanes + (T)(e1 - W - e0);   /* column offsets from e0, exact in T */
            store(srow + e0, (first < lo || first >= hi) ? ninf : load(srow + e0));
            store(srow + e1 - W, (last < lo || last >= hi) ? ninf : load(srow + e1 - W));
        }
        for (int64_t k = a0; k < e0; k += W) store(srow + k, V{});
        for (int64_t k = e1; k < a1; k += W) store(srow + k, V{});
        V vmax0 = splat(-__builtin_inf()), vmax1 = vmax0;   /* two chains: max latency, not throughput */
        int64_t cc = e0;
        for (; cc + 2 * W <= e1; cc += 2 * W) {
            V x0 = load(srow + cc), x1 = load(srow + cc + W);
            vmax0 = x0 > vmax0 ? x0 : vmax0;
            vmax1 = x1 > vmax1 ? x1 : vmax1;
        }
        if (cc < e1) { V x0 = load(srow + cc); vmax0 = x0 > vmax0 ? x0 : vmax0; }
        vmax0 = vmax1 > vmax0 ? vmax1 : vmax0;
        const T row_max = hmax(vmax0);
        const T m_new = row_max > *m ? row_max : *m;
        if (m_new == -__builtin_inf()) {
            /* nothing visible, or every visible score is -inf or NaN: P = 0 unless a NaN is there */
            T fill = 0;
            for (int64_t k = c0; k < c1; ++k) if (srow[k] != srow[k]) fill = srow[k];
            for (int64_t k = e0; k < e1; k += W) store(srow + k, splat(fill));
            if (fill != fill) *l = (double)fill;
            *alpha = 1;
            return 0;
        }
        V vsum0 = V{}, vsum1 = V{};
        const V vm = splat(m_new), vc = splat(c);
        for (cc = e0; cc + 2 * W <= e1; cc += 2 * W) {
            V x0 = exp2v((load(srow + cc) - vm) * vc), x1 = exp2v((load(srow + cc + W) - vm) * vc);
            store(srow + cc, x0);
            store(srow + cc + W, x1);
            vsum0 += x0;
            vsum1 += x1;
        }
        if (cc < e1) { V x0 = exp2v((load(srow + cc) - vm) * vc); store(srow + cc, x0); vsum0 += x0; }
        vsum0 += vsum1;
        const T row_sum = hsum(vsum0);
        const T a = exp2v(splat((*m - m_new) * c))[0];
        *alpha = a;
        *l = (double)a * *l + (double)row_sum;
        *m = m_new;
        return m_new == __builtin_inf();
    }

    /* The tile-skipping rule: the keys [lo, hi) query i of entry e may see (causal, window, and the
     * bounds [mask_lo, mask_hi) of a key-padding mask: 0 and len_kv without one).  Every kernel (the
     * forward items, decode) skips the keys outside; the logit hook handles the rest of the mask. */
    static inline void visible_keys(const fa_params *p, const fa_entry &e, int64_t i, int64_t mask_lo,
                                    int64_t mask_hi, int64_t *lo_out, int64_t *hi_out) {
        const int64_t pos = i + (p->bottom_right ? e.len_kv - e.len_q : 0);
        int64_t lo = mask_lo, hi = mask_hi;
        if (p->causal && pos + 1 < hi) hi = pos + 1;
        if (p->window_right >= 0 && pos + p->window_right + 1 < hi) hi = pos + p->window_right + 1;
        if (p->window_left >= 0 && pos - p->window_left > lo) lo = pos - p->window_left;
        lo = clamp64(lo, 0, e.len_kv);
        *lo_out = lo;
        *hi_out = clamp64(hi, lo, e.len_kv);
    }

    /* The tile-skipping rule's mask part: a boolean mask that does not vary along the queries
     * (a key-padding mask) and hides the tile's columns [u0, u1) from every query head of the
     * group lets the item skip the tile (as if it were outside the rows' intervals). */
    static bool tile_hidden(const fa_params *p, int64_t b, int64_t hkv, int64_t k0, int64_t u0, int64_t u1) {
        if (!p->mask || p->mask_dtype != FA_MASK_BOOL || p->mask_strides[2] != 0) return false;
        const int64_t heads = p->mask_strides[1] == 0 ? 1 : p->group;
        for (int64_t g = 0; g < heads; ++g) {
            const char *mrow = p->mask + b * p->mask_strides[0] + (hkv * p->group + g) * p->mask_strides[1]
                               + (k0 + u0) * p->mask_strides[3];
            for (int64_t c = 0; c < u1 - u0; ++c)
                if (mrow[c * p->mask_strides[3]]) return false;
        }
        return true;
    }

    /* O_r = alpha O_r + sum of P[c] V[c] over one row's own visible keys that its mask lets
     * through: the slow path of a V tile with a non-finite value (never multiply a masked key). */
    static void o_row_exact(const fa_params *p, const T *prow, const T *vp, int64_t ldv, int64_t c0, int64_t c1,
                            const char *mrow, int64_t mask_sj, T alpha, T *orow, int64_t dvp) {
        for (int64_t dd = 0; dd < dvp; dd += W) store(orow + dd, load(orow + dd) * alpha);
        for (int64_t c = c0; c < c1; ++c) {
            if (mrow && p->mask_dtype == FA_MASK_BOOL && !mrow[c * mask_sj]) continue;
            const V a = splat(prow[c]);
            for (int64_t dd = 0; dd < dvp; dd += W) store(orow + dd, load(orow + dd) + a * load(vp + c * ldv + dd));
        }
    }

    /* A boolean mask that does not vary along the queries (a key-padding mask) bounds every row's keys
     * of (batch b, k/v head hkv) by its first and last True over the group's heads: [lo, hi).  Returns 1
     * when those bounds are the whole mask (every entry inside True for every head of the group, as
     * with padding at the end or the start): the rows' intervals then carry it and the logit hook has
     * nothing left to do.  Without such a mask: [0, len_kv) and 0. */
    static int key_mask_bounds(const fa_params *p, int64_t b, int64_t hkv, int64_t len_kv, int64_t *lo_out,
                               int64_t *hi_out) {
        *lo_out = 0;
        *hi_out = len_kv;
        if (!p->mask || p->mask_dtype != FA_MASK_BOOL || p->mask_strides[2] != 0) return 0;
        const int64_t G = p->group, sj = p->mask_strides[3];
        const int64_t heads = p->mask_strides[1] == 0 ? 1 : G;
        int64_t lo = len_kv, hi = 0;
        for (int64_t g = 0; g < heads; ++g) {
            const char *mrow = p->mask + b * p->mask_strides[0] + (hkv * G + g) * p->mask_strides[1];
            for (int64_t j = 0; j < lo; ++j)
                if (mrow[j * sj]) { lo = j; break; }
            for (int64_t j = len_kv - 1; j >= hi; --j)
                if (mrow[j * sj]) { hi = j + 1; break; }
        }
        if (hi < lo) hi = lo;
        int whole = 1;
        for (int64_t g = 0; g < heads && whole; ++g) {
            const char *mrow = p->mask + b * p->mask_strides[0] + (hkv * G + g) * p->mask_strides[1];
            for (int64_t j = lo; j < hi; ++j)
                if (!mrow[j * sj]) { whole = 0; break; }
        }
        *lo_out = lo;
        *hi_out = hi;
        return whole;
    }

    /* The item's key-padding bounds (key_mask_bounds), and whether its mask still needs the hook. */
    struct item_mask {
        int64_t lo, hi;
        bool hook;
    };

    /* S = A.Bt over the tile's columns [a0, a1) (W-aligned; Bt: kdim x ldb, one tile of K^T or V^T) for
     * the live rows (A: rows x kdim, row stride lda), each row block over its rows' visible columns only
     * ([lo, hi) of its first and last row, keys k0 + c).  Column strips outside, row blocks inside: one
     * strip of Bt (kdim x S_NR vectors) stays in L1 for the whole tile.  S rows have stride ldb. */
    static void scores_tile(int64_t live, const int64_t *lo, const int64_t *hi, int64_t k0, int64_t ncols, int64_t a0,
                            int64_t a1, const T *a, int64_t lda, const T *bt, int64_t ldb, int64_t kdim, T *s) {
        for (int64_t cs = a0; cs < a1; cs += FA_S_NR * W) {
            const bool full = cs + FA_S_NR * W <= a1;
            for (int64_t rb = 0; rb < live; rb += FA_S_MR) {
                const int mr = (int)((live - rb < FA_S_MR) ? live - rb : FA_S_MR);
                const int64_t b0 = round_down(clamp64(lo[rb] - k0, 0, ncols), W);
                const int64_t b1 = round_up(clamp64(hi[rb + mr - 1] - k0, 0, ncols), W);
                if (cs + FA_S_NR * W <= b0 || cs >= b1) continue;
                const T *ablk = a + rb * lda;
                T *sblk = s + rb * ldb;
                if (full && cs >= b0 && cs + FA_S_NR * W <= b1) {
                    s_rows<FA_S_NR>(mr, ablk, lda, bt + cs, ldb, kdim, sblk + cs, ldb);
                } else {
                    /* the part of the strip the block needs, two vectors at a time where it can
                     * (one vector per block would leave the FMA units waiting on each chain) */
                    const int64_t end = a1 < b1 ? a1 : b1;
                    const int64_t e1 = cs + FA_S_NR * W < end ? cs + FA_S_NR * W : end;
                    int64_t cc = cs > b0 ? cs : b0;
                    for (; cc + 2 * W <= e1; cc += 2 * W) s_rows<2>(mr, ablk, lda, bt + cc, ldb, kdim, sblk + cc, ldb);
                    if (cc < e1) s_rows<1>(mr, ablk, lda, bt + cc, ldb, kdim, sblk + cc, ldb);
                }
            }
        }
    }

    /* One pass of the item with the query rows multiplied by qmul, exponents by c and (with a logit
     * hook) the scores by smul (see the header); km: the item's key-padding bounds and whether the
     * mask needs the hook here.  Returns 1 if some row max was +inf or some row sum NaN (a product
     * that overflowed; NaN input gives NaN again on the retry). */
    template <T (*LOAD)(const char *)>
    static int item_pass(const fa_params *p, int64_t bh, int64_t rt, const T *panel, scratch *ws, T qmul, T c,
                         T smul, const item_mask &km) {
        const layout L(p);
        const int64_t d = p->head_dim, dvp = L.dvp, bkvp = L.bkvp;
        const int64_t bq = p->block_q, bkv = p->block_kv, G = p->group;
        const int64_t b = bh / p->heads_kv, hkv = bh % p->heads_kv;
        const fa_entry e = entry(p, b);
        const int64_t r0 = rt * bq;                       /* packed rows: r = i * G + g */
        const int64_t rows = (e.rows * G - r0 < bq) ? e.rows * G - r0 : bq;
        const T *flags = L.flags((T *)panel, d);
        const bool hook = p->softcap > 0 || p->alibi || km.hook;
        const bool bool_mask = km.hook && p->mask_dtype == FA_MASK_BOOL;
        const int64_t mask_lo = km.lo, mask_hi = km.hi;
        /* rows of the entry's queries; the rest (padding of a padded batch) see no key */
        const int64_t live = clamp64(e.len_q * G - r0, 0, rows > 0 ? rows : 0);

        /* each row's position, head and visible keys [lo, hi): the ends never decrease with r */
        for (int64_t r = 0; r < live; ++r) {
            const int64_t i = G == 1 ? r0 + r : (r0 + r) / G;
            ws->row_i[r] = i;
            ws->row_h[r] = G == 1 ? hkv : hkv * G + (r0 + r) % G;
            visible_keys(p, e, i, mask_lo, mask_hi, ws->lo + r, ws->hi + r);
        }
        /* the item's key tiles: the union of its rows' intervals */
        const int64_t kv_lo = live > 0 ? ws->lo[0] : 0, kv_hi = live > 0 ? ws->hi[live - 1] : 0;

        for (int64_t r = 0; r < (rows > 0 ? rows : 0); ++r) {
            if (r < live) {
                const char *qrow = p->q + e.src * p->q_strides[0] + ws->row_h[r] * p->q_strides[1]
                                   + (e.row_q + ws->row_i[r]) * p->q_strides[2];
                T *qp = ws->qp + r * d;
                int64_t dd = 0;
                if (native_rows(p, p->q, p->q_strides)) {   /* whole vectors */
                    const V vq = splat(qmul);
                    for (; dd + W <= d; dd += W) store(qp + dd, load((const T *)qrow + dd) * vq);
                }
                for (; dd < d; ++dd) qp[dd] = LOAD(qrow + dd * p->q_strides[3]) * qmul;
            }
            ws->m[r] = -__builtin_inf();
            ws->l[r] = 0;
            for (int64_t dd = 0; dd < dvp; ++dd) ws->o[r * dvp + dd] = 0;
        }

        int overflow = 0;
        for (int64_t t = kv_lo / bkv; t * bkv < kv_hi; ++t) {
            const int64_t k0 = t * bkv;
            const int64_t ncols = (e.len_kv - k0 < bkv) ? e.len_kv - k0 : bkv;
            const T *kt = L.kt((T *)panel, t, d);
            const T *vp = L.v((T *)panel, t, d);
            /* the tile's columns any row needs, W-aligned: [a0, a1) */
            const int64_t u0 = clamp64(kv_lo - k0, 0, ncols), u1 = clamp64(kv_hi - k0, 0, ncols);
            if (u0 >= u1 || tile_hidden(p, b, hkv, k0, u0, u1)) continue;
            const int64_t a0 = round_down(u0, W), a1 = round_up(u1, W);

            if (km.hook) prefetch_tile_masks<3>(p, ws, b, 0, live < mask_ahead ? live : mask_ahead, k0, ncols);
            /* the next tile's mask rows are asked for during this tile's P.V, a row block at a time */
            const int64_t k0n = k0 + bkv, ncols_n = k0n < kv_hi ? (e.len_kv - k0n < bkv ? e.len_kv - k0n : bkv) : 0;
            scores_tile(live, ws->lo, ws->hi, k0, ncols, a0, a1, ws->qp, d, kt, bkvp, d, ws->s);

            /* logits (the hook), P = 2^((S - m') c), running max / sum, dropout */
            for (int64_t r = 0; r < live; ++r) {
                const int64_t c0 = clamp64(ws->lo[r] - k0, 0, ncols), c1 = clamp64(ws->hi[r] - k0, 0, ncols);
                const int64_t i = ws->row_i[r], h = ws->row_h[r];
                T *srow = ws->s + r * bkvp;
                if (hook && c0 < c1) logit_row(p, e, b, h, i, k0, c0, c1, smul, srow);
                overflow |= softmax_row(srow, a0, a1, c0, c1, c, ws->m + r, ws->l + r, ws->alpha + r);
                if (p->dropout && c0 < c1) apply_dropout(p, b, h, i, k0, c0, c1, srow);
            }

            /* O = alpha O + P.V over each row block's columns (P is 0 outside a row's own keys); a
             * V tile with a non-finite value goes row by row over each row's own keys only */
            if (flags[t] != (T)0) {
                for (int64_t r = 0; r < live; ++r) {
                    const int64_t c0 = clamp64(ws->lo[r] - k0, 0, ncols), c1 = clamp64(ws->hi[r] - k0, 0, ncols);
                    const int64_t i = ws->row_i[r], h = ws->row_h[r];
                    const char *mrow = bool_mask ? p->mask + b * p->mask_strides[0] + h * p->mask_strides[1]
                                                   + i * p->mask_strides[2] + k0 * p->mask_strides[3] : NULL;
                    o_row_exact(p, ws->s + r * bkvp, vp, dvp, c0, c1 > c0 ? c1 : c0, mrow, p->mask_strides[3],
                                ws->alpha[r], ws->o + r * dvp, dvp);
                }
                continue;
            }
            for (int64_t rb = 0; rb < live; rb += FA_O_MR) {
                const int mr = (int)((live - rb < FA_O_MR) ? live - rb : FA_O_MR);
                const int64_t p0 = clamp64(ws->lo[rb] - k0, 0, ncols);
                const int64_t p1 = clamp64(ws->hi[rb + mr - 1] - k0, 0, ncols);
                if (p0 >= p1) {                /* no row of the block sees this tile: alpha = 1 */
                    continue;
                }
                const T *prow = ws->s + rb * bkvp + p0;
                T *orow = ws->o + rb * dvp;
                int64_t cd = 0;
                for (; cd + FA_O_ND * W <= dvp; cd += FA_O_ND * W)
                    o_rows<FA_O_ND>(mr, prow, bkvp, vp + p0 * dvp + cd, dvp, p1 - p0, ws->alpha + rb, orow + cd, dvp);
                for (; cd + 2 * W <= dvp; cd += 2 * W)
                    o_rows<2>(mr, prow, bkvp, vp + p0 * dvp + cd, dvp, p1 - p0, ws->alpha + rb, orow + cd, dvp);
                if (cd < dvp)
                    o_rows<1>(mr, prow, bkvp, vp + p0 * dvp + cd, dvp, p1 - p0, ws->alpha + rb, orow + cd, dvp);
                if (km.hook && ncols_n > 0) prefetch_tile_masks<1>(p, ws, b, rb, rb + mr, k0n, ncols_n);
            }
        }
        for (int64_t r = 0; r < live; ++r) overflow |= ws->l[r] != ws->l[r];
        return overflow;
    }

    template <T (*LOAD)(const char *)>
    static void run_item(const fa_params *p, int64_t bh, int64_t rt, const T *panel, scratch *ws) {
        /* c = scale log2(e) (raw scores) or log2(e) (logits in their own units, the hook's); kept a
         * positive finite number (a huge scale saturates: every weight but the row maximum's
         * underflows, as in exact arithmetic) */
        item_mask km;
        const int whole = key_mask_bounds(p, bh / p->heads_kv, bh % p->heads_kv, entry(p, bh / p->heads_kv).len_kv,
                                          &km.lo, &km.hi);
        km.hook = p->mask && !whole;
        const units u(p, p->softcap > 0 || p->alibi || km.hook);
        double unit = u.unit;
        if (may_overflow<LOAD>(p, bh, rt, panel)) {
            item_pass<LOAD>(p, bh, rt, panel, ws, (T)p->scale, (T)units::log2e, (T)1, km);
            unit = 1.0;
        } else if (item_pass<LOAD>(p, bh, rt, panel, ws, (T)1, u.c_raw, u.smul, km) && p->scale < 1.0) {
            /* a raw product overflowed: scores in their own units (q scale, c = log2 e) */
            const T qmul = (T)p->scale;
            if (qmul > (T)0) {
                item_pass<LOAD>(p, bh, rt, panel, ws, qmul, (T)units::log2e, (T)1, km);
                unit = 1.0;
            }
        }

        /* out = O / l, lse = unit m + ln l, for the rows of the entry's queries (the padding rows of
         * a padded batch get 0 and -inf: they see no key) */
        const int64_t dv = p->head_dim_v, dvp = layout(p).dvp, bq = p->block_q, G = p->group;
        const int64_t b = bh / p->heads_kv, hkv = bh % p->heads_kv;
        const fa_entry e = entry(p, b);
        const int64_t r0 = rt * bq;
        const int64_t rows = (e.rows * G - r0 < bq) ? e.rows * G - r0 : bq;
        for (int64_t r = 0; r < rows; ++r) {
            const int64_t i = (r0 + r) / G, h = hkv * G + (r0 + r) % G;
            T *out = (T *)p->out + e.src * p->out_strides[0] + h * p->out_strides[1] + (e.row_q + i) * p->out_strides[2];
            T *lse = (T *)p->lse + (e.src * p->heads + h) * p->lse_rows + e.row_q + i;
            double row_lse;
            finish_row(ws->o + r * dvp, dv, ws->l[r], ws->m[r], unit, out, &row_lse);
            *lse = (T)row_lse;
        }
    }

    /* The constants of the online softmax (see the header): c = scale log2(e) for raw scores, or log2(e)
     * for logits in their own units (the hook's); a positive finite number (a huge scale saturates: every
     * weight but the row maximum's underflows, as in exact arithmetic).  lse = unit m + ln l. */
    struct units {
        static constexpr double log2e = 1.4426950408889634074;
        T c_raw, smul;
        double unit;
        units(const fa_params *p) : units(p, p->softcap > 0 || p->alibi || p->mask) {}
        units(const fa_params *p, bool hook) {
            const double big = sizeof(T) == 8 ? __DBL_MAX__ : (double)__FLT_MAX__;
            const double tiny = sizeof(T) == 8 ? __DBL_MIN__ : (double)__FLT_MIN__;
            double c = hook ? log2e : p->scale * log2e;
            if (!(c <= big)) c = big;
            if (c < tiny) c = tiny;
            c_raw = (T)c;
            smul = (T)(p->scale <= big ? p->scale : big);
            unit = hook ? 1.0 : p->scale;
        }
    };

    /* out = O / l and lse = unit m + ln l of one row (l = 0: no key, out 0 and lse -inf; l NaN: NaN) */
    static inline void finish_row(const T *o, int64_t dv, double l, T m, double unit, T *out, double *lse) {
        const T inv = l > 0 ? (T)(1.0 / l) : (l == 0 ? (T)0 : (T)l);   /* l NaN stays NaN */
        for (int64_t dd = 0; dd < dv; ++dd) out[dd] = o[dd] * inv;
        *lse = l > 0 ? unit * (double)m + log(l) : (l == 0 ? -__builtin_inf() : l);
    }

#include "decode_tile.h"
#include "flash_bwd_tile.h"
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

/* bytes of one head's panel, or -1 if that size does not fit in int64 */
static int64_t panel_bytes(const fa_params *p) {
    const int64_t elems = p->in_dtype == FA_DTYPE_F64 ? kern<double>::panel_elems(p) : kern<float>::panel_elems(p);
    return elems < 0 ? -1 : elems * (p->in_dtype == FA_DTYPE_F64 ? 8 : 4);
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

static void *bwd_scratch_new(const fa_params *p) {
    if (p->in_dtype == FA_DTYPE_F64) return kern<double>::bwd_scratch_new(p);
    return kern<float>::bwd_scratch_new(p);
}

static void bwd_scratch_free(const fa_params *p, void *ws) {
    if (p->in_dtype == FA_DTYPE_F64) kern<double>::bwd_scratch_free((kern<double>::bscratch *)ws);
    else kern<float>::bwd_scratch_free((kern<float>::bscratch *)ws);
}

static int64_t bwd_panel_bytes(const fa_params *p) {
    const bool f64 = p->in_dtype == FA_DTYPE_F64;
    const int64_t elems = f64 ? kern<double>::bwd_panel_elems(p) : kern<float>::bwd_panel_elems(p);
    return elems < 0 ? -1 : elems * (f64 ? 8 : 4);
}

static int64_t bwd_parts_bytes(const fa_params *p, int64_t nchunk) {
    const bool f64 = p->in_dtype == FA_DTYPE_F64;
    const int64_t elems = f64 ? kern<double>::bwd_parts_elems(p, nchunk) : kern<float>::bwd_parts_elems(p, nchunk);
    return elems < 0 ? -1 : elems * (f64 ? 8 : 4);
}

static int64_t bwd_dim_pad(int in_dtype) { return in_dtype == FA_DTYPE_F64 ? kern<double>::W : kern<float>::W; }

static void bwd_pack_tile(const fa_params *p, int64_t bh, int64_t t, void *panel) {
    switch (p->in_dtype) {
    case FA_DTYPE_F64: kern<double>::bwd_pack_tile<ld_f64>(p, bh, t, (double *)panel); break;
    case FA_DTYPE_F16: kern<float>::bwd_pack_tile<ld_f16>(p, bh, t, (float *)panel); break;
    case FA_DTYPE_BF16: kern<float>::bwd_pack_tile<ld_bf16>(p, bh, t, (float *)panel); break;
    default: kern<float>::bwd_pack_tile<ld_f32>(p, bh, t, (float *)panel); break;
    }
}

static void bwd_item(const fa_params *p, const fa_bwd *g, int64_t bh, int64_t chunk, const void *panel, void *parts,
                     void *ws) {
    switch (p->in_dtype) {
    case FA_DTYPE_F64:
        kern<double>::bwd_item<ld_f64>(p, g, bh, chunk, (const double *)panel, (double *)parts,
                                       (kern<double>::bscratch *)ws);
        break;
    case FA_DTYPE_F16:
        kern<float>::bwd_item<ld_f16>(p, g, bh, chunk, (const float *)panel, (float *)parts, (kern<float>::bscratch *)ws);
        break;
    case FA_DTYPE_BF16:
        kern<float>::bwd_item<ld_bf16>(p, g, bh, chunk, (const float *)panel, (float *)parts, (kern<float>::bscratch *)ws);
        break;
    default:
        kern<float>::bwd_item<ld_f32>(p, g, bh, chunk, (const float *)panel, (float *)parts, (kern<float>::bscratch *)ws);
        break;
    }
}

static void bwd_reduce(const fa_params *p, const fa_bwd *g, int64_t bh, int64_t row, const void *parts) {
    if (p->in_dtype == FA_DTYPE_F64) kern<double>::bwd_reduce(p, g, bh, row, (const double *)parts);
    else kern<float>::bwd_reduce(p, g, bh, row, (const float *)parts);
}

static void *decode_scratch_new(const fa_params *p) {
    if (p->in_dtype == FA_DTYPE_F64) return kern<double>::decode_scratch_new(p);
    return kern<float>::decode_scratch_new(p);
}

static void decode_scratch_free(const fa_params *p, void *ws) {
    if (p->in_dtype == FA_DTYPE_F64) kern<double>::decode_scratch_free((kern<double>::dscratch *)ws);
    else kern<float>::decode_scratch_free((kern<float>::dscratch *)ws);
}

static int64_t decode_parts_bytes(const fa_params *p, int64_t nsplit) {
    const bool f64 = p->in_dtype == FA_DTYPE_F64;
    const int64_t elems = f64 ? kern<double>::decode_parts_elems(p, nsplit) : kern<float>::decode_parts_elems(p, nsplit);
    if (elems < 0 || elems > INT64_MAX / 16) return -1;
    /* the O/l parts (dvp per row and split), then one double per (row, split) */
    const int64_t dvp = f64 ? kern<double>::round_up(p->head_dim_v, kern<double>::W)
                            : kern<float>::round_up(p->head_dim_v, kern<float>::W);
    return elems * (f64 ? 8 : 4) + elems / dvp * 8;
}

static void decode_item(const fa_params *p, int64_t bh, int64_t split, int64_t nsplit, void *parts, void *ws) {
    switch (p->in_dtype) {
    case FA_DTYPE_F64:
        kern<double>::decode_item<ld_f64>(p, bh, split, nsplit, parts, (kern<double>::dscratch *)ws);
        break;
    case FA_DTYPE_F16:
        kern<float>::decode_item<ld_f16>(p, bh, split, nsplit, parts, (kern<float>::dscratch *)ws);
        break;
    case FA_DTYPE_BF16:
        kern<float>::decode_item<ld_bf16>(p, bh, split, nsplit, parts, (kern<float>::dscratch *)ws);
        break;
    default:
        kern<float>::decode_item<ld_f32>(p, bh, split, nsplit, parts, (kern<float>::dscratch *)ws);
        break;
    }
}

static void decode_merge(const fa_params *p, int64_t x, int64_t nsplit, const void *parts) {
    if (p->in_dtype == FA_DTYPE_F64) kern<double>::decode_merge(p, x, nsplit, parts);
    else kern<float>::decode_merge(p, x, nsplit, parts);
}

#undef FA_VBYTES
#undef FA_S_MR
#undef FA_S_NR
#undef FA_O_MR
#undef FA_O_ND
#undef FA_D_MR
#undef FA_S_CHUNK
#undef FA_O_CHUNK
