/* A whole decoder layer of a batch of fp32 token rows in one C call
 * (models/decode_layer_native.py): the same kernels, in the same order and on the same
 * scratch, that models/decode.py calls one by one through ctypes for a batch of 2+ tokens
 * on the CPU (RMSNorm, qkv matmul, qk-norm/RoPE/cache write, attention from the cache,
 * o_proj + residual, RMSNorm, router and experts or the dense MLP, residual). Between those
 * calls each layer paid ~40 torch and ctypes dispatches; here it pays one.
 * The sources are included whole: one library, the kernels inlined where GCC likes. */
#include "decode_batch_kernels.c"
#include "decode_attend_kernels.c"
#include "decode_bf16_kernels.c"

/* What every layer of one forward shares: shapes, the forward's rows and scratch. */
typedef struct {
  long T, H, Hq, Hkv, D, max_len;
  float eps, scale;
  int half;       /* bf16 weights (fp32 otherwise) */
  int cache_half; /* bf16 KV cache */
  const float *cos, *sin; /* RoPE [T, D] */
  const int *perm;
  const float *sign;
  const long *write_rows;   /* int64 [T 2 Hkv]: cache rows of the new K/V heads */
  const long *slots, *ends; /* int64 [T]: each token's slot and context length */
  float *h, *qkv, *q, *attn, *y; /* [T, H], [T, (Hq + 2 Hkv) D], [T, Hq D] x 2, [T, H] */
  float *p;                      /* attend_rows' scratch */
  float *qkn;                    /* a bf16 qk-norm weight widened: (Hq + Hkv) D */
  bf16 *xh;                      /* matmul_bf16's: MAX_ROWS x the widest K */
  long *tok;                     /* moe_rows' / mlp_rows': T (k + 1) */
  float *wt, *buf;               /* T (k + 1); MAX_ROWS (3 H + 2 x the widest 2 I) */
} Step;

/* One layer's weights (fp32 or bf16 as Step.half; norms as norm_half; router fp32). */
typedef struct {
  const void *in_norm, *post_norm, *qkv, *o;
  const void *qk_norm;  /* [Hq + Hkv, D] fp32 or (qk_norm_half) bf16, or NULL */
  const void *gate_up, *down; /* the dense MLP, or the shared experts outside the bank */
  long I;
  const float *router_w; /* NULL: a dense layer */
  long E, k, I_moe;
  int norm_topk;
  float scaling;
  const void *experts_gate_up, *experts_down; /* the bank (shared last) or the experts */
  int shared_in_bank, norm_half, qk_norm_half;
} Layer;

static void mm(const Step *S, const float *X, long K, const void *W, long N, float *Y) {
  if (S->half)
    matmul_bf16(X, S->T, K, W, N, Y, S->xh);
  else
    matmul_f32(X, S->T, K, W, N, Y);
}

static void add_rows(float *x, const float *y, long n) {
  for (long i = 0; i < n; i++) x[i] += y[i];
}

/* x fp32 [T, H] (the residual stream) through layer L, in place, with its KV cache [slots,
 * 2 Hkv, max_len, D] and (MoE) router bias fp32 [E]; a MoE layer's experts int64 [T, k]
 * (ascending per token) and weights fp32 [T, k] go to experts / weights. L is only read:
 * what changes between forwards comes as arguments or in S. */
void layer_rows(float *x, const Layer *L, const Step *S, void *cache, const float *bias,
                long *experts, float *weights) {
  long T = S->T, H = S->H, Hq = S->Hq, Hkv = S->Hkv, D = S->D;
  const float *qk_norm = L->qk_norm;
  if (qk_norm && L->qk_norm_half) { /* exact, as torch's .float() */
    for (long i = 0; i < (Hq + Hkv) * D; i++) S->qkn[i] = bf16_float(((const bf16 *)L->qk_norm)[i]);
    qk_norm = S->qkn;
  }
  rms_rows(x, T, H, L->in_norm, S->eps, S->h, L->norm_half);
  mm(S, S->h, H, L->qkv, (Hq + 2 * Hkv) * D, S->qkv);
  qkv_rows(S->qkv, T, Hq, Hkv, D, qk_norm, S->eps, S->cos, S->sin, S->perm, S->sign,
           cache, S->write_rows, S->q, S->cache_half);
  attend_rows(S->q, Hq * D, cache, Hkv, Hq / Hkv, S->max_len, D, S->slots, S->ends, T,
              S->scale, S->attn, S->p, S->cache_half);
  mm(S, S->attn, Hq * D, L->o, H, S->y);
  add_rows(x, S->y, T * H);
  rms_rows(x, T, H, L->post_norm, S->eps, S->h, L->norm_half);
  if (!L->router_w) { /* dense: x += mlp(h) */
    mlp_rows(S->h, T, H, L->I, L->gate_up, L->down, x, S->tok, S->wt, S->buf, S->half);
    return;
  }
  route_rows(S->h, T, H, L->router_w, bias, L->E, L->k, L->norm_topk, L->scaling, experts,
             weights);
  moe_rows(S->h, T, H, L->I_moe, experts, weights, L->k, L->E, L->experts_gate_up,
           L->experts_down, L->shared_in_bank, S->y, S->tok, S->wt, S->buf, S->half);
  if (L->gate_up) /* shared experts outside the bank: added to the routed output first */
    mlp_rows(S->h, T, H, L->I, L->gate_up, L->down, S->y, S->tok, S->wt, S->buf, S->half);
  add_rows(x, S->y, T * H);
}
