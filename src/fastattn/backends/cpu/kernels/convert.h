/* Scalar loads of the input element types, widened to the compute type. */
#ifndef FASTATTN_CONVERT_H
#define FASTATTN_CONVERT_H
#include <stdint.h>
#include <string.h>

static inline float f32_from_bits(uint32_t bits) { float f; memcpy(&f, &bits, 4); return f; }

static inline float f32_from_f16(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu;
    if (exp == 0x1f) return f32_from_bits(sign | 0x7f800000u | (mant << 13));      /* inf, nan */
    if (exp == 0) {                                                                 /* zero, subnormal */
        float mag = (float)mant * (1.0f / 16777216.0f);                             /* mant * 2^-24 */
        return sign ? -mag : mag;
    }
    return f32_from_bits(sign | ((exp + 112u) << 23) | (mant << 13));
}

static inline float f32_from_bf16(uint16_t b) { return f32_from_bits((uint32_t)b << 16); }

template <typename T> struct load_as {
    static inline T f32(const char *p) { float x; memcpy(&x, p, 4); return (T)x; }
    static inline T f64(const char *p) { double x; memcpy(&x, p, 8); return (T)x; }
    static inline T f16(const char *p) { uint16_t x; memcpy(&x, p, 2); return (T)f32_from_f16(x); }
    static inline T bf16(const char *p) { uint16_t x; memcpy(&x, p, 2); return (T)f32_from_bf16(x); }
};
#endif
