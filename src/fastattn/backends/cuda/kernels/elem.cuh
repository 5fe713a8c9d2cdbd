// Element-type traits of the tensor-core kernels (flash_fwd.cu, decode.cu): the mma instruction,
// packing two floats into a 16-bit pair, conversions.  Needs cuda_fp16.h / cuda_bf16.h first.
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
