// Philox4x32-10 (Salmon et al., Random123) and the dropout keep decision shared with the
// CPU backend and fastattn._dropout (the NumPy twin):
//
//   key     = (seed mod 2^32, seed >> 32)
//   counter = (j >> 2, i, h, b)
//   word    = Philox4x32_10(counter, key)[j & 3]
//   keep    = word >= threshold,  threshold = min(floor(p * 2^32), 2^32 - 1)
#pragma once

__device__ __forceinline__ uint4 philox4x32_10(uint4 ctr, unsigned key0, unsigned key1) {
#pragma unroll
    for (int round = 0; round < 10; ++round) {
        const unsigned hi0 = __umulhi(0xD2511F53u, ctr.x), lo0 = 0xD2511F53u * ctr.x;
        const unsigned hi1 = __umulhi(0xCD9E8D57u, ctr.z), lo1 = 0xCD9E8D57u * ctr.z;
        ctr = make_uint4(hi1 ^ ctr.y ^ key0, lo1, hi0 ^ ctr.w ^ key1, lo0);
        key0 += 0x9E3779B9u;
        key1 += 0xBB67AE85u;
    }
    return ctr;
}

// The four Philox words of key group (j >> 2) for query row i of head (b, h).
__device__ __forceinline__ uint4 dropout_words(unsigned long long seed, int b, int h, int i, int j) {
    return philox4x32_10(make_uint4((unsigned)j >> 2, (unsigned)i, (unsigned)h, (unsigned)b),
                         (unsigned)(seed & 0xffffffffull), (unsigned)(seed >> 32));
}

__device__ __forceinline__ unsigned uint4_lane(uint4 w, int lane) {
    return lane == 0 ? w.x : lane == 1 ? w.y : lane == 2 ? w.z : w.w;
}

__device__ __forceinline__ bool dropout_keep(unsigned long long seed, unsigned threshold, int b, int h, int i, int j) {
    return uint4_lane(dropout_words(seed, b, h, i, j), j & 3) >= threshold;
}
