/* What the decode kernels share (models/decode_batch_kernels.c, decode_attend_kernels.c):
 * GCC vector types, exp of 16 floats, a 16-lane sum, rounding to bf16. Header-only (static
 * inline); models/native_build.py hashes it with each source that includes it. */
#ifndef DECODE_KERNELS_H
#define DECODE_KERNELS_H
#include <math.h>
#include <string.h>

typedef float v16 __attribute__((vector_size(64), aligned(4)));
typedef int v16i __attribute__((vector_size(64), aligned(4)));
typedef unsigned short bf16;

/* exp of 16 floats (Cephes' expf: 2^n * a degree-7 polynomial of the remainder, within
 * ~2 ulp); the input clamped to [-87.3, 88.7], where exp stays a normal float. */
static inline v16 exp16(v16 x) {
  const v16 hi = (v16){0} + 88.7f, lo = (v16){0} + -87.3f;
  v16i above = x > hi, below = x < lo; /* lanes of -1 where true (GCC vector compares) */
  x = (v16)((above & (v16i)hi) | (~above & (v16i)x));
  x = (v16)((below & (v16i)lo) | (~below & (v16i)x));
  v16 n = x * 1.44269504088896341f + 12582912.f; /* round to nearest: 1.5 * 2^23 */
  n = n - 12582912.f;
  v16 r = x - n * 0.693359375f + n * 2.12194440e-4f;
  v16 p = (v16){0} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  v16i bits = (__builtin_convertvector(n, v16i) + 127) << 23;
  return p * (v16)bits;
}

static inline void to_bf16(const float *x, bf16 *y, long n) {
  for (long i = 0; i < n; i++) {
    unsigned u;
    memcpy(&u, x + i, 4);
    y[i] = (bf16)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
  }
}

/* The sum of a vector's 16 lanes (halving shuffles). */
static inline float hsum16(v16 v) {
  v = v + __builtin_shuffle(v, (v16i){8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7});
  v = v + __builtin_shuffle(v, (v16i){4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11});
  v = v + __builtin_shuffle(v, (v16i){2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13});
  v = v + __builtin_shuffle(v, (v16i){1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14});
  return v[0];
}

#endif
