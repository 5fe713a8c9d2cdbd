// Element-type traits of the tensor-core kernels (flash_fwd.cu, flash_bwd.cu, decode.cu): the mma
// instruction, packing two floats into a 16-bit pair, conversions; and the tile loads of the
// mma.sync kernels.  Needs cuda_fp16.h / cuda_bf16.h and common.cuh first.
#pragma once

// Element-type traits: the mma instruction, packing two floats, conversions.
template <typename T>
struct elem;

template <>
struct elem<__half> {
    static constexpr bool bf16 = false;
    static __device__ __forceinline__ void mma(float* c, const unsigned* a, unsigned b0, unsigned b1) {
        mma_m16n8k16<false>(c, a, b0, b1);
    }
    static __device__ __forceinline__ unsigned pack2(float lo, float hi) {
        __half2 h = __floats2half2_rn(lo, hi);
        return *reinterpret_cast<unsigned*>(&h);
    }
    static __device__ __forceinline__ __half from_float(float x) { return __float2half_rn(x); }
};

template <>
struct elem<__nv_bfloat16> {
    static constexpr bool bf16 = true;
    static __device__ __forceinline__ void mma(float* c, const unsigned* a, unsigned b0, unsigned b1) {
        mma_m16n8k16<true>(c, a, b0, b1);
    }
    static __device__ __forceinline__ unsigned pack2(float lo, float hi) {
        __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
        return *reinterpret_cast<unsigned*>(&h);
    }
    static __device__ __forceinline__ __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
};

// The A fragment (m16 x k16, 16-bit pairs) of one k-step from the fp32 accumulators of two m16n8
// n-tiles of a product (lo: columns 0-7, hi: 8-15 of the step): how P (and dS) feed the next mma
// without passing through shared memory.
template <typename T>
__device__ __forceinline__ void acc_to_a_frag(unsigned (&a)[4], const float (&lo)[4], const float (&hi)[4]) {
    a[0] = elem<T>::pack2(lo[0], lo[1]);
    a[1] = elem<T>::pack2(lo[2], lo[3]);
    a[2] = elem<T>::pack2(hi[0], hi[1]);
    a[3] = elem<T>::pack2(hi[2], hi[3]);
}

// ------------------------------------------------------------------------------------------------
// tile loads: ROWS x D elements of a (seq, d) matrix with element strides (ss, sd) into shared
// memory rows of LDS elements; rows >= seq and columns >= d become zero.
// VEC: d % 8 == 0, sd == 1 and every row start 16-byte aligned (checked by the launcher), so each
// thread moves 16-byte chunks with cp.async.  Otherwise plain element loads (any strides).
// ------------------------------------------------------------------------------------------------

// VEC loads where every thread keeps one column chunk and walks rows (see load_tile)
template <int ROWS, int D, int NT>
__device__ constexpr bool vec_load_walks_rows() {
    return NT % (D / 8) == 0 && ROWS % (NT / (D / 8)) == 0;
}

template <typename T, int ROWS, int D, int LDS, int NT, bool VEC>
__device__ __forceinline__ void load_tile(T* smem, const T* __restrict__ g, long long ss, long long sd, int row0,
                                          int seq, int d, int tid) {
    if constexpr (VEC) {
        constexpr int CHUNKS = D / 8;
        if constexpr (vec_load_walks_rows<ROWS, D, NT>()) {
            // each thread keeps one 16-byte column chunk and walks rows r0, r0 + RS, ...: one 64-bit
            // pointer and one increment live instead of an address per unrolled chunk
            constexpr int RS = NT / CHUNKS;
            const int ch = tid % CHUNKS, r0 = tid / CHUNKS;
            const bool col_ok = ch * 8 < d;
            const T* src = g + (long long)(row0 + r0) * ss + ch * 8;
            const long long step = (long long)RS * ss;
            unsigned dst = smem_u32(smem + r0 * LDS + ch * 8);
#pragma unroll
            for (int i = 0; i < ROWS / RS; ++i) {
                const bool ok = col_ok && row0 + r0 + i * RS < seq;
                cp_async_16(dst, ok ? src : g, ok ? 16 : 0);
                src += step;
                dst += RS * LDS * (int)sizeof(T);
            }
        } else {
#pragma unroll
            for (int c = tid; c < ROWS * CHUNKS; c += NT) {
                const int r = c / CHUNKS, ch = c % CHUNKS;
                const int gr = row0 + r;
                const bool ok = gr < seq && ch * 8 < d;
                const T* src = ok ? g + (long long)gr * ss + ch * 8 : g;
                cp_async_16(smem_u32(smem + r * LDS + ch * 8), src, ok ? 16 : 0);
            }
        }
    } else {
        const T zero = elem<T>::from_float(0.0f);
        for (int e = tid; e < ROWS * D; e += NT) {
            const int r = e / D, c = e % D;
            const int gr = row0 + r;
            smem[r * LDS + c] = (gr < seq && c < d) ? g[(long long)gr * ss + (long long)c * sd] : zero;
        }
    }
}
