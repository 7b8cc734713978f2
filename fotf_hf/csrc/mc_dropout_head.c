/* Fused head-only MC dropout for FOTF on the CPU (see fotf_hf/_mc_kernel.py, which builds and calls it).
 *
 * For pixel-major features x (N, D), a 1x1-conv classifier folded into wt (D, CP) = W^T / (1 - p)
 * (columns C..CP-1 zero) and the no-drop logits base (N, C) = x wt + b, sample t's logits are
 *
 *     z_t[n, :] = base[n, :] - sum over dropped (n, d) of x[n, d] * wt[d, :]
 *
 * which is W (m_t * x) / (1 - p) + b for a Bernoulli(1 - p) keep-mask m_t. The dropped positions of
 * each segment of `seg_rows` rows are a Bernoulli(p) process walked by its geometric gaps (the
 * inverse-CDF table of fotf_hf.uncertainty._geometric_table, indexed by 16-bit uniforms), drawn from
 * a splitmix64 stream whose start is a hash of (seeds[t], segment index). Segments are disjoint and
 * their streams independent, so every (n, d) is dropped independently with probability p (up to the
 * table's 2**-16 resolution), and the draws do not depend on how segments are split over threads.
 *
 * One pass per (segment, sample) does what the torch `sparse` path needs ~15 kernels for: gap
 * generation, the walk, the corrections, a softmax, and the sums of eq. 6 shifted by the first
 * sample (as fotf_hf.uncertainty.predictive_std). The segment's x (seg_rows * D floats) stays in L2
 * across the T samples.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>

/* splitmix64's output function (Steele, Lea & Flood 2014) */
static inline uint64_t mix64(uint64_t z)
{
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

typedef struct {
    uint64_t state;        /* splitmix64 state */
    int64_t gi, n, cap;    /* next unread gap, gaps drawn, buffer size (>= 4 D + 4 and >= 1024) */
    int32_t *gaps;
} stream_t;

/* Keep the unread gaps (in order) and draw new ones behind them: four 16-bit uniforms per
 * splitmix64 word, low bits first. The table loads are independent of each other, so they overlap
 * here instead of sitting on the walk's critical path. */
static void refill(stream_t *s, const int32_t *table)
{
    int64_t left = s->n - s->gi, i;
    memmove(s->gaps, s->gaps + s->gi, sizeof(int32_t) * (size_t)left);
    for (i = left; i + 4 <= s->cap; i += 4) {
        uint64_t w = mix64(s->state += 0x9E3779B97F4A7C15ULL);
        s->gaps[i] = table[w & 0xFFFF];
        s->gaps[i + 1] = table[(w >> 16) & 0xFFFF];
        s->gaps[i + 2] = table[(w >> 32) & 0xFFFF];
        s->gaps[i + 3] = table[w >> 48];
    }
    s->gi = 0;
    s->n = i;
}

static void stream_start(stream_t *s, uint64_t seed, uint64_t segment, const int32_t *table)
{
    s->state = mix64(seed ^ mix64(segment + 0x632BE59BD9B4E019ULL));
    s->gi = s->n = 0;
    refill(s, table);
}

/* exp(x) for x <= 0 (softmax after the max is subtracted): Cody-Waite reduction and a degree-6
 * Taylor polynomial, relative error < 2.4e-7 on [-87, 0] (checked against exp() in double for every
 * float there); branch-free so that the class loop vectorises. Below -87 it returns
 * ~1.6e-38 instead of a denormal or 0. */
static inline float exp_nonpositive(float x)
{
    x = x < -87.0f ? -87.0f : x;
    float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f; /* round to nearest */
    float r = x - n * 0.693145751953125f - n * 1.428606765330187045e-06f;
    float q = 1.0f + r * (1.0f + r * (0.5f + r * (1.0f / 6 + r * (1.0f / 24 + r * (1.0f / 120 + r * (1.0f / 720))))));
    union { int32_t i; float f; } u;
    u.i = ((int32_t)n + 127) << 23;
    return q * u.f;
}

/* In-place class softmax of `rows` rows stored class-major (L[j * stride + i] = logit of class j,
 * row i): the loops run over rows, so max, exp and sum vectorise without horizontal reductions
 * (a row-major softmax of 19 classes was ~200 cycles of dependent scalar work per row). */
static void softmax_columns(float *restrict L, int64_t rows, int64_t stride, int64_t C,
                           float *restrict m, float *restrict sum)
{
    for (int64_t i = 0; i < rows; i++) m[i] = L[i];
    for (int64_t j = 1; j < C; j++)
        for (int64_t i = 0; i < rows; i++) m[i] = L[j * stride + i] > m[i] ? L[j * stride + i] : m[i];
    for (int64_t i = 0; i < rows; i++) sum[i] = 0.0f;
    for (int64_t j = 0; j < C; j++)
        for (int64_t i = 0; i < rows; i++) {
            const float e = exp_nonpositive(L[j * stride + i] - m[i]);
            L[j * stride + i] = e;
            sum[i] += e;
        }
    for (int64_t i = 0; i < rows; i++) m[i] = 1.0f / sum[i];
    for (int64_t j = 0; j < C; j++)
        for (int64_t i = 0; i < rows; i++) L[j * stride + i] *= m[i];
}

static inline __attribute__((always_inline)) int
run(const float *restrict x, const float *restrict wt, const float *restrict base, const int32_t *restrict table,
    const uint64_t *restrict seeds, int64_t T, int64_t N, int64_t D, int64_t C, int64_t seg_rows,
    int64_t seg_begin, int64_t seg_end, float *restrict logits, float *restrict sigma, int64_t correction,
    const int CP)
{
    /* Per segment, class-major (C x seg_rows): the sample's probabilities, the shift (the first
     * sample's), the running sums; plus two per-row scratch vectors. */
    const int64_t S = seg_rows;
    float *buf = malloc(sizeof(float) * (size_t)((4 * C + 2) * S));
    stream_t stream, *s = &stream;
    s->cap = 4 * D + 4 > 1024 ? 4 * D + 4 : 1024;
    s->gaps = malloc(sizeof(int32_t) * (size_t)s->cap);
    if (!buf || !s->gaps) {
        free(buf);
        free(s->gaps);
        return 1;
    }
    float *q = buf, *shift = buf + C * S, *s1 = buf + 2 * C * S, *s2 = buf + 3 * C * S;
    float *m = buf + 4 * C * S, *sum = m + S;
    for (int64_t seg = seg_begin; seg < seg_end; seg++) {
        const int64_t r0 = seg * S, r1 = r0 + S < N ? r0 + S : N, rows = r1 - r0;
        if (r0 >= N)
            break;
        if (sigma)
            memset(s1, 0, sizeof(float) * (size_t)(2 * C * S));
        for (int64_t t = 0; t < T; t++) {
            stream_start(s, seeds[t], (uint64_t)seg, table);
            int64_t pos = r0 * D + s->gaps[s->gi++] - 1;
            for (int64_t r = r0; r < r1; r++) {
                float a[CP];
                for (int j = 0; j < CP; j++) a[j] = j < C ? base[r * C + j] : 0.0f;
                const int64_t rs = r * D, re = rs + D;
                /* a row takes at most D gaps (each moves pos by >= 1): check the buffer once per row */
                if (s->n - s->gi < D)
                    refill(s, table);
                const int32_t *g = s->gaps + s->gi;
                int64_t k = 0;
                while (pos < re) {
                    const float xv = x[pos];
                    const float *w = wt + (pos - rs) * CP;
                    pos += g[k++];
                    for (int j = 0; j < CP; j++) a[j] -= xv * w[j];
                }
                s->gi += k;
                if (logits)
                    memcpy(logits + (t * N + r) * C, a, sizeof(float) * (size_t)C);
                if (sigma)
                    for (int64_t j = 0; j < C; j++) q[j * S + (r - r0)] = a[j];
            }
            if (sigma) {
                softmax_columns(q, rows, S, C, m, sum);
                if (t == 0) {
                    /* the first sample is the shift: sigma is exactly 0 where all samples agree, and as
                     * accurate as a two-pass std where they nearly do (predictive_std does the same) */
                    for (int64_t j = 0; j < C; j++)
                        memcpy(shift + j * S, q + j * S, sizeof(float) * (size_t)rows);
                    continue;
                }
                for (int64_t j = 0; j < C; j++)
                    for (int64_t i = 0; i < rows; i++) {
                        const float d = q[j * S + i] - shift[j * S + i];
                        s1[j * S + i] += d;
                        s2[j * S + i] += d * d;
                    }
            }
        }
        if (sigma) {
            /* var = (sum d^2 - (sum d)^2 / T) / (T - correction), d = q_t - q_1 */
            const float inv_t = 1.0f / (float)T, inv_dof = 1.0f / (float)(T - correction);
            for (int64_t j = 0; j < C; j++)
                for (int64_t i = 0; i < rows; i++) {
                    const float var = (s2[j * S + i] - s1[j * S + i] * s1[j * S + i] * inv_t) * inv_dof;
                    sigma[(r0 + i) * C + j] = var > 0.0f ? sqrtf(var) : 0.0f;
                }
        }
    }
    free(buf);
    free(s->gaps);
    return 0;
}

#define SPECIALISE(CPV)                                                                                       \
    static int run_##CPV(const float *x, const float *wt, const float *base, const int32_t *table,            \
                         const uint64_t *seeds, int64_t T, int64_t N, int64_t D, int64_t C, int64_t seg_rows,  \
                         int64_t sb, int64_t se, float *logits, float *sigma, int64_t correction)             \
    {                                                                                                         \
        return run(x, wt, base, table, seeds, T, N, D, C, seg_rows, sb, se, logits, sigma, correction, CPV);  \
    }
SPECIALISE(8)
SPECIALISE(16)
SPECIALISE(24)
SPECIALISE(32)
SPECIALISE(40)
SPECIALISE(48)
SPECIALISE(56)
SPECIALISE(64)

/* Generic padded width (a multiple of 8 above 64): same code, runtime loop bounds. */
static int run_any(const float *x, const float *wt, const float *base, const int32_t *table, const uint64_t *seeds,
                   int64_t T, int64_t N, int64_t D, int64_t C, int64_t seg_rows, int64_t sb, int64_t se,
                   float *logits, float *sigma, int64_t correction, int CP)
{
    return run(x, wt, base, table, seeds, T, N, D, C, seg_rows, sb, se, logits, sigma, correction, CP);
}

/* Entry point. Returns 0 on success, 1 when out of memory, 2 on bad sizes. Segments
 * [seg_begin, seg_end) of `seg_rows` rows; `logits` (T, N, C) and/or `sigma` (N, C) may be NULL.
 * CP = C rounded up to a multiple of 8 (the padded width of wt). */
int fotf_mc_dropout_head(const float *x, const float *wt, const float *base, const int32_t *table,
                         const uint64_t *seeds, int64_t T, int64_t N, int64_t D, int64_t C, int64_t CP,
                         int64_t seg_rows, int64_t seg_begin, int64_t seg_end, float *logits, float *sigma,
                         int64_t correction)
{
    if (T < 1 || N < 0 || D < 1 || C < 1 || CP < C || CP % 8 != 0 || seg_rows < 1 || (sigma && T - correction < 1))
        return 2;
    switch (CP) {
#define CASE(CPV) \
    case CPV:     \
        return run_##CPV(x, wt, base, table, seeds, T, N, D, C, seg_rows, seg_begin, seg_end, logits, sigma, correction);
        CASE(8) CASE(16) CASE(24) CASE(32) CASE(40) CASE(48) CASE(56) CASE(64)
#undef CASE
    default:
        return run_any(x, wt, base, table, seeds, T, N, D, C, seg_rows, seg_begin, seg_end, logits, sigma,
                       correction, (int)CP);
    }
}

/* Version of the stream definition: bump when the draws change, so cached builds and tests agree. */
int fotf_mc_dropout_head_version(void) { return 1; }
