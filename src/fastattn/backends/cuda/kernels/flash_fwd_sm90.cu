// FlashAttention forward for Hopper (sm_90a): warpgroup MMA (wgmma) on swizzled shared-memory tiles.
//
// Same math as fa_fwd_mma in flash_fwd.cu (online softmax on raw scores, exponent (s - m) * scale *
// log2 e, masked keys never contribute: see there), same arguments, same results; float16 /
// bfloat16, no dropout, d % 8 == 0 with unit stride along d.
// The element type is a template flag (BF16) over 16-bit storage: the source needs no CUDA header,
// so NVRTC compiles it wherever CuPy finds NVRTC.
//
// Work split: one block per (query tile of 64 * NWG rows, batch*head); each of the NWG warpgroups
// (4 warps, 128 threads) owns 64 query rows and walks every key/value tile of its head.
//   S = Q K^T   wgmma m64nBKVk16, A = Q and B = K straight from shared memory (K-major)
//   O += P V    wgmma m64nDk16, A = P from registers (the S accumulators re-packed to 16 bits),
//               B = V from shared memory (MN-major: the instruction transposes it)
// Tiles live in shared memory in the 128-byte-swizzle layout the tensor cores read without bank
// conflicts: a tile of R rows x D columns is stored as D/64 panels of R rows x 64 columns (128
// bytes a row); the 16-byte chunk c of row r sits at chunk position c ^ (r % 8).
//
// Pipeline (per warpgroup, tile j): issue S_j = Q K_j^T and O += P_{j-1} V_{j-1} back to back,
// then, while the tensor cores run, the cp.async copies of K_{j+1} and V_j (K runs one tile ahead
// of V, two buffers each); wait for S_j only and run the softmax of tile j on the CUDA cores while
// the tensor cores finish P_{j-1} V_{j-1}; then rescale O.  Buffers are handed over on mbarriers,
// not a block barrier: "full" completes when every thread's copies into it landed
// (cp.async.mbarrier.arrive), "empty" when every warp's MMAs reading it finished, so the warpgroups
// of a block may drift up to a tile apart and one's softmax can overlap another's MMAs.
#include "common.cuh"
#include "wgmma.cuh"
#include "sm90.cuh"

namespace fa_sm90 {

#ifdef FA_PAGED_KV
// A paged K/V cache (fastattn.flash_attention_with_kvcache's long chunks; compiled only with
// -DFA_PAGED_KV, so the plain forward's cubins do not change): key row j of batch entry b is row
// j % block_size of block table[b * table_sb + j / block_size]; a block id outside [0, num_blocks)
// reads as zeros (the launcher checks the table unless a CUDA graph is being captured).  g points
// at the head's row 0 of block 0; sb is the block stride.
//
// The block ids are read a key tile ahead, one table entry a lane: lane l of every warp holds the id
// of block slot(row0) + l of a tile starting at key row0 (a tile of BKV keys spans at most
// BKV / 16 + 1 blocks, block_size being a multiple of 16), and each row's copy takes its id from that
// lane by a shuffle.  Two tiles are held: v_* the tile whose V is copied next (its K was copied a
// tile earlier) and k_* the one after it, whose K is copied next; after each V tile's copies the
// entries of the tile after that are loaded, so a table load has a whole tile's work to land in
// before its first use (the copies no longer wait on a dependent global load).  An entry is kept
// raw, as two 32-bit words (lo, hi; an int32 table's hi is 0, its negative ids read as huge
// unsigned ones): nothing touches a loaded register before the copies that need it, where the
// range check turns it into an id or -1.
struct kv_pages {
    const void* table;
    long long row_off, sb_k, sb_v;
    int kind, block_size, shift, num_blocks;
    int row_v;                            // first key of the tile held in v_*
    unsigned v_lo, v_hi, k_lo, k_hi;     // this lane's raw table entries of tiles row_v, row_v + BKV
    __device__ __forceinline__ int slot_of(int j) const { return shift >= 0 ? (j >> shift) : j / block_size; }
    __device__ __forceinline__ int row_in_block(int j, int slot) const {
        return shift >= 0 ? (j & (block_size - 1)) : j - slot * block_size;
    }
    // this lane's raw entry of the tile at row0 (all ones where the lane's block holds no key < seq or
    // lies past the tile): independent loads, nothing here waits for them
    template <int BKV>
    __device__ __forceinline__ void load_raw(int row0, int seq, unsigned& lo, unsigned& hi) const {
        const int s0 = slot_of(row0), slot = s0 + (int)(threadIdx.x & 31u);
        lo = hi = 0xffffffffu;
        if (slot <= slot_of(row0 + BKV - 1) && (long long)slot * block_size < seq) {
            const unsigned* t = reinterpret_cast<const unsigned*>(table);
            if (kind == 8) {
                const long long at = 2 * (row_off + slot);
                lo = __ldg(t + at);
                hi = __ldg(t + at + 1);
            } else {
                lo = __ldg(t + row_off + slot);
                hi = 0u;
            }
        }
    }
    __device__ __forceinline__ int id_of(unsigned lo, unsigned hi) const {
        return hi == 0u && lo < (unsigned)num_blocks ? (int)lo : -1;
    }
    // before the first tile: the entries of tiles row0 and row0 + BKV
    template <int BKV>
    __device__ __forceinline__ void start(int row0, int seq) {
        row_v = row0;
        load_raw<BKV>(row0, seq, v_lo, v_hi);
        load_raw<BKV>(row0 + BKV, seq, k_lo, k_hi);
    }
    // this lane's block id of the tile at row0 (row_v or row_v + BKV)
    __device__ __forceinline__ int ids(int row0) const {
        return row0 == row_v ? id_of(v_lo, v_hi) : id_of(k_lo, k_hi);
    }
    // after the V copies of tile row_v: hold the next two tiles, the entries of the later one loading
    template <int BKV>
    __device__ __forceinline__ void advance(int seq) {
        row_v += BKV;
        v_lo = k_lo;
        v_hi = k_hi;
        load_raw<BKV>(row_v + BKV, seq, k_lo, k_hi);
    }
};

// load_tile through the block table, the tile's block ids in the lanes (ids: lane l holds block
// slot(row0) + l, or -1); every thread of the block takes part (the shuffles).  Where a thread's
// chunks are whole rows apart (NT a multiple of D / 8: head dims 64, 128, 256) its rows step by
// RS = NT / (D / 8) and the row's block and row in the block are carried from chunk to chunk (a
// block holds at least 16 rows, so a step crosses at most ceil(RS / 16) block ends): no division
// per chunk.  Else each chunk divides.
template <int R, int D, int NT>
__device__ __forceinline__ void load_tile_paged(unsigned sbase, const unsigned short* __restrict__ g, long long ss,
                                                long long sb, const kv_pages& pg, int ids, int row0, int seq, int d,
                                                int tid) {
    static_assert(R / 16 + 1 <= 32, "a tile's blocks: one a lane");
    constexpr int CPR = D / 8, TOTAL = R * CPR, PER = (TOTAL + NT - 1) / NT;
    const int s0 = pg.slot_of(row0);
    if constexpr (NT % CPR == 0) {
        constexpr int RS = NT / CPR;
        const int r0 = tid / CPR, ch = tid % CPR;
        const int j0 = row0 + r0, slot0 = pg.slot_of(j0);
        int lane_i = slot0 - s0;                  // the lane holding the block of this thread's row
        int rib = j0 - slot0 * pg.block_size;     // the row inside its block
        const int left = ch * 8 < d ? seq - j0 : 0;  // chunk i is read where i * RS < left
        const unsigned short* gc = g + ch * 8;
        const unsigned s_base = sbase + sw128_offset<R>(r0, ch);
#pragma unroll
        for (int i = 0; i < PER; ++i) {
            const int blk = __shfl_sync(0xffffffffu, ids, lane_i);
            if (TOTAL % NT == 0 || r0 + i * RS < R) {
                const bool ok = blk >= 0 && i * RS < left;
                const unsigned short* src = gc + ((long long)(unsigned)blk * sb + (long long)(unsigned)rib * ss);
                const unsigned dst = RS % 8 == 0 ? s_base + (unsigned)(i * RS * 128)
                                                 : sbase + sw128_offset<R>(r0 + i * RS, ch);
                cp_async_16(dst, ok ? src : g, ok ? 16 : 0);
            }
            if (i + 1 < PER) {
                rib += RS;
#pragma unroll
                for (int k = 0; k < (RS + 15) / 16; ++k) {
                    if (rib >= pg.block_size) {
                        rib -= pg.block_size;
                        ++lane_i;
                    }
                }
            }
        }
    } else {
#pragma unroll
        for (int i = 0; i < PER; ++i) {
            const int c = tid + i * NT;
            const int r = c / CPR, ch = c % CPR, j = row0 + r;
            const int slot = pg.slot_of(j);
            const int blk = __shfl_sync(0xffffffffu, ids, (slot - s0) & 31);
            if (TOTAL % NT == 0 || c < TOTAL) {
                const bool ok = blk >= 0 && j < seq && ch * 8 < d;
                const long long off = (long long)blk * sb + (long long)pg.row_in_block(j, slot) * ss + ch * 8;
                cp_async_16(sbase + sw128_offset<R>(r, ch), ok ? g + off : g, ok ? 16 : 0);
            }
        }
    }
}
#define FA_LOAD_K(dst, row0) \
    load_tile_paged<BKV, D, NT>(dst, kp, k_ss, pages.sb_k, pages, pages.ids(row0), row0, lk, d, tid)
#define FA_LOAD_V(dst, row0)                                                                                  \
    do {                                                                                                      \
        load_tile_paged<BKV, DV, NT>(dst, vp, v_ss, pages.sb_v, pages, pages.ids(row0), row0, lk, dv, tid); \
        pages.advance<BKV>(lk);                                                                               \
    } while (0)
#else
#define FA_LOAD_K(dst, row0) load_tile<BKV, D, NT>(dst, kp, k_ss, row0, lk, d, tid)
#define FA_LOAD_V(dst, row0) load_tile<BKV, DV, NT>(dst, vp, v_ss, row0, lk, dv, tid)
#endif

}  // namespace fa_sm90


// attn_mask elements (i, j) and (i, j + 1) of kind MK as floats (a bias) or 0 / 1 (a boolean mask),
// from row pointer row (bytes); pair: one aligned load of both (unit key stride); ok0 / ok1: the
// element lies inside the entry (else it is not read: 0)
template <int MK>
__device__ __forceinline__ void fa_mask_pair(const unsigned char* row, long long m_sj, int j, bool pair, bool ok0,
                                             bool ok1, float& a, float& b) {
    constexpr int ES = MK == FA_MASK_BOOL ? 1 : (MK <= FA_MASK_BF16 ? 2 : (MK == FA_MASK_F32 ? 4 : 8));
    auto one = [&](long long off) -> float {
        const unsigned char* p = row + off * ES;
        if constexpr (MK == FA_MASK_BOOL) return *p != 0 ? 1.0f : 0.0f;
        else if constexpr (MK == FA_MASK_F16) return float_of_f16_bits(*reinterpret_cast<const unsigned short*>(p));
        else if constexpr (MK == FA_MASK_BF16)
            return __uint_as_float((unsigned)*reinterpret_cast<const unsigned short*>(p) << 16);
        else if constexpr (MK == FA_MASK_F32) return *reinterpret_cast<const float*>(p);
        else return (float)*reinterpret_cast<const double*>(p);
    };
    if (pair && ok1) {
        const unsigned char* p = row + (long long)j * ES;
        if constexpr (MK == FA_MASK_BOOL) {
            const unsigned short w = *reinterpret_cast<const unsigned short*>(p);
            a = (w & 0xffu) ? 1.0f : 0.0f;
            b = (w >> 8) ? 1.0f : 0.0f;
        } else if constexpr (MK == FA_MASK_F16) {
            const unsigned w = *reinterpret_cast<const unsigned*>(p);
            a = float_of_f16_bits((unsigned short)(w & 0xffffu));
            b = float_of_f16_bits((unsigned short)(w >> 16));
        } else if constexpr (MK == FA_MASK_BF16) {
            const unsigned w = *reinterpret_cast<const unsigned*>(p);
            a = __uint_as_float(w << 16);
            b = __uint_as_float(w & 0xffff0000u);
        } else if constexpr (MK == FA_MASK_F32) {
            const float2 w = *reinterpret_cast<const float2*>(p);
            a = w.x;
            b = w.y;
        } else {
            const double2 w = *reinterpret_cast<const double2*>(p);
            a = (float)w.x;
            b = (float)w.y;
        }
    } else {
        a = ok0 ? one((long long)j * m_sj) : 0.0f;
        b = ok1 ? one((long long)(j + 1) * m_sj) : 0.0f;
    }
}

// attn_mask elements (row, j) and (row, j + 1) of kind MK (up to 4 bytes) from the shared-memory copy
// of the tile (common zero-filled outside the entry: 0 = hidden for a boolean mask, no bias)
template <int MK>
__device__ __forceinline__ void fa_mask_pair_smem(unsigned addr, float& a, float& b) {
    if constexpr (MK == FA_MASK_BOOL) {
        unsigned short w;
        asm volatile("ld.shared.u16 %0, [%1];\n" : "=h"(w) : "r"(addr));
        a = (w & 0xffu) ? 1.0f : 0.0f;
        b = (w >> 8) ? 1.0f : 0.0f;
    } else if constexpr (MK == FA_MASK_F32) {
        asm volatile("ld.shared.v2.f32 {%0, %1}, [%2];\n" : "=f"(a), "=f"(b) : "r"(addr));
    } else {
        unsigned w;
        asm volatile("ld.shared.b32 %0, [%1];\n" : "=r"(w) : "r"(addr));
        if constexpr (MK == FA_MASK_F16) {
            a = float_of_f16_bits((unsigned short)(w & 0xffffu));
            b = float_of_f16_bits((unsigned short)(w >> 16));
        } else {
            a = __uint_as_float(w << 16);
            b = __uint_as_float(w & 0xffff0000u);
        }
    }
}

// attn_mask tiles in shared memory (fa_fwd_sm90, MODS_FORM FA_MODS_TILES): each warp copies its own 16
// rows x BKV keys with cp.async, tiles ahead, into a ring of two or three; rows of FA_MROW(BKV) bytes (4-byte
// elements at most, +16 bytes so that the hook's reads of 8 rows fall in distinct banks)
#define FA_MROW(BKV) ((BKV) * 4 + 16)

// The mask hook on one tile of wgmma accumulators (thread rows r0, r0 + 8; keys kv0 + 8 n + 2 t4 +
// {0, 1}): logits of the form F (MODS: bit 0 softcap, bit 1 ALiBi; -1: raw scores), attn_mask of
// kind MK (0 none, FA_MASK_BOOL, or a float bias's dtype), read from the warp's shared-memory copy
// of the tile at msh (SM) or else through two row pointers, pairs of keys at once where the key
// stride is 1 and rows are aligned; -inf where the row does not see the key (NEEDS: the tile has
// elements outside the interval; a boolean mask tests every element).  TANH: the softcap through
// tanh.approx (common.cuh: fa_mask::logit2_d); TU: the softcap alone, left as tanh(scale s / c)
// (the caller's exponent multiplies by c log2 e).  ALiBi's distance i + off - j is formed from one
// per-thread base with a constant offset per element (exact below 2^24).
template <int F, int MK, bool TANH, bool NEEDS, bool SM = false, bool TU = false, int NS, class Mask>
__device__ __forceinline__ void fa_hook_tile(float (&s)[NS], const Mask& mask, int kv0, int r0, int t4,
                                             unsigned msh = 0u) {
    constexpr bool SC = F >= 0 && (F & 1) != 0, AL = F >= 0 && (F & 2) != 0;
    constexpr bool BO = MK == FA_MASK_BOOL, BI = MK >= FA_MASK_F16;
    constexpr int ES = MK == FA_MASK_BOOL ? 1 : (MK <= FA_MASK_BF16 ? 2 : (MK == FA_MASK_F32 ? 4 : 8));
    static_assert(!SM || ES <= 4, "shared-memory mask tiles hold elements of up to 4 bytes");
    constexpr int MROW = FA_MROW(NS * 2);
    const unsigned char* rows[2] = {nullptr, nullptr};
    bool pair = false;
    if constexpr (SM) {
        msh += (unsigned)((((int)threadIdx.x & 31) >> 2) * MROW + 2 * t4 * ES);  // row g, key 2 t4
    } else if constexpr (BO || BI) {
#pragma unroll
        for (int r = 0; r < 2; ++r) rows[r] = mask.m + (long long)min(r0 + 8 * r, mask.lq - 1) * mask.m_si * ES;
        pair = mask.m_sj == 1 &&
               ((reinterpret_cast<unsigned long long>(rows[0]) | reinterpret_cast<unsigned long long>(rows[1])) %
                (2 * ES)) == 0;
    }
    float dist0 = 0.0f;  // ALiBi: i + alibi_off - j at row r0, key kv0 + 2 t4
    if constexpr (AL) dist0 = (float)(r0 + mask.alibi_off - kv0 - 2 * t4);
#pragma unroll
    for (int e2 = 0; e2 < NS; e2 += 2) {
        const int j = kv0 + (e2 >> 2) * 8 + 2 * t4;
        const int rr = (e2 >> 1) & 1;
        const int i = r0 + rr * 8;
        float m0 = 0.0f, m1 = 0.0f;
        if constexpr (SM) {
            fa_mask_pair_smem<MK>(msh + (unsigned)(rr * 8 * MROW + (e2 >> 2) * 8 * ES), m0, m1);
        } else if constexpr (BO || BI) {
            const bool row_ok = i < mask.lq;
            fa_mask_pair<MK>(rows[rr], mask.m_sj, j, pair, row_ok && j < mask.lk, row_ok && j + 1 < mask.lk, m0, m1);
        }
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            float x = s[e2 + h];
            if constexpr (TU) {
                static_assert(SC && !AL && !BI && TANH, "tanh units: the softcap alone");
                x = mask.softcap_t(x);
            } else if constexpr (F >= 0) {
                x = mask.template logit2_d<SC, AL, BI, TANH>(x, dist0 + (float)(rr * 8 - (e2 >> 2) * 8 - h),
                                                             h ? m1 : m0);
            }
            if constexpr (BO) {
                if (!((!NEEDS || mask.in_interval(i, j + h)) && (h ? m1 : m0) != 0.0f)) x = -FA_INF;
            } else {
                if (NEEDS && !mask.in_interval(i, j + h)) x = -FA_INF;
            }
            s[e2 + h] = x;
        }
    }
}

// the tile's loop with or without the interval test per element: tiles inside every row's interval
// (most of them) skip it (needs: warp-uniform)
template <int F, int MK, bool TANH, bool SM = false, bool TU = false, int NS, class Mask>
__device__ __forceinline__ void fa_hook_needs(float (&s)[NS], const Mask& mask, int kv0, int r0, int t4, bool needs,
                                              unsigned msh = 0u) {
    if (needs) fa_hook_tile<F, MK, TANH, true, SM, TU>(s, mask, kv0, r0, t4, msh);
    else fa_hook_tile<F, MK, TANH, false, SM, TU>(s, mask, kv0, r0, t4, msh);
}

// attn_mask's kind (never none here: these kernels serve calls with an attn_mask), from the warp's
// shared-memory tile at msh (SM: FA_MODS_TILES) or from global memory (FA_MODS_ALL: keys not
// contiguous, rows not 16-byte aligned, float64; the interval test on every element there)
template <int F, bool TANH, bool SM, int NS, class Mask>
__device__ __forceinline__ void fa_hook_kind(float (&s)[NS], const Mask& mask, int kv0, int r0, int t4, bool needs,
                                             unsigned msh) {
    if constexpr (SM) {
        switch (mask.mask_kind) {  // uniform: one loop per tile, no branch per element
            case FA_MASK_BOOL: fa_hook_needs<F, FA_MASK_BOOL, TANH, true>(s, mask, kv0, r0, t4, needs, msh); break;
            case FA_MASK_F16: fa_hook_needs<F, FA_MASK_F16, TANH, true>(s, mask, kv0, r0, t4, needs, msh); break;
            case FA_MASK_BF16: fa_hook_needs<F, FA_MASK_BF16, TANH, true>(s, mask, kv0, r0, t4, needs, msh); break;
            default: fa_hook_needs<F, FA_MASK_F32, TANH, true>(s, mask, kv0, r0, t4, needs, msh); break;
        }
    } else {
        switch (mask.mask_kind) {
            case FA_MASK_BOOL: fa_hook_tile<F, FA_MASK_BOOL, TANH, true>(s, mask, kv0, r0, t4); break;
            case FA_MASK_F16: fa_hook_tile<F, FA_MASK_F16, TANH, true>(s, mask, kv0, r0, t4); break;
            case FA_MASK_BF16: fa_hook_tile<F, FA_MASK_BF16, TANH, true>(s, mask, kv0, r0, t4); break;
            case FA_MASK_F32: fa_hook_tile<F, FA_MASK_F32, TANH, true>(s, mask, kv0, r0, t4); break;
            default: fa_hook_tile<F, FA_MASK_F64, TANH, true>(s, mask, kv0, r0, t4); break;
        }
    }
}

// the softcap through tanh.approx (one MUFU op) on bfloat16, and on float16 unless FA_SOFTCAP_TANH_F16
// is 0: measured on an H100 (tools/gpu_mods_probe.py tanh), the float16 outputs' error against
// float64 stayed within 0.77-0.93x that of a plain float16 implementation either way
#ifndef FA_SOFTCAP_TANH_F16
#define FA_SOFTCAP_TANH_F16 1
#endif

// ------------------------------------------------------------------------------------------------
// fa_v_nonfinite: sets *flag when v (heads x seq rows per batch entry, dv columns, unit stride
// along dv, 16-byte aligned rows: what fa_fwd_sm90 reads) holds inf or NaN.  Run before a call
// whose tiles often hide keys from some rows (a window, a boolean mask): when V is finite, as it
// nearly always is, fa_fwd_sm90 then skips the per-tile masked-V checks (v_flag).  One warp a row.
// ------------------------------------------------------------------------------------------------
template <bool BF16>
__global__ void __launch_bounds__(256)
    fa_v_nonfinite(const unsigned short* __restrict__ v, int heads, int seq, int dv, long long sb, long long sh,
                   long long ss, long long rows, int* __restrict__ flag) {
    const int lane = threadIdx.x & 31, cpr = dv / 8;
    unsigned acc = 0u;
    for (long long r = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5; r < rows;
         r += ((long long)gridDim.x * blockDim.x) >> 5) {
        const long long bh = r / seq, s = r - bh * seq;
        const unsigned short* row = v + (bh / heads) * sb + (bh % heads) * sh + s * ss;
        for (int ch = lane; ch < cpr; ch += 32) {
            uint4 w = *reinterpret_cast<const uint4*>(row + ch * 8);
            acc = nonfinite_or16x2<BF16>(acc, w.x);
            acc = nonfinite_or16x2<BF16>(acc, w.y);
            acc = nonfinite_or16x2<BF16>(acc, w.z);
            acc = nonfinite_or16x2<BF16>(acc, w.w);
        }
    }
    if (nonfinite_seen(acc)) *flag = 1;
}

// timing probe of the attn_mask tiles (FA_MODS_TILES; results wrong, never the default): bit 0 skips the
// mask copies, bit 1 the mask in the hook (the scores still scaled to logits, the interval test kept)
#ifndef FA_PROBE_MASK
#define FA_PROBE_MASK 0
#endif

enum { FA_MODS_NONE = 0, FA_MODS_ALL = 1, FA_MODS_LOGITS = 2, FA_MODS_TILES = 3 };  // fa_fwd_sm90's MODS_FORM

// ------------------------------------------------------------------------------------------------
// fa_fwd_sm90
//   BF16 bfloat16 (true) or float16 (false) inputs and output
//   D    head_dim of q / k padded (64, 128, 192, 256: whole swizzle panels)
//   DV   head_dim of v (and out) padded, likewise
//   NWG  warpgroups per block: block_q = 64 * NWG
//   BKV  block_kv (64 or 128)
//   MINB blocks per SM the register budget must allow (2: at most 65536 / (2 * 128 * NWG) registers
//        a thread, so two blocks share an SM and one's softmax overlaps the other's MMAs)
//   INTERVAL causal and/or a window: key tiles outside the block's interval are skipped, tiles
//        that hide keys from some rows take the masked-V checks (common.cuh: fa_mask)
//   MODS_FORM FA_MODS_NONE (false): none; FA_MODS_ALL (true): softcap / ALiBi / attn_mask of any
//        kind and layout, read from global memory in the hook (the guarded path); FA_MODS_TILES (3):
//        the same with an attn_mask whose rows the launcher found 16-byte aligned with a unit key
//        stride (elements of up to 4 bytes): copied into shared memory with cp.async a tile ahead;
//        FA_MODS_LOGITS (2): softcap / ALiBi without attn_mask (4 loop forms, no mask loads or
//        registers).  The mask's kind and the logit form are switched once per tile.  One hook.
// Shared memory (dynamic, 1024-byte aligned inside): Q block_q x D, K 2 x BKV x D, V 2 x BKV x DV,
// a 16 x DV tile of zeros, with FA_MODS_TILES each warp's ring of 16 x BKV attn_mask tiles (FA_MROW
// bytes a row; three tiles up to head dims of 128, else two); static: 8 mbarriers.
// Registers per thread: S BKV/2 floats, P BKV/4 words, O DV/2 floats.
// ------------------------------------------------------------------------------------------------

template <bool BF16, int D, int DV, int NWG, int BKV, int MINB, bool INTERVAL, int MODS_FORM>
__global__ void __launch_bounds__(NWG * 128, MINB)
    fa_fwd_sm90(FA_COMMON_PARAMS(unsigned short, float), float softcap, float scale_log2, float scale,
                unsigned long long seed, unsigned threshold, float keep_scale
#ifdef FA_PAGED_KV
                , const void* __restrict__ block_table, int table_kind, long long table_sb, int block_size,
                int num_blocks, long long k_blk, long long v_blk
#endif
    ) {
    using namespace fa_sm90;
    static_assert(D % 64 == 0 && DV % 64 == 0 && BKV % 16 == 0, "D, DV: whole 64-column panels; BKV: whole k-steps");
    constexpr int BQ = 64 * NWG, NT = 128 * NWG;
    constexpr unsigned Q_BYTES = BQ * D * 2, K_BYTES = BKV * D * 2, V_BYTES = BKV * DV * 2, Z_BYTES = 16 * DV * 2;
    constexpr int NS = BKV / 2, NO = DV / 2;  // accumulator registers per thread
    static_assert(MODS_FORM >= FA_MODS_NONE && MODS_FORM <= FA_MODS_TILES, "MODS_FORM");
    constexpr bool MODS = MODS_FORM != FA_MODS_NONE;  // the mask's logit fields (fa_mask<., true>)
    constexpr bool TILES = MODS_FORM == FA_MODS_TILES;  // attn_mask tiles in shared memory
    constexpr bool ALL = MODS_FORM == FA_MODS_ALL || TILES;  // attn_mask's code
    constexpr bool HIDES = INTERVAL || ALL;  // can a key < Lk be hidden? (else every P V is PV_WGMMA)
    constexpr bool TANH = BF16 || FA_SOFTCAP_TANH_F16 != 0;

    extern __shared__ unsigned char smem_raw[];
    const unsigned raw = smem_u32(smem_raw);
    const unsigned sQ = (raw + 1023u) & ~1023u;
    const unsigned sK = sQ + Q_BYTES, sV = sK + 2 * K_BYTES;
    const unsigned sZ = sV + 2 * V_BYTES;  // 16 x DV zeros: the V operand of a P V that must add nothing
    // FA_MODS_TILES: each warp's ring of MST attn_mask tiles (16 rows x BKV keys, FA_MROW bytes a row):
    // three up to head dims of 128 (two tiles in flight while one is read), two above (shared memory)
    constexpr int MROW = FA_MROW(BKV), MST = (D <= 128 && DV <= 128) ? 3 : 2;
    constexpr unsigned M_TILE = 16u * MROW, M_WARP = MST * M_TILE;
    const unsigned sMw = sZ + Z_BYTES + (unsigned)(threadIdx.x >> 5) * M_WARP;

    // heaviest query tiles first (causal: the last ones)
    const int q_block = num_q_blocks - 1 - (int)(blockIdx.x % (unsigned)num_q_blocks);
    const fa_entry e = fa_entry_of((int)(blockIdx.x / (unsigned)num_q_blocks), heads, ragged, rag_q, rag_kv,
                                   seq_q, seq_kv);
    const int q0 = q_block * BQ;
    const int tid = threadIdx.x, wg = tid >> 7, warp = (tid >> 5) & 3, lane = tid & 31;
    const int g = lane >> 2, t4 = lane & 3;
    const int row_wg0 = q0 + wg * 64;        // first of this warpgroup's 64 rows
    const int row_w0 = row_wg0 + warp * 16;  // first of this warp's 16 rows; thread rows +g, +g+8
    const fa_mask<INTERVAL, MODS> mask = fa_mask_of<INTERVAL, MODS>(
        e, bottom_right, win_left, win_right, attn_mask, m_sb, m_sh, m_si, m_sj, mask_kind, slopes, slopes_sb,
        scale, softcap);
    // FA_MODS_TILES: attn_mask's element size (the launcher chose the form: unit key stride,
    // 16-byte aligned rows, elements of up to 4 bytes)
    const int mes = mask_kind == FA_MASK_BOOL ? 1 : (mask_kind <= FA_MASK_BF16 ? 2 : 4);
    // with MODS the hook hands the softmax logits in log2 units: exponent (s - m), lse m ln 2 + ln l
    // FA_MODS_LOGITS: the softcap alone (form 1) hands over t = tanh(scale s / c) and the exponent
    // takes the factor c log2 e (kx) in its FFMA, 2^(kx t - kx m): one FMUL and one MUFU a score for
    // the softcap; the other forms kx = 1 (exactly x - m)
    constexpr bool LOGITS = MODS_FORM == FA_MODS_LOGITS;
    const bool t_units = LOGITS && TANH && mask.mods_form() == 1;
    const float kx = t_units ? mask.sc_c2 : 1.0f;
    const float sl2 = MODS ? 1.0f : scale_log2;
    const float lse_scale = LOGITS ? kx * 0.6931471805599453f : (MODS ? 0.6931471805599453f : scale);

    const unsigned short* qp = q + e.view_b * q_sb + e.h * q_sh + e.q_row * q_ss;
    const unsigned short* kp = k + e.view_b * k_sb + (e.h / group) * k_sh + e.kv_row * k_ss;
    const unsigned short* vp = v + e.view_b * v_sb + (e.h / group) * v_sh + e.kv_row * v_ss;
#ifdef FA_PAGED_KV
    kv_pages pages;
    pages.table = block_table, pages.row_off = (long long)e.b * table_sb, pages.sb_k = k_blk, pages.sb_v = v_blk;
    pages.kind = table_kind, pages.block_size = block_size, pages.num_blocks = num_blocks;
    pages.shift = (block_size & (block_size - 1)) == 0 ? __ffs(block_size) - 1 : -1;
#endif

    // the key tiles this block needs (the one tile-skipping rule); none: every row sees no key
    int kv_lo = 0, kv_hi = 0;
    if (q0 < e.lq) mask.key_range(q0, min(q0 + BQ, e.lq), kv_lo, kv_hi);
    if (kv_hi <= kv_lo) {
        unsigned short* ob = out + e.view_b * o_sb + e.h * o_sh + e.q_row * o_ss;
        float* lb = lse + e.view_b * lse_sb + e.h * lse_sh + e.q_row;
        const int rows_out = ragged == 2 ? e.lq : seq_q;  // padded batches: rows past Lq get 0 / -inf
        write_empty_rows(ob, lb, o_ss, min(q0, rows_out), min(q0 + BQ, rows_out), dv, tid, NT);
        return;
    }
    const int kv_begin = (kv_lo / BKV) * BKV;
    const int n_tiles = (kv_hi - kv_begin + BKV - 1) / BKV;  // >= 1
    const int lk = e.lk;
#ifdef FA_PAGED_KV
    pages.start<BKV>(kv_begin, lk);  // the first two tiles' block ids, loading
#endif

    // K/V buffers handed over on mbarriers instead of one __syncthreads a tile, so the warpgroups
    // may drift apart by up to a tile: full_{K,V}[b] complete when every thread's copies into buffer
    // b landed (count NT), empty_{K,V}[b] when every warp's MMAs reading it finished (count 4 NWG)
    __shared__ __align__(8) unsigned long long bars[8];
    const unsigned full_k = smem_u32(bars), full_v = full_k + 16, empty_k = full_k + 32, empty_v = full_k + 48;
    if (tid == 0) {
        for (int i = 0; i < 2; ++i) {
            mbar_init(full_k + 8 * i, NT);
            mbar_init(full_v + 8 * i, NT);
            mbar_init(empty_k + 8 * i, 4 * NWG);
            mbar_init(empty_v + 8 * i, 4 * NWG);
        }
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    if constexpr (HIDES) {
        for (int c = tid; c < (int)(Z_BYTES / 16); c += NT)
            asm volatile("st.shared.v4.b32 [%0], {%1, %1, %1, %1};\n" ::"r"(sZ + c * 16), "r"(0u) : "memory");
        fence_proxy_async();  // the zeros are read by the tensor cores (async proxy)
    }
    // the warp's rows [row_w0, row_w0 + 16) of attn_mask at key tile jt into ring slot jt % MST, one
    // cp.async group (committed even when empty: softmax of tile jt waits for all but the MST - 1
    // newest groups); rows past Lq and keys past Lk are zero-filled, never read
    // Lane l copies chunk ch = l % cpr (cpr = BKV * mes / 16 chunks a row, a power of two dividing
    // 32) of rows l / cpr + t * (32 / cpr), t < cpr / 2: its chunk and first row never change, so
    // one row pointer (advanced by a fixed row step) serves every tile
    const int cpr_log2 = (mes == 1 ? 0 : mes == 2 ? 1 : 2) + (BKV == 32 ? 1 : BKV == 64 ? 2 : 3);
    const int m_ch = lane & ((1 << cpr_log2) - 1), m_r0 = lane >> cpr_log2, m_rstep = 32 >> cpr_log2;
    const long long m_step = (long long)m_rstep * mask.m_si * mes;  // bytes between a lane's rows
    const unsigned char* m_row0 = TILES ? mask.m + (long long)(row_w0 + m_r0) * mask.m_si * mes : nullptr;
    auto load_mask = [&](int jt) {
        if (TILES && jt < n_tiles && (FA_PROBE_MASK & 1) == 0) {
            const int key = kv_begin + jt * BKV + m_ch * (16 / mes);
            const int kbytes = max(0, min(16, (mask.lk - key) * mes));
            const unsigned char* src = m_row0 + (long long)key * mes;
            unsigned dst = sMw + (unsigned)(jt % MST) * M_TILE + (unsigned)(m_r0 * MROW + m_ch * 16);
            int i = row_w0 + m_r0;
            for (int t = 0; t < (1 << cpr_log2) / 2; ++t) {
                const int bytes = i < mask.lq ? kbytes : 0;
                cp_async_16(dst, bytes > 0 ? src : mask.m, bytes);
                src += m_step;
                dst += (unsigned)(m_rstep * MROW);
                i += m_rstep;
            }
        }
        cp_async_commit();
    };
    __syncthreads();
    if constexpr (TILES) {
        static_assert(BKV == 32 || BKV == 64 || BKV == 128, "mask tiles: BKV of 32, 64 or 128");
#pragma unroll
        for (int jt = 0; jt < MST; ++jt) load_mask(jt);
    }
    load_tile<BQ, D, NT>(sQ, qp, q_ss, q0, e.lq, d, tid);
    FA_LOAD_K(sK, kv_begin);
    mbar_arrive_cp_async(full_k);
    if (n_tiles > 1) {
        FA_LOAD_K(sK + K_BYTES, kv_begin + BKV);
        mbar_arrive_cp_async(full_k + 8);
    }
    FA_LOAD_V(sV, kv_begin);
    mbar_arrive_cp_async(full_v);

    float s[NS], o[NO];
    unsigned p[BKV / 4];
    float m_i[2] = {-FA_INF, -FA_INF};  // row max of the softmax's input (raw scores, or log2 logits)
    // this thread's share of the row sums (its columns): one float chain, l = alpha l + tile sum
    // (as in fa_fwd_mma; the SIMT kernel's two-level row_sum would cost a register a row, and this
    // kernel's tiles sit at their register limits)
    float l_i[2] = {0.0f, 0.0f};
#pragma unroll
    for (int i = 0; i < NO; ++i) o[i] = 0.0f;

    const unsigned q_warpgroup = sQ + wg * 64 * 128;
    // S = Q K^T over D/16 k-steps: panel kk / 4, 32 bytes per k-step inside the 128-byte row
    auto issue_s = [&](unsigned k_tile) {
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
            const unsigned a = q_warpgroup + (kk >> 2) * (BQ * 128) + (kk & 3) * 32;
            const unsigned bb = k_tile + (kk >> 2) * (BKV * 128) + (kk & 3) * 32;
            wgmma<BF16, BKV>::ss(s, desc_sw128(a, 16, 1024), desc_sw128(bb, 16, 1024), kk > 0);
        }
    };
    // O += P V over BKV/16 k-steps of 16 keys (2048 bytes of every panel); panels BKV * 128 apart.
    // zero: the same instructions on the zero tile sZ (every k-step reads its 16 rows), adding 0.
    // Issued on every path: ptxas serializes every wgmma of the kernel when one sits behind a branch
    // it cannot prove uniform, and a P V that must add nothing costs no more than one that adds.
    auto issue_pv = [&](unsigned v_tile, bool zero) {
        const unsigned base = zero ? sZ : v_tile, step = zero ? 0u : 2048u, panel = zero ? 2048u : BKV * 128u;
#pragma unroll
        for (int kb = 0; kb < BKV / 16; ++kb)
            wgmma<BF16, DV>::rs(o, p + 4 * kb, desc_sw128(base + kb * step, panel, 1024));
    };
    // masks tile kv0 in s (the one hook: fa_mask), turns s into 2^((s - m) * sl2) and updates m_i,
    // l_i; returns alpha (the exponent is <= 0 by construction: p <= 1, alpha exactly 1 while m
    // stays put)
    auto softmax = [&](int jt, float (&alpha)[2]) {
        const int kv0 = kv_begin + jt * BKV;
        const int r0 = row_w0 + g;
        if constexpr (ALL) {
            const bool needs = mask.tile_needs_interval(row_w0, 16, kv0, BKV);
            const unsigned msh = sMw + (unsigned)(jt % MST) * M_TILE;
            if constexpr (TILES) {  // this tile's mask copies landed (every lane's: the warp barrier)
                cp_async_wait<MST - 1>();
                __syncwarp();
            }
            if constexpr (TILES && (FA_PROBE_MASK & 2) != 0) {  // timing probe: the hook without the mask
                fa_hook_needs<0, 0, TANH>(s, mask, kv0, r0, t4, needs);
            } else {
                switch (mask.mods_form()) {  // uniform: one loop per tile, no branch per element
                    case 0: fa_hook_kind<0, TANH, TILES>(s, mask, kv0, r0, t4, needs, msh); break;
                    case 1: fa_hook_kind<1, TANH, TILES>(s, mask, kv0, r0, t4, needs, msh); break;
                    case 2: fa_hook_kind<2, TANH, TILES>(s, mask, kv0, r0, t4, needs, msh); break;
                    default: fa_hook_kind<3, TANH, TILES>(s, mask, kv0, r0, t4, needs, msh); break;
                }
            }
        } else if constexpr (MODS_FORM == FA_MODS_LOGITS) {
            const bool needs = mask.tile_needs_mask(row_w0, 16, kv0, BKV);
            switch (mask.mods_form()) {  // uniform: one of 4 loops per tile
                case 0: fa_hook_needs<0, 0, TANH>(s, mask, kv0, r0, t4, needs); break;
                case 1: fa_hook_needs<1, 0, TANH, false, TANH>(s, mask, kv0, r0, t4, needs); break;  // t_units
                case 2: fa_hook_needs<2, 0, TANH>(s, mask, kv0, r0, t4, needs); break;
                default: fa_hook_needs<3, 0, TANH>(s, mask, kv0, r0, t4, needs); break;
            }
        } else if (mask.tile_needs_mask(row_w0, 16, kv0, BKV)) {
            fa_hook_tile<-1, 0, false, true>(s, mask, kv0, r0, t4);
        }
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            float mx = m_i[r];
#pragma unroll
            for (int n = 0; n < NS / 4; ++n) mx = fmaxf(mx, fmaxf(s[4 * n + 2 * r], s[4 * n + 2 * r + 1]));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
            const float m_use = (mx == -FA_INF) ? 0.0f : mx;  // no key seen yet: every p is 0
            const float mk = -m_use * kx;                      // FA_MODS_LOGITS: exponent kx s + mk
            alpha[r] = exp2_approx((m_i[r] - m_use) * (LOGITS ? kx : sl2));  // m_i = -inf -> 0
            m_i[r] = mx;
            float tile_sum = 0.0f;
#pragma unroll
            for (int n = 0; n < NS / 4; ++n) {
                const float p0 = LOGITS ? exp2_approx(fmaf(s[4 * n + 2 * r], kx, mk))
                                        : exp2_approx((s[4 * n + 2 * r] - m_use) * sl2);
                const float p1 = LOGITS ? exp2_approx(fmaf(s[4 * n + 2 * r + 1], kx, mk))
                                        : exp2_approx((s[4 * n + 2 * r + 1] - m_use) * sl2);
                tile_sum += p0 + p1;
                s[4 * n + 2 * r] = p0;
                s[4 * n + 2 * r + 1] = p1;
            }
            l_i[r] = l_i[r] * alpha[r] + tile_sum;
        }
    };
    // the S accumulators of n-blocks 2kb, 2kb+1 are the A fragment of k-step kb (rows g, g+8)
    auto pack_p = [&]() {
#pragma unroll
        for (int w = 0; w < BKV / 4; ++w) p[w] = pack2<BF16>(s[2 * w], s[2 * w + 1]);
    };

    // How the P V of the V tile at v_tile (keys kv0 ..) runs for this warpgroup:
    //   PV_SKIP   no row of the warpgroup sees a key of the tile: nothing to add, whatever V holds
    //             (the wgmma run on the zero tile);
    //   PV_WGMMA  on the tensor cores (wgmma), the usual path;
    //   PV_SLOW   the tile hides keys from some of the rows and V holds inf or NaN, which p = 0
    //             would still turn into NaN on the tensor cores: the wgmma run on the zero tile,
    //             then (pv_slow, once they are done) mma.sync on V with those entries zeroed and
    //             their p * v added for the rows that see them (common.cuh).
    // Only tiles that hide keys (interval edges, a boolean mask) are checked: the warpgroup's
    // threads scan the tile together (one packed FMA per word) and OR the answer on a named
    // barrier.  The answer is the same for the whole warpgroup; the kernel branches on it through
    // warp votes, which the compiler knows to be uniform (a branch it cannot prove uniform between
    // wgmma makes ptxas serialize every wgmma of the kernel).
    enum { PV_SKIP, PV_WGMMA, PV_SLOW };
    const int wtid = tid & 127;
    // v_flag (when the launcher scanned V first): 0 = V holds no inf / NaN, so no tile needs the check
    const bool v_check = HIDES && (v_flag == nullptr || *v_flag != 0);
    auto pv_path = [&](int jt, unsigned v_tile) -> int {
        const int kv0 = kv_begin + jt * BKV;
        if (__all_sync(0xffffffffu, mask.tile_hidden(row_wg0, 64, kv0, BKV))) return PV_SKIP;
        if (!__any_sync(0xffffffffu, v_check && mask.tile_hides_keys(row_wg0, 64, kv0, BKV))) return PV_WGMMA;
        mbar_wait(full_v + 8 * (jt & 1), (jt >> 1) & 1);  // V_jt landed (waited for again later)
        unsigned acc = 0u;
#pragma unroll
        for (int i = 0; i < (int)(V_BYTES / 16 / 128); ++i) {
            uint4 w;
            asm volatile("ld.shared.v4.b32 {%0, %1, %2, %3}, [%4];\n"
                         : "=r"(w.x), "=r"(w.y), "=r"(w.z), "=r"(w.w)
                         : "r"(v_tile + (wtid + i * 128) * 16)
                         : "memory");
            acc = nonfinite_or16x2<BF16>(acc, w.x);
            acc = nonfinite_or16x2<BF16>(acc, w.y);
            acc = nonfinite_or16x2<BF16>(acc, w.z);
            acc = nonfinite_or16x2<BF16>(acc, w.w);
        }
        const bool seen = named_barrier_or(1 + NWG + wg, 128, nonfinite_seen(acc));
        return __any_sync(0xffffffffu, seen) ? PV_SLOW : PV_WGMMA;
    };
    auto pv_slow = [&](int kv0, unsigned v_tile) {
        const int a_row = (lane & 7) + ((lane >> 3) & 1) * 8, a_chunk = lane >> 4;  // ldmatrix.trans rows
        pv_tile_nonfinite_v<BF16, DV / 8, BKV>(
            o, p,
            [&](int kb, int np) { return v_tile + sw128_offset<BKV>(kb * 16 + a_row, 2 * np + a_chunk); },
            [&](int key, int n) {
                unsigned w;
                asm volatile("ld.shared.b32 %0, [%1];\n"
                             : "=r"(w)
                             : "r"(v_tile + sw128_offset<BKV>(key, n) + t4 * 4)
                             : "memory");
                return w;
            },
            [&](int r, int key) { return mask.visible(row_w0 + g + 8 * r, kv0 + key); }, lane);
    };
    // once P_jt is packed (no wgmma in flight, S dead: the registers to spare): how its P V runs,
    // and on the slow path the P V itself; the wgmma of the next iteration then add 0
    auto settle_pv = [&](int jt) -> int {
        if constexpr (!HIDES) return PV_WGMMA;
        const unsigned v_tile = sV + (jt & 1) * V_BYTES;
        const int pv = pv_path(jt, v_tile);
        if (__any_sync(0xffffffffu, pv == PV_SLOW)) pv_slow(kv_begin + jt * BKV, v_tile);
        return pv;
    };
    float alpha[2];
    if constexpr (ALL && !TILES) mask.prefetch_rows(row_w0, kv_begin, BKV, lane);
    mbar_wait(full_k, 0);
    fence_proxy_async();
    reg_fence(s);
    wgmma_fence();
    issue_s(sK);
    wgmma_commit();
    wgmma_wait<0>();
    reg_fence(s);
    if (lane == 0) mbar_arrive(empty_k);
    softmax(0, alpha);
    pack_p();
    int pv = settle_pv(0);

    for (int j = 1; j < n_tiles; ++j) {
        if constexpr (ALL && !TILES) mask.prefetch_rows(row_w0, kv_begin + j * BKV, BKV, lane);
        if constexpr (TILES) {
            __syncwarp();      // every lane is done with the slot's tile j - 1
            load_mask(j + MST - 1);  // into the slot of tile j - 1
        }
        mbar_wait(full_k + 8 * (j & 1), (j >> 1) & 1);
        mbar_wait(full_v + 8 * ((j - 1) & 1), ((j - 1) >> 1) & 1);
        const unsigned v_prev = sV + ((j - 1) & 1) * V_BYTES;
        const bool pv_zero = HIDES && !__all_sync(0xffffffffu, pv == PV_WGMMA);
        fence_proxy_async();
        reg_fence(s);
        reg_fence(o);
        wgmma_fence();
        issue_s(sK + (j & 1) * K_BYTES);
        wgmma_commit();
        issue_pv(v_prev, pv_zero);
        wgmma_commit();
        // while the tensor cores run: K_{j+1} into the buffer of K_{j-1}, V_j into that of V_{j-2}
        if (j + 1 < n_tiles) {
            mbar_wait(empty_k + 8 * ((j + 1) & 1), ((j - 1) >> 1) & 1);
            FA_LOAD_K(sK + ((j + 1) & 1) * K_BYTES, kv_begin + (j + 1) * BKV);
            mbar_arrive_cp_async(full_k + 8 * ((j + 1) & 1));
        }
        if (j >= 2) mbar_wait(empty_v + 8 * (j & 1), ((j - 2) >> 1) & 1);
        FA_LOAD_V(sV + (j & 1) * V_BYTES, kv_begin + j * BKV);
        mbar_arrive_cp_async(full_v + 8 * (j & 1));
        wgmma_wait<1>();  // S_j done; P_{j-1} V_{j-1} may still run
        reg_fence(s);
        if (lane == 0) mbar_arrive(empty_k + 8 * (j & 1));
        softmax(j, alpha);
        wgmma_wait<0>();
        reg_fence(o);
        if (lane == 0) mbar_arrive(empty_v + 8 * ((j - 1) & 1));
        if (__any_sync(0xffffffffu, alpha[0] != 1.0f || alpha[1] != 1.0f)) {
#pragma unroll
            for (int e2 = 0; e2 < NO; ++e2) o[e2] *= alpha[(e2 >> 1) & 1];
        }
        pack_p();
        pv = settle_pv(j);
    }

    // last P V
    mbar_wait(full_v + 8 * ((n_tiles - 1) & 1), ((n_tiles - 1) >> 1) & 1);
    const bool pv_zero = HIDES && !__all_sync(0xffffffffu, pv == PV_WGMMA);
    fence_proxy_async();
    reg_fence(o);
    wgmma_fence();
    issue_pv(sV + ((n_tiles - 1) & 1) * V_BYTES, pv_zero);
    wgmma_commit();
    wgmma_wait<0>();
    reg_fence(o);

    // epilogue: this warpgroup's 64 Q rows (read by its own wgmma only, all finished) stage the
    // normalized output in the swizzled layout (DV <= D columns); then 16-byte coalesced stores
    static_assert(DV <= D, "the output is staged in the Q tile");
    const unsigned o_stage = q_warpgroup;
    // where the rows go (worked out again here: nothing of it stays live through the loop)
    const fa_entry eo = fa_entry_of((int)(blockIdx.x / (unsigned)num_q_blocks), heads, ragged, rag_q, rag_kv,
                                    seq_q, seq_kv);
    unsigned short* ob = out + eo.view_b * o_sb + eo.h * o_sh + eo.q_row * o_ss;
    float* lb = lse + eo.view_b * lse_sb + eo.h * lse_sh + eo.q_row;
    const int rows_out = ragged == 2 ? eo.lq : seq_q;  // padded batches: rows past Lq get 0 / -inf
    const int rw = warp * 16 + g;  // row inside the warpgroup (and rw + 8)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        float l = l_i[r];
        l += __shfl_xor_sync(0xffffffffu, l, 1);
        l += __shfl_xor_sync(0xffffffffu, l, 2);
        // l >= 1 for a row that saw a key, 0 for one that saw none (output exactly 0: no V value,
        // inf or NaN, reaches it), NaN for a NaN score
        const bool empty = l == 0.0f;
        const float inv = empty ? 0.0f : keep_scale / l;
        const int row = rw + r * 8;
#pragma unroll
        for (int n = 0; n < DV / 8; ++n) {
            const unsigned addr = o_stage + sw128_offset<BQ>(row, n) + t4 * 4;
            const unsigned val = empty ? 0u : pack2<BF16>(o[4 * n + 2 * r] * inv, o[4 * n + 2 * r + 1] * inv);
            asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(addr), "r"(val) : "memory");
        }
        const int i = row_w0 + g + r * 8;
        if (t4 == 0 && i < rows_out) lb[i] = empty ? -FA_INF : fmaf(m_i[r], lse_scale, logf(l));
    }
    named_barrier(1 + wg, 128);
#pragma unroll
    for (int c = wtid; c < 64 * (DV / 8); c += 128) {
        const int row = c / (DV / 8), ch = c % (DV / 8);
        const int i = q0 + wg * 64 + row;
        if (i < rows_out && ch * 8 < dv) {
            uint4 val;
            asm volatile("ld.shared.v4.b32 {%0, %1, %2, %3}, [%4];\n"
                         : "=r"(val.x), "=r"(val.y), "=r"(val.z), "=r"(val.w)
                         : "r"(o_stage + sw128_offset<BQ>(row, ch))
                         : "memory");
            *reinterpret_cast<uint4*>(ob + (long long)i * o_ss + ch * 8) = val;
        }
    }
}
