/* fastattn CPU kernel: the C interface the Cython driver calls.
 *
 * The (batch entry, k/v head) pairs are processed in groups.  For each group, fa_pack_tile packs
 * every key/value tile of its pairs into one panel per pair (fa_panel_bytes each); then one work
 * item per (pair bh, row tile rt), fa_run_item, computes the output rows of that tile over every
 * key tile its mask lets it see, with the online softmax, and writes out and lse.  A row tile
 * holds block_q "packed rows" r = i * group + g: query position i of query head
 * h = h_kv * group + g (grouped-query attention: the group's heads share the k/v panel).  Items
 * only read the panels, so any thread may run any item; a thread keeps its own tile scratch
 * (fa_scratch_new).  bh = b * heads_kv + h_kv.
 *
 * The mask (fastattn/_masks.py): per batch entry b with len_q queries and len_kv keys and
 * off = len_kv - len_q (bottom_right) or 0, query i sees keys j with
 *   (!causal || j <= i + off) && (window_left < 0 || j >= i + off - window_left)
 *   && (window_right < 0 || j <= i + off + window_right) && (no bool mask || mask[b, h, i, j]);
 * logits: scale q.k, then softcap tanh, minus alibi[b, h] |i + len_kv - len_q - j|, plus a float mask.
 */
#ifndef FASTATTN_FLASH_CPU_H
#define FASTATTN_FLASH_CPU_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum { FA_DTYPE_F32 = 0, FA_DTYPE_F64 = 1, FA_DTYPE_F16 = 2, FA_DTYPE_BF16 = 3 };
enum { FA_ISA_GENERIC = 0, FA_ISA_AVX2 = 1, FA_ISA_AVX512 = 2, FA_ISA_COUNT = 3 };
enum { FA_MASK_BOOL = 1, FA_MASK_F16 = 2, FA_MASK_BF16 = 3, FA_MASK_F32 = 4, FA_MASK_F64 = 5 };

typedef struct {
    const char *q, *k, *v;          /* base pointers of the 4-D (b, h, s, d) views (k/v: h_kv heads) */
    int64_t q_strides[4];           /* byte strides (any sign) */
    int64_t k_strides[4];
    int64_t v_strides[4];
    void *out;                      /* (b, h, s, d_v) of the compute type, unit stride along d */
    int64_t out_strides[3];         /* element strides of b, h, s (any layout) */
    void *lse;                      /* contiguous (b, h, lse_rows) of the compute type */
    int64_t lse_rows;
    int in_dtype;                   /* FA_DTYPE_* */
    int64_t batch;                  /* batch entries (sequences of a packed call) */
    int64_t heads, heads_kv, group; /* query heads, k/v heads, heads / heads_kv */
    int64_t seq_q, seq_kv;          /* padded (or longest) lengths */
    int64_t head_dim, head_dim_v;
    int64_t block_q, block_kv;      /* block_q counts packed rows (positions x group) */
    double scale;
    /* the mask */
    int causal, bottom_right;
    int64_t window_left, window_right;  /* -1: unbounded */
    double softcap;                     /* 0: off */
    const float *alibi;                 /* slopes: alibi[b * alibi_sb + h], or NULL */
    int64_t alibi_sb;
    const char *mask;                   /* attn_mask (b, h, s_q, s_kv) through mask_strides (bytes), or NULL */
    int mask_dtype;                     /* FA_MASK_* */
    int64_t mask_strides[4];
    const int32_t *lens_q, *lens_kv;    /* padded ragged batch: each entry's lengths, or NULL */
    const int32_t *cu_q, *cu_kv;        /* packed batch: where each sequence starts, or NULL */
    /* a paged k/v cache: the k/v views are (num_blocks, h_kv, block_size, d); key j of batch entry b is
     * row j % block_size of block block_table[b * table_stride + j / block_size] (fa_kv_row) */
    const int32_t *block_table;         /* NULL: k/v are (b, h_kv, s, d) views */
    int64_t table_stride, block_size;
    int64_t decode_heads;               /* decode: k/v heads per work item (>= 1) */
    /* dropout */
    int dropout;                    /* 0: no dropout */
    uint32_t drop_threshold;        /* drop iff philox word < threshold */
    double drop_scale;              /* 1 / (1 - p) */
    uint64_t seed;
} fa_params;

/* One batch entry: which view entry holds it (src), the view row its queries / keys start at, its
 * lengths, and the query rows the output has for it (the padded length, or len_q when packed). */
typedef struct {
    int64_t src, row_q, row_kv, len_q, len_kv, rows;
} fa_entry;

static inline void fa_get_entry(const fa_params *p, int64_t b, fa_entry *e) {
    if (p->cu_q) {
        e->src = 0;
        e->row_q = p->cu_q[b];
        e->row_kv = p->cu_kv[b];
        e->len_q = (int64_t)p->cu_q[b + 1] - p->cu_q[b];
        e->len_kv = (int64_t)p->cu_kv[b + 1] - p->cu_kv[b];
        e->rows = e->len_q;
    } else {
        e->src = b;
        e->row_q = e->row_kv = 0;
        e->len_q = p->lens_q ? p->lens_q[b] : p->seq_q;
        e->len_kv = p->lens_kv ? p->lens_kv[b] : p->seq_kv;
        e->rows = p->seq_q;
    }
}

/* The address of key (or value) row j of batch entry e, k/v head h: through the block table of a paged
 * cache, else the view's own row (j counts from the entry's first key). */
static inline const char *fa_kv_row(const fa_params *p, const char *base, const int64_t *strides, const fa_entry *e,
                                    int64_t h, int64_t j) {
    if (p->block_table) {
        const int64_t blk = p->block_table[e->src * p->table_stride + j / p->block_size];
        return base + blk * strides[0] + h * strides[1] + (j % p->block_size) * strides[2];
    }
    return base + e->src * strides[0] + h * strides[1] + (e->row_kv + j) * strides[2];
}

/* The backward (flash_bwd_tile.h): the forward's fa_params (q, k, v, the mask, lengths, dropout) plus the
 * arrays below.  dq (b, h, s, dp), dk (b, h_kv, s, dp), dv (b, h_kv, s, dvp) are
 * zeroed arrays of the compute type, dp / dvp the head dims rounded up to the ISA's vector width, unit
 * stride along d; the caller keeps their first head_dim (head_dim_v) columns.  Per (batch entry, k/v head)
 * bh: fa_bwd_pack_tile packs its panel (fa_bwd_panel_bytes); fa_bwd_item(bh, chunk) computes the query
 * tiles chunk, chunk + nchunk, ... (their dQ rows, and dK/dV into the output for chunk 0 or into parts,
 * fa_bwd_parts_bytes per bh, zeroed, for the others); fa_bwd_reduce adds the parts of one key row. */
typedef struct {
    const char *dout, *o;           /* (b, h, s, d_v) views, byte strides (any sign) */
    const double *lse;              /* the forward's lse, contiguous (b, h, lse_rows), in double */
    int64_t dout_strides[4], o_strides[4];
    void *dq, *dk, *dv;
    void *dbias;                    /* NULL, or (b, h, s_q, s_kv) of the compute type: dS, the logits' gradient */
    int64_t dq_strides[3], dk_strides[3], dv_strides[3], dbias_strides[3];   /* element strides of b, h, s */
    int64_t nchunk;                 /* >= 1 */
} fa_bwd;

int64_t fa_bwd_panel_bytes(const fa_params *p, int isa);               /* -1: too large */
int64_t fa_bwd_parts_bytes(const fa_params *p, int isa, int64_t nchunk);   /* -1: too large */
int64_t fa_bwd_dim_pad(int isa, int in_dtype);                         /* dp, dvp are multiples of this */
void *fa_bwd_scratch_new(const fa_params *p, int isa);
void fa_bwd_pack_tile(const fa_params *p, int isa, int64_t bh, int64_t tile, void *panel);
void fa_bwd_item(const fa_params *p, const fa_bwd *g, int isa, int64_t bh, int64_t chunk, const void *panel,
                 void *parts, void *scratch);
void fa_bwd_reduce(const fa_params *p, const fa_bwd *g, int isa, int64_t bh, int64_t row, const void *parts);

/* Decode (a few query rows per k/v head against a long cache, read in place): one work item per
 * (batch entry, decode_heads k/v heads, split of its keys); its rows are every query position x query
 * head of the group, for each of its k/v heads.  With nsplit > 1 an item writes its rows' normalized partial output and lse into parts
 * (fa_decode_parts_bytes), and fa_decode_merge combines the splits of one output row by their lse. */
int64_t fa_decode_parts_bytes(const fa_params *p, int isa, int64_t nsplit);   /* -1: too large */
void *fa_decode_scratch_new(const fa_params *p, int isa);
void fa_decode_item(const fa_params *p, int isa, int64_t bh, int64_t split, int64_t nsplit, void *parts,
                    void *scratch);
void fa_decode_merge(const fa_params *p, int isa, int64_t row, int64_t nsplit, const void *parts);

int fa_isa_supported(int isa);
int fa_best_isa(void);
const char *fa_isa_name(int isa);
int64_t fa_num_q_tiles(const fa_params *p);         /* row tiles (packed rows) of one k/v head */
int64_t fa_num_kv_tiles(const fa_params *p);        /* key tiles some query may see */
int64_t fa_panel_bytes(const fa_params *p, int isa);  /* -1: the size does not fit in int64 */
void *fa_aligned_alloc(int64_t bytes);               /* NULL on failure; free with fa_aligned_free */
void fa_aligned_free(void *ptr);
void *fa_scratch_new(const fa_params *p, int isa);   /* NULL on allocation failure or size overflow */
void fa_scratch_free(void *scratch);
void fa_pack_tile(const fa_params *p, int isa, int64_t bh, int64_t tile, void *panel);
void fa_run_item(const fa_params *p, int isa, int64_t bh, int64_t rt, const void *panel, void *scratch);

#ifdef __cplusplus
}
#endif
#endif
