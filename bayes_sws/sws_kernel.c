/* The mixture prior's value and analytic gradients in one pass over the weights.
 *
 * For weights w_i (i < n) and J components with log_norm_j = log pi_j - log sigma_j
 * - log(2 pi)/2, means mu_j and precisions p_j = 1/sigma_j^2, it computes
 *
 *   summary[0]         = sum_i log sum_j exp(log_norm_j - p_j (w_i - mu_j)^2 / 2)
 *   summary[1 + j]     = sum_i gamma_ij                    (responsibilities)
 *   summary[1 + J + j] = sum_i gamma_ij d_ij               (d = w - mu)
 *   summary[1 + 2J + j]= sum_i gamma_ij d_ij^2
 *   grad_w[i]          = -sum_j gamma_ij d_ij p_j          (if grad_w is not NULL)
 *
 * Weights are taken in blocks whose (J, BLOCK) table stays in L1; the loops over a
 * block vectorise (with -O3 -ffast-math, exp and log map to glibc's vector math).
 * Sums over a block are float, across blocks double. Built at run time by
 * bayes_sws/kernels.py; the torch kernels there compute the same quantities.
 */
#include <float.h>
#include <tgmath.h>

#define BLOCK 256
#define MAX_COMPONENTS 64
#define MIN_LOG_RATIO (-80) /* exp below this is subnormal in float32 */

#define DEFINE_KERNEL(NAME, REAL, REAL_MAX)                                                 \
    int NAME(const REAL *w, long n, const REAL *log_norm, const REAL *means,                \
             const REAL *precisions, int J, REAL *grad_w, double *summary)                  \
    {                                                                                       \
        REAL table[MAX_COMPONENTS][BLOCK];                                                  \
        REAL top[BLOCK], total[BLOCK], grad[BLOCK];                                         \
        if (J < 1 || J > MAX_COMPONENTS)                                                    \
            return 1;                                                                       \
        for (int k = 0; k < 1 + 3 * J; k++)                                                 \
            summary[k] = 0.0;                                                               \
        for (long start = 0; start < n; start += BLOCK) {                                   \
            const int b = (n - start < BLOCK) ? (int)(n - start) : BLOCK;                   \
            const REAL *wb = w + start;                                                     \
            for (int i = 0; i < b; i++) {                                                   \
                top[i] = -REAL_MAX;                                                         \
                total[i] = 0;                                                               \
                grad[i] = 0;                                                                \
            }                                                                               \
            for (int j = 0; j < J; j++) {                                                   \
                const REAL mu = means[j], p = precisions[j], ln = log_norm[j];              \
                for (int i = 0; i < b; i++) {                                               \
                    const REAL d = wb[i] - mu;                                              \
                    const REAL v = ln - (REAL)0.5 * p * d * d;                              \
                    table[j][i] = v;                                                        \
                    top[i] = v > top[i] ? v : top[i];                                       \
                }                                                                           \
            }                                                                               \
            for (int j = 0; j < J; j++) {                                                   \
                for (int i = 0; i < b; i++) {                                               \
                    REAL x = table[j][i] - top[i];                                          \
                    x = x > (REAL)MIN_LOG_RATIO ? x : (REAL)MIN_LOG_RATIO;                  \
                    const REAL e = exp(x);                                                  \
                    table[j][i] = e;                                                        \
                    total[i] += e;                                                          \
                }                                                                           \
            }                                                                               \
            REAL block_value = 0;                                                           \
            for (int i = 0; i < b; i++) {                                                   \
                block_value += top[i] + log(total[i]);                                      \
                total[i] = (REAL)1 / total[i];                                              \
            }                                                                               \
            summary[0] += block_value;                                                      \
            for (int j = 0; j < J; j++) {                                                   \
                const REAL mu = means[j], p = precisions[j];                                \
                REAL s0 = 0, s1 = 0, s2 = 0;                                                \
                for (int i = 0; i < b; i++) {                                               \
                    const REAL gamma = table[j][i] * total[i];                              \
                    const REAL d = wb[i] - mu;                                              \
                    const REAL gamma_d = gamma * d;                                         \
                    grad[i] += gamma_d * p;                                                 \
                    s0 += gamma;                                                            \
                    s1 += gamma_d;                                                          \
                    s2 += gamma_d * d;                                                      \
                }                                                                           \
                summary[1 + j] += s0;                                                       \
                summary[1 + J + j] += s1;                                                   \
                summary[1 + 2 * J + j] += s2;                                               \
            }                                                                               \
            if (grad_w)                                                                     \
                for (int i = 0; i < b; i++)                                                 \
                    grad_w[start + i] = -grad[i];                                           \
        }                                                                                   \
        return 0;                                                                           \
    }

DEFINE_KERNEL(sws_mixture_f32, float, FLT_MAX)
DEFINE_KERNEL(sws_mixture_f64, double, DBL_MAX)
