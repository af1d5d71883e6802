/* The inverse-CDF draw of rollout/embedded/sampler.py in one call instead of ~10 torch ops
 * over [B, V]. Bit-equal to its torch ops: torch's CPU cumsum of float32 adds in a double
 * accumulator and rounds each prefix to float, searchsorted(right=True) of a non-decreasing
 * row is the first prefix above the target (an upper bound), and the target is
 * float(u * double(float(total))). Rows it cannot vouch for (a negative or NaN weight, a
 * non-finite total, or a draw landing on a zero weight) are counted in *irregular and the
 * caller reruns its torch ops. Built by models/native_build.py. */
#include <math.h>

#define LANES 8 /* rows summed together: independent double add chains, not one latency-bound */

/* first i in [0, V) with cdf[i] > target, else V - 1 (searchsorted's V, clamped) */
static long upper_bound(const float *cdf, long V, float target) {
  long lo = 0, hi = V; /* answer in [lo, hi] */
  while (lo < hi) {
    long mid = lo + (hi - lo) / 2;
    if (cdf[mid] > target) hi = mid;
    else lo = mid + 1;
  }
  return lo < V ? lo : V - 1;
}

/* w float32 [B, V], u float64 [B] in [0, 1) -> pick int64 [B]; cdf: scratch [LANES * V]. */
void inverse_cdf_rows(const float *w, long B, long V, const double *u, long *pick,
                      long *irregular, float *cdf) {
  *irregular = 0;
  for (long b0 = 0; b0 < B; b0 += LANES) {
    long n = B - b0 < LANES ? B - b0 : LANES;
    double acc[LANES] = {0};
    int bad[LANES] = {0};
    const float *rows = w + b0 * V;
    for (long j = 0; j < V; j++) {
      for (long k = 0; k < n; k++) {
        float x = rows[k * V + j];
        bad[k] |= !(x >= 0.f);
        acc[k] += (double)x;
        cdf[k * V + j] = (float)acc[k];
      }
    }
    for (long k = 0; k < n; k++) {
      float total = cdf[k * V + V - 1];
      long p = 0;
      if (bad[k] || !isfinite(total)) {
        (*irregular)++;
      } else {
        p = upper_bound(cdf + k * V, V, (float)(u[b0 + k] * (double)total));
        if (!(rows[k * V + p] > 0.f)) (*irregular)++;
      }
      pick[b0 + k] = p;
    }
  }
}
