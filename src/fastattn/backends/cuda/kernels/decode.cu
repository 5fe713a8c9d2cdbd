// Attention against a KV cache (decode and chunked prefill) for fastattn's CUDA backend.
//
// One launch appends the new tokens and attends (split-KV, "flash-decoding"); the splits are merged by
// their log-sum-exps by the last block of each unit to finish (fa_decode_mma with counters), else by a
// second launch (fa_decode_combine).
//
//   fa_decode_mma     float16 / bfloat16: mma.sync m16n8k16, fp32 accumulation
//   fa_decode_simt    float32 / float64: plain FMA in the input precision
//   fa_decode_combine out = sum_s e^(lse_s - lse) out_s, lse = log sum_s e^(lse_s)  (fastattn.merge_attention)
//
// Work split.  A block serves one (split, sequence b, k/v head, query tile).  Its rows are the
// (query t, head of the group gi) pairs r = t * G + gi of that k/v head (G = heads_q / heads_kv), so
// every K/V byte a block reads serves all G query heads of the group at once; a decode step (seq_q = 1)
// has G rows, one 16-row tensor-core tile.  The block's warps form a WR x WK grid: WR warps own 16 * MT
// rows each, WK warps own BKV / WK keys of every key tile each (decode: one row tile, four warps over the
// keys; chunked prefill: four row tiles, every warp over all keys).  Each warp runs the online softmax
// over its rows and keys (m' = max(m, rowmax S), l' = 2^((m - m') c) l + rowsum 2^((S - m') c),
// O' = 2^((m - m') c) O + 2^((S - m') c) V, c = scale log2 e); the block then merges its WK warps' (m, l,
// O) in shared memory, and the combine kernel merges the splits the same way.
//
// Where keys live.  Sequence b holds `cached` = clamp(cache_seqlens[b], 0, capacity) tokens in the cache
// and appends seq_new: it attends to total = min(cached + seq_new, capacity) keys.  Key j < cached is
// read from the cache (contiguous: row j of sequence b; paged: row j % block_size of block
// block_table[b, j / block_size]), key j >= cached straight from the new k / v (row j - cached), so the
// append (block (split 0, query tile 0) of each (b, k/v head) copies the new rows into the cache) and
// the attention need no ordering between blocks.  The clamps, and a block id outside [0, num_blocks)
// read as a block of zeros and never written, keep every access in bounds whatever the lengths and the
// table hold (values the launcher checks on the host unless a CUDA graph is being captured).
//
// The mask is the forward kernels' (common.cuh: fa_mask, bottom-right aligned): query t of the chunk is
// row i = t of an entry with Lq = seq_q and Lk = total; ALiBi's slope is per query head, so each row
// takes its head's slope into its copy of the mask.
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#include "common.cuh"
#include "elem.cuh"

// The launch arguments of both attention kernels, in this order (the launcher packs them once per
// call geometry).  Strides in elements.  k_sb / v_sb: the batch stride of a contiguous cache, the
// block stride of a paged one (block_size > 0).  lens_kind: 0 (every sequence holds lens_const), 4
// (int32 array), 8 (int64); table_kind likewise (paged only).  part_o / part_lse: the splits' partial
// results (num_splits > 1), else out / lse are written directly.  lse may be null (not asked for).
// sem (fa_decode_mma, num_splits > 1, or null): one counter per unit, zero at the launch; the block that
// finishes a unit's last split merges the unit's splits itself (dec_merge_unit) and sets the counter back
// to zero, so no combine launch follows.
#define FA_DECODE_PARAMS(T, L)                                                                              \
    const T *__restrict__ q, const T *__restrict__ k_cache, const T *__restrict__ v_cache,                  \
        const T *__restrict__ k_new, const T *__restrict__ v_new, T *__restrict__ out, L *__restrict__ lse, \
        L *__restrict__ part_o, L *__restrict__ part_lse, unsigned *__restrict__ sem,                       \
        const void *__restrict__ lens, int lens_kind,                                                       \
        int lens_const, const void *__restrict__ table, int table_kind, long long table_sb,                 \
        const float *__restrict__ slopes, int slopes_sb, int batch, int heads_kv, int group, int seq_q,     \
        int seq_new, int capacity, int block_size, int num_blocks, int d, int dv, long long q_sb,           \
        long long q_ss, long long q_sh, long long q_sd, long long k_sb, long long k_ss, long long k_sh,       \
        long long k_sd, long long v_sb, long long v_ss, long long v_sh, long long v_sd, long long kn_sb,      \
        long long kn_ss, long long kn_sh, long long kn_sd, long long vn_sb, long long vn_ss, long long vn_sh, \
        long long vn_sd, long long o_sb, long long o_ss, long long o_sh, long long lse_sb, long long lse_sh,  \
        int num_splits, int q_tiles, int win_left, int win_right, int vec

__device__ __forceinline__ long long dec_int(const void* p, int kind, long long i) {
    return kind == 8 ? reinterpret_cast<const long long*>(p)[i] : (long long)reinterpret_cast<const int*>(p)[i];
}

// One sequence's keys for one k/v head (see the top of the file).
template <typename T>
struct dec_seq {
    const T *kc, *vc;    // the cache's head hkv: of sequence b (contiguous), of block 0 (paged)
    const T *kn, *vn;    // the new tokens of sequence b, head hkv
    const void* table;   // paged: block_table, row b (element offset in row_off)
    long long row_off;
    int table_kind, block_size, num_blocks, cached, total;
    int bs_shift;  // log2(block_size) for a power of two (the usual 16 / 64 / 256: no division), else -1
    long long k_sb, k_ss, v_sb, v_ss, kn_ss, vn_ss, k_sd, v_sd, kn_sd, vn_sd;

    // block of key j < cached (paged), or -1 for an id outside the cache
    __device__ __forceinline__ long long block_of(int j) const {
        const long long blk = dec_int(table, table_kind, row_off + j / block_size);
        return (blk < 0 || blk >= num_blocks) ? -1 : blk;
    }
    // row j's head vector in K (V), or nullptr where zeros stand in (j >= total, an invalid block)
    __device__ __forceinline__ const T* k_row(int j) const {
        if (j >= total) return nullptr;
        if (j >= cached) return kn + (long long)(j - cached) * kn_ss;
        if (block_size == 0) return kc + (long long)j * k_ss;
        const long long blk = block_of(j);
        return blk < 0 ? nullptr : kc + blk * k_sb + (long long)(j % block_size) * k_ss;
    }
    __device__ __forceinline__ const T* v_row(int j) const {
        if (j >= total) return nullptr;
        if (j >= cached) return vn + (long long)(j - cached) * vn_ss;
        if (block_size == 0) return vc + (long long)j * v_ss;
        const long long blk = block_of(j);
        return blk < 0 ? nullptr : vc + blk * v_sb + (long long)(j % block_size) * v_ss;
    }
    // the stride along d of row j (the new k / v may be laid out unlike the cache)
    __device__ __forceinline__ long long k_sd_of(int j) const { return j >= cached ? kn_sd : k_sd; }
    __device__ __forceinline__ long long v_sd_of(int j) const { return j >= cached ? vn_sd : v_sd; }
};

template <typename T>
__device__ __forceinline__ dec_seq<T> dec_seq_of(const T* k_cache, const T* v_cache, const T* k_new, const T* v_new,
                                                 const void* lens, int lens_kind, int lens_const, const void* table,
                                                 int table_kind, long long table_sb, int b, int hkv, int seq_new,
                                                 int capacity, int block_size, int num_blocks, long long k_sb,
                                                 long long k_ss, long long k_sh, long long v_sb, long long v_ss,
                                                 long long v_sh, long long kn_sb, long long kn_ss, long long kn_sh,
                                                 long long vn_sb, long long vn_ss, long long vn_sh, long long k_sd,
                                                 long long v_sd, long long kn_sd, long long vn_sd) {
    dec_seq<T> s;
    const long long len = lens_kind == 0 ? (long long)lens_const : dec_int(lens, lens_kind, b);
    s.cached = (int)min(max(len, 0LL), (long long)capacity);
    s.total = min(s.cached + seq_new, capacity);
    const long long cache_b = block_size == 0 ? (long long)b : 0LL;
    s.kc = k_cache + cache_b * k_sb + (long long)hkv * k_sh;
    s.vc = v_cache + cache_b * v_sb + (long long)hkv * v_sh;
    s.kn = seq_new > 0 ? k_new + (long long)b * kn_sb + (long long)hkv * kn_sh : nullptr;
    s.vn = seq_new > 0 ? v_new + (long long)b * vn_sb + (long long)hkv * vn_sh : nullptr;
    s.table = table;
    s.row_off = (long long)b * table_sb;
    s.table_kind = table_kind;
    s.block_size = block_size;
    s.bs_shift = (block_size > 0 && (block_size & (block_size - 1)) == 0) ? __ffs(block_size) - 1 : -1;
    s.num_blocks = num_blocks;
    s.k_sb = k_sb, s.k_ss = k_ss, s.v_sb = v_sb, s.v_ss = v_ss, s.kn_ss = kn_ss, s.vn_ss = vn_ss;
    s.k_sd = k_sd, s.v_sd = v_sd, s.kn_sd = kn_sd, s.vn_sd = vn_sd;
    return s;
}

// The append: new tokens [t0, t1) of sequence b, head hkv -> cache positions cached + t (positions at or
// past capacity and invalid blocks are skipped; t1 <= total - cached).  Every thread of the block takes
// a share: 16-byte chunks where vec (unit stride along d, 16-byte aligned rows, d and dv multiples of 8:
// checked by the launcher), else elements.
template <typename T>
__device__ __forceinline__ void dec_append_rows(const dec_seq<T>& s, int t0, int t1, int d, int dv, bool vec,
                                                int tid, int nt) {
    const int step = vec ? 16 / (int)sizeof(T) : 1;  // elements a copy moves
    const long long k_sd = vec ? 1 : s.k_sd, v_sd = vec ? 1 : s.v_sd, kn_sd = vec ? 1 : s.kn_sd,
                    vn_sd = vec ? 1 : s.vn_sd;
    const int ck = d / step, width = ck + dv / step;  // a token's k then v copies
    T* kc = const_cast<T*>(s.kc);
    T* vc = const_cast<T*>(s.vc);
    for (int e = tid; e < (t1 - t0) * width; e += nt) {
        const int t = t0 + e / width, c = e - (e / width) * width, j = s.cached + t;
        long long k_off = (long long)j * s.k_ss, v_off = (long long)j * s.v_ss;  // contiguous: row j
        if (s.block_size != 0) {
            const long long blk = s.block_of(j);
            if (blk < 0) continue;
            k_off = blk * s.k_sb + (long long)(j % s.block_size) * s.k_ss;
            v_off = blk * s.v_sb + (long long)(j % s.block_size) * s.v_ss;
        }
        const bool is_k = c < ck;
        const long long col = (long long)(is_k ? c : c - ck) * step;
        T* dst = is_k ? kc + k_off + col * k_sd : vc + v_off + col * v_sd;
        const T* src = is_k ? s.kn + (long long)t * s.kn_ss + col * kn_sd : s.vn + (long long)t * s.vn_ss + col * vn_sd;
        if (vec)
            *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
        else
            *dst = *src;
    }
}

template <typename T>
__device__ __forceinline__ void dec_append(const dec_seq<T>& s, int d, int dv, bool vec, int tid, int nt) {
    dec_append_rows<T>(s, 0, s.total - s.cached, d, dv, vec, tid, nt);
}

// ROWS rows of DIM (padded) elements into shared memory rows of LD elements; row_ptr(r) gives row r's
// first element or nullptr (zeros); columns >= dim are zeros.  vec: 16-byte cp.async chunks (unit
// stride along d, d % 8 == 0, 16-byte aligned rows: checked by the launcher), else element loads.
template <typename T, int ROWS, int DIM, int LD, int NT, class RowPtr, class RowSd>
__device__ __forceinline__ void dec_load_rows(T* smem, RowPtr row_ptr, RowSd row_sd, const T* any_valid, int dim,
                                              bool vec, int tid) {
    if (vec) {
        constexpr int CH = DIM / 8;
#pragma unroll 4
        for (int c = tid; c < ROWS * CH; c += NT) {
            const int r = c / CH, ch = c - (c / CH) * CH;
            const T* src = row_ptr(r);
            const bool ok = src != nullptr && ch * 8 < dim;
            cp_async_16(smem_u32(smem + r * LD + ch * 8), ok ? src + ch * 8 : any_valid, ok ? 16 : 0);
        }
    } else {
        for (int e = tid; e < ROWS * DIM; e += NT) {
            const int r = e / DIM, c = e - (e / DIM) * DIM;
            const T* src = c < dim ? row_ptr(r) : nullptr;
            smem[r * LD + c] = src != nullptr ? src[(long long)c * row_sd(r)] : elem<T>::from_float(0.0f);
        }
    }
}

// The vector tile loader of fa_decode_mma (16-byte cp.async chunks, NT % (DIM / 8) == 0): thread tid
// copies chunk tid % CH of rows tid / CH + RPI p, p < PASSES, of K and V.  A key's K and V rows share
// one block of a paged cache, so each of the thread's rows costs one table read, and those reads are
// made a tile ahead (dec_tile_blocks for tile it + STAGES while tile it + STAGES - 1 is issued) so
// that no cp.async waits on a dependent table load.
// A K/V chunk: cp.async.cg with the L2 told to fetch the whole 256-byte line pair around it (a head's
// row of 128 half-precision elements is 256 bytes; the warp reads it whole, so nothing is wasted).
// FA_DECODE_L2_PREFETCH=0 drops the hint (experiments).
#ifndef FA_DECODE_L2_PREFETCH
#define FA_DECODE_L2_PREFETCH 256
#endif
__device__ __forceinline__ void dec_cp_async_16(unsigned dst, const void* src, int src_bytes) {
#if FA_DECODE_L2_PREFETCH == 256
    asm volatile("cp.async.cg.shared.global.L2::256B [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes));
#elif FA_DECODE_L2_PREFETCH == 128
    asm volatile("cp.async.cg.shared.global.L2::128B [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes));
#else
    cp_async_16(dst, src, src_bytes);
#endif
}

template <int NT, int DIM, int ROWS>
struct dec_tiling {
    static constexpr int CH = DIM / 8;
    static constexpr bool OK = NT % CH == 0 && NT / CH <= ROWS && ROWS % (NT / CH) == 0;
    static constexpr int RPI = OK ? NT / CH : 1;
    static constexpr int PASSES = OK ? ROWS / RPI : 1;
};

// block id of each of the thread's rows of the tile at kv0 (-1: invalid, 0 where no table is read)
template <typename T, int PASSES, int RPI>
__device__ __forceinline__ void dec_tile_blocks(const dec_seq<T>& s, int kv0, int r0, int (&blk)[PASSES]) {
#pragma unroll
    for (int p = 0; p < PASSES; ++p) blk[p] = 0;
    if (s.block_size == 0) return;
#pragma unroll
    for (int p = 0; p < PASSES; ++p) {
        const int j = kv0 + r0 + p * RPI;
        if (j < s.cached) {
            const int jb = s.bs_shift >= 0 ? j >> s.bs_shift : j / s.block_size;
            const long long b = dec_int(s.table, s.table_kind, s.row_off + jb);
            blk[p] = (b < 0 || b >= s.num_blocks) ? -1 : (int)b;
        }
    }
}

template <typename T, int PASSES, int RPI, int LDK, int LDV>
__device__ __forceinline__ void dec_tile_issue(const dec_seq<T>& s, T* sK, T* sV, int kv0, int r0, int ch,
                                               const int (&blk)[PASSES], const T* any_valid, int d, int dv) {
    // Every row of the tile in a contiguous cache (all tiles but a sequence's last): the thread's rows are
    // RPI rows apart, so one pointer per tensor steps through them.  This path is most of what a decode
    // block executes: kept short, since a block runs it only a few times and the instruction fetch of
    // straight-line code, not the loads, set the time of small caches (ncu: stall_no_inst).
    // A column past d (dv) zero-fills from any_valid: its pointer does not step.
    if (s.block_size == 0 && kv0 + PASSES * RPI <= s.cached) {
        const bool kok = ch * 8 < d, vok = ch * 8 < dv, v_any = ch * 8 < LDV - 8;
        const T* kr = kok ? s.kc + (long long)(kv0 + r0) * s.k_ss + ch * 8 : any_valid;
        const T* vr = vok ? s.vc + (long long)(kv0 + r0) * s.v_ss + ch * 8 : any_valid;
        const long long k_step = kok ? (long long)RPI * s.k_ss : 0, v_step = vok ? (long long)RPI * s.v_ss : 0;
        const int k_bytes = kok ? 16 : 0, v_bytes = vok ? 16 : 0;
#pragma unroll
        for (int p = 0; p < PASSES; ++p, kr += k_step, vr += v_step) {
            const int r = r0 + p * RPI;
            dec_cp_async_16(smem_u32(sK + r * LDK + ch * 8), kr, k_bytes);
            if (v_any) dec_cp_async_16(smem_u32(sV + r * LDV + ch * 8), vr, v_bytes);
        }
        return;
    }
    // A contiguous cache's last tile of a sequence (the new tokens, rows past the keys): a rolled loop,
    // so that the few blocks that run it (on the launch's critical path) fetch little code.
    if (s.block_size == 0) {
#pragma unroll 1
        for (int p = 0; p < PASSES; ++p) {
            const int r = r0 + p * RPI, j = kv0 + r;
            const T *kr = nullptr, *vr = nullptr;
            if (j < s.total) {
                if (j >= s.cached)
                    kr = s.kn + (long long)(j - s.cached) * s.kn_ss, vr = s.vn + (long long)(j - s.cached) * s.vn_ss;
                else
                    kr = s.kc + (long long)j * s.k_ss, vr = s.vc + (long long)j * s.v_ss;
            }
            const bool kok = kr != nullptr && ch * 8 < d, vok = vr != nullptr && ch * 8 < dv;
            dec_cp_async_16(smem_u32(sK + r * LDK + ch * 8), kok ? kr + ch * 8 : any_valid, kok ? 16 : 0);
            if (ch * 8 < LDV - 8)
                dec_cp_async_16(smem_u32(sV + r * LDV + ch * 8), vok ? vr + ch * 8 : any_valid, vok ? 16 : 0);
        }
        return;
    }
#pragma unroll
    for (int p = 0; p < PASSES; ++p) {
        const int r = r0 + p * RPI, j = kv0 + r;
        const T *kr = nullptr, *vr = nullptr;
        if (j < s.total) {
            if (j >= s.cached) {
                kr = s.kn + (long long)(j - s.cached) * s.kn_ss, vr = s.vn + (long long)(j - s.cached) * s.vn_ss;
            } else if (s.block_size == 0) {
                kr = s.kc + (long long)j * s.k_ss, vr = s.vc + (long long)j * s.v_ss;
            } else if (blk[p] >= 0) {
                const long long in = s.bs_shift >= 0 ? j & (s.block_size - 1) : j % s.block_size;
                kr = s.kc + (long long)blk[p] * s.k_sb + in * s.k_ss;
                vr = s.vc + (long long)blk[p] * s.v_sb + in * s.v_ss;
            }
        }
        const bool kok = kr != nullptr && ch * 8 < d, vok = vr != nullptr && ch * 8 < dv;
        dec_cp_async_16(smem_u32(sK + r * LDK + ch * 8), kok ? kr + ch * 8 : any_valid, kok ? 16 : 0);
        if (ch * 8 < LDV - 8)  // V may be narrower than K (DV < D): its chunks past DV are none
            dec_cp_async_16(smem_u32(sV + r * LDV + ch * 8), vok ? vr + ch * 8 : any_valid, vok ? 16 : 0);
    }
}

// The merge of one unit's splits by the block that finished the unit's last split (fa_decode_mma with
// sem): the math of fa_decode_combine (fastattn.merge_attention) over the unit's rows r_begin .. r_end.
// A warp a row computes the splits' weights w_s = e^(lse_s - max) (kept in shared memory) and the row's
// lse; then each thread owns 4 columns of a row and adds w_s o_s over the splits in order (16-byte loads,
// several in flight).  The partial results are read through L2 (__ldcg): other blocks wrote them.
// Needs num_splits <= 128 and dv % 4 == 0 (the launcher's rule).
template <typename T, int NT>
__device__ __forceinline__ void dec_merge_unit(const float* part_o, const float* part_lse, T* out, float* lse,
                                               int num_splits, long long n_rows, int b, int hkv, int heads_kv,
                                               int group, int seq_q, int r_begin, int r_end, int dv, long long o_sb,
                                               long long o_ss, long long o_sh, long long lse_sb, long long lse_sh,
                                               float* smem, int tid) {
    constexpr int NW = NT / 32, SPL = 4;  // splits per lane: num_splits <= 128
    const int rows = r_end - r_begin, S = num_splits;
    float* sW = smem;                 // [rows][S]: the splits' weights
    float* sTot = sW + rows * S;      // [rows]: sum of the weights
    int* sNan = reinterpret_cast<int*>(sTot + rows);  // [rows]: a NaN lse in the row
    const int warp = tid >> 5, lane = tid & 31;
    auto row_of = [&](int lr) {
        const int r = r_begin + lr, t = r / group, h = hkv * group + (r - t * group);
        return ((long long)b * heads_kv * group + h) * seq_q + t;
    };
    for (int lr = warp; lr < rows; lr += NW) {
        const long long row = row_of(lr);
        float x[SPL];
        float mx = -FA_INF;
        bool nan = false;
#pragma unroll
        for (int i = 0; i < SPL; ++i) {
            const int sp = lane + 32 * i;
            x[i] = sp < S ? __ldcg(part_lse + sp * n_rows + row) : -FA_INF;
            nan |= x[i] != x[i];
            mx = fmaxf(mx, x[i]);
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
        nan = __any_sync(0xffffffffu, nan);
        float total = 0.0f;
#pragma unroll
        for (int i = 0; i < SPL; ++i) {
            const int sp = lane + 32 * i;
            const float w = (mx != -FA_INF && sp < S) ? exp_t<float>(x[i] - mx) : 0.0f;
            total += w;
            if (sp < S) sW[lr * S + sp] = w;
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) total += __shfl_xor_sync(0xffffffffu, total, o);
        if (lane == 0) {
            sTot[lr] = total;
            sNan[lr] = nan;
            const bool empty = !nan && total == 0.0f;
            const int r = r_begin + lr, t = r / group, h = hkv * group + (r - t * group);
            if (lse != nullptr)
                lse[(long long)b * lse_sb + (long long)h * lse_sh + t] =
                    nan ? __int_as_float(0x7fc00000) : (empty ? -FA_INF : mx + logf(total));
        }
    }
    __syncthreads();
    const int C4 = dv / 4;
    for (int x = tid; x < rows * C4; x += NT) {
        const int lr = x / C4, c4 = x - (x / C4) * C4;
        const long long row = row_of(lr);
        const float* w_row = sW + lr * S;
        float4 acc = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
#pragma unroll 8
        for (int sp = 0; sp < S; ++sp) {
            const float w = w_row[sp];
            const float4 o = __ldcg(reinterpret_cast<const float4*>(part_o + (sp * n_rows + row) * dv) + c4);
            acc.x += w != 0.0f ? w * o.x : 0.0f;  // a split of weight 0 adds nothing, whatever it holds
            acc.y += w != 0.0f ? w * o.y : 0.0f;
            acc.z += w != 0.0f ? w * o.z : 0.0f;
            acc.w += w != 0.0f ? w * o.w : 0.0f;
        }
        const float total = sTot[lr];
        const bool nan = sNan[lr] != 0, empty = !nan && total == 0.0f;
        const int r = r_begin + lr, t = r / group, h = hkv * group + (r - t * group);
        T* op = out + (long long)b * o_sb + (long long)t * o_ss + (long long)h * o_sh + 4 * c4;
        const float res[4] = {acc.x, acc.y, acc.z, acc.w};
#pragma unroll
        for (int e = 0; e < 4; ++e)
            op[e] = elem<T>::from_float(nan ? __int_as_float(0x7fc00000) : (empty ? 0.0f : res[e] / total));
    }
}

// ------------------------------------------------------------------------------------------------
// fa_decode_mma: float16 / bfloat16 on tensor cores
//   D, DV   padded head dims of q/k and v (multiples of 16, DV <= D)
//   MT      16-row m-tiles per warp;  WR x WK warps: WR over rows, WK over each tile's keys
//   BKV     keys per tile (BKV / WK a multiple of 16)
//   STAGES  key tiles in the cp.async ring: STAGES - 1 tiles are in flight while one is computed
//           (decode is a stream of K/V bytes: the bytes in flight per multiprocessor set its speed)
// Shared memory: Q BR x (D+8), K STAGES x BKV x (D+8), V STAGES x BKV x (DV+8) (the 8-element pad keeps
// the ldmatrix rows in distinct banks); the epilogue reuses it for the WK warps' (m, l, O).
// ------------------------------------------------------------------------------------------------
template <typename T, int D, int DV, int MT, int WR, int WK, int BKV, int STAGES, bool INTERVAL, bool MODS>
__global__ void __launch_bounds__(WR* WK * 32)
    fa_decode_mma(FA_DECODE_PARAMS(T, float), float softcap, float scale_log2, float scale) {
    constexpr int NT = WR * WK * 32;
    constexpr int BR = 16 * MT * WR;  // rows of the block
    constexpr int KW = BKV / WK;      // keys of a tile per warp
    constexpr int LDS = D + 8, LDV = DV + 8, LDO = DV + 4;
    constexpr int KT = D / 16, NS = KW / 8, NO = DV / 8;
    constexpr bool BF16 = elem<T>::bf16;
    static_assert(D % 16 == 0 && DV % 16 == 0 && DV <= D && KW % 16 == 0 && STAGES >= 2, "tile sizes");
    using TL = dec_tiling<NT, D, BKV>;

    extern __shared__ __align__(16) unsigned char smem_raw[];
    T* sQ = reinterpret_cast<T*>(smem_raw);
    T* sK = sQ + BR * LDS;
    T* sV = sK + STAGES * BKV * LDS;

    const int split = (int)blockIdx.y;  // grid (units, splits): y is the short axis
    const int unit = (int)blockIdx.x;
    const int q_tile = unit % q_tiles;
    const int hkv = (unit / q_tiles) % heads_kv;
    const int b = unit / q_tiles / heads_kv;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int wr = warp / WK, wk = warp - (warp / WK) * WK;
    const int g = lane >> 2, t4 = lane & 3;

    const dec_seq<T> s = dec_seq_of<T>(k_cache, v_cache, k_new, v_new, lens, lens_kind, lens_const, table,
                                       table_kind, table_sb, b, hkv, seq_new, capacity, block_size, num_blocks,
                                       k_sb, k_ss, k_sh, v_sb, v_ss, v_sh, kn_sb, kn_ss, kn_sh, vn_sb, vn_ss, vn_sh, k_sd, v_sd,
                                       kn_sd, vn_sd);
    if (split == 0 && q_tile == 0 && seq_new > 0)
        dec_append<T>(s, d, dv, vec != 0, tid, NT);

    const int rows = seq_q * group;
    const int r_begin = q_tile * BR, r_end = min(r_begin + BR, rows);
    fa_entry e;
    e.b = b, e.h = hkv * group, e.view_b = b, e.q_row = e.kv_row = 0, e.lq = seq_q, e.lk = s.total;
    const fa_mask<INTERVAL, MODS> mask = fa_mask_of<INTERVAL, MODS>(
        e, 1, win_left, win_right, nullptr, 0, 0, 0, 0, FA_MASK_NONE, slopes, slopes_sb, scale, softcap);
    const float sl2 = MODS ? 1.0f : scale_log2, lse_scale = MODS ? 0.6931471805599453f : scale;

    // this split's key tiles: the block's interval (the one tile-skipping rule) cut into num_splits runs
    int kv_lo = 0, kv_hi = 0;
    mask.key_range(r_begin / group, (r_end - 1) / group + 1, kv_lo, kv_hi);
    const int kv_begin = (kv_lo / BKV) * BKV;
    const int n_all = kv_hi > kv_lo ? (kv_hi - kv_begin + BKV - 1) / BKV : 0;
    const int per_split = (n_all + num_splits - 1) / num_splits;
    const int it0 = min(n_all, split * per_split);
    const int n_tiles = min(n_all, it0 + per_split) - it0;

    // the query row of each accumulator row of this thread (seq_q: a row past the block's rows)
    const int row_w0 = r_begin + wr * 16 * MT;
    int t_of[MT][2];
    float slope_l2[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int rr = 0; rr < 2; ++rr) {
            const int r = row_w0 + mt * 16 + g + 8 * rr;
            t_of[mt][rr] = r < r_end ? r / group : seq_q;
            slope_l2[mt][rr] = (MODS && slopes != nullptr && r < r_end)
                                   ? slopes[(long long)b * slopes_sb + hkv * group + r % group] * FA_LOG2E
                                   : 0.0f;
        }
    const int w_rows = max(0, min(row_w0 + 16 * MT, r_end) - row_w0);  // this warp's rows in the block
    const int t_lo = w_rows > 0 ? row_w0 / group : seq_q;
    const int t_n = w_rows > 0 ? (row_w0 + w_rows - 1) / group - t_lo + 1 : 1;

    auto q_row = [&](int r) -> const T* {
        const int rg = r_begin + r;
        if (rg >= r_end) return nullptr;
        const int t = rg / group;
        return q + (long long)b * q_sb + (long long)t * q_ss + (long long)(hkv * group + rg - t * group) * q_sh;
    };
    // tile it of this split: its keys start at kv_begin + (it0 + it) BKV, it sits in slot it % STAGES
    const int r0 = tid / TL::CH, ch = tid % TL::CH;
    int blk_next[TL::PASSES];  // the block ids of the next tile to issue (paged, vector path)
    auto load_kv = [&](int it) {
        const int slot = it % STAGES, kv0 = kv_begin + (it0 + it) * BKV;
        if constexpr (TL::OK) {
            if (vec) {
                dec_tile_issue<T, TL::PASSES, TL::RPI, LDS, LDV>(s, sK + slot * BKV * LDS, sV + slot * BKV * LDV, kv0,
                                                                 r0, ch, blk_next, q, d, dv);
                if (it + 1 < n_tiles) dec_tile_blocks<T, TL::PASSES, TL::RPI>(s, kv0 + BKV, r0, blk_next);
                return;
            }
        }
        dec_load_rows<T, BKV, D, LDS, NT>(sK + slot * BKV * LDS, [&](int r) { return s.k_row(kv0 + r); },
                                          [&](int r) { return s.k_sd_of(kv0 + r); }, q, d, vec != 0, tid);
        dec_load_rows<T, BKV, DV, LDV, NT>(sV + slot * BKV * LDV, [&](int r) { return s.v_row(kv0 + r); },
                                           [&](int r) { return s.v_sd_of(kv0 + r); }, q, dv, vec != 0, tid);
    };

    dec_load_rows<T, BR, D, LDS, NT>(sQ, q_row, [&](int) { return q_sd; }, q, d, vec != 0, tid);
    if constexpr (TL::OK) dec_tile_blocks<T, TL::PASSES, TL::RPI>(s, kv_begin + it0 * BKV, r0, blk_next);
#pragma unroll
    for (int st = 0; st < STAGES - 1; ++st) {  // the ring's first STAGES - 1 tiles (Q rides with the first)
        if (st < n_tiles) load_kv(st);
        cp_async_commit();
    }

    unsigned qf[MT][KT][4];
    float acc_o[MT][NO][4];
    float m_i[MT][2], l_i[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int n = 0; n < NO; ++n) acc_o[mt][n][0] = acc_o[mt][n][1] = acc_o[mt][n][2] = acc_o[mt][n][3] = 0.0f;
        m_i[mt][0] = m_i[mt][1] = -FA_INF;
        l_i[mt][0] = l_i[mt][1] = 0.0f;
    }
    const int a_row = (lane & 7) + ((lane >> 3) & 1) * 8, a_col = (lane >> 4) * 8;  // Q (A), V (.trans B)
    const int b_row = (lane & 7) + (lane >> 4) * 8, b_col = ((lane >> 3) & 1) * 8;  // K (B)

    for (int it = 0; it < n_tiles; ++it) {
        const int slot = it % STAGES;
        const int kv0 = kv_begin + (it0 + it) * BKV;
        cp_async_wait<STAGES - 2>();
        __syncthreads();  // tile it is in; every warp is done with tile it-1, whose slot is refilled now
        if (it + STAGES - 1 < n_tiles) load_kv(it + STAGES - 1);
        cp_async_commit();
        if (it == 0) {
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int kt = 0; kt < KT; ++kt)
                    ldsm_x4(qf[mt][kt][0], qf[mt][kt][1], qf[mt][kt][2], qf[mt][kt][3],
                            smem_u32(sQ + (wr * 16 * MT + mt * 16 + a_row) * LDS + kt * 16 + a_col));
        }
        const int kw0 = kv0 + wk * KW;  // this warp's first key
        if (w_rows == 0 || mask.tile_hidden(t_lo, t_n, kw0, KW)) continue;
        const T* sKs = sK + (slot * BKV + wk * KW) * LDS;
        const T* sVs = sV + (slot * BKV + wk * KW) * LDV;

        float sc[MT][NS][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int n = 0; n < NS; ++n) sc[mt][n][0] = sc[mt][n][1] = sc[mt][n][2] = sc[mt][n][3] = 0.0f;
#pragma unroll
        for (int kt = 0; kt < KT; ++kt)
#pragma unroll
            for (int np = 0; np < NS / 2; ++np) {
                unsigned b0, b1, b2, b3;
                ldsm_x4(b0, b1, b2, b3, smem_u32(sKs + (np * 16 + b_row) * LDS + kt * 16 + b_col));
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    elem<T>::mma(sc[mt][2 * np], qf[mt][kt], b0, b1);
                    elem<T>::mma(sc[mt][2 * np + 1], qf[mt][kt], b2, b3);
                }
            }

        // the mask hook (common.cuh: fa_mask): logits (MODS), -inf where the row does not see the key
        const bool needs = mask.tile_needs_mask(t_lo, t_n, kw0, KW);
        if (MODS || needs) {
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int n = 0; n < NS; ++n)
#pragma unroll
                    for (int e2 = 0; e2 < 4; ++e2) {
                        const int j = kw0 + n * 8 + 2 * t4 + (e2 & 1);
                        const int i = t_of[mt][e2 >> 1];
                        if constexpr (MODS) {
                            fa_mask<INTERVAL, MODS> row_mask = mask;  // the row's head's ALiBi slope
                            row_mask.slope_l2 = slope_l2[mt][e2 >> 1];
                            sc[mt][n][e2] = row_mask.logit2(sc[mt][n][e2], i, j);
                        }
                        if (needs && !mask.visible(i, j)) sc[mt][n][e2] = -FA_INF;
                    }
        }

        float alpha[MT][2];
        bool rescale = false;
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                float mx = m_i[mt][r];
#pragma unroll
                for (int n = 0; n < NS; ++n) mx = fmaxf(mx, fmaxf(sc[mt][n][2 * r], sc[mt][n][2 * r + 1]));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
                const float m_use = (mx == -FA_INF) ? 0.0f : mx;  // no key seen yet: every p is 0
                alpha[mt][r] = exp2_approx((m_i[mt][r] - m_use) * sl2);
                rescale |= mx != m_i[mt][r];
                m_i[mt][r] = mx;
                float tile_sum = 0.0f;
#pragma unroll
                for (int n = 0; n < NS; ++n) {
                    const float p0 = exp2_approx((sc[mt][n][2 * r] - m_use) * sl2);
                    const float p1 = exp2_approx((sc[mt][n][2 * r + 1] - m_use) * sl2);
                    tile_sum += p0 + p1;
                    sc[mt][n][2 * r] = p0;
                    sc[mt][n][2 * r + 1] = p1;
                }
                l_i[mt][r] = l_i[mt][r] * alpha[mt][r] + tile_sum;
            }
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

        // O += P V.  A V sub-tile with inf / NaN at keys some row of the warp must not see takes the
        // forward kernels' slow path (common.cuh: pv_tile_nonfinite_v); the check runs only on tiles
        // that hide keys (a window's edge, the chunk's causal diagonal)
        bool v_bad = false;
        if (fa_mask<INTERVAL, MODS>::hides_keys_ever && mask.tile_hides_keys(t_lo, t_n, kw0, KW)) {
            unsigned acc = 0u;
            for (int w = lane; w < KW * (DV / 2); w += 32)
                acc = nonfinite_or16x2<BF16>(
                    acc, *reinterpret_cast<const unsigned*>(sVs + (w / (DV / 2)) * LDV + 2 * (w % (DV / 2))));
            v_bad = __any_sync(0xffffffffu, nonfinite_seen(acc));
        }
        if (!v_bad) {
#pragma unroll
            for (int kb = 0; kb < KW / 16; ++kb) {
                unsigned a[MT][4];
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    acc_to_a_frag<T>(a[mt], sc[mt][2 * kb], sc[mt][2 * kb + 1]);
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
                    pw[2 * n] = elem<T>::pack2(sc[mt][n][0], sc[mt][n][1]),
                    pw[2 * n + 1] = elem<T>::pack2(sc[mt][n][2], sc[mt][n][3]);
                pv_tile_nonfinite_v<BF16, NO, KW>(
                    &acc_o[mt][0][0], pw,
                    [&](int kb, int np) { return smem_u32(sVs + (kb * 16 + a_row) * LDV + np * 16 + a_col); },
                    [&](int key, int n) { return *reinterpret_cast<const unsigned*>(sVs + key * LDV + n * 8 + 2 * t4); },
                    [&](int r, int key) { return mask.visible(t_of[mt][r], kw0 + key); }, lane);
            }
        }
    }
    cp_async_wait<0>();
    __syncthreads();  // shared memory is the epilogue's now

    // the WK warps' (m, l, O) of each row, then merged: M = max m_w, w_w = 2^((m_w - M) c),
    // out = sum w_w O_w / sum w_w l_w, lse = M scale + ln(sum w_w l_w)
    float* sO = reinterpret_cast<float*>(smem_raw);
    float* sM = sO + WK * BR * LDO;
    float* sL = sM + WK * BR;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            float l = l_i[mt][r];
            l += __shfl_xor_sync(0xffffffffu, l, 1);
            l += __shfl_xor_sync(0xffffffffu, l, 2);
            const int lr = wr * 16 * MT + mt * 16 + g + 8 * r;
            if (t4 == 0) sM[wk * BR + lr] = m_i[mt][r], sL[wk * BR + lr] = l;
#pragma unroll
            for (int n = 0; n < NO; ++n)
                *reinterpret_cast<float2*>(sO + (wk * BR + lr) * LDO + n * 8 + 2 * t4) =
                    make_float2(acc_o[mt][n][2 * r], acc_o[mt][n][2 * r + 1]);
        }
    __syncthreads();
    const long long n_rows = (long long)batch * heads_kv * group * seq_q;
    for (int x = tid; x < BR * dv; x += NT) {
        const int lr = x / dv, c = x - (x / dv) * dv;
        const int r = r_begin + lr;
        if (r >= r_end) break;
        float mx = -FA_INF;
#pragma unroll
        for (int w = 0; w < WK; ++w) mx = fmaxf(mx, sM[w * BR + lr]);
        float l = 0.0f, o = 0.0f;
        if (mx != -FA_INF) {
#pragma unroll
            for (int w = 0; w < WK; ++w) {
                const float mw = sM[w * BR + lr];
                const float f = mw == -FA_INF ? 0.0f : exp2_approx((mw - mx) * sl2);
                l += f * sL[w * BR + lr];
                o += f * sO[(w * BR + lr) * LDO + c];
            }
        }
        const bool empty = l == 0.0f;  // no key (0 and -inf); NaN stays NaN
        const float res = empty ? 0.0f : o / l;
        const float lse_r = empty ? -FA_INF : fmaf(mx, lse_scale, logf(l));
        const int t = r / group, h = hkv * group + (r - t * group);
        if (num_splits == 1) {
            out[(long long)b * o_sb + (long long)t * o_ss + (long long)h * o_sh + c] = elem<T>::from_float(res);
            if (c == 0 && lse != nullptr) lse[(long long)b * lse_sb + (long long)h * lse_sh + t] = lse_r;
        } else {
            const long long row = (long long)split * n_rows + ((long long)b * heads_kv * group + h) * seq_q + t;
            part_o[row * dv + c] = res;
            if (c == 0) part_lse[row] = lse_r;
        }
    }
    if (sem != nullptr && num_splits > 1) {  // the last of the unit's splits to finish merges them
        __shared__ int s_last;
        __threadfence();  // this block's partial results, visible to the block that merges
        __syncthreads();
        if (tid == 0) {
            const unsigned prev = atomicAdd(&sem[unit], 1u);
            s_last = prev == (unsigned)num_splits - 1u;
            if (s_last) sem[unit] = 0u;  // every split has counted: zero again for the next launch
        }
        __syncthreads();
        if (s_last) {
            __threadfence();  // the other splits' results, seen after their counts
            dec_merge_unit<T, NT>(part_o, part_lse, out, lse, num_splits, n_rows, b, hkv, heads_kv, group, seq_q,
                                  r_begin, r_end, dv, o_sb, o_ss, o_sh, lse_sb, lse_sh,
                                  reinterpret_cast<float*>(smem_raw), tid);
        }
    }
}

// ------------------------------------------------------------------------------------------------
// fa_decode_simt: float32 / float64, exact FMA in the input precision (no TF32).  128 threads, 8 rows
// a block (2 a warp), 32 keys a tile: lane j scores key j of the tile, then each lane accumulates
// output columns lane + 32 u over the tile's visible keys.  Logits in natural units (the hook's
// SIMT form with MODS, scale * q.k without).
// ------------------------------------------------------------------------------------------------

template <typename T, typename L, int D, bool INTERVAL, bool MODS>
__global__ void __launch_bounds__(128) fa_decode_simt(FA_DECODE_PARAMS(T, L), double softcap, double scale) {
    constexpr int NT = 128, BR = 8, RW = 2, BKV = 32, LDS = D + 1, NU = D / 32;
    static_assert(D % 32 == 0, "head dim");
    extern __shared__ __align__(16) unsigned char smem_raw[];
    T* sQ = reinterpret_cast<T*>(smem_raw);
    T* sK = sQ + BR * LDS;
    T* sV = sK + BKV * LDS;

    const int split = (int)blockIdx.y;  // grid (units, splits): y is the short axis
    const int unit = (int)blockIdx.x;
    const int q_tile = unit % q_tiles;
    const int hkv = (unit / q_tiles) % heads_kv;
    const int b = unit / q_tiles / heads_kv;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;

    const dec_seq<T> s = dec_seq_of<T>(k_cache, v_cache, k_new, v_new, lens, lens_kind, lens_const, table,
                                       table_kind, table_sb, b, hkv, seq_new, capacity, block_size, num_blocks,
                                       k_sb, k_ss, k_sh, v_sb, v_ss, v_sh, kn_sb, kn_ss, kn_sh, vn_sb, vn_ss, vn_sh, k_sd, v_sd,
                                       kn_sd, vn_sd);
    if (split == 0 && q_tile == 0 && seq_new > 0)
        dec_append<T>(s, d, dv, vec != 0, tid, NT);

    const int rows = seq_q * group;
    const int r_begin = q_tile * BR, r_end = min(r_begin + BR, rows);
    fa_entry e;
    e.b = b, e.h = hkv * group, e.view_b = b, e.q_row = e.kv_row = 0, e.lq = seq_q, e.lk = s.total;
    const fa_mask<INTERVAL, MODS> mask = fa_mask_of<INTERVAL, MODS>(
        e, 1, win_left, win_right, nullptr, 0, 0, 0, 0, FA_MASK_NONE, slopes, slopes_sb, (float)scale, (float)softcap);

    int kv_lo = 0, kv_hi = 0;
    mask.key_range(r_begin / group, (r_end - 1) / group + 1, kv_lo, kv_hi);
    const int kv_begin = (kv_lo / BKV) * BKV;
    const int n_all = kv_hi > kv_lo ? (kv_hi - kv_begin + BKV - 1) / BKV : 0;
    const int per_split = (n_all + num_splits - 1) / num_splits;
    const int it0 = min(n_all, split * per_split);
    const int n_tiles = min(n_all, it0 + per_split) - it0;

    for (int x = tid; x < BR * D; x += NT) {
        const int lr = x / D, c = x - (x / D) * D, rg = r_begin + lr;
        T val = T(0);
        if (rg < r_end && c < d) {
            const int t = rg / group;
            val = q[(long long)b * q_sb + (long long)t * q_ss + (long long)(hkv * group + rg - t * group) * q_sh +
                    (long long)c * q_sd];
        }
        sQ[lr * LDS + c] = val;
    }

    int t_of[RW];
    fa_mask<INTERVAL, MODS> row_mask[RW];
    T acc[RW][NU], m_i[RW], l_i[RW];
#pragma unroll
    for (int rr = 0; rr < RW; ++rr) {
        const int r = r_begin + warp * RW + rr;
        t_of[rr] = r < r_end ? r / group : seq_q;
        row_mask[rr] = mask;
        if (MODS && slopes != nullptr && r < r_end)
            row_mask[rr].slope = slopes[(long long)b * slopes_sb + hkv * group + r % group];
        m_i[rr] = -FA_INF;
        l_i[rr] = T(0);
#pragma unroll
        for (int u = 0; u < NU; ++u) acc[rr][u] = T(0);
    }

    for (int it = 0; it < n_tiles; ++it) {
        const int kv0 = kv_begin + (it0 + it) * BKV;
        __syncthreads();
        for (int x = tid; x < BKV * D; x += NT) {
            const int jl = x / D, c = x - (x / D) * D;
            const T* kr = c < d ? s.k_row(kv0 + jl) : nullptr;
            const T* vr = c < dv ? s.v_row(kv0 + jl) : nullptr;
            sK[jl * LDS + c] = kr != nullptr ? kr[(long long)c * s.k_sd_of(kv0 + jl)] : T(0);
            sV[jl * LDS + c] = vr != nullptr ? vr[(long long)c * s.v_sd_of(kv0 + jl)] : T(0);
        }
        __syncthreads();
#pragma unroll
        for (int rr = 0; rr < RW; ++rr) {
            const int i = t_of[rr], j = kv0 + lane;
            const T* qr = sQ + (warp * RW + rr) * LDS;
            T x = T(0);
            for (int c = 0; c < d; ++c) x = fma(qr[c], sK[lane * LDS + c], x);
            // the mask hook (common.cuh: fa_mask): logits, -inf where the row does not see the key
            if constexpr (MODS) x = row_mask[rr].template logit<T>(x, scale, softcap, i, j);
            else x *= (T)scale;
            const bool seen = mask.visible(i, j);
            if (!seen) x = -FA_INF;
            T mx = x;
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) mx = fmax(mx, __shfl_xor_sync(0xffffffffu, mx, o));
            mx = fmax(mx, m_i[rr]);
            const T m_use = mx == -FA_INF ? T(0) : mx;
            const T alpha = exp_t<T>(m_i[rr] - m_use);
            m_i[rr] = mx;
            const T p = seen ? exp_t<T>(x - m_use) : T(0);
            T psum = p;
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) psum += __shfl_xor_sync(0xffffffffu, psum, o);
            l_i[rr] = fma(l_i[rr], alpha, psum);
#pragma unroll
            for (int u = 0; u < NU; ++u) acc[rr][u] *= alpha;
            const unsigned seen_mask = __ballot_sync(0xffffffffu, seen);
            for (int jl = 0; jl < BKV; ++jl) {
                const T pj = __shfl_sync(0xffffffffu, p, jl);
                if (!((seen_mask >> jl) & 1u)) continue;  // a masked key's V (inf, NaN) never reaches the row
#pragma unroll
                for (int u = 0; u < NU; ++u) acc[rr][u] = fma(pj, sV[jl * LDS + lane + 32 * u], acc[rr][u]);
            }
        }
    }

    const long long n_rows = (long long)batch * heads_kv * group * seq_q;
#pragma unroll
    for (int rr = 0; rr < RW; ++rr) {
        const int r = r_begin + warp * RW + rr;
        if (r >= r_end) continue;
        const int t = r / group, h = hkv * group + (r - t * group);
        const T l = l_i[rr];
        const bool empty = l == T(0);
        const L lse_r = empty ? (L)(-FA_INF) : (L)(m_i[rr] + log(l));
        if (num_splits == 1) {
            T* op = out + (long long)b * o_sb + (long long)t * o_ss + (long long)h * o_sh;
#pragma unroll
            for (int u = 0; u < NU; ++u)
                if (lane + 32 * u < dv) op[lane + 32 * u] = empty ? T(0) : acc[rr][u] / l;
            if (lane == 0 && lse != nullptr) lse[(long long)b * lse_sb + (long long)h * lse_sh + t] = lse_r;
        } else {
            const long long row = (long long)split * n_rows + ((long long)b * heads_kv * group + h) * seq_q + t;
#pragma unroll
            for (int u = 0; u < NU; ++u)
                if (lane + 32 * u < dv) part_o[row * dv + lane + 32 * u] = empty ? L(0) : (L)(acc[rr][u] / l);
            if (lane == 0) part_lse[row] = lse_r;
        }
    }
}

// ------------------------------------------------------------------------------------------------
// fa_decode_combine: the splits' partial results merged by their log-sum-exps, one block of four warps
// a row (rows ordered (batch, heads_q, seq_q)): the splits' lse spread over the lanes, the splits' outputs
// over the warps, each split's columns over the lanes (many independent loads in flight: batch 1 has few
// rows and many splits), the warps' sums added in shared memory in a fixed order; the math of fastattn.merge_attention: a row no split saw a key of gives 0 and -inf, a
// NaN lse makes the row NaN.
// ------------------------------------------------------------------------------------------------
// ------------------------------------------------------------------------------------------------
// fa_kv_append: the append alone, for chunks the forward kernel attends (the launcher's long-chunk
// path: fa_fwd_sm90 / fa_fwd_mma read the cache in place after this launch, on the same stream).  The
// decode kernels' arguments (one parameter buffer), then rag: the forward's padded-batch lengths,
// rag[b] = seq_q and rag[batch + b] = total (the clamped cache length plus the new tokens), written by
// block (b, head 0, 0).  Grid (batch * heads_kv, ceil(seq_new / DEC_APPEND_TOKENS)): block (b * heads_kv
// + hkv, y) copies new tokens [y * DEC_APPEND_TOKENS, ...) of that sequence and head.
// ------------------------------------------------------------------------------------------------
#define DEC_APPEND_TOKENS 16

template <typename T>
__global__ void __launch_bounds__(128) fa_kv_append(FA_DECODE_PARAMS(T, float), int* __restrict__ rag) {
    const int hkv = (int)(blockIdx.x % (unsigned)heads_kv), b = (int)(blockIdx.x / (unsigned)heads_kv);
    const dec_seq<T> s = dec_seq_of<T>(k_cache, v_cache, k_new, v_new, lens, lens_kind, lens_const, table,
                                       table_kind, table_sb, b, hkv, seq_new, capacity, block_size, num_blocks,
                                       k_sb, k_ss, k_sh, v_sb, v_ss, v_sh, kn_sb, kn_ss, kn_sh, vn_sb, vn_ss, vn_sh,
                                       k_sd, v_sd, kn_sd, vn_sd);
    if (hkv == 0 && blockIdx.y == 0 && threadIdx.x == 0) {
        rag[b] = seq_q;
        rag[batch + b] = s.total;
    }
    const int t0 = (int)blockIdx.y * DEC_APPEND_TOKENS, t1 = min(t0 + DEC_APPEND_TOKENS, s.total - s.cached);
    if (seq_new > 0 && t0 < t1)
        dec_append_rows<T>(s, t0, t1, d, dv, vec != 0, threadIdx.x, 128);
}

#ifndef FA_DECODE_MAX_DV
#define FA_DECODE_MAX_DV 256  // the largest head dim of v the launcher passes (_specs.MAX_HEAD_DIM)
#endif

template <typename T>
__device__ __forceinline__ T dec_from(float x) { return elem<T>::from_float(x); }
template <>
__device__ __forceinline__ float dec_from<float>(float x) { return x; }
template <typename T>
__device__ __forceinline__ T dec_from(double x) { return (T)x; }

__device__ __forceinline__ float dec_nan(float) { return __int_as_float(0x7fc00000); }
__device__ __forceinline__ double dec_nan(double) { return __longlong_as_double(0x7ff8000000000000LL); }

template <typename T, typename L>
__global__ void __launch_bounds__(128)
    fa_decode_combine(const L* __restrict__ part_o, const L* __restrict__ part_lse, T* __restrict__ out,
                      L* __restrict__ lse, int num_splits, int heads_q, int seq_q, int dv, long long n_rows,
                      long long o_sb, long long o_ss, long long o_sh, long long lse_sb, long long lse_sh) {
    constexpr int NW = 4, U = FA_DECODE_MAX_DV / 32;  // warps (splits w, w + NW, ...); columns per lane
    __shared__ L s_o[NW][FA_DECODE_MAX_DV];
    const long long row = blockIdx.x;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int t = (int)(row % seq_q);
    const int h = (int)((row / seq_q) % heads_q);
    const long long b = row / seq_q / heads_q;
    // the splits' lse side by side over the lanes (every warp alike): their max, any NaN, sum e^(lse_s - max)
    L mx = -FA_INF;
    bool nan = false;
    for (int sp = lane; sp < num_splits; sp += 32) {
        const L x = part_lse[sp * n_rows + row];
        nan |= x != x;
        mx = x > mx ? x : mx;
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const L y = __shfl_xor_sync(0xffffffffu, mx, o);
        mx = y > mx ? y : mx;
    }
    nan = __any_sync(0xffffffffu, nan);
    L total = L(0);
    if (mx != -FA_INF)
        for (int sp = lane; sp < num_splits; sp += 32) total += exp_t<L>(part_lse[sp * n_rows + row] - mx);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) total += __shfl_xor_sync(0xffffffffu, total, o);
    const bool empty = !nan && total == L(0);
    L o[U];
#pragma unroll
    for (int u = 0; u < U; ++u) o[u] = L(0);
    if (!empty && !nan) {
#pragma unroll 4
        for (int sp = warp; sp < num_splits; sp += NW) {
            const L w = exp_t<L>(part_lse[sp * n_rows + row] - mx);
            const L* po = part_o + (sp * n_rows + row) * dv;
#pragma unroll
            for (int u = 0; u < U; ++u) {
                const int c = lane + 32 * u;
                const L x = c < dv ? po[c] : L(0);
                o[u] += w != L(0) ? w * x : L(0);  // a split of weight 0 adds nothing, whatever it holds
            }
        }
    }
#pragma unroll
    for (int u = 0; u < U; ++u)
        if (lane + 32 * u < dv) s_o[warp][lane + 32 * u] = o[u];
    __syncthreads();
    T* op = out + b * o_sb + (long long)t * o_ss + (long long)h * o_sh;
    for (int c = threadIdx.x; c < dv; c += 32 * NW) {
        L sum = L(0);
#pragma unroll
        for (int w = 0; w < NW; ++w) sum += s_o[w][c];  // a fixed order: the result does not vary between runs
        op[c] = dec_from<T>(nan ? dec_nan(L(0)) : (empty ? L(0) : sum / total));
    }
    if (threadIdx.x == 0 && lse != nullptr)
        lse[b * lse_sb + (long long)h * lse_sh + t] = nan ? dec_nan(L(0)) : (empty ? (L)(-FA_INF) : mx + log(total));
}
