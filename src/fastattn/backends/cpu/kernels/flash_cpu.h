/* fastattn CPU kernel: the C interface the Cython driver calls.
 *
 * Heads are processed in groups.  For each group, fa_pack_tile packs every key/value
 * tile of its heads into one panel per head (fa_panel_bytes each); then one work item
 * per (head bh, query tile qt), fa_run_item, computes the output rows of that tile over
 * every key tile it needs with the online softmax, and writes out[bh, rows, :] and
 * lse[bh, rows].  Items only read the panels, so any thread may run any item; a thread
 * keeps its own tile scratch (fa_scratch_new).  bh = b * heads + h.
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

typedef struct {
    const char *q, *k, *v;          /* base pointers of the 4-D (b, h, s, d) inputs */
    int64_t q_strides[4];           /* byte strides (any sign) */
    int64_t k_strides[4];
    int64_t v_strides[4];
    void *out;                      /* contiguous (b, h, seq_q, d): double for f64 input, else float */
    void *lse;                      /* contiguous (b, h, seq_q): double for f64 input, else float */
    int in_dtype;                   /* FA_DTYPE_* */
    int causal;                     /* top-left aligned: query i sees keys 0..i */
    int64_t batch, heads, seq_q, seq_kv, head_dim;
    int64_t block_q, block_kv;
    double scale;
    int dropout;                    /* 0: no dropout */
    uint32_t drop_threshold;        /* drop iff philox word < threshold */
    double drop_scale;              /* 1 / (1 - p) */
    uint64_t seed;
} fa_params;

int fa_isa_supported(int isa);
int fa_best_isa(void);
const char *fa_isa_name(int isa);
int64_t fa_num_q_tiles(const fa_params *p);
int64_t fa_num_kv_tiles(const fa_params *p);        /* key tiles some query may see */
int64_t fa_panel_bytes(const fa_params *p, int isa);  /* -1: the size does not fit in int64 */
void *fa_aligned_alloc(int64_t bytes);               /* NULL on failure; free with fa_aligned_free */
void fa_aligned_free(void *ptr);
void *fa_scratch_new(const fa_params *p, int isa);   /* NULL on allocation failure or size overflow */
void fa_scratch_free(void *scratch);
void fa_pack_tile(const fa_params *p, int isa, int64_t bh, int64_t tile, void *panel);
void fa_run_item(const fa_params *p, int isa, int64_t bh, int64_t qt, const void *panel, void *scratch);

#ifdef __cplusplus
}
#endif
#endif
