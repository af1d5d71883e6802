/* The routed (and shared) experts of a decode batch's MoE layer in one C call
 * (models/decode_batch_native.py).
 *
 * With 2-64 tokens and top-k of a few experts, each expert sees a handful of rows: the
 * grouped GEMM pair runs ~20 tiny matmuls per layer plus a sort, gathers and an index_add,
 * ~4 us of dispatch each, several times the arithmetic. Here every expert's rows go through
 * its two matrices in blocks of up to 8 rows (each weight vector loaded once per block), the
 * SwiGLU in between, and the weighted rows are added to their tokens in ascending expert
 * order, the shared expert last (the order of models/decode_moe.py's index_add).
 * GCC vector extensions; built with -O3 -march=native -ffp-contract=fast.
 */
#include <math.h>
#include <string.h>

typedef float v16 __attribute__((vector_size(64), aligned(4)));
typedef int v16i __attribute__((vector_size(64), aligned(4)));
#define MAX_ROWS 8

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

/* Y[r, :] = X[r, :] @ W for R rows; W [K, N] row-major, N % 32 == 0. */
#define DEFINE_MM(R)                                                                   \
  static void mm_##R(const float *X, const float *W, float *Y, long K, long N) {      \
    for (long j = 0; j < N; j += 32) {                                                 \
      v16 a0[R], a1[R];                                                                \
      for (int r = 0; r < R; r++) a0[r] = a1[r] = (v16){0};                            \
      const float *w = W + j;                                                          \
      for (long k = 0; k < K; k++, w += N) {                                           \
        v16 w0 = *(const v16 *)w, w1 = *(const v16 *)(w + 16);                          \
        for (int r = 0; r < R; r++) {                                                  \
          float xr = X[r * K + k];                                                     \
          a0[r] += w0 * xr;                                                            \
          a1[r] += w1 * xr;                                                            \
        }                                                                              \
      }                                                                                \
      for (int r = 0; r < R; r++) {                                                    \
        *(v16 *)(Y + r * N + j) = a0[r];                                               \
        *(v16 *)(Y + r * N + j + 16) = a1[r];                                          \
      }                                                                                \
    }                                                                                  \
  }
DEFINE_MM(1)
DEFINE_MM(2)
DEFINE_MM(3)
DEFINE_MM(4)
DEFINE_MM(5)
DEFINE_MM(6)
DEFINE_MM(7)
DEFINE_MM(8)

static void mm_rows(int rows, const float *X, const float *W, float *Y, long K, long N) {
  switch (rows) {
    case 1: mm_1(X, W, Y, K, N); break;
    case 2: mm_2(X, W, Y, K, N); break;
    case 3: mm_3(X, W, Y, K, N); break;
    case 4: mm_4(X, W, Y, K, N); break;
    case 5: mm_5(X, W, Y, K, N); break;
    case 6: mm_6(X, W, Y, K, N); break;
    case 7: mm_7(X, W, Y, K, N); break;
    default: mm_8(X, W, Y, K, N); break;
  }
}

/* bf16 weights (a bf16 model on the CPU): Y[r, :] = bf16(X[r, :]) @ W, the rows rounded to
 * bf16 (nearest even) and multiplied with vdpbf16ps, products summed in fp32. W bf16 [K, N]
 * row-major as the model stores it, K even, N % 32 == 0: each pair of W's rows is
 * interleaved in registers (dpbf16 multiplies pairs along K) by in-lane unpacks, once per
 * block of rows; the columns' lane order is undone once per output row. */
typedef unsigned short bf16;

static void to_bf16(const float *x, bf16 *y, long n) {
  for (long i = 0; i < n; i++) {
    unsigned u;
    memcpy(&u, x + i, 4);
    y[i] = (bf16)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
  }
}

#ifdef __AVX512BF16__
#include <immintrin.h>
#define DEFINE_MMB(R)                                                                  \
  static void mmb_##R(const bf16 *X, const bf16 *W, float *Y, long K, long N) {       \
    const __m512i lo = _mm512_set_epi32(23, 22, 21, 20, 7, 6, 5, 4, 19, 18, 17, 16, 3, 2, \
                                        1, 0);                                         \
    const __m512i hi = _mm512_add_epi32(lo, _mm512_set1_epi32(8));                     \
    for (long j = 0; j < N; j += 32) {                                                 \
      __m512 a0[R], a1[R];                                                             \
      for (int r = 0; r < R; r++) a0[r] = a1[r] = _mm512_setzero_ps();                 \
      const bf16 *w = W + j;                                                           \
      for (long k = 0; k < K; k += 2, w += 2 * N) {                                    \
        __m512i r0 = _mm512_loadu_si512(w), r1 = _mm512_loadu_si512(w + N);            \
        __m512bh w0 = (__m512bh)_mm512_unpacklo_epi16(r0, r1);                         \
        __m512bh w1 = (__m512bh)_mm512_unpackhi_epi16(r0, r1);                         \
        for (int r = 0; r < R; r++) {                                                  \
          int pair;                                                                    \
          memcpy(&pair, X + r * K + k, 4);                                             \
          __m512bh xr = (__m512bh)_mm512_set1_epi32(pair);                             \
          a0[r] = _mm512_dpbf16_ps(a0[r], xr, w0);                                     \
          a1[r] = _mm512_dpbf16_ps(a1[r], xr, w1);                                     \
        }                                                                              \
      }                                                                                \
      for (int r = 0; r < R; r++) { /* unpack's lane order back to column order */     \
        _mm512_storeu_ps(Y + r * N + j, _mm512_permutex2var_ps(a0[r], lo, a1[r]));     \
        _mm512_storeu_ps(Y + r * N + j + 16, _mm512_permutex2var_ps(a0[r], hi, a1[r])); \
      }                                                                                \
    }                                                                                  \
  }
#else /* no bf16 dot product on this CPU: the same sums in fp32 */
static inline float bf16_value(bf16 b) {
  unsigned u = (unsigned)b << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}
#define DEFINE_MMB(R)                                                                  \
  static void mmb_##R(const bf16 *X, const bf16 *W, float *Y, long K, long N) {       \
    for (int r = 0; r < R; r++)                                                        \
      for (long j = 0; j < N; j++) {                                                   \
        float acc = 0.f;                                                               \
        for (long k = 0; k < K; k++) acc += bf16_value(X[r * K + k]) * bf16_value(W[k * N + j]); \
        Y[r * N + j] = acc;                                                            \
      }                                                                                \
  }
#endif
DEFINE_MMB(1)
DEFINE_MMB(2)
DEFINE_MMB(3)
DEFINE_MMB(4)
DEFINE_MMB(5)
DEFINE_MMB(6)
DEFINE_MMB(7)
DEFINE_MMB(8)

/* mm_rows over bf16 weights; xh: bf16 scratch of rows * K. */
static void mmb_rows(int rows, const float *X, const bf16 *W, float *Y, long K, long N,
                     bf16 *xh) {
  to_bf16(X, xh, rows * K);
  switch (rows) {
    case 1: mmb_1(xh, W, Y, K, N); break;
    case 2: mmb_2(xh, W, Y, K, N); break;
    case 3: mmb_3(xh, W, Y, K, N); break;
    case 4: mmb_4(xh, W, Y, K, N); break;
    case 5: mmb_5(xh, W, Y, K, N); break;
    case 6: mmb_6(xh, W, Y, K, N); break;
    case 7: mmb_7(xh, W, Y, K, N); break;
    default: mmb_8(xh, W, Y, K, N); break;
  }
}

/* Y [T, N] = bf16(X [T, K]) @ W bf16 [K, N] (see mmb_rows); xh: bf16 scratch of
 * MAX_ROWS * K. */
void matmul_bf16(const float *X, long T, long K, const bf16 *W, long N, float *Y, bf16 *xh) {
  for (long s = 0; s < T; s += MAX_ROWS) {
    int rows = T - s < MAX_ROWS ? (int)(T - s) : MAX_ROWS;
    mmb_rows(rows, X + s * K, W, Y + s * N, K, N, xh);
  }
}

/* Y [T, N] = X [T, K] @ W fp32 [K, N] (N % 32 == 0) in blocks of MAX_ROWS rows: a decode
 * batch's dense matmuls (2-128 rows), where MKL's small-GEMM path runs ~70 GFLOP/s. */
void matmul_f32(const float *X, long T, long K, const float *W, long N, float *Y) {
  for (long s = 0; s < T; s += MAX_ROWS) {
    int rows = T - s < MAX_ROWS ? (int)(T - s) : MAX_ROWS;
    mm_rows(rows, X + s * K, W, Y + s * N, K, N);
  }
}

/* out[tok[r]] += wt[r] * swiglu(x[tok[r]]) for n rows of one expert; the weights fp32 or,
 * with `half`, bf16 (then buf also holds the rows rounded to bf16). */
static void expert_rows(const float *x, float *out, const long *tok, const float *wt, long n,
                        const void *gate_up, const void *down, long H, long I, float *buf,
                        int half) {
  float *xb = buf, *gu = buf + MAX_ROWS * H, *y = gu + MAX_ROWS * 2 * I;
  bf16 *xh = (bf16 *)(y + MAX_ROWS * H);
  for (long s = 0; s < n; s += MAX_ROWS) {
    int rows = n - s < MAX_ROWS ? (int)(n - s) : MAX_ROWS;
    for (int r = 0; r < rows; r++) memcpy(xb + r * H, x + tok[s + r] * H, H * sizeof(float));
    if (half)
      mmb_rows(rows, xb, gate_up, gu, H, 2 * I, xh);
    else
      mm_rows(rows, xb, gate_up, gu, H, 2 * I);
    for (int r = 0; r < rows; r++) { /* silu(gate) * up, packed into the gate half */
      float *g = gu + r * 2 * I;
      for (long i = 0; i < I; i += 16) {
        v16 gv = *(v16 *)(g + i);
        *(v16 *)(g + i) = gv / (1.f + exp16(-gv)) * *(v16 *)(g + I + i);
      }
    }
    /* the down matmul reads rows of width I: repack [rows, 2 I] -> [rows, I] */
    for (int r = 1; r < rows; r++) memmove(gu + r * I, gu + r * 2 * I, I * sizeof(float));
    if (half)
      mmb_rows(rows, gu, down, y, I, H, xh);
    else
      mm_rows(rows, gu, down, y, I, H);
    for (int r = 0; r < rows; r++) {
      float *o = out + tok[s + r] * H, a = wt[s + r];
      const float *yr = y + r * H;
      for (long h = 0; h < H; h++) o[h] += a * yr[h];
    }
  }
}

/* out [T, H] = sum over each token's k experts (ascending ids) of weight * expert(x), then
 * + the shared expert (bank index E) when `shared`. experts int64 [T, k], weights fp32
 * [T, k]; gate_up [E (+1), H, 2 I], down [E (+1), I, H], fp32 or (half) bf16; scratch: tok
 * int64 and wt fp32 of T (k + 1) each, buf fp32 of MAX_ROWS (3 H + 3 I). */
void moe_rows(const float *x, long T, long H, long I, const long *experts, const float *weights,
              long k, long E, const void *gate_up, const void *down, int shared, float *out,
              long *tok, float *wt, float *buf, int half) {
  long size = half ? 2 : 4; /* bytes per weight */
  const char *gu = gate_up, *dn = down;
  memset(out, 0, T * H * sizeof(float));
  for (long e = 0; e <= E; e++) {
    long n = 0;
    if (e < E) {
      for (long t = 0; t < T; t++)
        for (long j = 0; j < k; j++)
          if (experts[t * k + j] == e) {
            tok[n] = t;
            wt[n++] = weights[t * k + j];
          }
    } else if (shared) { /* every token, weight 1 */
      for (; n < T; n++) {
        tok[n] = n;
        wt[n] = 1.f;
      }
    }
    if (n)
      expert_rows(x, out, tok, wt, n, gu + e * H * 2 * I * size, dn + e * I * H * size, H, I,
                  buf, half);
  }
}

/* out [T, H] += swiglu(x) (a dense MLP: gate_up [H, 2 I], down [I, H], fp32 or (half)
 * bf16); scratch as moe_rows'. */
void mlp_rows(const float *x, long T, long H, long I, const void *gate_up, const void *down,
              float *out, long *tok, float *wt, float *buf, int half) {
  for (long t = 0; t < T; t++) {
    tok[t] = t;
    wt[t] = 1.f;
  }
  expert_rows(x, out, tok, wt, T, gate_up, down, H, I, buf, half);
}

/* The sum of a vector's 16 lanes (halving shuffles). */
static inline float hsum16(v16 v) {
  v = v + __builtin_shuffle(v, (v16i){8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7});
  v = v + __builtin_shuffle(v, (v16i){4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11});
  v = v + __builtin_shuffle(v, (v16i){2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13});
  v = v + __builtin_shuffle(v, (v16i){1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14});
  return v[0];
}

/* softmax(q . K[j] * scale for j < n) @ V for one query head; K, V [n, D] rows of the cache,
 * D % 16 == 0 and D <= 256; p: n rounded up to 16 floats of scratch. */
/* 16 cache values from element i of a row: fp32, or (half) bf16 widened exactly. */
typedef unsigned short v16h __attribute__((vector_size(32), aligned(2)));
static inline __attribute__((always_inline)) v16 load16(const void *row, long i, int half) {
  if (!half) return *(const v16 *)((const float *)row + i);
  v16h h = *(const v16h *)((const unsigned short *)row + i);
  return (v16)(__builtin_convertvector(h, v16i) << 16);
}

static inline __attribute__((always_inline)) void attend_head(
    const float *q, const void *K, const void *V, long n, long D, float scale, float *p,
    float *out, int half) {
  float top = -INFINITY;
  for (long j = 0; j < n; j++) {
    v16 s = (v16){0};
    for (long d = 0; d < D; d += 16) s += *(const v16 *)(q + d) * load16(K, j * D + d, half);
    p[j] = hsum16(s) * scale;
    top = p[j] > top ? p[j] : top;
  }
  long padded = (n + 15) & ~15L;
  for (long j = n; j < padded; j++) p[j] = top; /* lanes past n: dropped below */
  v16 total = (v16){0};
  for (long j = 0; j < padded; j += 16) {
    v16 e = exp16(*(v16 *)(p + j) - top);
    *(v16 *)(p + j) = e;
    if (j + 16 <= n) total += e;
  }
  float sum = hsum16(total);
  for (long j = n & ~15L; j < n; j++) sum += p[j];
  v16 acc[16];
  for (long d = 0; d < D / 16; d++) acc[d] = (v16){0};
  for (long j = 0; j < n; j++)
    for (long d = 0; d < D / 16; d++) acc[d] += load16(V, j * D + 16 * d, half) * p[j];
  for (long d = 0; d < D / 16; d++) *(v16 *)(out + 16 * d) = acc[d] / sum;
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
 * values), fp32 or (half) bf16; out [B, Hq, D]; p: scratch of max(ends) rounded up to 16
 * floats. */
void attend_rows(const float *q, long q_row, const void *cache, long Hkv, long G, long max_len,
                 long D, const long *slots, const long *ends, long B, float scale, float *out,
                 float *p, int half) {
  long size = half ? 2 : 4, row = 2 * Hkv * max_len * D * size, head = max_len * D * size;
  for (long b = 0; b < B; b++) {
    const char *base = (const char *)cache + slots[b] * row;
    for (long a = b ? b + AHEAD : 1; a <= b + AHEAD && a < B; a++)
      prefetch_row((const char *)cache + slots[a] * row, Hkv, max_len, D, ends[a], size);
    for (long h = 0; h < Hkv; h++)
      for (long g = 0; g < G; g++) {
        const float *qh = q + b * q_row + (h * G + g) * D;
        const void *K = base + h * head, *V = base + (Hkv + h) * head;
        float *o = out + (b * Hkv * G + h * G + g) * D;
        if (half) /* two call sites: each inlined with its loads fixed */
          attend_head(qh, K, V, ends[b], D, scale, p, o, 1);
        else
          attend_head(qh, K, V, ends[b], D, scale, p, o, 0);
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
