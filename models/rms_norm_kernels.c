/* RMSNorm forward and backward over rows of a contiguous fp32 [n, d] array (the training
 * forward's norms, models/rms_norm_native.py). Sums run in 8 lanes so the compiler can
 * vectorise them without -ffast-math; the result differs from torch's ops only by rounding. */
#include <math.h>

#define LANES 8

static float dot_lanes(const float *a, const float *b, long d) {
    float acc[LANES] = {0.f};
    long i = 0;
    for (; i + LANES <= d; i += LANES)
        for (int l = 0; l < LANES; l++) acc[l] += a[i + l] * b[i + l];
    float s = 0.f;
    for (int l = 0; l < LANES; l++) s += acc[l];
    for (; i < d; i++) s += a[i] * b[i];
    return s;
}

static float dot3_lanes(const float *a, const float *b, const float *c, long d) {
    float acc[LANES] = {0.f};
    long i = 0;
    for (; i + LANES <= d; i += LANES)
        for (int l = 0; l < LANES; l++) acc[l] += a[i + l] * b[i + l] * c[i + l];
    float s = 0.f;
    for (int l = 0; l < LANES; l++) s += acc[l];
    for (; i < d; i++) s += a[i] * b[i] * c[i];
    return s;
}

/* y = x * rstd * w row by row; rstd[r] = 1 / sqrt(mean(x[r]^2) + eps) (kept for the backward). */
void rms_forward(const float *x, const float *w, float *y, float *rstd, long n, long d,
                 float eps) {
    for (long r = 0; r < n; r++) {
        const float *xr = x + r * d;
        float *yr = y + r * d;
        float s = 1.0f / sqrtf(dot_lanes(xr, xr, d) / (float)d + eps);
        rstd[r] = s;
        for (long i = 0; i < d; i++) yr[i] = xr[i] * s * w[i];
    }
}

/* gx = s (g w) - x s^3 mean(g w x) per row; gw = sum over rows of g x s (gw is overwritten;
 * gw may be NULL when the weight needs no gradient). */
void rms_backward(const float *g, const float *x, const float *w, const float *rstd, float *gx,
                  float *gw, long n, long d) {
    if (gw)
        for (long i = 0; i < d; i++) gw[i] = 0.f;
    for (long r = 0; r < n; r++) {
        const float *gr = g + r * d, *xr = x + r * d;
        float *o = gx + r * d;
        float s = rstd[r];
        float c = dot3_lanes(gr, w, xr, d) * s * s * s / (float)d;
        for (long i = 0; i < d; i++) o[i] = s * gr[i] * w[i] - xr[i] * c;
        if (gw)
            for (long i = 0; i < d; i++) gw[i] += gr[i] * xr[i] * s;
    }
}

#define MAX_D 1024

/* QK-norm then RoPE of x [t, h, d] (one row per token and head): n = x rstd w, then
 * y = n cos + (n R) sin with cos, sin [t, d] shared by a token's heads and R the signed
 * permutation (n R)[i] = sign[i] n[perm[i]] (sign 0: a pass-through dim). */
void qk_norm_rope_forward(const float *x, const float *w, const float *cos_t, const float *sin_t,
                          const int *perm, const float *sign, float *y, float *rstd, long t,
                          long h, long d, float eps) {
    float nrm[MAX_D];
    for (long r = 0; r < t * h; r++) {
        const float *xr = x + r * d, *c = cos_t + (r / h) * d, *sn = sin_t + (r / h) * d;
        float *yr = y + r * d;
        float s = 1.0f / sqrtf(dot_lanes(xr, xr, d) / (float)d + eps);
        rstd[r] = s;
        for (long i = 0; i < d; i++) nrm[i] = xr[i] * s * w[i];
        for (long i = 0; i < d; i++) yr[i] = nrm[i] * c[i] + sign[i] * nrm[perm[i]] * sn[i];
    }
}

/* The backward of qk_norm_rope_forward: gn = g cos + (g sin) R^T, written with the inverse
 * permutation (gn[j] += isign[j] (g sin)[iperm[j]]), then the RMSNorm backward of gn. */
void qk_norm_rope_backward(const float *g, const float *x, const float *w, const float *rstd,
                           const float *cos_t, const float *sin_t, const int *iperm,
                           const float *isign, float *gx, float *gw, long t, long h, long d) {
    float gn[MAX_D];
    if (gw)
        for (long i = 0; i < d; i++) gw[i] = 0.f;
    for (long r = 0; r < t * h; r++) {
        const float *gr = g + r * d, *xr = x + r * d;
        const float *c = cos_t + (r / h) * d, *sn = sin_t + (r / h) * d;
        float *o = gx + r * d;
        for (long j = 0; j < d; j++) {
            long i = iperm[j];
            gn[j] = gr[j] * c[j] + isign[j] * gr[i] * sn[i];
        }
        float s = rstd[r];
        float c3 = dot3_lanes(gn, w, xr, d) * s * s * s / (float)d;
        for (long i = 0; i < d; i++) o[i] = s * gn[i] * w[i] - xr[i] * c3;
        if (gw)
            for (long i = 0; i < d; i++) gw[i] += gn[i] * xr[i] * s;
    }
}
