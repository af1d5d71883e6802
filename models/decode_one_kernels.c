/* The batch-1 fp32 decode step's layer work in a few C calls (models/decode_one_native.py).
 *
 * Out of cache, a one-row GEMV over a [k, n] matrix (n = 512) streams ~11 GB/s through MKL's
 * sgemv here and ~25 GB/s as a plain sum: a loop that stores its accumulators once per row
 * keeps too few loads in flight. gemv_acc reads 16 rows per pass over the accumulators
 * (16 loads per store): ~17-20 GB/s on the step's shapes. The small ops around the GEMVs
 * (norms, RoPE, the cache write, attention over one query row, SwiGLU) run in the same call,
 * so a layer costs a handful of calls instead of ~55 tensor ops.
 * GCC vector extensions: any target; built with -O3 -march=native -ffp-contract=fast.
 */
#include <math.h>
#include <string.h>

typedef float v16 __attribute__((vector_size(64), aligned(4)));
#define ROWS 16
#define MAX_N 8192 /* widest GEMV output (floats) the stack buffers take */

/* acc[n] += x[k] @ W[k, n] (W row-major). Each load of a block of ROWS rows comes with a
 * prefetch into L2 of the same line two blocks ahead (inside W): out of cache 15 -> 17-20
 * GB/s on [384 | 512 | 1536, 512], no change on [512, 3072] (micro-bench, alternated). */
static void gemv_acc(const float *x, const float *W, float *acc, long k, long n) {
  long nv = n - n % 16, i = 0;
  for (; i + ROWS <= k; i += ROWS) {
    const float *w = W + i * n;
    int ahead = i + 3 * ROWS <= k;
    for (long j = 0; j < nv; j += 16) {
      v16 t = *(v16 *)(acc + j);
      for (int r = 0; r < ROWS; r++) {
        if (ahead) __builtin_prefetch(w + (2 * ROWS + r) * n + j, 0, 2);
        t += *(const v16 *)(w + r * n + j) * x[i + r];
      }
      *(v16 *)(acc + j) = t;
    }
    for (long j = nv; j < n; j++)
      for (int r = 0; r < ROWS; r++) acc[j] += w[r * n + j] * x[i + r];
  }
  for (; i < k; i++)
    for (long j = 0; j < n; j++) acc[j] += W[i * n + j] * x[i];
}

static float sum_sq(const float *x, long n) {
  float s = 0.f;
  for (long i = 0; i < n; i++) s += x[i] * x[i];
  return s;
}

/* out[n] = rmsnorm(x[n]) * w[n] */
void rms_row(const float *x, const float *w, float *out, long n, float eps) {
  float scale = (float)(1.0 / sqrt((double)sum_sq(x, n) / n + eps));
  for (long i = 0; i < n; i++) out[i] = x[i] * scale * w[i];
}

/* y[n] += alpha * x[k] @ W[k, n] */
void gemv_add(const float *x, const float *W, float *y, long k, long n, float alpha) {
  float acc[MAX_N] __attribute__((aligned(64)));
  memset(acc, 0, n * sizeof(float));
  gemv_acc(x, W, acc, k, n);
  for (long j = 0; j < n; j++) y[j] += alpha * acc[j];
}

/* x[H] += alpha * (silu(h @ gate) * (h @ up)) @ down; gate_up [H, 2 I] gate columns first,
 * down [I, H]. */
void swiglu_add(float *x, const float *h, const float *gate_up, const float *down, long H,
                long I, float alpha) {
  float g[MAX_N] __attribute__((aligned(64)));
  memset(g, 0, 2 * I * sizeof(float));
  gemv_acc(h, gate_up, g, H, 2 * I);
  for (long i = 0; i < I; i++) g[i] = g[i] / (1.f + expf(-g[i])) * g[I + i];
  gemv_add(g, down, x, I, H, alpha);
}

/* One head's RMSNorm (weight w) then RoPE (y[i] = x[i] cos[i] + sign[i] x[perm[i]] sin[i]). */
static void norm_rope(float *x, const float *w, long D, float eps, const float *cos,
                      const float *sin, const int *perm, const float *sign) {
  float t[1024];
  if (w) {
    float r = 1.f / sqrtf(eps + sum_sq(x, D) / (float)D);
    for (long i = 0; i < D; i++) t[i] = x[i] * r * w[i];
  } else {
    memcpy(t, x, D * sizeof(float));
  }
  for (long i = 0; i < D; i++) x[i] = t[i] * cos[i] + sign[i] * t[perm[i]] * sin[i];
}

/* One query row's attention, written into out[hq D] (before o_proj).
 * h [H] normed input; qkv [H, (hq + 2 hkv) D] (+ bias or NULL); qk_norm [hq + hkv, D] or
 * NULL; cos/sin [D] of the position; cache: the slot's [2 hkv, max_len, D], written at
 * `pos`, attended over [0, pos]. */
void attend_one(const float *h, const float *qkv, const float *bias, const float *qk_norm,
                long H, long hq, long hkv, long D, float eps, const float *cos,
                const float *sin, const int *perm, const float *sign, float *cache,
                long max_len, long pos, float *out) {
  long width = (hq + 2 * hkv) * D, groups = hq / hkv;
  float q[MAX_N] __attribute__((aligned(64)));
  float p[8192];
  if (bias) memcpy(q, bias, width * sizeof(float));
  else memset(q, 0, width * sizeof(float));
  gemv_acc(h, qkv, q, H, width);
  for (long head = 0; head < hq + hkv; head++)
    norm_rope(q + head * D, qk_norm ? qk_norm + head * D : NULL, D, eps, cos, sin, perm, sign);
  for (long kv = 0; kv < 2 * hkv; kv++)  /* K heads then V heads, as the cache holds them */
    memcpy(cache + (kv * max_len + pos) * D, q + (hq + kv) * D, D * sizeof(float));
  float scale = 1.f / sqrtf((float)D);
  for (long head = 0; head < hq; head++) {
    const float *qh = q + head * D;
    const float *K = cache + (head / groups) * max_len * D;
    const float *V = cache + (hkv + head / groups) * max_len * D;
    float top = -INFINITY, total = 0.f;
    for (long t = 0; t <= pos; t++) {
      float s = 0.f;
      for (long i = 0; i < D; i++) s += qh[i] * K[t * D + i];
      p[t] = s * scale;
      top = p[t] > top ? p[t] : top;
    }
    float *o = out + head * D;
    memset(o, 0, D * sizeof(float));
    for (long t = 0; t <= pos; t++) {
      float e = expf(p[t] - top);
      total += e;
      for (long i = 0; i < D; i++) o[i] += e * V[t * D + i];
    }
    for (long i = 0; i < D; i++) o[i] /= total;
  }
}

/* models.moe.TopkRouter of one row with one expert group, as models/decode_one._route
 * computes it: scores sigmoid(router_w [E, H] . h), the top k of score + bias (exact double
 * sums; ties go to the lower id), ascending ids when `ordered`, the k scores normalised
 * (fp32, summed in id order, + 1e-20) when `norm`, times `scaling` unless it is 1. */
void route_one(const float *h, const float *router_w, const float *bias, long E, long H,
               long k, int norm, float scaling, int ordered, long *ids, float *weights) {
  float s[1024];
  double choice[1024];
  for (long e = 0; e < E; e++) {
    float dot = 0.f;
    for (long i = 0; i < H; i++) dot += h[i] * router_w[e * H + i];
    s[e] = 1.f / (1.f + expf(-dot));
    choice[e] = (double)s[e] + (double)bias[e];
  }
  for (long j = 0; j < k; j++) { /* k passes of a max: k and E are small */
    long best = -1;
    for (long e = 0; e < E; e++) {
      int taken = 0;
      for (long i = 0; i < j; i++) taken |= ids[i] == e;
      if (!taken && (best < 0 || choice[e] > choice[best])) best = e;
    }
    ids[j] = best;
  }
  if (ordered)
    for (long j = 1; j < k; j++)
      for (long i = j; i > 0 && ids[i - 1] > ids[i]; i--) {
        long t = ids[i]; ids[i] = ids[i - 1]; ids[i - 1] = t;
      }
  float total = 0.f;
  for (long j = 0; j < k; j++) weights[j] = s[ids[j]];
  for (long j = 0; j < k; j++) total += weights[j];
  total += 1e-20f;
  for (long j = 0; j < k; j++) {
    if (norm) weights[j] /= total;
    if (scaling != 1.f) weights[j] *= scaling;
  }
}
