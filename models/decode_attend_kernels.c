/* A layer's attention in C (models/decode_batch_native.py): q/k/v's norms, RoPE and cache
 * writes (qkv_rows), then each row's attention straight from the cache (attend_rows).
 * GCC vector extensions; built with -O3 -march=native -ffp-contract=fast. */
#include "decode_kernels.h"

/* 16 cache values from element i of a row: fp32, or (half) bf16 widened exactly. */
typedef unsigned short v16h __attribute__((vector_size(32), aligned(2)));
static inline __attribute__((always_inline)) v16 load16(const void *row, long i, int half) {
  if (!half) return *(const v16 *)((const float *)row + i);
  v16h h = *(const v16h *)((const unsigned short *)row + i);
  return (v16)(__builtin_convertvector(h, v16i) << 16);
}

/* Lanes of a and b summed pairwise at distance `w` (8, 4, 2, 1) and packed: the steps of
 * hsum16, each adding the same lanes in the same order, for 2 vectors at once. */
#define HALVES(a, b, LO, HI) (__builtin_shuffle(a, b, (v16i)LO) + __builtin_shuffle(a, b, (v16i)HI))
#define L8 {0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23}
#define H8 {8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31}
#define L4 {0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27}
#define H4 {4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31}
#define L2 {0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29}
#define H2 {2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31}
#define L1 {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30}
#define H1 {1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31}

/* The 16 lane sums of s[0..15] as one vector (lane k: hsum16(s[k]), bit for bit): a
 * transposing reduction, 15 vector adds instead of 16 hsum16s' 64. */
static inline __attribute__((always_inline)) v16 hsum16x16(const v16 *s) {
  v16 a[8], b[4], c[2];
  for (int k = 0; k < 8; k++) a[k] = HALVES(s[2 * k], s[2 * k + 1], L8, H8);
  for (int k = 0; k < 4; k++) b[k] = HALVES(a[2 * k], a[2 * k + 1], L4, H4);
  for (int k = 0; k < 2; k++) c[k] = HALVES(b[2 * k], b[2 * k + 1], L2, H2);
  return HALVES(c[0], c[1], L1, H1);
}

/* softmax(q . K[j] * scale for j < n) @ V for the G query heads q [G, D] of one KV head;
 * K, V [n, D] rows of the cache; out [G, D]; p: G * padded floats of scratch (padded = n
 * rounded up to 16). D is a constant at the call sites (its loops unrolled, acc in
 * registers). The V sums of the G heads interleave (G D / 16 independent FMA chains). */
static inline __attribute__((always_inline)) void attend_group(
    const float *q, const void *K, const void *V, long n, long D, long G, float scale,
    float *p, float *out, int half) {
  long padded = (n + 15) & ~15L, full = n & ~15L;
  float sums[8], kb[16 * 256] __attribute__((aligned(64)));
  v16 top16[8];
  for (long g = 0; g < G; g++) top16[g] = (v16){0} - INFINITY;
  for (long j = 0; j < full; j += 16) {
    const float *k16 = kb; /* 16 keys in fp32: widened once for the G heads */
    if (half)
      for (long i = 0; i < 16 * D; i += 16) *(v16 *)(kb + i) = load16(K, j * D + i, 1);
    else
      k16 = (const float *)K + j * D;
    for (long g = 0; g < G; g++) {
      v16 sk[16];
      for (int k = 0; k < 16; k++) {
        sk[k] = (v16){0};
        for (long d = 0; d < D; d += 16)
          sk[k] += *(const v16 *)(q + g * D + d) * *(const v16 *)(k16 + k * D + d);
      }
      v16 sc = hsum16x16(sk) * scale;
      *(v16 *)(p + g * padded + j) = sc;
      v16i keep = top16[g] > sc; /* lanes of -1 where true */
      top16[g] = (v16)((keep & (v16i)top16[g]) | (~keep & (v16i)sc));
    }
  }
  for (long g = 0; g < G; g++) {
    const float *qg = q + g * D;
    float *pg = p + g * padded, top = -INFINITY;
    for (int k = 0; k < 16; k++) top = top16[g][k] > top ? top16[g][k] : top;
    for (long j = full; j < n; j++) {
      v16 s = (v16){0};
      for (long d = 0; d < D; d += 16) s += *(const v16 *)(qg + d) * load16(K, j * D + d, half);
      pg[j] = hsum16(s) * scale;
      top = pg[j] > top ? pg[j] : top;
    }
    for (long j = n; j < padded; j++) pg[j] = top; /* lanes past n: dropped below */
    v16 total = (v16){0};
    for (long j = 0; j < padded; j += 16) {
      v16 e = exp16(*(v16 *)(pg + j) - top);
      *(v16 *)(pg + j) = e;
      if (j + 16 <= n) total += e;
    }
    sums[g] = hsum16(total);
    for (long j = full; j < n; j++) sums[g] += pg[j];
  }
  v16 acc[64];
  for (long i = 0; i < G * D / 16; i++) acc[i] = (v16){0};
  for (long j = 0; j < n; j++)
    for (long d = 0; d < D / 16; d++) {
      v16 v = load16(V, j * D + 16 * d, half);
      for (long g = 0; g < G; g++) acc[g * D / 16 + d] += v * p[g * padded + j];
    }
  for (long g = 0; g < G; g++)
    for (long d = 0; d < D / 16; d++)
      *(v16 *)(out + g * D + 16 * d) = acc[g * D / 16 + d] / sums[g];
}

/* Ask for the next row's keys and values into L2 while this row computes: the cache of
 * a step's rows was last read a whole step ago and is mostly out of cache by now (a
 * decode step's attention ran 2.5-4x slower than on hot caches). */
#define AHEAD 2 /* rows prefetched ahead */
static void prefetch_row(const char *base, long Hkv, long max_len, long D, long n, long size) {
  for (long h = 0; h < 2 * Hkv; h++)
    for (long i = 0; i < n * D * size; i += 64)
      __builtin_prefetch(base + h * max_len * D * size + i, 0, 2);
}

/* Decode attention of B rows (one new token each) straight from the cache, each row to its
 * own context [0, ends[b]): no gather, no mask. q [B, Hq, D] with rows q_row floats apart
 * (query head h * G + g reads KV head h); cache [slots, 2 Hkv, max_len, D] (keys then
 * values), fp32 or (half) bf16; out [B, Hq, D]; p: scratch of min(G, 8) x max(ends)
 * rounded up to 16 floats (models/decode_batch_native.ATTEND_GROUP). */
void attend_rows(const float *q, long q_row, const void *cache, long Hkv, long G, long max_len,
                 long D, const long *slots, const long *ends, long B, float scale, float *out,
                 float *p, int half) {
  long size = half ? 2 : 4, row = 2 * Hkv * max_len * D * size, head = max_len * D * size;
  for (long b = 0; b < B; b++) {
    const char *base = (const char *)cache + slots[b] * row;
    for (long a = b ? b + AHEAD : 1; a <= b + AHEAD && a < B; a++)
      prefetch_row((const char *)cache + slots[a] * row, Hkv, max_len, D, ends[a], size);
    for (long h = 0; h < Hkv; h++) {
      const float *qh = q + b * q_row + h * G * D;
      const void *K = base + h * head, *V = base + (Hkv + h) * head;
      float *o = out + (b * Hkv + h) * G * D;
      /* call sites with D, G and half constant: each inlined with its loops fixed */
      if (D == 32 && G == 2 && half)
        attend_group(qh, K, V, ends[b], 32, 2, scale, p, o, 1);
      else if (D == 32 && G == 2)
        attend_group(qh, K, V, ends[b], 32, 2, scale, p, o, 0);
      else if (D == 32 && G <= 8)
        attend_group(qh, K, V, ends[b], 32, G, scale, p, o, half);
      else if (D == 128 && G <= 2)
        attend_group(qh, K, V, ends[b], 128, G, scale, p, o, half);
      else
        for (long g = 0; g < G; g++)
          attend_group(qh + g * D, K, V, ends[b], D, 1, scale, p, o + g * D, half);
    }
  }
}

/* A layer's q/k/v rows after the qkv matmul, in one pass: RMSNorm of each q and k head
 * (norm_w [Hq + Hkv, D], or NULL: none), RoPE (cos/sin [T, D]; (x @ rotate)[i] =
 * sign[i] * x[perm[i]]), q to q_out [T, Hq, D], k and v heads to their cache rows: rows
 * int64 [T, 2 Hkv] of cache viewed [-1, D] (models/decode.py's write index), fp32 or (half)
 * bf16. qkv [T, Hq + 2 Hkv, D] contiguous; D % 16 == 0, D <= 256. */
void qkv_rows(const float *qkv, long T, long Hq, long Hkv, long D, const float *norm_w,
              float eps, const float *cos, const float *sin, const int *perm, const float *sign,
              void *cache, const long *rows, float *q_out, int half) {
  float y[256] __attribute__((aligned(64))), r[256];
  long heads = Hq + 2 * Hkv;
  for (long t = 0; t < T; t++) {
    const float *c = cos + t * D, *s = sin + t * D;
    for (long h = 0; h < heads; h++) {
      const float *x = qkv + (t * heads + h) * D;
      float *dst = h < Hq ? q_out + (t * Hq + h) * D : r; /* r: a k or v row for the cache */
      if (h >= Hq + Hkv) { /* v: as it is */
        memcpy(dst, x, D * sizeof(float));
      } else {
        if (norm_w) {
          v16 acc = (v16){0};
          for (long d = 0; d < D; d += 16) acc += *(const v16 *)(x + d) * *(const v16 *)(x + d);
          float scale = 1.f / sqrtf(hsum16(acc) / (float)D + eps);
          for (long d = 0; d < D; d += 16)
            *(v16 *)(y + d) = *(const v16 *)(x + d) * scale * *(const v16 *)(norm_w + h * D + d);
        } else {
          memcpy(y, x, D * sizeof(float));
        }
        if (D == 32) /* the permutation as two-vector shuffles, not a gather (slow here) */
          for (int i = 0; i < 32; i += 16) {
            v16 yp = __builtin_shuffle(*(v16 *)y, *(v16 *)(y + 16), *(const v16i *)(perm + i));
            *(v16 *)(dst + i) = *(v16 *)(y + i) * *(const v16 *)(c + i) +
                                *(const v16 *)(sign + i) * yp * *(const v16 *)(s + i);
          }
        else
          for (long i = 0; i < D; i++) dst[i] = y[i] * c[i] + sign[i] * y[perm[i]] * s[i];
      }
      if (h < Hq) continue;
      long at = rows[t * 2 * Hkv + h - Hq] * D;
      if (half) /* the cache's dtype: bf16 rounded to nearest even, as torch's .to() */
        to_bf16(r, (bf16 *)cache + at, D);
      else
        memcpy((float *)cache + at, r, D * sizeof(float));
    }
  }
}
