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
#include "decode_kernels.h"

#define MAX_ROWS 8
/* The matmuls walk a 32-column strip of W down its K rows, a row (N floats) apart: past a
 * 4 KiB page the hardware prefetcher loses the stream, so each row's lines are requested
 * this many rows ahead (prefetch never faults, so no bound check at W's end). */
#define AHEAD_ROWS 8

/* Y[r, :] = X[r, :] @ W for R rows; W [K, N] row-major, N % 32 == 0. */
#define DEFINE_MM(R)                                                                   \
  static void mm_##R(const float *X, const float *W, float *Y, long K, long N) {      \
    for (long j = 0; j < N; j += 32) {                                                 \
      v16 a0[R], a1[R];                                                                \
      for (int r = 0; r < R; r++) a0[r] = a1[r] = (v16){0};                            \
      const float *w = W + j;                                                          \
      for (long k = 0; k < K; k++, w += N) {                                           \
        __builtin_prefetch(w + AHEAD_ROWS * N, 0, 2);                                  \
        __builtin_prefetch(w + AHEAD_ROWS * N + 16, 0, 2);                             \
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
        __builtin_prefetch(w + AHEAD_ROWS * N, 0, 2);                                  \
        __builtin_prefetch(w + AHEAD_ROWS * N + N, 0, 2);                              \
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
