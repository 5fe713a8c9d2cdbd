/* Decode: the rows of one (batch entry, k/v head) against its keys, read in place.  Included inside
 * kern<T> (flash_tile.h): the same vector type, exp2v, the logit hook, softmax_row, visible_keys,
 * units and finish_row.
 *
 * Math: run_item's (see flash_tile.h's header), over one split [s0, s1) of the rows' visible keys, for
 * each k/v head of the item (decode_heads neighbours: read tile by tile, the heads of a key side by side):
 *   rows r = i * G + g: query position i of query head h = h_kv * G + g (the group shares K/V, so each
 *   K/V byte is read once per group);
 *   for each tile of DEC_TK keys: S = Q.K^T (dot products along d), the hook and mask, the online
 *   softmax step (m, l in double, alpha), O = alpha O + P.V (a fresh sum per tile);
 *   one split: out = O / l, lse = unit m + ln l;  several: each split's (O / l, lse) goes to parts and
 *   fa_decode_merge forms  lse = log sum_s e^(lse_s),  out = sum_s e^(lse_s - lse) out_s.
 *
 * Data path: a key's K and V rows are found by fa_kv_row (row_walk: any strides, a paged cache's blocks); rows of
 * float data with unit stride and a multiple of the vector width are read where they lie, others are
 * converted (or padded) into the per-thread tile buffers first.  No packing of the cache.
 *
 * Masked keys never contribute: a row's S outside its visible keys is -inf (softmax_row), and when the
 * rows of a tile see different keys (the causal edge of a chunk, a window's edge) each row's P.V runs
 * over its own keys only, so a NaN or inf in V behind the mask never reaches it.
 */

enum { DEC_TK = 32 };   /* keys per tile: the K and V tiles of converted data stay in L1 */

struct dscratch {
    T *q, *s, *o, *m, *alpha, *kbuf, *vbuf;
    double *l;
    int64_t *lo, *hi;
    const T **krow, **vrow;
    void *block;
};

static dscratch *decode_scratch_new(const fa_params *p) {
    const int64_t R = p->seq_q * p->group, dp = round_up(p->head_dim, W), dvp = round_up(p->head_dim_v, W);
    const int64_t Rt = mul_checked(R, p->decode_heads);   /* the rows of every k/v head of an item */
    const int64_t tk = round_up((int64_t)DEC_TK, W);
    const int64_t wide = (int64_t)(sizeof(double) / sizeof(T));   /* T slots per double / int64 / pointer */
    const int64_t sizes[11] = {mul_checked(Rt, dp), mul_checked(Rt, tk), mul_checked(Rt, dvp), Rt, Rt,
                               mul_checked(tk, dp), mul_checked(tk, dvp), mul_checked(Rt, wide),
                               mul_checked(R, wide), mul_checked(R, wide), mul_checked(2 * tk, wide)};
    const int64_t pad = 64 / (int64_t)sizeof(T);
    int64_t total = 0;
    for (int i = 0; i < 11; ++i) total = add_checked(total, add_checked(round_up(sizes[i] < 0 ? -1 : sizes[i], pad), pad));
    const int64_t bytes = mul_checked(total, (int64_t)sizeof(T));
    if (total < 0 || bytes < 0 || bytes > INT64_MAX - 64) return NULL;
    dscratch *ws = (dscratch *)calloc(1, sizeof(dscratch));
    if (!ws) return NULL;
    ws->block = aligned_alloc(64, (size_t)round_up(bytes, 64));
    if (!ws->block) { free(ws); return NULL; }
    T *cur = (T *)ws->block, *starts[11];
    for (int i = 0; i < 11; ++i) { starts[i] = cur; cur += round_up(sizes[i], pad) + pad; }
    ws->q = starts[0]; ws->s = starts[1]; ws->o = starts[2]; ws->m = starts[3]; ws->alpha = starts[4];
    ws->kbuf = starts[5]; ws->vbuf = starts[6];
    ws->l = (double *)starts[7]; ws->lo = (int64_t *)starts[8]; ws->hi = (int64_t *)starts[9];
    ws->krow = (const T **)starts[10]; ws->vrow = ws->krow + tk;
    /* the pad columns of the converted tiles stay zero */
    for (int64_t i = 0; i < sizes[5]; ++i) ws->kbuf[i] = 0;
    for (int64_t i = 0; i < sizes[6]; ++i) ws->vbuf[i] = 0;
    return ws;
}

static void decode_scratch_free(dscratch *ws) {
    if (ws) { free(ws->block); free(ws); }
}

static inline int64_t elem_bytes(const fa_params *p) {
    return p->in_dtype == FA_DTYPE_F64 ? 8 : (p->in_dtype == FA_DTYPE_F32 ? 4 : 2);
}

/* Horizontal sums, four at a time: each vector folded to 16 bytes (4 floats or 2 doubles), then the
 * four folded vectors transposed and added.  Every shuffle mask is a constant. */
typedef T V16 __attribute__((vector_size(16)));
typedef typename vec_traits<T>::I I16 __attribute__((vector_size(16)));

static inline V16 fold16(V v) {
    V16 acc, part;
    memcpy(&acc, &v, 16);
    for (int o = 16; o < FA_VBYTES; o += 16) {
        memcpy(&part, (const char *)&v + o, 16);
        acc += part;
    }
    return acc;
}

static inline void hsum4(const V *x, T *out) {
    const V16 a = fold16(x[0]), b = fold16(x[1]), c = fold16(x[2]), d = fold16(x[3]);
    if constexpr (sizeof(T) == 4) {
        const V16 u0 = __builtin_shuffle(a, b, I16{0, 4, 1, 5}) + __builtin_shuffle(a, b, I16{2, 6, 3, 7});
        const V16 u1 = __builtin_shuffle(c, d, I16{0, 4, 1, 5}) + __builtin_shuffle(c, d, I16{2, 6, 3, 7});
        const V16 r = __builtin_shuffle(u0, u1, I16{0, 1, 4, 5}) + __builtin_shuffle(u0, u1, I16{2, 3, 6, 7});
        memcpy(out, &r, 16);
    } else {
        const V16 ab = __builtin_shuffle(a, b, I16{0, 2}) + __builtin_shuffle(a, b, I16{1, 3});
        const V16 cd = __builtin_shuffle(c, d, I16{0, 2}) + __builtin_shuffle(c, d, I16{1, 3});
        memcpy(out, &ab, 16);
        memcpy(out + 2, &cd, 16);
    }
}

/* W elements of a K or V row from element dd on: the row's own T values (BF = 0), or bfloat16 widened
 * by a shift into a float's top half (BF = 1: read where it lies, no conversion pass). */
template <int BF>
static inline V ldrow(const T *row, int64_t dd) {
    if constexpr (BF == 1 && sizeof(T) == 4) {
        typedef uint16_t VH __attribute__((vector_size(W * 2), aligned(2), may_alias));
        return (V)(__builtin_convertvector(*(const VH *)((const uint16_t *)(const void *)row + dd), VI) << 16);
    } else {
        return load(row + dd);
    }
}

/* S[r][c] = q_r . k_c for MR rows and columns [c0, c1): KB keys at a time, MR x KB accumulators (8 keys for a
 * single row: with 4, each accumulator's chain of FMAs along d would leave the FMA units waiting on its latency). */
template <int MR, int BF>
static void dec_score_rows(const T *q, int64_t dp, const T *const *krow, int64_t c0, int64_t c1, T *s,
                           int64_t lds) {
    constexpr int KB = MR == 1 ? 8 : 4;
    int64_t c = c0;
    for (; c + KB <= c1; c += KB) {
        V acc[MR][KB];
        for (int i = 0; i < MR; ++i)
            for (int j = 0; j < KB; ++j) acc[i][j] = V{};
        const T *kr[KB];
        for (int j = 0; j < KB; ++j) kr[j] = krow[c + j];
        for (int64_t dd = 0; dd < dp; dd += W) {
            V kv[KB];
            for (int j = 0; j < KB; ++j) kv[j] = ldrow<BF>(kr[j], dd);
            for (int i = 0; i < MR; ++i) {
                const V qv = load(q + i * dp + dd);
                for (int j = 0; j < KB; ++j) acc[i][j] += qv * kv[j];
            }
        }
        for (int i = 0; i < MR; ++i)
            for (int j = 0; j < KB; j += 4) hsum4(acc[i] + j, s + i * lds + c + j);
    }
    for (; c < c1; ++c) {
        V acc[MR];
        for (int i = 0; i < MR; ++i) acc[i] = V{};
        for (int64_t dd = 0; dd < dp; dd += W) {
            const V kv = ldrow<BF>(krow[c], dd);
            for (int i = 0; i < MR; ++i) acc[i] += load(q + i * dp + dd) * kv;
        }
        for (int i = 0; i < MR; ++i) s[i * lds + c] = hsum(acc[i]);
    }
}

/* S[r][c] = q_r . k_c for rows [0, R) and columns [c0, c1), q rows of dp (a multiple of W) elements. */
template <int BF>
static void dec_scores(const T *q, int64_t R, int64_t dp, const T *const *krow, int64_t c0, int64_t c1, T *s,
                       int64_t lds) {
    for (int64_t rb = 0; rb < R; rb += FA_D_MR) {
        const int64_t mr = R - rb < FA_D_MR ? R - rb : FA_D_MR;
        const T *qb = q + rb * dp;
        T *sb = s + rb * lds;
        switch (mr) {
#define FA_CASE(M) case M: dec_score_rows<(M <= FA_D_MR ? M : 1), BF>(qb, dp, krow, c0, c1, sb, lds); break;
            FA_CASE(1) FA_CASE(2) FA_CASE(3) FA_CASE(4)
#undef FA_CASE
        }
    }
}

/* O[r] = alpha[r] O[r] + sum_{c in [c0, c1)} P[r][c] v_c for rows [r0, r1) sharing [c0, c1). */
template <int BF>
static void dec_pv(const T *s, int64_t lds, const T *const *vrow, int64_t c0, int64_t c1, const T *alpha,
                   T *o, int64_t dvp, int64_t r0, int64_t r1) {
    for (int64_t rb = r0; rb < r1; rb += FA_O_MR) {
        const int mr = (int)(r1 - rb < FA_O_MR ? r1 - rb : FA_O_MR);
        for (int64_t cd = 0; cd < dvp; cd += FA_O_ND * W) {
            const int nd = (int)((dvp - cd) / W < FA_O_ND ? (dvp - cd) / W : FA_O_ND);
            if (mr == 1) {   /* one row: even and odd keys into two sets of sums, twice the chains of FMAs */
                V even[FA_O_ND], odd[FA_O_ND];
                for (int j = 0; j < FA_O_ND; ++j) even[j] = odd[j] = V{};
                const T *srow = s + rb * lds;
                int64_t c = c0;
                for (; c + 2 <= c1; c += 2) {
                    const V a0 = splat(srow[c]), a1 = splat(srow[c + 1]);
                    for (int j = 0; j < FA_O_ND; ++j)
                        if (j < nd) {
                            even[j] += a0 * ldrow<BF>(vrow[c], cd + j * W);
                            odd[j] += a1 * ldrow<BF>(vrow[c + 1], cd + j * W);
                        }
                }
                if (c < c1) {
                    const V a0 = splat(srow[c]);
                    for (int j = 0; j < FA_O_ND; ++j)
                        if (j < nd) even[j] += a0 * ldrow<BF>(vrow[c], cd + j * W);
                }
                T *orow = o + rb * dvp + cd;
                for (int j = 0; j < nd; ++j) store(orow + j * W, load(orow + j * W) * alpha[rb] + (even[j] + odd[j]));
                continue;
            }
            V acc[FA_O_MR][FA_O_ND];
            for (int i = 0; i < FA_O_MR; ++i)
                for (int j = 0; j < FA_O_ND; ++j) acc[i][j] = V{};
            for (int64_t c = c0; c < c1; ++c) {
                V vb[FA_O_ND];
                for (int j = 0; j < FA_O_ND; ++j) vb[j] = j < nd ? ldrow<BF>(vrow[c], cd + j * W) : V{};
                for (int i = 0; i < FA_O_MR; ++i) {
                    if (i < mr) {
                        const V a = splat(s[(rb + i) * lds + c]);
                        for (int j = 0; j < FA_O_ND; ++j) acc[i][j] += a * vb[j];
                    }
                }
            }
            for (int i = 0; i < mr; ++i) {
                T *orow = o + (rb + i) * dvp + cd;
                for (int j = 0; j < nd; ++j) store(orow + j * W, load(orow + j * W) * alpha[rb + i] + acc[i][j]);
            }
        }
    }
}

enum { DIRECT_NONE = -1, DIRECT_T = 0, DIRECT_BF16 = 1 };

/* How rows of n elements (np: padded to W) with these strides are read: where they lie as T (DIRECT_T),
 * where they lie as bfloat16 (DIRECT_BF16), or converted into the tile buffers first (DIRECT_NONE). */
static inline int direct_rows(const fa_params *p, const int64_t *strides, int64_t n, int64_t np) {
    if (n != np) return DIRECT_NONE;
    if (p->in_dtype == (sizeof(T) == 8 ? FA_DTYPE_F64 : FA_DTYPE_F32) && strides[3] == (int64_t)sizeof(T))
        return DIRECT_T;
    if (sizeof(T) == 4 && p->in_dtype == FA_DTYPE_BF16 && strides[3] == 2) return DIRECT_BF16;
    return DIRECT_NONE;
}

/* fa_kv_row's addresses of rows j0, j0 + 1, ... of entry e, head h, one after the other: one division per
 * walk instead of one per row of a paged cache. */
struct row_walk {
    const char *ptr, *head;
    const int32_t *table;
    int64_t step, block_stride, bs, jb, off;
    row_walk(const fa_params *p, const char *base, const int64_t *strides, const fa_entry &e, int64_t h, int64_t j0)
        : step(strides[2]), block_stride(strides[0]), bs(p->block_size) {
        table = p->block_table ? p->block_table + e.src * p->table_stride : NULL;
        head = base + h * strides[1];
        ptr = table ? NULL : head + e.src * strides[0] + (e.row_kv + j0) * strides[2];
        jb = table ? j0 / bs : 0;
        off = table ? j0 % bs : 0;
    }
    inline const char *next() {
        if (!table) {
            const char *row = ptr;
            ptr += step;
            return row;
        }
        const char *row = head + table[jb] * block_stride + off * step;
        if (++off == bs) { off = 0; ++jb; }
        return row;
    }
};

/* The tile's K (or V) rows of keys [k0 + u0, k0 + u1): pointers to the data itself when it can be read
 * as T vectors (T data, unit stride, n a multiple of W), else rows converted into buf (zero padded). */
template <T (*LOAD)(const char *)>
static void dec_rows(const fa_params *p, const char *base, const int64_t *strides, const fa_entry &e, int64_t h,
                     int64_t k0, int64_t u0, int64_t u1, int64_t n, int64_t np, T *buf, const T **rows) {
    const bool direct = direct_rows(p, strides, n, np) != DIRECT_NONE;
    row_walk walk(p, base, strides, e, h, k0 + u0);
    for (int64_t c = u0; c < u1; ++c) {
        const char *src = walk.next();
        if (direct) {
            rows[c] = (const T *)src;
            continue;
        }
        T *dst = buf + c * np;
        int64_t dd = 0;
        if (sizeof(T) == 4 && strides[3] == 2 && p->in_dtype == FA_DTYPE_BF16)   /* widened as ldrow does */
            for (; dd + W <= n; dd += W) store(dst + dd, ldrow<1>((const T *)(const void *)src, dd));
        for (; dd < n; ++dd) dst[dd] = LOAD(src + dd * strides[3]);
        rows[c] = dst;
    }
}

/* An item: batch entry b and the k/v heads [h0, h1) (decode_heads of them: heads whose rows lie side by
 * side in memory, so a tile's keys are read as a few long runs), one split of the keys. */
static inline void item_heads(const fa_params *p, int64_t item, int64_t *b, int64_t *h0, int64_t *h1) {
    const int64_t chunks = (p->heads_kv + p->decode_heads - 1) / p->decode_heads;
    *b = item / chunks;
    *h0 = item % chunks * p->decode_heads;
    *h1 = *h0 + p->decode_heads < p->heads_kv ? *h0 + p->decode_heads : p->heads_kv;
}

/* One pass of a decode item (qmul, c, smul as item_pass's); returns 1 if some row max was +inf or some
 * row sum NaN.  Rows: head j = hkv - h0 of the item owns rows [j R, (j + 1) R); their visible keys
 * depend on the position only (lo, hi: R of them). */
template <T (*LOAD)(const char *)>
static int decode_pass(const fa_params *p, int64_t item, int64_t split, int64_t nsplit, dscratch *ws, T qmul, T c,
                       T smul) {
    const int64_t G = p->group, d = p->head_dim, dp = round_up(d, W), dvp = round_up(p->head_dim_v, W);
    const int64_t tk = round_up((int64_t)DEC_TK, W);
    int64_t b, h0, h1;
    item_heads(p, item, &b, &h0, &h1);
    const fa_entry e = entry(p, b);
    const int64_t R = e.len_q * G;
    const bool hook = p->softcap > 0 || p->alibi || p->mask;
    for (int64_t r = 0; r < R; ++r) visible_keys(p, e, r / G, 0, e.len_kv, ws->lo + r, ws->hi + r);
    for (int64_t hkv = h0; hkv < h1; ++hkv) {
        for (int64_t r = 0; r < R; ++r) {
            const int64_t x = (hkv - h0) * R + r;
            const char *qrow = p->q + e.src * p->q_strides[0] + (hkv * G + r % G) * p->q_strides[1]
                               + (e.row_q + r / G) * p->q_strides[2];
            for (int64_t dd = 0; dd < d; ++dd) ws->q[x * dp + dd] = LOAD(qrow + dd * p->q_strides[3]) * qmul;
            for (int64_t dd = d; dd < dp; ++dd) ws->q[x * dp + dd] = 0;
            ws->m[x] = -__builtin_inf();
            ws->l[x] = 0;
            for (int64_t dd = 0; dd < dvp; ++dd) ws->o[x * dvp + dd] = 0;
        }
    }
    if (R == 0) return 0;
    /* this split's keys: whole tiles of the rows' union [lo[0], hi[R-1]) (both ends grow with r) */
    const int64_t kv_lo = ws->lo[0], kv_hi = ws->hi[R - 1];
    const int64_t n_tiles = (kv_hi - kv_lo + DEC_TK - 1) / DEC_TK, per = (n_tiles + nsplit - 1) / nsplit;
    const int64_t s0 = kv_lo + split * per * DEC_TK;
    const int64_t s1 = s0 + per * DEC_TK < kv_hi ? s0 + per * DEC_TK : kv_hi;
    const int64_t eb = elem_bytes(p), kb = d * eb, vb = p->head_dim_v * eb;
    const bool dense = p->k_strides[3] == eb && p->v_strides[3] == eb;   /* rows to prefetch are contiguous */
    const bool k_bf16 = direct_rows(p, p->k_strides, d, dp) == DIRECT_BF16;
    const auto pv = direct_rows(p, p->v_strides, p->head_dim_v, dvp) == DIRECT_BF16 ? dec_pv<1> : dec_pv<0>;
    int overflow = 0;
    for (int64_t k0 = s0; k0 < s1; k0 += DEC_TK) {
        const int64_t nc = s1 - k0 < DEC_TK ? s1 - k0 : DEC_TK;
        const int64_t u0 = clamp64(kv_lo - k0, 0, nc), u1 = clamp64(kv_hi - k0, 0, nc);
        if (u0 >= u1) continue;
        const int64_t a0 = round_down(u0, W), a1 = round_up(u1, W);
        const int64_t n1 = k0 + DEC_TK < s1 ? (s1 - k0 - DEC_TK < DEC_TK ? s1 - k0 - DEC_TK : DEC_TK) : 0;
        for (int64_t hkv = h0; hkv < h1; ++hkv) {
            /* the rows of the next (head, tile) of the item, one head's tile ahead of use */
            const int64_t ph = hkv + 1 < h1 ? hkv + 1 : h0, pk = hkv + 1 < h1 ? k0 : k0 + DEC_TK;
            const int64_t pn = hkv + 1 < h1 ? u1 : n1;
            const int64_t pc0 = hkv + 1 < h1 ? u0 : 0;
            row_walk kw(p, p->k, p->k_strides, e, ph, pk + pc0), vw(p, p->v, p->v_strides, e, ph, pk + pc0);
            for (int64_t cc = pc0; cc < pn && dense; ++cc) {
                const char *kr = kw.next(), *vr = vw.next();
                for (int64_t x = 0; x < kb; x += 64) __builtin_prefetch(kr + x, 0, 1);
                for (int64_t x = 0; x < vb; x += 64) __builtin_prefetch(vr + x, 0, 1);
            }
            const int64_t far = k0 + DEC_TK, n2 = n1;   /* the next tile (further ahead measured no better) */
            if (p->block_table && h1 - h0 > 1 && n2 > 0 && dense) {
                /* a paged cache: its blocks lie anywhere, so no hardware prefetcher follows them; each head's
                 * turn also fetches (into L2) its share of the next tile's keys, all the item's heads of a
                 * key at once (they lie side by side) */
                const int64_t j = hkv - h0, nh = h1 - h0, t0 = j * n2 / nh, t1 = (j + 1) * n2 / nh;
                const int64_t kspan = (nh - 1) * p->k_strides[1] + kb, vspan = (nh - 1) * p->v_strides[1] + vb;
                row_walk kn(p, p->k, p->k_strides, e, h0, far + t0);
                row_walk vn(p, p->v, p->v_strides, e, h0, far + t0);
                for (int64_t t = t0; t < t1; ++t) {
                    const char *kr = kn.next(), *vr = vn.next();
                    for (int64_t x = 0; x < kspan; x += 64) __builtin_prefetch(kr + x, 0, 2);
                    for (int64_t x = 0; x < vspan; x += 64) __builtin_prefetch(vr + x, 0, 2);
                }
            }
            const int64_t x0 = (hkv - h0) * R;
            T *S = ws->s + x0 * tk, *O = ws->o + x0 * dvp, *A = ws->alpha + x0;
            dec_rows<LOAD>(p, p->k, p->k_strides, e, hkv, k0, u0, u1, d, dp, ws->kbuf, ws->krow);
            dec_rows<LOAD>(p, p->v, p->v_strides, e, hkv, k0, u0, u1, p->head_dim_v, dvp, ws->vbuf, ws->vrow);
            if (k_bf16) dec_scores<1>(ws->q + x0 * dp, R, dp, ws->krow, u0, u1, S, tk);
            else dec_scores<0>(ws->q + x0 * dp, R, dp, ws->krow, u0, u1, S, tk);
            bool uniform = true;
            int64_t c0_all = 0, c1_all = 0;
            for (int64_t r = 0; r < R; ++r) {
                const int64_t c0 = clamp64(ws->lo[r] - k0, u0, u1), c1 = clamp64(ws->hi[r] - k0, c0, u1);
                T *srow = S + r * tk;
                if (hook && c0 < c1) logit_row(p, e, b, hkv * G + r % G, r / G, k0, c0, c1, smul, srow);
                overflow |= softmax_row(srow, a0, a1, c0, c1, c, ws->m + x0 + r, ws->l + x0 + r, A + r);
                if (r == 0) { c0_all = c0; c1_all = c1; }
                else if (c0 != c0_all || c1 != c1_all) uniform = false;
            }
            if (uniform) {
                if (c0_all < c1_all) pv(S, tk, ws->vrow, c0_all, c1_all, A, O, dvp, 0, R);
                continue;
            }
            for (int64_t r = 0; r < R; ++r) {   /* rows of different keys: each over its own only */
                const int64_t c0 = clamp64(ws->lo[r] - k0, u0, u1), c1 = clamp64(ws->hi[r] - k0, c0, u1);
                if (c0 < c1) pv(S, tk, ws->vrow, c0, c1, A, O, dvp, r, r + 1);
                /* else no key of this tile: softmax_row left m, and so O (alpha = 1), as they were */
            }
        }
    }
    for (int64_t x = 0; x < (h1 - h0) * R; ++x) overflow |= ws->l[x] != ws->l[x];   /* inf - inf in a product */
    return overflow;
}

/* parts: for output row x = (b * heads + h) * seq_q + i and split s, O/l at [(x * nsplit + s) * dvp], then
 * every lse (double) after all of them. */
static int64_t decode_parts_elems(const fa_params *p, int64_t nsplit) {
    const int64_t rows = mul_checked(mul_checked(p->batch, p->heads), p->seq_q);
    return mul_checked(mul_checked(rows, nsplit), round_up(p->head_dim_v, W));
}

template <T (*LOAD)(const char *)>
static void decode_item(const fa_params *p, int64_t item, int64_t split, int64_t nsplit, void *parts,
                        dscratch *ws) {
    const units u(p);
    double unit = u.unit;
    if (decode_pass<LOAD>(p, item, split, nsplit, ws, (T)1, u.c_raw, u.smul) && p->scale < 1.0) {
        const T qmul = (T)p->scale;   /* a raw product overflowed: scores in their own units */
        if (qmul > (T)0) {
            decode_pass<LOAD>(p, item, split, nsplit, ws, qmul, (T)units::log2e, (T)1);
            unit = 1.0;
        }
    }
    const int64_t G = p->group, dv = p->head_dim_v, dvp = round_up(dv, W);
    int64_t b, h0, h1;
    item_heads(p, item, &b, &h0, &h1);
    const fa_entry e = entry(p, b);
    const int64_t R = e.len_q * G;
    T *part_o = (T *)parts;
    double *part_lse = parts ? (double *)(part_o + decode_parts_elems(p, nsplit)) : NULL;
    for (int64_t x = 0; x < (h1 - h0) * R; ++x) {
        const int64_t r = x % R, i = r / G, h = (h0 + x / R) * G + r % G;
        double lse;
        if (nsplit == 1) {
            T *out = (T *)p->out + e.src * p->out_strides[0] + h * p->out_strides[1] + (e.row_q + i) * p->out_strides[2];
            finish_row(ws->o + x * dvp, dv, ws->l[x], ws->m[x], unit, out, &lse);
            ((T *)p->lse)[(e.src * p->heads + h) * p->lse_rows + e.row_q + i] = (T)lse;
        } else {
            const int64_t y = ((b * p->heads + h) * p->seq_q + i) * nsplit + split;
            finish_row(ws->o + x * dvp, dv, ws->l[x], ws->m[x], unit, part_o + y * dvp, &lse);
            part_lse[y] = lse;
        }
    }
}

/* Output row x = (b * heads + h) * seq_q + i from its splits (merge_attention's math). */
static void decode_merge(const fa_params *p, int64_t x, int64_t nsplit, const void *parts) {
    const int64_t dv = p->head_dim_v, dvp = round_up(dv, W);
    const T *part_o = (const T *)parts + x * nsplit * dvp;
    const double *lse_s = (const double *)((const T *)parts + decode_parts_elems(p, nsplit)) + x * nsplit;
    const int64_t i = x % p->seq_q, h = (x / p->seq_q) % p->heads, b = x / (p->seq_q * p->heads);
    T *out = (T *)p->out + b * p->out_strides[0] + h * p->out_strides[1] + i * p->out_strides[2];
    T *lse = (T *)p->lse + (b * p->heads + h) * p->lse_rows + i;
    double top = -__builtin_inf(), nan = 0;
    for (int64_t s = 0; s < nsplit; ++s) {
        if (lse_s[s] != lse_s[s]) nan = lse_s[s];
        else if (lse_s[s] > top) top = lse_s[s];
    }
    if (nan != nan || top == -__builtin_inf()) {   /* a NaN part: NaN; no key in any split: 0 and -inf */
        const T fill = nan != nan ? (T)nan : (T)0;
        for (int64_t dd = 0; dd < dv; ++dd) out[dd] = fill;
        *lse = nan != nan ? (T)nan : -(T)__builtin_inf();
        return;
    }
    double total = 0;
    for (int64_t s = 0; s < nsplit; ++s) total += exp(lse_s[s] - top);
    for (int64_t dd = 0; dd < dv; ++dd) {
        double acc = 0;
        for (int64_t s = 0; s < nsplit; ++s) {
            const double w = exp(lse_s[s] - top);
            if (w > 0) acc += w * (double)part_o[s * dvp + dd];   /* a split without keys adds nothing */
        }
        out[dd] = (T)(acc / total);
    }
    *lse = (T)(top + log(total));
}
