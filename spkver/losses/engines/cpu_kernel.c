/* The alpha-divergence Fenchel-Young loss of a batch of rows on the CPU, one pass of selection per row.
 *
 * Built and loaded by spkver/losses/cpu_kernel.py (which documents the maths); plain C99 and POSIX threads,
 * no Python or torch headers, so that it compiles in about a second with the system's C compiler.
 *
 * Per row, with theta_j = s x_j (j != y), the target's logit theta_y (the column or an override) and its
 * measure log q_y (0 without one):
 *   1. the largest non-target logit gives the lower bound tau_lo = max(max_{j != y} theta_j, b_y),
 *      b_y = theta_y - log_alpha(1/q_y), of the root tau of sum_j p_j = 1;
 *   2. one pass keeps the columns with theta_j > tau_lo - 1/(alpha-1): no other can be in the support;
 *   3. Newton from tau_lo on phi(tau) = M(tau)^(alpha-1) - 1, M the mass of the kept columns, in float64:
 *      for 1 < alpha <= 2 phi is convex and decreasing, so the iterates rise monotonically to the root, and
 *      every column whose p_j has reached 0 is dropped for good (it cannot come back as tau rises);
 *   4. the loss L = (alpha-1)/alpha <p, theta - tau> - (theta_y - tau) + log_alpha(1/q_y)/alpha, p_y, the
 *      support size, tau, the normaliser of p and the row's maximum (NaN if it has one) are written.
 * Bad input (NaN, +inf) gives garbage rows, never a hang or an access out of the row: the caller raises on
 * the row maxima.
 * The backward kernel writes g s p_j off the target and g a_y (p_y - 1) at it, for an upstream gradient g and
 * the target logit's slope a_y (s; 0 when the target logit takes its own gradient; s psi'(cos_y) for a margin
 * psi), from (values, tau, normaliser, p_y) in one pass per row: the forward keeps no (B, C) buffer.
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_ITERATIONS 100
/* Newton stops when tau moves by less than this, relative to 1 + |tau| (float64). */
#define STEP_TOLERANCE 1e-14

typedef struct {
    const float *values;
    int64_t classes, stride;
    const int64_t *targets;
    const float *target_logits; /* NULL: the target's column of values, times scale */
    const float *log_q_target;  /* NULL: unit measure on the target too */
    double alpha, scale;
    int degree;                 /* 1/(alpha-1) when it is an integer, else 0 */
    float *loss, *p_y, *row_max; /* forward: written; backward: p_y read */
    int32_t *support;
    double *tau, *total;        /* the root (in logit units) and the normaliser of p, per row */
    const float *upstream;      /* backward: the gradient of each row's loss */
    float *grad;                /* backward: (B, C), row stride classes */
    const float *target_slope;  /* backward: d(target logit)/d(target column) per row: s, 0, or a margin's */
    int64_t first_row, last_row;
    int status;
} Job;

/* z^k and z^(k-1) for z >= 0 (both 0 at z = 0, alpha <= 2): products for an integer k, pow otherwise. */
static inline void powers(double z, int degree, double k, double *w, double *w_lower) {
    if (degree > 0) {
        double lower = degree == 1 ? (double)(z > 0.0) : z; /* z^(k-1), 0 at z = 0 */
        for (int i = 2; i < degree; ++i) lower *= z;
        *w_lower = lower;
        *w = lower * z;
    } else {
        *w_lower = pow(z, k - 1.0);
        *w = *w_lower * z;
    }
}

static void solve_row(const Job *job, int64_t row, float *picked, double *work) {
    const float *x = job->values + row * job->stride;
    const int64_t classes = job->classes, y = job->targets[row];
    const double alpha = job->alpha, s = job->scale, reach = 1.0 / (alpha - 1.0), k = reach;

    float largest = -INFINITY; /* the largest non-target value, as vector maxima; NaN is seen apart */
    int not_a_number = 0;
#pragma omp simd reduction(max : largest) reduction(| : not_a_number)
    for (int64_t j = 0; j < y; ++j) {
        largest = x[j] > largest ? x[j] : largest;
        not_a_number |= x[j] != x[j];
    }
#pragma omp simd reduction(max : largest) reduction(| : not_a_number)
    for (int64_t j = y + 1; j < classes; ++j) {
        largest = x[j] > largest ? x[j] : largest;
        not_a_number |= x[j] != x[j];
    }
    /* the row's maximum as torch's amax gives it (NaN if any): the caller checks the input with it */
    job->row_max[row] = (not_a_number || x[y] != x[y]) ? NAN : (x[y] > largest ? x[y] : largest);
    const double theta_y = job->target_logits ? (double)job->target_logits[row] : s * (double)x[y];
    const double log_q_y = job->log_q_target ? (double)job->log_q_target[row] : 0.0;
    /* log_alpha(1/q_y) = (q_y^(1-alpha) - 1)/(alpha-1); steepness a_y = q_y^(alpha-1) */
    const double log_alpha_inverse_q = expm1(-(alpha - 1.0) * log_q_y) / (alpha - 1.0);
    const double steepness_y = exp((alpha - 1.0) * log_q_y);
    const double bound_y = theta_y - log_alpha_inverse_q;
    const double other_max = s * (double)largest;
    const double origin = other_max > bound_y ? other_max : bound_y; /* tau_lo: every logit is shifted by it */

    /* Selection: theta_j - origin > -reach. The float cut is one ulp generous; extra columns have p = 0.
     * Only the values are kept: the backward pass finds the support again from tau. */
    int64_t n = 0;
    if (largest > -INFINITY) { /* branch-free: every value is written, the count moves only on a kept one */
        const float cut = nextafterf((float)((origin - reach) / s), -INFINITY);
        for (int64_t j = 0; j < y; ++j) {
            picked[n] = x[j];
            n += x[j] > cut;
        }
        for (int64_t j = y + 1; j < classes; ++j) {
            picked[n] = x[j];
            n += x[j] > cut;
        }
    }
    double *shifted = work, *spare = work + classes;
    for (int64_t i = 0; i < n; ++i) shifted[i] = s * (double)picked[i] - origin;
    const double target_shifted = bound_y - origin; /* b_y - tau_lo <= 0 */

    /* Newton from tau_lo (shifted: 0), where the mass is at least 1. */
    double tau = 0.0, mass = 0.0, slope = 0.0, w, w_lower;
    const int degree = job->degree;
    int64_t live = n;
    for (int iteration = 0; iteration < MAX_ITERATIONS; ++iteration) {
        mass = 0.0;
        slope = 0.0;
        /* the sums as vector reductions: a column at z <= 0 adds 0 */
        if (degree == 1 || degree == 2 || degree == 4) {
#pragma omp simd reduction(+ : mass, slope)
            for (int64_t i = 0; i < live; ++i) {
                double z = 1.0 + (alpha - 1.0) * (shifted[i] - tau);
                z = z > 0.0 ? z : 0.0;
                const double lower = degree == 1 ? (z > 0.0 ? 1.0 : 0.0) : (degree == 2 ? z : z * z * z);
                mass += lower * z;
                slope += lower;
            }
        } else {
            for (int64_t i = 0; i < live; ++i) {
                const double z = 1.0 + (alpha - 1.0) * (shifted[i] - tau);
                if (z <= 0.0) continue;
                powers(z, degree, k, &w, &w_lower);
                mass += w;
                slope += w_lower;
            }
        }
        const double z_y = 1.0 + (alpha - 1.0) * steepness_y * (target_shifted - tau);
        if (z_y > 0.0) {
            powers(z_y, degree, k, &w, &w_lower);
            mass += w;
            slope += steepness_y * w_lower;
        }
        if (!(slope > 0.0)) break; /* an empty row: validated inputs never get here */
        /* step = k M (1 - M^(-1/k)) / slope, >= 0 while M >= 1 */
        const double step = -mass * expm1(-(alpha - 1.0) * log(mass)) / ((alpha - 1.0) * slope);
        if (!(step > STEP_TOLERANCE * (1.0 + fabs(tau + origin)))) break;
        tau += step;
        /* Columns whose p_j has reached 0 are dropped for good (tau only rises), into the other buffer. */
        int64_t kept = 0;
        const double floor = tau - reach;
        for (int64_t i = 0; i < live; ++i) {
            spare[kept] = shifted[i];
            kept += shifted[i] > floor;
        }
        double *swap = shifted;
        shifted = spare;
        spare = swap;
        live = kept;
    }

    /* p = w / M at the root (the renormalisation removes Newton's last residual), and the loss. */
    double total = 0.0, inner = 0.0, p_target = 0.0;
    int32_t support = 0;
    for (int64_t i = 0; i < live; ++i) {
        const double z = 1.0 + (alpha - 1.0) * (shifted[i] - tau);
        if (z > 0.0) {
            powers(z, job->degree, k, &w, &w_lower);
            total += w;
            inner += w * (shifted[i] - tau);
            ++support;
        }
    }
    const double z_y = 1.0 + (alpha - 1.0) * steepness_y * (target_shifted - tau);
    const double v_y = theta_y - origin - tau;
    if (z_y > 0.0) {
        powers(z_y, job->degree, k, &w, &w_lower);
        p_target = w;
        total += w;
        inner += w * v_y;
        ++support;
    }
    p_target /= total;
    inner /= total;
    double loss = (alpha - 1.0) / alpha * inner - v_y + log_alpha_inverse_q / alpha;
    if (support == 1 && p_target > 0.0) loss = 0.0; /* p = e_y: exactly 0, without the terms' rounding */
    job->loss[row] = (float)(loss > 0.0 ? loss : 0.0); /* >= 0 exactly; remove rounding below zero */
    job->p_y[row] = (float)p_target;
    job->support[row] = support;
    job->tau[row] = origin + tau;
    job->total[row] = total;
}

/* One row's gradient: g s p_j, p_j = [1 + (alpha-1)(s x_j - tau)]_+^k / total, off the target. */
static void gradient_row(const Job *job, int64_t row) {
    const float *x = job->values + row * job->stride;
    const int64_t classes = job->classes, y = job->targets[row];
    const double alpha = job->alpha, s = job->scale, k = 1.0 / (alpha - 1.0), tau = job->tau[row];
    const double factor = (double)job->upstream[row] * s / job->total[row];
    float *g = job->grad + row * classes;
    const int degree = job->degree;
    if (degree == 1 || degree == 2 || degree == 4) { /* the papers' alphas: a loop the compiler vectorises */
#pragma omp simd
        for (int64_t j = 0; j < classes; ++j) {
            double z = 1.0 + (alpha - 1.0) * (s * (double)x[j] - tau);
            z = z > 0.0 ? z : 0.0;
            const double w = degree == 1 ? z : (degree == 2 ? z * z : (z * z) * (z * z));
            g[j] = (float)(factor * w);
        }
    } else {
        for (int64_t j = 0; j < classes; ++j) {
            const double z = 1.0 + (alpha - 1.0) * (s * (double)x[j] - tau);
            double w = 0.0, w_lower;
            if (z > 0.0) powers(z, degree, k, &w, &w_lower);
            g[j] = (float)(factor * w);
        }
    }
    /* the target column: (p_y - 1) through the target logit's slope (its p_y is the forward's) */
    g[y] = (float)((double)job->upstream[row] * (double)job->target_slope[row] * ((double)job->p_y[row] - 1.0));
}

static void *forward_rows(void *argument) {
    Job *job = (Job *)argument;
    const size_t width = (size_t)(job->classes > 0 ? job->classes : 1);
    float *picked = malloc(width * sizeof(float));
    double *work = malloc(2 * width * sizeof(double));
    if (!picked || !work) {
        job->status = 1;
    } else {
        for (int64_t row = job->first_row; row < job->last_row; ++row) solve_row(job, row, picked, work);
    }
    free(picked);
    free(work);
    return NULL;
}

static void *backward_rows(void *argument) {
    Job *job = (Job *)argument;
    for (int64_t row = job->first_row; row < job->last_row; ++row) gradient_row(job, row);
    return NULL;
}

#define MAX_THREADS 64

/* Runs ``work`` on ``threads`` contiguous blocks of rows; a thread that cannot be started is run here. */
static int parallel_rows(const Job *prototype, int64_t batch, int threads, void *(*work)(void *)) {
    if (threads > batch) threads = batch > 0 ? (int)batch : 1;
    if (threads < 1) threads = 1;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    Job jobs[MAX_THREADS];
    pthread_t handles[MAX_THREADS];
    int created[MAX_THREADS] = {0};
    for (int t = 0; t < threads; ++t) {
        jobs[t] = *prototype;
        jobs[t].first_row = batch * t / threads;
        jobs[t].last_row = batch * (t + 1) / threads;
        jobs[t].status = 0;
    }
    for (int t = 1; t < threads; ++t) created[t] = pthread_create(&handles[t], NULL, work, &jobs[t]) == 0;
    work(&jobs[0]);
    for (int t = 1; t < threads; ++t) {
        if (created[t])
            pthread_join(handles[t], NULL);
        else
            work(&jobs[t]);
    }
    int status = 0;
    for (int t = 0; t < threads; ++t) status |= jobs[t].status;
    return status;
}

static int integer_degree(double alpha) {
    const double k = 1.0 / (alpha - 1.0);
    return (k <= 64.0 && fabs(k - nearbyint(k)) <= 1e-9 * k) ? (int)nearbyint(k) : 0;
}

/* The loss rows (and each row's maximum, NaN if it has one, for the caller's checks). Returns 0, or 1 when a thread's work memory could not be had (its rows are not written). */
int spkver_alpha_loss_rows(const float *values, int64_t batch, int64_t classes, int64_t stride,
                           const int64_t *targets, const float *target_logits, const float *log_q_target,
                           double alpha, double scale, float *loss, float *p_y, int32_t *support, double *tau,
                           double *total, float *row_max, int threads) {
    Job job = {0};
    job.values = values, job.classes = classes, job.stride = stride, job.targets = targets;
    job.target_logits = target_logits, job.log_q_target = log_q_target, job.alpha = alpha, job.scale = scale;
    job.degree = integer_degree(alpha), job.loss = loss, job.p_y = p_y, job.support = support;
    job.tau = tau, job.total = total, job.row_max = row_max;
    return parallel_rows(&job, batch, threads, forward_rows);
}

/* The gradient upstream * (scale p_j, target_slope (p_y - 1) at the target) of the rows solved by
 * spkver_alpha_loss_rows, into grad (B, C). */
int spkver_alpha_loss_gradient(const float *values, int64_t batch, int64_t classes, int64_t stride,
                               const int64_t *targets, const float *target_slope, const float *p_y, const double *tau,
                               const double *total, double alpha, double scale, const float *upstream, float *grad,
                               int threads) {
    Job job = {0};
    job.values = values, job.classes = classes, job.stride = stride, job.targets = targets;
    job.target_slope = target_slope, job.p_y = (float *)p_y, job.tau = (double *)tau;
    job.total = (double *)total, job.alpha = alpha, job.scale = scale, job.degree = integer_degree(alpha);
    job.upstream = upstream, job.grad = grad;
    return parallel_rows(&job, batch, threads, backward_rows);
}
