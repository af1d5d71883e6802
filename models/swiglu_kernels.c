/* SwiGLU silu(gate) * up over rows of fp32 gate / up arrays (models/swiglu_native.py): the
 * training forward's MLPs and routed experts. gate and up rows start `ld` floats apart (ld = i
 * for two [n, i] arrays, 2 i for one [n, 2 i] array holding gate columns, then up columns). */
#include <stdint.h>

/* exp(x) in float without a libm call (and no floorf, fminf), so the loops below vectorise:
 * x = n ln2 + r with |r| <= ln2 / 2 (n rounded by the 1.5 * 2^23 trick), Cephes' expf
 * polynomial for exp(r), 2^n from the exponent bits; ~1 ulp. */
static inline float exp_poly(float x) {
    x = x < -87.3f ? -87.3f : x;
    x = x > 88.3f ? 88.3f : x;
    float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    union {
        int32_t i;
        float f;
    } scale;
    scale.i = ((int32_t)n + 127) << 23;
    return p * scale.f;
}


void swiglu_forward(const float *restrict gate, const float *restrict up, float *restrict h,
                    long n, long i, long ld) {
    for (long r = 0; r < n; r++) {
        const float *g = gate + r * ld, *u = up + r * ld;
        float *o = h + r * i;
        for (long j = 0; j < i; j++) o[j] = g[j] / (1.0f + exp_poly(-g[j])) * u[j];
    }
}

/* d gate = grad up sig(g) (1 + g (1 - sig(g))), d up = grad silu(g); written with stride ld. */
void swiglu_backward(const float *restrict grad, const float *restrict gate,
                     const float *restrict up, float *restrict dgate, float *restrict dup,
                     long n, long i, long ld) {
    for (long r = 0; r < n; r++) {
        const float *g = gate + r * ld, *u = up + r * ld, *d = grad + r * i;
        float *dg = dgate + r * ld, *du = dup + r * ld;
        for (long j = 0; j < i; j++) {
            float e = 1.0f + exp_poly(-g[j]), sig = 1.0f / e;
            du[j] = d[j] * (g[j] / e);
            dg[j] = d[j] * u[j] * sig * (1.0f + g[j] * (1.0f - sig));
        }
    }
}
