/* The mixture prior's value and analytic gradients in one pass over the weights.
 *
 * For weights w_i (i < n, the segments w[0..segments) laid end to end: the tensors of
 * one mixture group, read in place) and a J-component mixture (log pi_j, mu_j,
 * sigma_j), with log_norm_j = log pi_j - log sigma_j - log(2 pi)/2 and precisions
 * p_j = 1/sigma_j^2, sws_mixture_f32/_f64 compute, with responsibilities gamma_ij and
 * d_ij = w_i - mu_j,
 *
 *   summary[0]          = sum_i log sum_j exp(log_norm_j - p_j d_ij^2 / 2)      (value)
 *   summary[1 + j]      = sum_i gamma_ij                        (d value / d log pi_j)
 *   summary[1 + J + j]  = p_j sum_i gamma_ij d_ij                (d value / d mu_j)
 *   summary[1 + 2J + j] = (p_j sum_i gamma_ij d_ij^2 - sum_i gamma_ij) / sigma_j
 *                                                                (d value / d sigma_j)
 *   grad_w[s][i]        = -sum_j gamma_ij d_ij p_j    (if grad_w is not NULL; each
 *                                                      segment's gradient in place)
 *
 * and return 0 (1 for arguments out of range). Non-finite input gives NaN, as the
 * formulas would in exact arithmetic: a NaN or infinite weight makes the value, the
 * mixture sums and its own gradient NaN, and a mixture entry that is NaN or infinite
 * (a mean), NaN, infinite or not positive (a scale) or NaN or +inf (a log proportion)
 * makes every output NaN. A log proportion of -inf (pi_j = 0) is legitimate. The
 * checks need IEEE comparisons and w - w kept as written: the file is compiled
 * without -ffinite-math-only. The weights are split into `parts`
 * ranges run on OpenMP threads: linked against the libgomp that torch has already
 * loaded, they are torch's own intra-op threads (a second pool would compete with
 * torch's threads while they spin-wait after each parallel op). Within a range,
 * weights are taken in blocks whose (J, BLOCK) table stays in L1, and the loops over
 * a block vectorise (with -O3 and the reassociation flags that kernels.py passes;
 * float exp is the inline exp2_f32 below, double exp and both logs map to glibc's
 * vector math where it has them). Sums over a block are float,
 * across blocks and ranges double. Built at run time by bayes_sws/kernels.py; the
 * torch kernels there compute the same quantities.
 *
 * SKIPPING. Per block, only the components that can matter are evaluated. With the
 * block's weights in [lo, hi] and v_ij = log_norm_j - p_j d_ij^2 / 2,
 *
 *   best_j  = max over w in [lo, hi] of v_j(w)   (d at the point of [lo, hi] nearest mu_j)
 *   worst_j = min over w in [lo, hi] of v_j(w)   (d at the end farthest from mu_j)
 *   top_floor = max_j worst_j
 *
 * Every weight's top component t has v_it >= v_ij >= worst_j for all j, so
 * top_i >= top_floor, and component j is skipped when best_j < top_floor - margin: then
 * v_ij - top_i < -margin for every weight of the block, i.e. gamma_ij < exp(-margin),
 * and each weight's top component always stays. kernels.py sets the margin (see its
 * docstring: ln(1/u) + ln J + a safety term, u the dtype's unit round-off), so the
 * skipped terms, at most J of them, change each weight's density by less than a
 * fraction u exp(-safety) of it; margin = +inf evaluates every pair (the dense kernel).
 * GRADIENT FACTOR. A responsibility under exp(-margin) is not enough for the gradients:
 * a skipped pair's terms there are gamma_ij |d_ij| p_j (w, mu) and
 * gamma_ij |z_ij^2 - 1| / sigma_j (sigma), z = d / sigma, both at most
 * gamma_ij (1 + z_ij^2) / sigma_j, and a narrow component just past a block (sigma_j
 * 1e-4 beside a kept sigma of 1, z near 8) carries 1e4 (1 + z^2) times the
 * gradient of a kept component's weight one sigma from its mean. So component j is
 * skipped only when best_j + ln max(1, (widest / sigma_j) max(2, 1 + z_near_j^2)) is
 * under the threshold (the log bounded from above by bit arithmetic), widest the
 * largest sigma among the components that can be a weight's top (best_j >= top_floor)
 * and z_near_j the block's nearest z (exp(v_j) (1 + z^2) falls with z beyond z = 1, so
 * this bounds it over the block). Each skipped term of every gradient is then below
 * exp(-margin) / widest: at most the fraction exp(-margin) of the gradient of a weight
 * one sigma from its top component, as each skipped responsibility is of one.
 * A block holding a non-finite weight is always dense (NaN rules above unchanged).
 * The bound costs O(J) per block; late in training, with narrow components and most
 * weights near zero, a block needs a few components of J. A few outlying weights
 * widen a block's range: a block that keeps more than SPLIT_COMPONENTS (and fewer than
 * J), and more than SPLIT_EXCESS over the fewest that any block of its range has kept so
 * far, is bounded again in sub-blocks of SUB_BLOCK weights, used where they drop a
 * quarter of the pairs.
 * The weights are not reordered (a permutation would cost two more passes over them).
 *
 * BLOCK REFERENCE (float). Each weight's terms are exponentiated relative to a reference
 * log-density: its top term, found in a pass of its own, or, where the block's bounds
 * allow, the term of the block's floor component t (the j of top_floor). That is allowed
 * when every kept component's v_j - v_t lies in [MIN_LOG_RATIO, -MIN_LOG_RATIO] over the
 * block (worst_j - best_t and best_j - worst_t), and every kept worst_j is above
 * -MAX_REFERENCE_MAGNITUDE (so that round-off cannot carry a term past exp2_f32's range),
 * so no term needs clamping and none overflows; then v_j - v_t and its exp are computed
 * in one loop, and t's own term is exactly 1, as a weight's top term is in the other
 * form (which keeps the responsibilities of the dominant component exact, where sums
 * like sum_i gamma_i0 d_i cancel). It saves the pass that finds each weight's top and
 * the clamping pass: 1.5 times faster on broad early-training mixtures. The float64
 * kernel keeps the top-term form.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

/* glibc declares its vector exp and log (libmvec) only under -ffast-math; declared
 * here, the loops calling them vectorise without it. */
#if defined(__GLIBC__) && defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)   \
    && !defined(__FAST_MATH__) && __GLIBC_PREREQ(2, 22)
__attribute__((__simd__("notinbranch"))) double exp(double);
__attribute__((__simd__("notinbranch"))) double log(double);
__attribute__((__simd__("notinbranch"))) float logf(float);
#endif

/* 2^x for float x in [MIN_LOG_RATIO, -MIN_LOG_RATIO] * LOG2_E only (the caller clamps or
 * checks; beyond about +-126 the exponent arithmetic overflows): x = n + f, n = rint(x),
 * |f| <= 1/2 (x - n is exact in float), a degree-6 polynomial for 2^f (1 + f ln2 + ...,
 * Horner form; fitted for least maximum relative error, 5.2e-9 in exact arithmetic) and
 * n added to the exponent bits. The float kernel works in log2 units (each log-density
 * scaled by LOG2_E beforehand, no more operations a pair), so that no reduction by a
 * two-part ln2 is needed: one operation a pair fewer than exp(x), and as exact (a term's
 * error is that of its x, as before). Inline and branch-free, so the loops calling it
 * vectorise (glibc's vector expf is a call per vector and 1.4 times slower here).
 * Within 6.8e-8 relative (about one ulp) over that range. */
#define LOG2_E 1.44269504088896340736
static inline float exp2_f32(float x)
{
    const float n = rintf(x);
    const float f = x - n;
    float p = 1.5393329715e-4f;
    p = p * f + 1.3390135034e-3f;
    p = p * f + 9.6182583834e-3f;
    p = p * f + 5.5503623999e-2f;
    p = p * f + 2.4022649264e-1f;
    p = p * f + 6.9314718056e-1f;
    p = p * f + 1.0f;
    int32_t bits;
    memcpy(&bits, &p, sizeof bits);
    bits += (int32_t)((uint32_t)(int32_t)n << 23);
    memcpy(&p, &bits, sizeof p);
    return p;
}

/* An upper bound of ln x for finite x >= 1, at most 1 - ln 2 = 0.31 nats above it (and,
 * from float rounding, at most 1e-5 below it for float): with x = 2^e (1 + m), 0 <= m < 1,
 * ln x = e ln 2 + ln(1 + m) <= e ln 2 + m. Bit arithmetic, so the loop over the
 * components vectorises (a log call per component and block made the kernel 1.3-1.6
 * times slower on late-training mixtures). */
static inline float log_above_f32(float x)
{
    int32_t bits;
    memcpy(&bits, &x, sizeof bits);
    const int32_t mantissa_bits = (bits & 0x007fffff) | 0x3f800000;
    float one_plus_m;
    memcpy(&one_plus_m, &mantissa_bits, sizeof one_plus_m);
    return (float)((bits >> 23) - 127) * 0.693147182f + (one_plus_m - 1.0f);
}

static inline double log_above_f64(double x)
{
    int64_t bits;
    memcpy(&bits, &x, sizeof bits);
    const int64_t mantissa_bits = (bits & 0x000fffffffffffffLL) | 0x3ff0000000000000LL;
    double one_plus_m;
    memcpy(&one_plus_m, &mantissa_bits, sizeof one_plus_m);
    return (double)((bits >> 52) - 1023) * 0.69314718055994531 + (one_plus_m - 1.0);
}

#define BLOCK 256
#define SUB_BLOCK 64
#define UNROLL 4 /* see COMPONENTS IN GROUPS */
#define SPLIT_COMPONENTS 3
#define SPLIT_EXCESS 2
#define MAX_COMPONENTS 64
#define MAX_PARTS 256 /* the partial sums live on the stack */
#define MIN_LOG_RATIO (-80) /* exp below this is subnormal in float32 */
/* The block reference needs |v| under this: float32 round-off of each term, a few
 * 2^-24 |v| (0.3 nats here), then stays well inside the 7 nats from 80 to 87, where
 * exp2_f32 breaks down; at |v| near 1e10 it is hundreds of nats. */
#define MAX_REFERENCE_MAGNITUDE 1048576
#define HALF_LOG_2PI 0.91893853320467274178
#define SUMMARY(J) (1 + 3 * (J))

/* A mixture group's configuration for NAME##_joint (see GROUP below; prior.py's _PointPlan). */
typedef struct {
    int components;     /* J */
    int zero_component; /* component 0 has mean 0 and no means coordinate */
    int has_means, has_pi, has_pi_zero; /* which coordinates there are */
    int fixed_pi_zero;  /* zero component, J > 1, no pi_zero site: pi0 is fixed */
    double log_pi_zero, log1m_pi_zero; /* log pi0 and log(1 - pi0) of a fixed pi0 */
    double constant, means_precision; /* log p's constant; 1/s^2 of the means' Normal(0, s), or 0 */
    const double *gamma_shape_minus_one, *gamma_rate; /* J each, or NULL (flat precisions) */
    const double *dirichlet_minus_one; /* one per pi coordinate, or NULL (flat) */
    const double *beta_minus_one;      /* {a - 1, b - 1} of pi0's Beta, or NULL (flat) */
} sws_group_plan;

#define DEFINE_KERNEL(NAME, REAL, REAL_MAX, REAL_MIN, REAL_EPSILON, REAL_INF, UNIT, EXP,    \
                      LOG, LOG_ABOVE, REFERENCE)                                            \
    /* The components of a block that can matter (see SKIPPING above): their count, into */ \
    /* active[]. A block holding a non-finite weight keeps them all. */                     \
    static int NAME##_active(const REAL *wb, int b, const REAL *log_norm,                   \
                             const REAL *means, const REAL *precisions, const REAL *scales, \
                             int J, double margin, int *active, int *reference)             \
    {                                                                                       \
        int K = 0;                                                                          \
        *reference = -1;                                                                    \
        /* min and max by halving: elementwise loops vectorise where a reduction with */    \
        /* IEEE comparisons would not */                                                    \
        /* (a sum of w - w here would be reassociated away: bad + w - w = bad) */           \
        REAL lo[BLOCK], hi[BLOCK];                                                          \
        int nonfinite = 0;                                                                  \
        for (int i = 0; i < b; i++) {                                                       \
            lo[i] = hi[i] = wb[i];                                                          \
            nonfinite += !(fabs(wb[i]) <= REAL_MAX);                                        \
        }                                                                                   \
        if (nonfinite || !(margin < HUGE_VAL)) {                                            \
            for (int j = 0; j < J; j++)                                                     \
                active[K++] = j;                                                            \
            return K;                                                                       \
        }                                                                                   \
        int width = SUB_BLOCK;                                                              \
        while (width < b)                                                                   \
            width *= 2;                                                                     \
        for (int i = b; i < width; i++)                                                     \
            lo[i] = hi[i] = wb[0];                                                          \
        for (int half = width / 2; half > 0; half /= 2)                                     \
            for (int i = 0; i < half; i++) {                                                \
                lo[i] = lo[i + half] < lo[i] ? lo[i + half] : lo[i];                        \
                hi[i] = hi[i + half] > hi[i] ? hi[i + half] : hi[i];                        \
            }                                                                               \
        /* branch-free over the components, so that it vectorises */                        \
        REAL best[MAX_COMPONENTS], worst[MAX_COMPONENTS], near_z2[MAX_COMPONENTS];          \
        for (int j = 0; j < J; j++) {                                                       \
            const REAL below = lo[0] - means[j], above = hi[0] - means[j];                  \
            const REAL near = (below > 0 ? below : 0) + (above < 0 ? -above : 0);           \
            const REAL far = -below > above ? -below : above;                               \
            near_z2[j] = precisions[j] * near * near;                                       \
            best[j] = log_norm[j] - (REAL)0.5 * near_z2[j];                                 \
            worst[j] = log_norm[j] - (REAL)0.5 * precisions[j] * far * far;                 \
        }                                                                                   \
        REAL top_floor = -REAL_INF;                                                         \
        for (int j = 0; j < J; j++)                                                         \
            top_floor = worst[j] > top_floor ? worst[j] : top_floor;                        \
        const REAL threshold = top_floor - (REAL)margin;                                    \
        /* the widest component that can be a weight's top sets the gradients' scale; */    \
        /* each bound grows by its component's gradient factor (GRADIENT FACTOR above) */   \
        REAL widest = 0;                                                                    \
        for (int j = 0; j < J; j++)                                                         \
            widest = !(best[j] < top_floor) && scales[j] > widest ? scales[j] : widest;     \
        REAL bound[MAX_COMPONENTS];                                                         \
        for (int j = 0; j < J; j++) {                                                       \
            const REAL factor = widest / scales[j] * (near_z2[j] > 1 ? 1 + near_z2[j] : 2); \
            bound[j] = best[j] + LOG_ABOVE(factor > 1 ? factor : 1);                        \
        }                                                                                   \
        /* the floor's component t stays even where round-off of huge |v| drops best_t */   \
        /* under worst_t (else a block could keep none and every weight get log 0) */       \
        int t = 0;                                                                          \
        for (int j = 1; j < J; j++)                                                         \
            t = worst[j] > worst[t] ? j : t;                                                \
        for (int j = 0; j < J; j++)                                                         \
            if (!(bound[j] < threshold) || j == t) /* a NaN bound keeps its component */    \
                active[K++] = j;                                                            \
        /* BLOCK REFERENCE: t is every weight's reference where each kept v_j - v_t */      \
        /* lies in [MIN_LOG_RATIO, -MIN_LOG_RATIO] */                                       \
        int within = 1;                                                                     \
        for (int k = 0; k < K; k++)                                                         \
            within &= worst[active[k]] - best[t] >= (REAL)MIN_LOG_RATIO                     \
                      && best[active[k]] - worst[t] <= -(REAL)MIN_LOG_RATIO                 \
                      && worst[active[k]] >= -(REAL)MAX_REFERENCE_MAGNITUDE;                \
        *reference = REFERENCE && within ? t : -1;                                          \
        return K;                                                                           \
    }                                                                                       \
                                                                                            \
    /* COMPONENTS IN GROUPS: count components (UNROLL, or 1 for the rest; always_inline, */ \
    /* so each call is compiled for its constant count) in one loop over the block's */     \
    /* weights, which then reads each weight and its inverse total, and updates its */      \
    /* gradient, once per group instead of once per component: about 1.1 times faster */    \
    /* on broad early-training mixtures, 2 threads (benchmarks/README.md). (The pass */     \
    /* computing the terms stays one component a loop: grouped, it changes the order */     \
    /* in which each weight's total is summed, and with it the round-off that the */        \
    /* dominant component's mean gradient, a sum that cancels, is sensitive to.) */         \
                                                                                            \
    /* Components js[0..count) with their table rows: each weight's responsibilities */     \
    /* (row times inverse_total[i]) times d p_j into grad[i], and the block's sum gamma, */ \
    /* sum gamma d, sum gamma d^2 of each component into summary. */                        \
    static inline __attribute__((always_inline)) void NAME##_moments(                       \
        const REAL *wb, int b, const int *js, int count, const REAL *means,                 \
        const REAL *precisions, REAL (*rows)[BLOCK], const REAL *inverse_total, int J,      \
        REAL bad, REAL *grad, double *summary)                                              \
    {                                                                                       \
        REAL mu[UNROLL], p[UNROLL], s0[UNROLL], s1[UNROLL], s2[UNROLL];                     \
        for (int u = 0; u < count; u++) {                                                   \
            mu[u] = means[js[u]];                                                           \
            p[u] = precisions[js[u]];                                                       \
            s0[u] = s1[u] = s2[u] = 0;                                                      \
        }                                                                                   \
        for (int i = 0; i < b; i++) {                                                       \
            REAL g = 0;                                                                     \
            _Pragma("GCC unroll 8")                                                         \
            for (int u = 0; u < count; u++) {                                               \
                const REAL gamma = rows[u][i] * inverse_total[i];                           \
                const REAL d = wb[i] - mu[u];                                               \
                const REAL gamma_d = gamma * d;                                             \
                g += gamma_d * p[u];                                                        \
                s0[u] += gamma;                                                             \
                s1[u] += gamma_d;                                                           \
                s2[u] += gamma_d * d;                                                       \
            }                                                                               \
            grad[i] += g;                                                                   \
        }                                                                                   \
        for (int u = 0; u < count; u++) {                                                   \
            summary[1 + js[u]] += s0[u] + bad;                                              \
            summary[1 + J + js[u]] += s1[u] + bad;                                          \
            summary[1 + 2 * J + js[u]] += s2[u] + bad;                                      \
        }                                                                                   \
    }                                                                                       \
                                                                                            \
    /* adds one block's terms into summary: the value, then sum gamma, sum gamma d, */      \
    /* sum gamma d^2 (each J), over the K components in active[]; the log-densities */      \
    /* times UNIT (LOG2_E: in bits, EXP 2^x; 1: in nats, EXP e^x) */                        \
    static void NAME##_block(const REAL *wb, int b, const int *active, int K,               \
                             int reference, const REAL *log_norm, const REAL *means,        \
                             const REAL *precisions, int J, REAL gradient_scale, REAL *grad_w,\
                             double *summary)                                               \
    {                                                                                       \
        REAL table[MAX_COMPONENTS][BLOCK];                                                  \
        REAL top[BLOCK], total[BLOCK], grad[BLOCK];                                         \
        /* w - w: 0, or NaN for a non-finite weight, poisoning its gradient and the */      \
        /* block's sums */                                                                  \
        REAL bad = 0;                                                                       \
        for (int i = 0; i < b; i++) {                                                       \
            top[i] = -REAL_MAX;                                                             \
            total[i] = 0;                                                                   \
            grad[i] = wb[i] - wb[i];                                                        \
            bad += grad[i];                                                                 \
        }                                                                                   \
        if (reference >= 0) { /* BLOCK REFERENCE (see _active): one pass a component */     \
            const REAL mu_t = means[reference], ln_t = (REAL)UNIT * log_norm[reference];    \
            const REAL half_p_t = (REAL)(0.5 * UNIT) * precisions[reference];               \
            for (int i = 0; i < b; i++) {                                                   \
                const REAL d = wb[i] - mu_t;                                                \
                top[i] = ln_t - half_p_t * d * d;                                           \
            }                                                                               \
            for (int k = 0; k < K; k++) {                                                   \
                const int j = active[k];                                                    \
                const REAL mu = means[j], ln = (REAL)UNIT * log_norm[j];                    \
                const REAL half_p = (REAL)(0.5 * UNIT) * precisions[j];                     \
                if (j == reference)                                                         \
                    for (int i = 0; i < b; i++) {                                           \
                        table[k][i] = 1;                                                    \
                        total[i] += 1;                                                      \
                    }                                                                       \
                else                                                                        \
                    for (int i = 0; i < b; i++) {                                           \
                        const REAL d = wb[i] - mu;                                          \
                        const REAL e = EXP((ln - half_p * d * d) - top[i]);                 \
                        table[k][i] = e;                                                    \
                        total[i] += e;                                                      \
                    }                                                                       \
            }                                                                               \
        } else {                                                                            \
            for (int k = 0; k < K; k++) {                                                   \
                const int j = active[k];                                                    \
                const REAL mu = means[j], ln = (REAL)UNIT * log_norm[j];                    \
                const REAL half_p = (REAL)(0.5 * UNIT) * precisions[j];                     \
                for (int i = 0; i < b; i++) {                                               \
                    const REAL d = wb[i] - mu;                                              \
                    const REAL v = ln - half_p * d * d;                                     \
                    table[k][i] = v;                                                        \
                    top[i] = v > top[i] ? v : top[i];                                       \
                }                                                                           \
            }                                                                               \
            /* Clamped in a loop of its own: in the loop calling EXP, GCC would rewrite */  \
            /* exp(max(x, m)) as x > m ? exp(x) : exp(m), and call exp on the unclamped */  \
            /* x, whose vector version takes a slow path far below m. */                    \
            const REAL lowest = (REAL)(MIN_LOG_RATIO * UNIT);                               \
            for (int k = 0; k < K; k++) {                                                   \
                for (int i = 0; i < b; i++) {                                               \
                    const REAL x = table[k][i] - top[i];                                    \
                    table[k][i] = x > lowest ? x : lowest;                                  \
                }                                                                           \
                for (int i = 0; i < b; i++) {                                               \
                    const REAL e = EXP(table[k][i]);                                        \
                    table[k][i] = e;                                                        \
                    total[i] += e;                                                          \
                }                                                                           \
            }                                                                               \
        }                                                                                   \
        REAL block_value = 0;                                                               \
        for (int i = 0; i < b; i++) {                                                       \
            block_value += top[i] * (REAL)(1 / UNIT) + LOG(total[i]);                       \
            total[i] = (REAL)1 / total[i];                                                  \
        }                                                                                   \
        summary[0] += block_value + bad;                                                    \
        for (int k = 0; k < K; k += UNROLL) {                                               \
            if (K - k >= UNROLL)                                                            \
                NAME##_moments(wb, b, active + k, UNROLL, means, precisions, table + k,     \
                               total, J, bad, grad, summary);                               \
            else                                                                            \
                for (int one = k; one < K; one++)                                           \
                    NAME##_moments(wb, b, active + one, 1, means, precisions, table + one,  \
                                   total, J, bad, grad, summary);                           \
        }                                                                                   \
        if (grad_w)                                                                         \
            for (int i = 0; i < b; i++)                                                     \
                grad_w[i] = -gradient_scale * grad[i];                                      \
    }                                                                                       \
                                                                                            \
    /* Blocks of BLOCK weights; one whose bound keeps more than SPLIT_COMPONENTS */         \
    /* components, and more than SPLIT_EXCESS over the fewest any block of the range */     \
    /* kept so far, is bounded again in sub-blocks of SUB_BLOCK (a few outlying weights */  \
    /* widen a block's range; a block that keeps about what every block keeps has none) */  \
    static void NAME##_range(const REAL *w, long n, const REAL *log_norm, const REAL *means, \
                             const REAL *precisions, const REAL *scales, int J,             \
                             double margin, REAL gradient_scale, REAL *grad_w,              \
                             double *summary)                                               \
    {                                                                                       \
        int active[MAX_COMPONENTS];                                                         \
        int reference, sub_reference[BLOCK / SUB_BLOCK];                                    \
        int fewest = J;                                                                     \
        for (long start = 0; start < n; start += BLOCK) {                                   \
            const int b = (n - start < BLOCK) ? (int)(n - start) : BLOCK;                   \
            const REAL *wb = w + start;                                                     \
            const int K = NAME##_active(wb, b, log_norm, means, precisions, scales, J,      \
                                        margin, active, &reference);                        \
            int sub_active[BLOCK / SUB_BLOCK][MAX_COMPONENTS], sub_K[BLOCK / SUB_BLOCK];    \
            long split_cost = 0;                                                            \
            /* (a block that keeps all J, e.g. under broad early-training components, */    \
            /* is not tried: its sub-blocks would mostly keep all too) */                   \
            fewest = K < fewest ? K : fewest;                                               \
            const int try_split = K > SPLIT_COMPONENTS && K > fewest + SPLIT_EXCESS         \
                                  && K < J && margin < HUGE_VAL && b == BLOCK;              \
            if (try_split)                                                                  \
                for (int s = 0; s < BLOCK / SUB_BLOCK; s++) {                               \
                    sub_K[s] = NAME##_active(wb + s * SUB_BLOCK, SUB_BLOCK, log_norm,       \
                                             means, precisions, scales, J, margin,          \
                                             sub_active[s], &sub_reference[s]);             \
                    split_cost += sub_K[s];                                                 \
                }                                                                           \
            /* sub-blocks pay where they drop a quarter of the pairs */                     \
            if (!try_split || 4 * split_cost > 3 * (BLOCK / SUB_BLOCK) * K) {               \
                NAME##_block(wb, b, active, K, reference, log_norm, means, precisions, J,   \
                             gradient_scale, grad_w ? grad_w + start : NULL, summary);      \
                continue;                                                                   \
            }                                                                               \
            for (int s = 0; s < BLOCK / SUB_BLOCK; s++)                                     \
                NAME##_block(wb + s * SUB_BLOCK, SUB_BLOCK, sub_active[s], sub_K[s],        \
                             sub_reference[s], log_norm,                                    \
                             means, precisions, J, gradient_scale,                          \
                             grad_w ? grad_w + start + s * SUB_BLOCK : NULL, summary);      \
        }                                                                                   \
    }                                                                                       \
                                                                                            \
    static int NAME##_scaled(int segments, const REAL *const *w, const long *n,             \
                             REAL *const *grad_w, REAL gradient_scale,                      \
                             const REAL *log_proportions, const REAL *means,                \
                             const REAL *scales, int J, double margin, REAL *summary,       \
                             int parts)                                                     \
    {                                                                                       \
        REAL log_norm[MAX_COMPONENTS], precisions[MAX_COMPONENTS];                          \
        if (J < 1 || J > MAX_COMPONENTS || parts < 1 || parts > MAX_PARTS || segments < 1   \
            || !(margin >= 0))                                                              \
            return 1;                                                                       \
        long total = 0;                                                                     \
        for (int s = 0; s < segments; s++) {                                                \
            if (n[s] < 0)                                                                   \
                return 1;                                                                   \
            total += n[s];                                                                  \
        }                                                                                   \
        int invalid = 0;                                                                    \
        for (int j = 0; j < J; j++)                                                         \
            invalid |= !(log_proportions[j] < REAL_INF) | !(fabs(means[j]) < REAL_INF)      \
                       | !(scales[j] > 0 && scales[j] < REAL_INF);                          \
        if (invalid && total > 0) {                                                         \
            for (int m = 0; m < SUMMARY(J); m++)                                            \
                summary[m] = (REAL)NAN;                                                     \
            if (grad_w)                                                                     \
                for (int s = 0; s < segments; s++)                                          \
                    for (long i = 0; i < n[s]; i++)                                         \
                        grad_w[s][i] = (REAL)NAN;                                           \
            return 0;                                                                       \
        }                                                                                   \
        for (int j = 0; j < J; j++) {                                                       \
            log_norm[j] = log_proportions[j] - LOG(scales[j]) - (REAL)HALF_LOG_2PI;         \
            precisions[j] = (REAL)1 / (scales[j] * scales[j]);                              \
        }                                                                                   \
        double partial[parts][SUMMARY(J)], sums[SUMMARY(J)];                                \
        _Pragma("omp parallel for num_threads(parts) schedule(static, 1)")                  \
        for (int k = 0; k < parts; k++) {                                                   \
            /* the k-th share of the segments laid end to end */                            \
            const long start = total * k / parts, stop = total * (k + 1) / parts;           \
            for (int m = 0; m < SUMMARY(J); m++)                                            \
                partial[k][m] = 0.0;                                                        \
            long offset = 0;                                                                \
            for (int s = 0; s < segments; offset += n[s], s++) {                            \
                const long first = start > offset ? start : offset;                         \
                const long last = stop < offset + n[s] ? stop : offset + n[s];              \
                if (first < last)                                                           \
                    NAME##_range(w[s] + (first - offset), last - first, log_norm, means,    \
                                 precisions, scales, J, margin, gradient_scale,             \
                                 grad_w ? grad_w[s] + (first - offset) : NULL, partial[k]); \
            }                                                                               \
        }                                                                                   \
        for (int m = 0; m < SUMMARY(J); m++) {                                              \
            sums[m] = 0.0;                                                                  \
            for (int k = 0; k < parts; k++)                                                 \
                sums[m] += partial[k][m];                                                   \
        }                                                                                   \
        summary[0] = (REAL)sums[0];                                                         \
        for (int j = 0; j < J; j++) {                                                       \
            const double p = precisions[j];                                                 \
            summary[1 + j] = (REAL)sums[1 + j];                                             \
            summary[1 + J + j] = (REAL)(p * sums[1 + J + j]);                               \
            summary[1 + 2 * J + j] = (REAL)((p * sums[1 + 2 * J + j] - sums[1 + j]) / scales[j]); \
        }                                                                                   \
        return 0;                                                                           \
    }                                                                                       \
                                                                                            \
    /* 1 where a value of the segments is NaN or infinite, else 0, over parts threads */    \
    /* (the fit loop's check of every gradient; read-only, where torch's writes them). */   \
    int NAME##_nonfinite(int segments, const REAL *const *x, const long *n, int parts)     \
    {                                                                                       \
        if (segments < 0 || parts < 1 || parts > MAX_PARTS)                                 \
            return -1;                                                                      \
        long total = 0;                                                                     \
        for (int s = 0; s < segments; s++) {                                                \
            if (n[s] < 0)                                                                   \
                return -1;                                                                  \
            total += n[s];                                                                  \
        }                                                                                   \
        int found = 0;                                                                      \
        _Pragma("omp parallel for num_threads(parts) schedule(static, 1) reduction(|:found)") \
        for (int k = 0; k < parts; k++) {                                                   \
            const long start = total * k / parts, stop = total * (k + 1) / parts;           \
            long offset = 0;                                                                \
            for (int s = 0; s < segments; offset += n[s], s++) {                            \
                const long first = start > offset ? start : offset;                         \
                const long last = stop < offset + n[s] ? stop : offset + n[s];              \
                const REAL *xs = x[s];                                                      \
                for (long i = first - offset; i < last - offset; i++)                       \
                    found |= !(fabs(xs[i]) <= REAL_MAX);                                    \
            }                                                                               \
        }                                                                                   \
        return found;                                                                       \
    }                                                                                       \
                                                                                            \
    int NAME(int segments, const REAL *const *w, const long *n, REAL *const *grad_w,        \
             const REAL *log_proportions, const REAL *means, const REAL *scales, int J,     \
             double margin, REAL *summary, int parts)                                       \
    {                                                                                       \
        return NAME##_scaled(segments, w, n, grad_w, 1, log_proportions, means, scales, J,  \
                             margin, summary, parts);                                       \
    }                                                                                       \
                                                                                            \
    /* GROUP: lambda * sum_i log p(w_i | mixture) + log p(mixture) of one group at a point */ \
    /* and every gradient, from the sites' unconstrained coordinates (NULL where a site */  \
    /* is absent): prior.py's _point_mixture, the kernel with its weight gradients */       \
    /* scaled by lambda, and _coordinate_gradients, in one call; the mixture in double. */  \
    /* Every gradient is written times gradient_scale (the value is not): -1 hands a loss */ \
    /* of minus the value its gradients with no pass of their own (prior.py). */            \
    int NAME##_joint(const sws_group_plan *plan, const REAL *means_u, const REAL *precisions_u, \
                     const REAL *pi_u, const REAL *pi_zero_u, int segments,                 \
                     const REAL *const *w, const long *n, REAL *const *grad_w,              \
                     double prior_weight, double gradient_scale, double margin, int parts,  \
                     REAL *value, REAL *grad_means, REAL *grad_precisions, REAL *grad_pi,   \
                     REAL *grad_pi_zero)                                                    \
    {                                                                                       \
        const int J = plan->components, offset = plan->zero_component;                      \
        const int split = plan->zero_component && J > 1; /* pi0 apart from the pi site */   \
        const int free = J - split;                                                         \
        if (J < 1 || J > MAX_COMPONENTS)                                                    \
            return 1;                                                                       \
        double tau[MAX_COMPONENTS], log_free[MAX_COMPONENTS], pi_free[MAX_COMPONENTS];      \
        REAL log_pi[MAX_COMPONENTS], means[MAX_COMPONENTS], scales[MAX_COMPONENTS];         \
        REAL summary[SUMMARY(MAX_COMPONENTS)];                                              \
        double log_p = plan->constant;                                                      \
        for (int j = 0; j < J; j++) {                                                       \
            tau[j] = exp((double)precisions_u[j]);                                          \
            scales[j] = (REAL)exp(-0.5 * (double)precisions_u[j]);                          \
            if (plan->gamma_rate)                                                           \
                log_p += plan->gamma_shape_minus_one[j] * precisions_u[j]                   \
                         - plan->gamma_rate[j] * tau[j];                                    \
        }                                                                                   \
        means[0] = 0;                                                                       \
        for (int k = 0; plan->has_means && k < J - offset; k++) {                           \
            means[offset + k] = means_u[k];                                                 \
            if (plan->means_precision) /* flat: no term (an infinite mean stays out of it) */ \
                log_p -= 0.5 * plan->means_precision * (double)means_u[k] * means_u[k];     \
        }                                                                                   \
        log_free[0] = 0, pi_free[0] = 1; /* one free component: pi = 1 among them */        \
        if (plan->has_pi) {                                                                 \
            double top = -HUGE_VAL, total = 0;                                              \
            for (int k = 0; k < free; k++)                                                  \
                top = pi_u[k] > top ? pi_u[k] : top;                                        \
            for (int k = 0; k < free; k++)                                                  \
                total += exp(pi_u[k] - top);                                                \
            for (int k = 0; k < free; k++) {                                                \
                log_free[k] = pi_u[k] - top - log(total);                                   \
                pi_free[k] = exp(log_free[k]);                                              \
                if (plan->dirichlet_minus_one)                                              \
                    log_p += plan->dirichlet_minus_one[k] * log_free[k];                    \
            }                                                                               \
        }                                                                                   \
        double pi_zero = 0, log_rest = 0;                                                   \
        if (split) {                                                                        \
            double log_zero = plan->log_pi_zero;                                            \
            log_rest = plan->log1m_pi_zero;                                                 \
            if (plan->has_pi_zero) { /* torch's sigmoid transform, clipped as it clips */   \
                REAL clipped = (REAL)(1 / (1 + exp(-(double)pi_zero_u[0])));                \
                clipped = clipped < REAL_MIN ? REAL_MIN : clipped;                          \
                clipped = clipped > 1 - REAL_EPSILON ? 1 - REAL_EPSILON : clipped;          \
                pi_zero = clipped, log_zero = log(pi_zero), log_rest = log1p(-pi_zero);     \
                if (plan->beta_minus_one)                                                   \
                    log_p += plan->beta_minus_one[0] * log_zero                             \
                             + plan->beta_minus_one[1] * log_rest;                          \
            }                                                                               \
            log_pi[0] = (REAL)log_zero;                                                     \
        }                                                                                   \
        for (int k = 0; k < free; k++)                                                      \
            log_pi[split + k] = (REAL)(log_rest + log_free[k]);                             \
        for (int m = 0; m < SUMMARY(J); m++)                                                \
            summary[m] = 0;                                                                 \
        if (prior_weight != 0 && NAME##_scaled(segments, w, n, grad_w,                      \
                                               (REAL)(gradient_scale * prior_weight), log_pi, \
                                               means, scales, J, margin, summary, parts))   \
            return 1;                                                                       \
        *value = (REAL)(log_p + prior_weight * summary[0]);                                 \
        /* the mixture's gradients, d/d log pi, d/d mu, d/d sigma, carried to the */        \
        /* coordinates: sigma = exp(-u/2), pi = softmax, pi0 = sigmoid */                   \
        const REAL *grad_log_pi = summary + 1, *grad_mu = summary + 1 + J;                  \
        const REAL *grad_sigma = summary + 1 + 2 * J;                                       \
        for (int j = 0; j < J; j++)                                                         \
            grad_precisions[j] = (REAL)(gradient_scale                                      \
                                        * (-0.5 * prior_weight * grad_sigma[j] * scales[j]  \
                                           + (plan->gamma_rate ? plan->gamma_shape_minus_one[j] \
                                              - plan->gamma_rate[j] * tau[j] : 0)));        \
        for (int k = 0; plan->has_means && k < J - offset; k++)                             \
            grad_means[k] = (REAL)(gradient_scale * (prior_weight * grad_mu[offset + k]     \
                                   - (plan->means_precision ? plan->means_precision * means_u[k] : 0))); \
        if (plan->has_pi) {                                                                 \
            double score[MAX_COMPONENTS], total = 0;                                        \
            for (int k = 0; k < free; k++) {                                                \
                score[k] = prior_weight * grad_log_pi[split + k]                            \
                           + (plan->dirichlet_minus_one ? plan->dirichlet_minus_one[k] : 0); \
                total += score[k];                                                          \
            }                                                                               \
            for (int k = 0; k < free; k++)                                                  \
                grad_pi[k] = (REAL)(gradient_scale * (score[k] - pi_free[k] * total));      \
        }                                                                                   \
        if (plan->has_pi_zero) {                                                            \
            double rest = 0;                                                                \
            for (int j = 1; j < J; j++)                                                     \
                rest += grad_log_pi[j];                                                     \
            const double a = plan->beta_minus_one ? plan->beta_minus_one[0] : 0;            \
            const double b = plan->beta_minus_one ? plan->beta_minus_one[1] : 0;            \
            grad_pi_zero[0] = (REAL)(gradient_scale                                         \
                                     * ((prior_weight * grad_log_pi[0] + a) * (1 - pi_zero) \
                                        - (prior_weight * rest + b) * pi_zero));            \
        }                                                                                   \
        return 0;                                                                           \
    }

DEFINE_KERNEL(sws_mixture_f32, float, FLT_MAX, FLT_MIN, FLT_EPSILON, HUGE_VALF, LOG2_E, exp2_f32, logf,
              log_above_f32, 1)
DEFINE_KERNEL(sws_mixture_f64, double, DBL_MAX, DBL_MIN, DBL_EPSILON, HUGE_VAL, 1.0, exp, log,
              log_above_f64, 0)

/* Whether this build runs the parts on OpenMP threads (else one after another). */
int sws_openmp(void)
{
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}
