/* The flash-attention CPU kernel, compiled once per ISA and dispatched at run time.
 *
 * flash_tile.h holds the ISA-neutral code (GCC vector extensions); it is included
 * three times below, each under its own `#pragma GCC target` and namespace, with the
 * vector width and register-block shapes that fit that ISA's register file:
 *   avx512  (32 zmm): S block 6 rows x 4 vectors, O block 6 rows x 4 vectors
 *   avx2    (16 ymm): S block 4 x 3,               O block 4 x 3
 *   generic (16 xmm, SSE2, every x86-64): same shapes as avx2
 * and the decode dot products (decode_tile.h) in blocks of FA_D_MR rows x 4 keys (avx512 4, else 2).
 * The products' sums run in chunks (FA_S_CHUNK dims of q.k, FA_O_CHUNK keys of P.V), each from zero:
 * blocked summation, which brings the float32 error below PyTorch's SDPA's.  Each chunk's end is a
 * load, add and store of the whole register block: free with AVX2's 12 accumulators, 4-5% with
 * AVX-512's 24 at 32 dims, so AVX-512 chunks q.k at 64 (see docs/design.md).
 * flash_tile.h undefines the shape macros at its end, ready for the next ISA.
 * The shipped build never uses -march=native; fa_isa_supported asks the CPU (and,
 * through libgcc, the OS) which paths may run.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "flash_cpu.h"
#include "convert.h"
#include "philox.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,f16c")
namespace isa_avx512 {
#define FA_VBYTES 64
#define FA_S_MR 6
#define FA_S_NR 4
#define FA_O_MR 6
#define FA_O_ND 4
#define FA_D_MR 4
#define FA_S_CHUNK 64
#define FA_O_CHUNK 64
#include "flash_tile.h"
}  // namespace isa_avx512
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace isa_avx2 {
#define FA_VBYTES 32
#define FA_S_MR 4
#define FA_S_NR 3
#define FA_O_MR 4
#define FA_O_ND 3
#define FA_D_MR 2
#define FA_S_CHUNK 32
#define FA_O_CHUNK 64
#include "flash_tile.h"
}  // namespace isa_avx2
#pragma GCC pop_options

namespace isa_generic {
#define FA_VBYTES 16
#define FA_S_MR 4
#define FA_S_NR 3
#define FA_O_MR 4
#define FA_O_ND 3
#define FA_D_MR 2
#define FA_S_CHUNK 32
#define FA_O_CHUNK 64
#include "flash_tile.h"
}  // namespace isa_generic

struct fa_scratch_box {
    int isa, decode;   /* decode: 0 forward, 1 decode, 2 backward scratch */
    const fa_params *params;
    void *ws;
};

extern "C" {

int fa_isa_supported(int isa) {
    __builtin_cpu_init();
    switch (isa) {
    case FA_ISA_GENERIC: return 1;
    case FA_ISA_AVX2: return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    case FA_ISA_AVX512:
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
               __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
               __builtin_cpu_supports("fma");
    default: return 0;
    }
}

int fa_best_isa(void) {
    for (int isa = FA_ISA_COUNT - 1; isa > 0; --isa)
        if (fa_isa_supported(isa)) return isa;
    return FA_ISA_GENERIC;
}

const char *fa_isa_name(int isa) {
    switch (isa) {
    case FA_ISA_AVX512: return "avx512";
    case FA_ISA_AVX2: return "avx2";
    case FA_ISA_GENERIC: return "generic";
    default: return "unknown";
    }
}

int64_t fa_num_q_tiles(const fa_params *p) {
    const int64_t rows = p->seq_q * p->group;
    return (rows + p->block_q - 1) / p->block_q;
}

int64_t fa_num_kv_tiles(const fa_params *p) {
    int64_t kv_end = p->seq_kv;
    /* top-left causal, no ragged lengths: no query sees a key past seq_q - 1 */
    if (p->causal && !p->bottom_right && !p->lens_q && !p->cu_q && p->seq_q < kv_end) kv_end = p->seq_q;
    return (kv_end + p->block_kv - 1) / p->block_kv;
}

int64_t fa_panel_bytes(const fa_params *p, int isa) {
    switch (isa) {
    case FA_ISA_AVX512: return isa_avx512::panel_bytes(p);
    case FA_ISA_AVX2: return isa_avx2::panel_bytes(p);
    default: return isa_generic::panel_bytes(p);
    }
}

void *fa_aligned_alloc(int64_t bytes) {
    if (bytes < 0 || bytes > INT64_MAX - 64) return NULL;
    if (bytes < 64) bytes = 64;
    return aligned_alloc(64, (size_t)((bytes + 63) / 64 * 64));
}

void fa_aligned_free(void *ptr) { free(ptr); }

void *fa_scratch_new(const fa_params *p, int isa) {
    fa_scratch_box *box = (fa_scratch_box *)malloc(sizeof(fa_scratch_box));
    if (!box) return NULL;
    box->isa = isa;
    box->decode = 0;
    box->params = p;
    switch (isa) {
    case FA_ISA_AVX512: box->ws = isa_avx512::scratch_new(p); break;
    case FA_ISA_AVX2: box->ws = isa_avx2::scratch_new(p); break;
    default: box->ws = isa_generic::scratch_new(p); break;
    }
    if (!box->ws) { free(box); return NULL; }
    return box;
}

void fa_scratch_free(void *scratch) {
    fa_scratch_box *box = (fa_scratch_box *)scratch;
    if (!box) return;
    if (box->decode == 2) {
        switch (box->isa) {
        case FA_ISA_AVX512: isa_avx512::bwd_scratch_free(box->params, box->ws); break;
        case FA_ISA_AVX2: isa_avx2::bwd_scratch_free(box->params, box->ws); break;
        default: isa_generic::bwd_scratch_free(box->params, box->ws); break;
        }
        free(box);
        return;
    }
    if (box->decode) {
        switch (box->isa) {
        case FA_ISA_AVX512: isa_avx512::decode_scratch_free(box->params, box->ws); break;
        case FA_ISA_AVX2: isa_avx2::decode_scratch_free(box->params, box->ws); break;
        default: isa_generic::decode_scratch_free(box->params, box->ws); break;
        }
        free(box);
        return;
    }
    switch (box->isa) {
    case FA_ISA_AVX512: isa_avx512::scratch_free(box->params, box->ws); break;
    case FA_ISA_AVX2: isa_avx2::scratch_free(box->params, box->ws); break;
    default: isa_generic::scratch_free(box->params, box->ws); break;
    }
    free(box);
}

void fa_pack_tile(const fa_params *p, int isa, int64_t bh, int64_t tile, void *panel) {
    switch (isa) {
    case FA_ISA_AVX512: isa_avx512::pack_tile(p, bh, tile, panel); break;
    case FA_ISA_AVX2: isa_avx2::pack_tile(p, bh, tile, panel); break;
    default: isa_generic::pack_tile(p, bh, tile, panel); break;
    }
}

void fa_run_item(const fa_params *p, int isa, int64_t bh, int64_t rt, const void *panel, void *scratch) {
    void *ws = ((fa_scratch_box *)scratch)->ws;
    switch (isa) {
    case FA_ISA_AVX512: isa_avx512::run_item(p, bh, rt, panel, ws); break;
    case FA_ISA_AVX2: isa_avx2::run_item(p, bh, rt, panel, ws); break;
    default: isa_generic::run_item(p, bh, rt, panel, ws); break;
    }
}

void *fa_decode_scratch_new(const fa_params *p, int isa) {
    fa_scratch_box *box = (fa_scratch_box *)malloc(sizeof(fa_scratch_box));
    if (!box) return NULL;
    box->isa = isa;
    box->decode = 1;
    box->params = p;
    switch (isa) {
    case FA_ISA_AVX512: box->ws = isa_avx512::decode_scratch_new(p); break;
    case FA_ISA_AVX2: box->ws = isa_avx2::decode_scratch_new(p); break;
    default: box->ws = isa_generic::decode_scratch_new(p); break;
    }
    if (!box->ws) { free(box); return NULL; }
    return box;
}

int64_t fa_decode_parts_bytes(const fa_params *p, int isa, int64_t nsplit) {
    switch (isa) {   /* rows padded to the ISA's vector width */
    case FA_ISA_AVX512: return isa_avx512::decode_parts_bytes(p, nsplit);
    case FA_ISA_AVX2: return isa_avx2::decode_parts_bytes(p, nsplit);
    default: return isa_generic::decode_parts_bytes(p, nsplit);
    }
}

void fa_decode_item(const fa_params *p, int isa, int64_t bh, int64_t split, int64_t nsplit, void *parts,
                    void *scratch) {
    void *ws = ((fa_scratch_box *)scratch)->ws;
    switch (isa) {
    case FA_ISA_AVX512: isa_avx512::decode_item(p, bh, split, nsplit, parts, ws); break;
    case FA_ISA_AVX2: isa_avx2::decode_item(p, bh, split, nsplit, parts, ws); break;
    default: isa_generic::decode_item(p, bh, split, nsplit, parts, ws); break;
    }
}

void fa_decode_merge(const fa_params *p, int isa, int64_t row, int64_t nsplit, const void *parts) {
    switch (isa) {
    case FA_ISA_AVX512: isa_avx512::decode_merge(p, row, nsplit, parts); break;
    case FA_ISA_AVX2: isa_avx2::decode_merge(p, row, nsplit, parts); break;
    default: isa_generic::decode_merge(p, row, nsplit, parts); break;
    }
}

void *fa_bwd_scratch_new(const fa_params *p, int isa) {
    fa_scratch_box *box = (fa_scratch_box *)malloc(sizeof(fa_scratch_box));
    if (!box) return NULL;
    box->isa = isa;
    box->decode = 2;
    box->params = p;
    switch (isa) {
    case FA_ISA_AVX512: box->ws = isa_avx512::bwd_scratch_new(p); break;
    case FA_ISA_AVX2: box->ws = isa_avx2::bwd_scratch_new(p); break;
    default: box->ws = isa_generic::bwd_scratch_new(p); break;
    }
    if (!box->ws) { free(box); return NULL; }
    return box;
}

int64_t fa_bwd_panel_bytes(const fa_params *p, int isa) {
    switch (isa) {
    case FA_ISA_AVX512: return isa_avx512::bwd_panel_bytes(p);
    case FA_ISA_AVX2: return isa_avx2::bwd_panel_bytes(p);
    default: return isa_generic::bwd_panel_bytes(p);
    }
}

int64_t fa_bwd_parts_bytes(const fa_params *p, int isa, int64_t nchunk) {
    switch (isa) {
    case FA_ISA_AVX512: return isa_avx512::bwd_parts_bytes(p, nchunk);
    case FA_ISA_AVX2: return isa_avx2::bwd_parts_bytes(p, nchunk);
    default: return isa_generic::bwd_parts_bytes(p, nchunk);
    }
}

int64_t fa_bwd_dim_pad(int isa, int in_dtype) {
    switch (isa) {
    case FA_ISA_AVX512: return isa_avx512::bwd_dim_pad(in_dtype);
    case FA_ISA_AVX2: return isa_avx2::bwd_dim_pad(in_dtype);
    default: return isa_generic::bwd_dim_pad(in_dtype);
    }
}

void fa_bwd_pack_tile(const fa_params *p, int isa, int64_t bh, int64_t tile, void *panel) {
    switch (isa) {
    case FA_ISA_AVX512: isa_avx512::bwd_pack_tile(p, bh, tile, panel); break;
    case FA_ISA_AVX2: isa_avx2::bwd_pack_tile(p, bh, tile, panel); break;
    default: isa_generic::bwd_pack_tile(p, bh, tile, panel); break;
    }
}

void fa_bwd_item(const fa_params *p, const fa_bwd *g, int isa, int64_t bh, int64_t chunk, const void *panel,
                 void *parts, void *scratch) {
    void *ws = ((fa_scratch_box *)scratch)->ws;
    switch (isa) {
    case FA_ISA_AVX512: isa_avx512::bwd_item(p, g, bh, chunk, panel, parts, ws); break;
    case FA_ISA_AVX2: isa_avx2::bwd_item(p, g, bh, chunk, panel, parts, ws); break;
    default: isa_generic::bwd_item(p, g, bh, chunk, panel, parts, ws); break;
    }
}

void fa_bwd_reduce(const fa_params *p, const fa_bwd *g, int isa, int64_t bh, int64_t row, const void *parts) {
    switch (isa) {
    case FA_ISA_AVX512: isa_avx512::bwd_reduce(p, g, bh, row, parts); break;
    case FA_ISA_AVX2: isa_avx2::bwd_reduce(p, g, bh, row, parts); break;
    default: isa_generic::bwd_reduce(p, g, bh, row, parts); break;
    }
}

}  // extern "C"
