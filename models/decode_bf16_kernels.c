/* The per-layer vector work of batched fp32 rows in C (models/decode_bf16.py): the RMSNorms
 * and the MoE router, ~6 and ~9 torch ops each. Their arithmetic is the torch ops' up to
 * the order of sums. Built by models/native_build.py. */
#include <math.h>
#include <string.h>

typedef unsigned short bf16;
typedef float v16 __attribute__((vector_size(64), aligned(4)));

/* sum of a[i] * b[i] for i < n, n % 16 == 0, in 16 lanes (then the lanes summed). */
static inline float dot16(const float *a, const float *b, long n) {
  v16 acc = (v16){0};
  for (long i = 0; i < n; i += 16) acc += *(const v16 *)(a + i) * *(const v16 *)(b + i);
  float s = 0.f;
  for (int i = 0; i < 16; i++) s += acc[i];
  return s;
}

static inline float bf16_float(bf16 b) {
  unsigned u = (unsigned)b << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}

/* out [T, H] = x * rsqrt(mean(x^2) + eps) * w, w fp32 or (half) bf16 [H]; H % 16 == 0. */
void rms_rows(const float *x, long T, long H, const void *w, float eps, float *out, int half) {
  for (long t = 0; t < T; t++) {
    const float *xr = x + t * H;
    float ss = dot16(xr, xr, H);
    float scale = 1.f / sqrtf(ss / (float)H + eps);
    if (half)
      for (long h = 0; h < H; h++) out[t * H + h] = xr[h] * scale * bf16_float(((const bf16 *)w)[h]);
    else
      for (long h = 0; h < H; h++) out[t * H + h] = xr[h] * scale * ((const float *)w)[h];
  }
}

/* models/decode_moe.route with one expert group: scores = sigmoid(x @ W^T) (W fp32 [E, H]),
 * the k experts of highest score + bias (ties: the lower id), ascending, to experts int64
 * [T, k]; their scores, normalised to sum 1 when `norm`, times `scaling`, to weights
 * fp32 [T, k]. E <= 256, H % 16 == 0. */
void route_rows(const float *x, long T, long H, const float *W, const float *bias, long E,
                long k, int norm, float scaling, long *experts, float *weights) {
  float score[256];
  unsigned char taken[256];
  for (long t = 0; t < T; t++) {
    const float *xr = x + t * H;
    for (long e = 0; e < E; e++) {
      float dot = dot16(xr, W + e * H, H);
      score[e] = 1.f / (1.f + expf(-dot));
      taken[e] = 0;
    }
    for (long j = 0; j < k; j++) {
      long best = -1;
      for (long e = 0; e < E; e++)
        if (!taken[e] && (best < 0 || score[e] + bias[e] > score[best] + bias[best])) best = e;
      if (best >= 0) taken[best] = 1;
    }
    long *ex = experts + t * k;
    float *wt = weights + t * k, sum = 0.f;
    for (long e = 0, j = 0; e < E; e++)
      if (taken[e]) {
        ex[j] = e;
        wt[j++] = score[e];
        sum += score[e];
      }
    for (long j = 0; j < k; j++) wt[j] = (norm ? wt[j] / (sum + 1e-20f) : wt[j]) * scaling;
  }
}
