/* The fp32 tanh RNN recurrence, forward and backpropagation through time, without MKL.

     forward:   A[t] += H[t-1] @ M;  A[t] = tanh(A[t])        (H[-1] = H0; A becomes H in place)
     backward:  dA[t] = (dH[t] + dA[t+1] @ M^T) * (1 - H[t]^2)  (no dA[steps] term);  dH0 = dA[0] @ M^T

   and, on the same tiles and team, the two other kinds of matmul a minibatch has: C = P^T Q
   (fp32_gemm_tn: the weight gradient over all steps) and C = P M + bias (fp32_matmul: the
   output layer).

   M is the (h, h) matrix the layer multiplies by, read through element strides (M[k][j] =
   W[k*sk + j*sj]), so the scratch model's W_hh (row-major) and nn.RNN's W_hh.t() (a transposed
   view) are both read in place. Each call packs M (or M^T) once into column panels NR wide,
   zero-padded, and every step runs an MR x NR register-blocked micro-kernel over its output
   tiles, with the tanh (forward) or the tanh' product (backward) fused into the tile's store.

   The same file is compiled once per instruction set (charrnn/kernels/fp32.py): the vector width
   comes from the target (AVX-512: 16 floats, AVX2: 8, anything else: 4, GCC vector extensions),
   so one source gives every variant. The tanh is the file's own (vtanh), on whole vectors.

   Threads: a team created on first use, grown on demand and reused by later calls; the caller
   is thread 0. Each step's output panels are split across the team: every thread first takes
   its own share (the same panels every step, so they stay in its cache), then helps with what
   is left of the others', so a thread whose core another process took holds a step up by one
   panel's work at most. A step starts when the one before is done: waits spin for a short while
   (CHARRNN_SPIN_US, default 50 us) and then sleep on a futex, so they do not burn a core that
   someone else needs. One thread: no atomics, no waits. One call at a time uses the team; a
   concurrent caller runs alone (one thread) rather than wait. */
#define _GNU_SOURCE
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#if defined(__linux__)
#include <linux/futex.h>
#include <sys/syscall.h>
#endif

#if defined(__AVX512F__)
#define VL 16
#elif defined(__AVX__)
#define VL 8
#else
#define VL 4
#endif
/* The tile: MR rows x NV vectors of accumulators, chosen by measurement (bench/kernel_fp32.py,
   the seed's sizes): 4 x 4 zmm (4 W loads and 4 broadcasts per 16 FMAs) beat 8 x 2 and 6 x 4,
   4 x 3 ymm beat 6 x 2 (16 registers: 12 + 3 + 1), and without FMA (SSE) 4 x 2 did as well as
   6 x 2. Either can be given with -DMR= -DNV=. */
#if VL == 16
#define MR_DEFAULT 4
#define NV_DEFAULT 4
#elif VL == 8
#define MR_DEFAULT 4
#define NV_DEFAULT 3
#else
#define MR_DEFAULT 4
#define NV_DEFAULT 2
#endif
#ifndef NV              /* vectors per panel row: NR = NV * VL columns */
#define NV NV_DEFAULT
#endif
#ifndef MR              /* rows per micro-tile: MR * NV accumulators */
#define MR MR_DEFAULT
#endif
#define NR (NV * VL)
#if MR > 8 || MR < 1 || NV > 4 || NV < 1
#error "MR must be 1..8 and NV 1..4"
#endif

typedef float vf __attribute__((vector_size(VL * 4), aligned(VL * 4)));
typedef float vfu __attribute__((vector_size(VL * 4), aligned(4), may_alias));

static inline vf loadu(const float *p) { return *(const vfu *)p; }
static inline void storeu(float *p, vf x) { *(vfu *)p = x; }

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

enum { FWD = 0, BWD = 1, STO = 2, TN = 3, TNA = 4, MMB = 5, MM = 6 };
static void pack_matrix(float *dst, const float *W, int K, int N, long rs, long cs);

/* tanh, VL lanes at a time, within ~2 ulp (tests/test_kernels_fp32.py measures it):
     |x| < 0.625:  x + x^3 P(x^2), P a degree-5 fit of (tanh(x) - x) / x^3;
     else:         1 - 2 / (e^{2|x|} + 1), e^y = 2^n e^r with |r| <= ln2/2 and a degree-7 Taylor
                   polynomial, |x| clamped at 9.5 (tanh is 1.0f from there on), the sign put back.
   NaN stays NaN, +-inf gives +-1. Plain arithmetic, no -ffast-math: the file is built without it. */
typedef int32_t vi __attribute__((vector_size(VL * 4), aligned(VL * 4)));

static inline vf splat(float c) { return (vf){0} + c; }
static inline vf blend(vi mask, vf yes, vf no) { return (vf)(((vi)yes & mask) | ((vi)no & ~mask)); }

static inline vf vtanh(vf x) {
    const vi sign = (vi)x & (int32_t)0x80000000;
    const vf ax = (vf)((vi)x & 0x7fffffff);
    /* the large path */
    vf y = blend(ax < splat(9.5f), ax, splat(9.5f));
    y = y + y;
    const vf magic = splat(12582912.0f);                    /* 1.5 * 2^23: rounds to an integer */
    const vf t = y * splat(1.44269504088896341f) + magic;
    const vf n = t - magic;
    const vi ni = (vi)t - (vi)magic;
    vf r = y - n * splat(0.693145751953125f);               /* ln 2, Cody-Waite: hi + lo */
    r = r - n * splat(1.42860682030941723212e-6f);
    vf p = splat(1.0f / 5040);
    p = p * r + splat(1.0f / 720);
    p = p * r + splat(1.0f / 120);
    p = p * r + splat(1.0f / 24);
    p = p * r + splat(1.0f / 6);
    p = p * r + splat(0.5f);
    p = p * r + splat(1.0f);
    p = p * r + splat(1.0f);
    const vf e = (vf)((vi)p + (ni << 23));                  /* 2^n e^r, n <= 28 */
    const vf large = splat(1.0f) - splat(2.0f) / (e + splat(1.0f));
    /* the small path */
    const vf x2 = ax * ax;
    vf q = splat(0.002142963232472539f);
    q = q * x2 + splat(-0.008177399635314941f);
    q = q * x2 + splat(0.021700704470276833f);
    q = q * x2 + splat(-0.05394676327705383f);
    q = q * x2 + splat(0.1333320587873459f);
    q = q * x2 + splat(-0.3333333134651184f);
    const vf small = ax + ax * x2 * q;
    vf res = (vf)((vi)blend(ax < splat(0.625f), small, large) | sign);
    return blend(x != x, x, res);                           /* NaN in, NaN out */
}

/* tanh of n floats in place (any n) */
static void tanh_any(float *o, long n) {
    long j = 0;
    for (; j + VL <= n; j += VL) storeu(o + j, vtanh(loadu(o + j)));
    if (j < n) {
        float t[VL] __attribute__((aligned(64))) = {0};
        memcpy(t, o + j, (n - j) * sizeof *t);
        *(vf *)t = vtanh(*(vf *)t);
        memcpy(o + j, t, (n - j) * sizeof *t);
    }
}

/* One m x NR output tile: acc = a (m rows, k columns, row stride lda) @ panel (k x NR, packed),
   then, at out (row stride ld, nr valid columns):
     FWD: out = tanh(x1 + acc)                   (x1 may be out)
     BWD: out = (x1 + acc) * (1 - x2 * x2)        (x1, x2 with stride ld, like out)
     STO: out = acc
     TN:  out = acc, where a is read transposed (a[p][r] at a + p*lda + r: k rows of m columns)
          and the panel's rows are pst floats apart (NR readable in each)
     TNA: out += acc, a and the panel as for TN
     MMB: out = acc + x1, x1 the same NR-column row for every row (a bias) */
static inline __attribute__((always_inline)) void
tile(const int m, const int kind, int k, const float *restrict a, long lda,
     const float *restrict panel, long pst, float *restrict out, const float *x1, const float *x2,
     long ld, int nr)
{
    vf acc[MR][NV];
    #pragma GCC unroll 8
    for (int r = 0; r < m; r++)
        #pragma GCC unroll 4
        for (int v = 0; v < NV; v++) acc[r][v] = (vf){0};
    #pragma GCC unroll 2
    for (int p = 0; p < k; p++) {
        vf b[NV];
        #pragma GCC unroll 4
        for (int v = 0; v < NV; v++)
            b[v] = kind == TN || kind == TNA ? loadu(panel + p * pst + v * VL) : *(const vf *)(panel + (long)p * NR + v * VL);
        #pragma GCC unroll 8
        for (int r = 0; r < m; r++) {
            const float s = kind == TN || kind == TNA ? a[p * lda + r] : a[r * lda + p];
            #pragma GCC unroll 4
            for (int v = 0; v < NV; v++) acc[r][v] += b[v] * s;
        }
    }
    #pragma GCC unroll 8
    for (int r = 0; r < m; r++) {
        float *o = out + r * ld;
        if (nr == NR) {
            #pragma GCC unroll 4
            for (int v = 0; v < NV; v++) {
                vf x = acc[r][v];
                if (kind == FWD) x = vtanh(x + loadu(x1 + r * ld + v * VL));
                if (kind == BWD) {
                    vf y = loadu(x2 + r * ld + v * VL);
                    x = (x + loadu(x1 + r * ld + v * VL)) * (1.0f - y * y);
                }
                if (kind == TNA) x += loadu(o + v * VL);
                if (kind == MMB) x += loadu(x1 + v * VL);
                storeu(o + v * VL, x);
            }
        } else {
            float t[NR] __attribute__((aligned(64)));
            #pragma GCC unroll 4
            for (int v = 0; v < NV; v++) *(vf *)(t + v * VL) = acc[r][v];
            /* finished in t, then stored once: `out` only ever holds final values, which a
               second thread running the same unit (wait_phase) relies on */
            for (int j = 0; j < nr; j++) {
                if (kind == FWD) t[j] += x1[r * ld + j];
                if (kind == BWD) { float y = x2[r * ld + j]; t[j] = (x1[r * ld + j] + t[j]) * (1.0f - y * y); }
                if (kind == TNA) t[j] += o[j];
                if (kind == MMB) t[j] += x1[j];
            }
            if (kind == FWD) tanh_any(t, nr);
            for (int j = 0; j < nr; j++) o[j] = t[j];
        }
    }
}

#define KINDS(M) case M: \
    if (kind == FWD) tile(M, FWD, k, a, lda, panel, NR, out, x1, x2, ld, nr); \
    else if (kind == BWD) tile(M, BWD, k, a, lda, panel, NR, out, x1, x2, ld, nr); \
    else if (kind == TN) tile(M, TN, k, a, lda, panel, pst, out, x1, x2, ld, nr); \
    else if (kind == TNA) tile(M, TNA, k, a, lda, panel, pst, out, x1, x2, ld, nr); \
    else if (kind == MMB) tile(M, MMB, k, a, lda, panel, NR, out, x1, x2, ld, nr); \
    else tile(M, STO, k, a, lda, panel, NR, out, x1, x2, ld, nr); \
    break;

static void tile_any(int m, int kind, int k, const float *a, long lda, const float *panel, long pst,
                     float *out, const float *x1, const float *x2, long ld, int nr) {
    switch (m) {
    KINDS(1)
#if MR >= 2
    KINDS(2)
#endif
#if MR >= 3
    KINDS(3)
#endif
#if MR >= 4
    KINDS(4)
#endif
#if MR >= 5
    KINDS(5)
#endif
#if MR >= 6
    KINDS(6)
#endif
#if MR >= 7
    KINDS(7)
#endif
#if MR >= 8
    KINDS(8)
#endif
    }
}

/* ---- the team of threads ---- */

static long futex(atomic_uint *word, int op, unsigned val) {
#if defined(__linux__)
    return syscall(SYS_futex, (unsigned *)word, op | FUTEX_PRIVATE_FLAG, val, NULL, NULL, 0);
#else
    (void)word; (void)op; (void)val; sched_yield(); return 0;
#endif
}

static double now_us(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e6 + ts.tv_nsec * 1e-3;
}

static double spin_us = 50.0;

/* Waits until *word >= target (as_ge) or *word != target (!as_ge): spins for spin_us, then
   sleeps on the futex. The thread that makes the condition true calls wake() after changing
   *word; a sleeper has either counted itself in *sleepers before wake() reads it, or sees the
   new value in the kernel's check (all seq_cst). */
static inline int met(atomic_uint *word, unsigned target, int as_ge) {
    unsigned v = atomic_load_explicit(word, memory_order_acquire);
    return as_ge ? v >= target : v != target;
}

static void wait_for(atomic_uint *word, unsigned target, int as_ge, atomic_int *sleepers) {
    if (met(word, target, as_ge)) return;
    double until = -1.0;
    for (unsigned i = 1;; i++) {
        if (met(word, target, as_ge)) return;
        cpu_relax();
        if ((i & 63) == 0) {
            double t = now_us();
            if (until < 0) until = t + spin_us;
            else if (t >= until) break;
        }
    }
    for (;;) {
        atomic_fetch_add(sleepers, 1);
        unsigned v = atomic_load(word);
        if (as_ge ? v >= target : v != target) { atomic_fetch_sub(sleepers, 1); return; }
        futex(word, FUTEX_WAIT, v);
        atomic_fetch_sub(sleepers, 1);
    }
}

static inline void wake(atomic_uint *word, atomic_int *sleepers) {
    if (atomic_load(sleepers) > 0) futex(word, FUTEX_WAKE, INT_MAX);
}

/* A call's work is a list of phases: packing the panels, then the steps (and dH0, backward),
   each phase np units (one panel's columns, every row). A phase starts once the one before is
   done. Thread i first takes the units of its own share of the panels (the same ones every
   step, so its panels of W stay in its cache), then takes what is left of the others' shares:
   a thread whose core was taken by another process holds up a step by at most the unit it is
   in, not by its whole share. */
typedef struct {
    _Alignas(64) atomic_uint next;        /* units of this (phase, share) claimed so far */
} claim_t;

typedef struct {
    int kind;                   /* FWD, BWD, TN (P^T Q: fp32_gemm_tn) or MM (P M + bias: fp32_matmul) */
    int steps, B, h, T, np, phases;
    const float *X;             /* FWD: (steps, B, h), x W_in + b */
    float *Hout;                /* FWD: (steps, B, h), H out; may be X (in place) */
    const float *H0;            /* FWD: (B, h) */
    const float *W; long sk, sj;/* M[k][j] = W[k*sk + j*sj]; BWD packs M^T */
    const float *dH, *H;        /* BWD: (steps, B, h) */
    float *dA, *dH0;            /* BWD: (steps, B, h) out; (B, h) out or NULL */
    const float *P, *Q;         /* TN: (K, h) and (K, n), rows ldp and ldq floats apart; MM: P (h, K) */
    float *C;                   /* TN: (h, n) out, rows ldc apart; MM: (h, n) */
    const float *bias;          /* MM: (n) or NULL */
    long ldp, ldq, ldc;
    int K, n, npanels;          /* MM: units are (rows MM_ROWS at a time) x npanels panels of M */
    atomic_int failed;          /* TN: a unit ran out of memory */
    float *pack;                /* FWD, BWD: np panels of h x NR */
    claim_t *claims;            /* phases x T */
    atomic_uchar *flags;        /* phases x np: unit done */
    int idempotent;             /* a unit may run twice (see wait_phase) */
    _Alignas(64) atomic_uint done;        /* units done, all phases */
    atomic_int sleepers;
} job_t;

/* Packs panel p of op = M (FWD) or M^T (BWD): dst[k][j] = op[k][p*NR + j], 0 beyond h. */
static void pack_panel(const job_t *J, int p) {
    const int h = J->h, c0 = p * NR, nc = h - c0 < NR ? h - c0 : NR;
    /* op[k][j] = W[k*rs + j*cs] */
    const long rs = J->kind == FWD ? J->sk : J->sj, cs = J->kind == FWD ? J->sj : J->sk;
    float *dst = J->pack + (long)p * h * NR;
    if (cs == 1 || rs != 1) {
        for (int k = 0; k < h; k++) {
            const float *src = J->W + k * rs + c0 * cs;
            for (int j = 0; j < nc; j++) dst[(long)k * NR + j] = src[j * cs];
            for (int j = nc; j < NR; j++) dst[(long)k * NR + j] = 0.0f;
        }
    } else {                    /* rows of op are strided, its columns contiguous in W */
        for (int j = 0; j < NR; j++) {
            if (j < nc) {
                const float *src = J->W + (c0 + j) * cs;
                for (int k = 0; k < h; k++) dst[(long)k * NR + j] = src[k];
            } else {
                for (int k = 0; k < h; k++) dst[(long)k * NR + j] = 0.0f;
            }
        }
    }
}

/* Unit p of TN: columns p*NR .. of C = P^T Q, every row, KC_TN rows of Q at a time: each block
   of the panel's columns is copied (zero-padded past n) into a buffer that stays in L1 while
   every row tile multiplies it, its sums added to the blocks' before. The sums build up in a
   buffer of the unit's own and go to C at the end, so a unit that two threads run (wait_phase)
   writes the same bits into C once each. Returns -1 when out of memory. */
#define KC_TN (6144 / NR)
static int tn_unit(const job_t *J, int p) {
    const int c0 = p * NR, nr = J->n - c0 < NR ? J->n - c0 : NR, h = J->h;
    float *panel = NULL, *sum = NULL;
    if (posix_memalign((void **)&panel, 64, (size_t)KC_TN * NR * sizeof(float)) != 0) return -1;
    if (posix_memalign((void **)&sum, 64, (size_t)h * NR * sizeof(float)) != 0) { free(panel); return -1; }
    for (int k0 = 0; k0 < J->K || k0 == 0; k0 += KC_TN) {   /* K = 0: one empty block, C = 0 */
        const int kc = J->K - k0 < KC_TN ? J->K - k0 : KC_TN;
        for (int k = 0; k < kc; k++) {
            const float *src = J->Q + (long)(k0 + k) * J->ldq + c0;
            float *dst = panel + (long)k * NR;
            for (int j = 0; j < NR; j++) dst[j] = j < nr ? src[j] : 0.0f;
        }
        for (int r0 = 0; r0 < h; r0 += MR)
            tile_any(h - r0 < MR ? h - r0 : MR, k0 ? TNA : TN, kc, J->P + (long)k0 * J->ldp + r0, J->ldp,
                     panel, NR, sum + (long)r0 * NR, NULL, NULL, NR, NR);
    }
    for (int r = 0; r < h; r++) memcpy(J->C + (long)r * J->ldc + c0, sum + (long)r * NR, nr * sizeof(float));
    free(sum);
    free(panel);
    return 0;
}

/* Unit u of MM: rows MM_ROWS * (u / npanels) .. of C = P M + bias, in the columns of panel
   u % npanels (M packed by run, before the team starts). */
#define MM_ROWS 128
static void mm_unit(const job_t *J, int u) {
    const int p = u % J->npanels, r1 = (u / J->npanels + 1) * MM_ROWS;
    const int c0 = p * NR, nr = J->n - c0 < NR ? J->n - c0 : NR, rows = r1 < J->h ? r1 : J->h;
    const float *panel = J->pack + (long)p * J->K * NR;
    for (int r0 = r1 - MM_ROWS; r0 < rows; r0 += MR) {
        float *out = J->C + (long)r0 * J->ldc + c0;
        const int m = rows - r0 < MR ? rows - r0 : MR;
        tile_any(m, J->bias ? MMB : STO, J->K, J->P + (long)r0 * J->ldp, J->ldp, panel, NR, out,
                 J->bias ? J->bias + c0 : NULL, NULL, J->ldc, nr);
    }
}

/* Unit p (a panel) of phase ph: 0 packs; FWD 1 + t is step t; BWD 1 + i is step steps-1-i,
   and phase steps + 1 is dH0 = dA[0] M^T. TN and MM: one phase, their matmul. */
static void run_unit(const job_t *J, int ph, int p) {
    if (J->kind == TN) { if (tn_unit(J, p) != 0) atomic_store(&((job_t *)J)->failed, 1); return; }
    if (J->kind == MM) { mm_unit(J, p); return; }
    if (ph == 0) { pack_panel(J, p); return; }
    const int h = J->h, B = J->B, c0 = p * NR, nr = h - c0 < NR ? h - c0 : NR;
    const long n = (long)B * h;
    const float *panel = J->pack + (long)p * h * NR;
    if (J->kind == FWD) {
        const int t = ph - 1;
        const float *prev = t ? J->Hout + (t - 1) * n : J->H0;
        for (int r0 = 0; r0 < B; r0 += MR) {
            const long o = t * n + (long)r0 * h + c0;
            tile_any(B - r0 < MR ? B - r0 : MR, FWD, h, prev + (long)r0 * h, h, panel, NR,
                     J->Hout + o, J->X + o, NULL, h, nr);
        }
    } else if (ph <= J->steps) {
        const int t = J->steps - ph;
        const int k = t == J->steps - 1 ? 0 : h;   /* no dA[steps] */
        const float *next = J->dA + (t + (k ? 1 : 0)) * n;
        float *out = J->dA + t * n;
        for (int r0 = 0; r0 < B; r0 += MR) {
            const long o = (long)r0 * h + c0;
            tile_any(B - r0 < MR ? B - r0 : MR, BWD, k, next + (long)r0 * h, h, panel, NR,
                     out + o, J->dH + t * n + o, J->H + t * n + o, h, nr);
        }
    } else {
        for (int r0 = 0; r0 < B; r0 += MR)
            tile_any(B - r0 < MR ? B - r0 : MR, STO, h, J->dA + (long)r0 * h, h, panel, NR,
                     J->dH0 + (long)r0 * h + c0, NULL, NULL, h, nr);
    }
}

static inline int share_start(const job_t *J, int i) { return (int)((long)J->np * i / J->T); }

/* Claims a unit of share i of phase ph: the panel's number, or -1 when the share is used up. */
static inline int claim(job_t *J, int ph, int i) {
    const int start = share_start(J, i), size = share_start(J, i + 1) - start;
    claim_t *c = &J->claims[(long)ph * J->T + i];
    if ((int)atomic_load_explicit(&c->next, memory_order_relaxed) >= size) return -1;
    const int u = (int)atomic_fetch_add(&c->next, 1);
    return u < size ? start + u : -1;
}

static atomic_long helped;       /* units a thread ran that another had claimed (fp32_helped) */

/* Marks unit p of phase ph done; only the first of two threads that ran it counts it. */
static inline void mark(job_t *J, int ph, int p) {
    if (atomic_exchange_explicit(&J->flags[(long)ph * J->np + p], 1, memory_order_acq_rel) == 0
            && (atomic_fetch_add(&J->done, 1) + 1) % (unsigned)J->np == 0)
        wake(&J->done, &J->sleepers);
}

/* Waits for phase ph (and so all before it) to be done. A unit still not done after a while
   (twice this thread's recent unit time, + 5 us) is run here too, when the job allows it
   (J->idempotent: every unit writes values that depend only on earlier phases, so two threads
   running it write the same bits): the thread that claimed it may have lost its core. */
static void wait_phase(job_t *J, int ph, double unit_us) {
    const unsigned target = (unsigned)J->np * (ph + 1);
    if (atomic_load_explicit(&J->done, memory_order_acquire) >= target) return;
    if (J->idempotent) {
        const double until = now_us() + 2 * unit_us + 5;
        for (unsigned i = 1; atomic_load_explicit(&J->done, memory_order_acquire) < target; i++) {
            cpu_relax();
            if ((i & 31) == 0 && now_us() >= until) {
                for (int p = 0; p < J->np; p++)
                    if (!atomic_load_explicit(&J->flags[(long)ph * J->np + p], memory_order_acquire)) {
                        run_unit(J, ph, p);
                        mark(J, ph, p);
                        atomic_fetch_add_explicit(&helped, 1, memory_order_relaxed);
                    }
                break;
            }
        }
    }
    wait_for(&J->done, target, 1, &J->sleepers);
}

static void work(job_t *J, int tid) {
    double unit_us = 0;
    for (int ph = 0; ph < J->phases; ph++) {
        if (ph > 0) wait_phase(J, ph - 1, unit_us);
        for (int k = 0; k < J->T; k++) {
            const int i = (tid + k) % J->T;     /* its own share first, then the others' */
            for (int p; (p = claim(J, ph, i)) >= 0;) {
                const double t0 = now_us();
                run_unit(J, ph, p);
                mark(J, ph, p);
                const double dt = now_us() - t0;
                unit_us = unit_us > 0 ? 0.75 * unit_us + 0.25 * dt : dt;
            }
        }
    }
    wait_phase(J, J->phases - 1, unit_us);
}

static void work_alone(const job_t *J) {
    for (int ph = 0; ph < J->phases; ph++)
        for (int p = 0; p < J->np; p++) run_unit(J, ph, p);
}

#define MAX_THREADS 256
enum { IDLE = 0, ASSIGNED = 1, RUNNING = 2 };

typedef struct {
    _Alignas(64) atomic_uint go;          /* bumped to wake the worker */
    atomic_int go_sleepers;
    atomic_uint state;                    /* IDLE, ASSIGNED (job set, not taken) or RUNNING */
    atomic_int state_sleepers;
    job_t *job;
    unsigned start;                       /* go's value when the worker was created */
} mailbox_t;

static struct {
    pthread_mutex_t lock;       /* held by the call using the team */
    int workers;                /* threads started, besides callers */
    mailbox_t box[MAX_THREADS];
} team = { .lock = PTHREAD_MUTEX_INITIALIZER };

static void *worker(void *arg) {
    const int tid = (int)(intptr_t)arg;
    mailbox_t *box = &team.box[tid];
    unsigned seen = box->start;           /* a bump made before this thread ran counts */
    for (;;) {
        wait_for(&box->go, seen, 0, &box->go_sleepers);
        seen = atomic_load(&box->go);
        unsigned expect = ASSIGNED;       /* else the caller took the job back: nothing to do */
        if (!atomic_compare_exchange_strong(&box->state, &expect, RUNNING)) continue;
        work(box->job, tid);
        atomic_store(&box->state, IDLE);
        wake(&box->state, &box->state_sleepers);
    }
    return NULL;
}

static void after_fork_child(void) {          /* the team's threads do not exist in a child */
    pthread_mutex_init(&team.lock, NULL);
    team.workers = 0;
    for (int i = 0; i < MAX_THREADS; i++) atomic_store(&team.box[i].state, IDLE);
}

static void init_once(void) {
    const char *s = getenv("CHARRNN_SPIN_US");
    if (s && atof(s) >= 0) spin_us = atof(s);
    pthread_atfork(NULL, NULL, after_fork_child);
}
static pthread_once_t once = PTHREAD_ONCE_INIT;

/* Starts workers 1 .. T-1 if need be; returns how many threads the team can give (>= 1). */
static int team_grow(int T) {
    if (T > MAX_THREADS) T = MAX_THREADS;
    while (team.workers < T - 1) {
        mailbox_t *box = &team.box[team.workers + 1];
        pthread_t th;
        pthread_attr_t at;
        pthread_attr_init(&at);
        pthread_attr_setdetachstate(&at, PTHREAD_CREATE_DETACHED);
        box->start = atomic_load(&box->go);
        int ok = pthread_create(&th, &at, worker, (void *)(intptr_t)(team.workers + 1)) == 0;
        pthread_attr_destroy(&at);
        if (!ok) break;
        team.workers++;
    }
    return team.workers + 1 < T ? team.workers + 1 : T;
}

/* Runs J on up to T threads; returns 0, or -1 when out of memory. */
static int run(job_t *J, int T) {
    pthread_once(&once, init_once);
    void *pack = NULL;
    if (J->kind == MM) {                    /* M is packed here, once, then the units multiply */
        J->npanels = (J->n + NR - 1) / NR;
        J->np = J->npanels * ((J->h + MM_ROWS - 1) / MM_ROWS);
        if (posix_memalign(&pack, 64, (size_t)J->npanels * (J->K > 0 ? J->K : 1) * NR * sizeof(float)) != 0)
            return -1;
        pack_matrix(pack, J->W, J->K, J->n, J->sk, J->sj);
    } else {
        J->np = ((J->kind == TN ? J->n : J->h) + NR - 1) / NR;
        if (J->kind != TN && posix_memalign(&pack, 64, (size_t)J->np * J->h * NR * sizeof(float)) != 0)
            return -1;
    }
    J->phases = J->kind == TN || J->kind == MM ? 1 : 1 + J->steps + (J->kind == BWD && J->dH0 ? 1 : 0);
    if (T > J->np) T = J->np;
    if (T < 1) T = 1;
    J->pack = pack;
    if (T > 1 && pthread_mutex_trylock(&team.lock) == 0) {
        T = team_grow(T);
        void *claims = NULL;
        const size_t nc = (size_t)J->phases * T * sizeof(claim_t), nf = (size_t)J->phases * J->np;
        if (T > 1 && posix_memalign(&claims, 64, nc + nf) == 0) {
            memset(claims, 0, nc + nf);
            J->claims = claims;
            J->flags = (atomic_uchar *)((char *)claims + nc);
            J->T = T;
            atomic_store(&J->done, 0);
            atomic_store(&J->sleepers, 0);
            for (int i = 1; i < T; i++) {
                mailbox_t *box = &team.box[i];
                box->job = J;
                atomic_store(&box->state, ASSIGNED);
                atomic_fetch_add(&box->go, 1);
                wake(&box->go, &box->go_sleepers);
            }
            work(J, 0);                     /* returns once every unit is done */
            /* a worker that never started is told not to (ASSIGNED -> IDLE); one that did is
               waited for, as it may still write (the same values) into a unit it ran */
            for (int i = 1; i < T; i++) {
                mailbox_t *box = &team.box[i];
                unsigned expect = ASSIGNED;
                if (!atomic_compare_exchange_strong(&box->state, &expect, IDLE))
                    wait_for(&box->state, RUNNING, 0, &box->state_sleepers);
            }
            free(claims);
        } else {
            J->T = 1;
            work_alone(J);
        }
        pthread_mutex_unlock(&team.lock);
    } else {                                /* one thread, or the team is busy with another call */
        J->T = 1;
        work_alone(J);
    }
    free(pack);
    return 0;
}

/* ---- the entry points ---- */

int fp32_vector_width(void) { return VL; }
void fp32_tanh(float *x, long n) { tanh_any(x, n); }
int fp32_panel_width(void) { return NR; }
long fp32_helped(void) { return atomic_load(&helped); }

/* The multiply-add rate of one thread in this build's vectors, GFLOP/s: reps rounds of
   independent chains acc = acc * m + c (FMAs where the target has them), enough chains to
   cover the latency. For the benchmark's fraction of peak. */
static volatile float fma_sink;
double fp32_fma_peak(long reps) {
    enum { C = VL == 16 ? 24 : 12 };
    vf acc[C];
    const vf m = splat(0.9999f), c = splat(0.0001f);
    #pragma GCC unroll 24
    for (int j = 0; j < C; j++) acc[j] = splat(j * 0.001f);
    const double t0 = now_us();
    for (long i = 0; i < reps; i++) {
        #pragma GCC unroll 24
        for (int j = 0; j < C; j++) acc[j] = acc[j] * m + c;
    }
    const double t1 = now_us();
    float s = 0;
    for (int j = 0; j < C; j++) s += acc[j][0];
    fma_sink = s;
    return (double)reps * C * VL * 2 / ((t1 - t0) * 1e3);
}
int fp32_tile_rows(void) { return MR; }

/* H (steps, B, h) out: H_t = tanh(X_t + H_{t-1} M), H_{-1} = H0 (B, h); X (steps, B, h) holds
   x_t W_in + b and may be H itself (in place: then a thread that lost its core is waited for,
   not helped). M[k][j] = W[k*sk + j*sj]. */
int fp32_forward(int steps, int B, int h, const float *X, float *H, const float *H0, const float *W,
                 long sk, long sj, int threads) {
    if (steps <= 0 || B <= 0 || h <= 0) return 0;
    job_t J = { .kind = FWD, .steps = steps, .B = B, .h = h, .X = X, .Hout = H, .H0 = H0, .W = W,
                .sk = sk, .sj = sj, .idempotent = X != H };
    return run(&J, threads);
}

/* dA (steps, B, h) out: dA[t] = (dH[t] + dA[t+1] M^T) * (1 - H[t]^2); dH0 (B, h) = dA[0] M^T unless NULL. */
int fp32_backward(int steps, int B, int h, const float *dH, const float *H, float *dA, float *dH0,
                  const float *W, long sk, long sj, int threads) {
    if (steps <= 0 || B <= 0 || h <= 0) return 0;
    job_t J = { .kind = BWD, .steps = steps, .B = B, .h = h, .W = W, .sk = sk, .sj = sj,
                .dH = dH, .H = H, .dA = dA, .dH0 = dH0, .idempotent = 1 };
    return run(&J, threads);
}

/* C (h, n) = P^T Q for P (K, h) and Q (K, n), rows ldp, ldq and ldc floats apart: the weight
   gradient sum_t H_{t-1}^T dA_t of a whole sequence as one matmul on the team, each panel of C's
   columns a unit (so a thread that lost its core is helped, as in the steps). Returns 0, or -1
   when out of memory. */
int fp32_gemm_tn(int K, int h, int n, const float *P, long ldp, const float *Q, long ldq,
                 float *C, long ldc, int threads) {
    if (h <= 0 || n <= 0) return 0;
    job_t J = { .kind = TN, .K = K > 0 ? K : 0, .h = h, .n = n, .P = P, .Q = Q, .C = C,
                .ldp = ldp, .ldq = ldq, .ldc = ldc, .idempotent = 1 };
    if (run(&J, threads) != 0) return -1;
    return atomic_load(&J.failed) ? -1 : 0;
}

/* C (h, n) = P M + bias for P (h, K), rows ldp floats apart, and M (K, n) read through element
   strides (M[k][j] = W[k*sk + j*sj]), packed once; bias (n) or NULL; C's rows ldc apart. The
   output layer's matmuls on the team: rows MM_ROWS at a time times panels of columns are the
   units. Returns 0, or -1 when out of memory. */
int fp32_matmul(int h, int K, int n, const float *P, long ldp, const float *W, long sk, long sj,
                const float *bias, float *C, long ldc, int threads) {
    if (h <= 0 || n <= 0) return 0;
    job_t J = { .kind = MM, .h = h, .K = K > 0 ? K : 0, .n = n, .P = P, .ldp = ldp, .W = W, .sk = sk,
                .sj = sj, .bias = bias, .C = C, .ldc = ldc, .idempotent = 1 };
    return run(&J, threads);
}

/* ---- generation: batch 1, a step at a time, the whole loop in one call ----

   gen_new packs M (the recurrence's (h, h) matrix, as above) and the output layer's (h, V)
   matrix O once, into the same panels the forward uses, so a step here computes what the
   forward's step computes for a batch of one, in the same order, and gives the same bits:

       h = tanh(E[y] + h @ M)        E = W_in + b, rows by token id (V, h), the caller's
       logits = h @ O + bo

   gen_run then picks, steps and picks again, `length` tokens, on the calling thread (a batch
   of one is a matrix-vector product: a team would spend more on waking than it saves), its
   products GEN_PI panels at a time (matvec_n).
   Greedy: the argmax, but only where it is certain that any fp32 evaluation of h @ O + bo
   (in any summation order, e.g. MKL's) has the same argmax; otherwise gen_run stops there and
   says so, and the caller decides that token with its own head. Sampling: softmax(logits / T)
   in double, restricted to the top_k largest, drawn by inverse CDF with the uniform u[i]. */
typedef struct {
    int h, V, npw, npo;
    float *packW, *packO;       /* npw (npo) panels of h x NR */
    const float *E, *bo;        /* the caller's: (V, h) and (V,) */
    double *tol;                /* (V): 2 gamma (sum_k |O[k][j]| + |bo[j]|) */
    double *z, *zs;             /* (V) scratch for sampling */
    float *hb, *logits, *acc;   /* (h), (npo * NR), (npw * NR) */
} gen_t;

/* dst: panels of NR columns, dst[p][k][j] = M[k][p*NR + j] (0 beyond N), M[k][j] = W[k*rs + j*cs] */
static void pack_matrix(float *dst, const float *W, int K, int N, long rs, long cs) {
    const int np = (N + NR - 1) / NR;
    for (int p = 0; p < np; p++) {
        const int c0 = p * NR, nc = N - c0 < NR ? N - c0 : NR;
        float *d = dst + (long)p * K * NR;
        if (cs == 1 || rs != 1) {
            for (int k = 0; k < K; k++)
                for (int j = 0; j < NR; j++)
                    d[(long)k * NR + j] = j < nc ? W[k * rs + (c0 + j) * cs] : 0.0f;
        } else {                /* columns of M contiguous in W */
            for (int j = 0; j < NR; j++)
                for (int k = 0; k < K; k++)
                    d[(long)k * NR + j] = j < nc ? W[k + (c0 + j) * cs] : 0.0f;
        }
    }
}

void fp32_gen_free(gen_t *g) {
    if (!g) return;
    free(g->packW); free(g->packO); free(g->acc); free(g->tol); free(g->z); free(g->zs); free(g->hb); free(g->logits);
    free(g);
}

gen_t *fp32_gen_new(int h, int V, const float *E, const float *W, long sk, long sj,
                    const float *O, long ok, long oj, const float *bo) {
    if (h <= 0 || V <= 0) return NULL;
    gen_t *g = calloc(1, sizeof *g);
    if (!g) return NULL;
    g->h = h; g->V = V; g->E = E; g->bo = bo;
    g->npw = (h + NR - 1) / NR; g->npo = (V + NR - 1) / NR;
    void *a = NULL, *b = NULL, *c = NULL, *d = NULL;
    if (posix_memalign(&a, 64, (size_t)g->npw * h * NR * sizeof(float))) a = NULL;
    if (posix_memalign(&b, 64, (size_t)g->npo * h * NR * sizeof(float))) b = NULL;
    if (posix_memalign(&c, 64, (size_t)g->npo * NR * sizeof(float))) c = NULL;
    if (posix_memalign(&d, 64, (size_t)g->npw * NR * sizeof(float))) d = NULL;
    g->packW = a; g->packO = b; g->logits = c; g->acc = d;
    g->hb = malloc((size_t)h * sizeof(float));
    g->tol = malloc((size_t)V * sizeof(double));
    g->z = malloc((size_t)V * sizeof(double));
    g->zs = malloc((size_t)V * sizeof(double));
    if (!a || !b || !c || !d || !g->hb || !g->tol || !g->z || !g->zs) { fp32_gen_free(g); return NULL; }
    pack_matrix(g->packW, W, h, h, sk, sj);
    pack_matrix(g->packO, O, h, V, ok, oj);
    /* |computed - exact| <= gamma_{h+1} (sum_k |h_k O_kj| + |bo_j|) for any order, |h_k| <= 1 */
    const double u = 1.0 / 16777216.0, gamma = (h + 1) * u / (1 - (h + 1) * u);
    for (int j = 0; j < V; j++) {
        double s = fabs((double)bo[j]);
        for (int k = 0; k < h; k++) s += fabs((double)O[k * ok + j * oj]);
        g->tol[j] = 2.02 * gamma * s;       /* this evaluation's error and another's, a little slack */
    }
    return g;
}

/* PI panels at once: t[i*NR + j] = sum_k a[k] panel_i[k][j], for i < n. A batch of one gives
   tile() NV accumulator chains per panel, each FMA waiting for the one before; interleaving PI
   panels gives PI * NV chains. Each column is still summed in tile()'s order (k = 0, 1, ...),
   with the same operations, so the same bits. */
#ifndef GEN_PI
#define GEN_PI (VL == 8 ? 2 : 4)
#endif
static inline __attribute__((always_inline)) void
matvec_n(const int n, int k, const float *restrict a, const float *restrict panel, long pstride,
         float *restrict t)
{
    vf acc[GEN_PI][NV];
    #pragma GCC unroll 4
    for (int i = 0; i < n; i++)
        #pragma GCC unroll 4
        for (int v = 0; v < NV; v++) acc[i][v] = (vf){0};
    for (int p = 0; p < k; p++) {
        const float s = a[p];
        #pragma GCC unroll 4
        for (int i = 0; i < n; i++)
            #pragma GCC unroll 4
            for (int v = 0; v < NV; v++)
                acc[i][v] += *(const vf *)(panel + i * pstride + (long)p * NR + v * VL) * s;
    }
    #pragma GCC unroll 4
    for (int i = 0; i < n; i++)
        #pragma GCC unroll 4
        for (int v = 0; v < NV; v++) *(vf *)(t + i * NR + v * VL) = acc[i][v];
}

/* t (npanels * NR, 64-aligned) = a (k) @ the packed panels */
static void matvec(int k, const float *a, const float *pack, int npanels, float *t) {
    const long ps = (long)k * NR;
    int p = 0;
    for (; p + GEN_PI <= npanels; p += GEN_PI) matvec_n(GEN_PI, k, a, pack + p * ps, ps, t + p * NR);
    for (; p < npanels; p++) matvec_n(1, k, a, pack + p * ps, ps, t + p * NR);
}

static void gen_head(gen_t *g, const float *hv) {
    matvec(g->h, hv, g->packO, g->npo, g->logits);
    for (int j = 0; j < g->V; j++) g->logits[j] += g->bo[j];
}

/* out (h) = tanh(x1 + t), as tile() stores a FWD tile */
static void gen_tanh(int h, const float *t, const float *x1, float *out) {
    int c0 = 0;
    for (; c0 + NR <= h; c0 += NR)
        #pragma GCC unroll 4
        for (int v = 0; v < NV; v++)
            storeu(out + c0 + v * VL, vtanh(*(const vf *)(t + c0 + v * VL) + loadu(x1 + c0 + v * VL)));
    if (c0 < h) {
        for (int j = c0; j < h; j++) out[j] = x1[j] + t[j];
        tanh_any(out + c0, h - c0);
    }
}

/* The argmax of lg, or -1 where another fp32 evaluation might pick another (or lg has a NaN). */
static int sure_argmax(const gen_t *g, const float *lg) {
    int top = 0;
    for (int j = 0; j < g->V; j++) {
        if (lg[j] != lg[j]) return -1;
        if (lg[j] > lg[top]) top = j;
    }
    for (int j = 0; j < g->V; j++)
        if (j != top && !((double)lg[top] - (double)lg[j] > g->tol[top] + g->tol[j])) return -1;
    return top;
}

static int desc(const void *a, const void *b) {
    const double x = *(const double *)a, y = *(const double *)b;
    return (x < y) - (x > y);
}

/* A draw from softmax(lg / temperature) over the top_k largest (top_k <= 0: all), by inverse CDF
   with u in [0, 1); -1 for NaN logits. */
static int sample(gen_t *g, const float *lg, double temperature, int top_k, double u) {
    const int V = g->V;
    double *z = g->z, zmax = -INFINITY;
    for (int j = 0; j < V; j++) {
        z[j] = (double)lg[j] / temperature;
        if (z[j] != z[j]) return -1;
    }
    if (top_k > 0 && top_k < V) {
        memcpy(g->zs, z, (size_t)V * sizeof *z);
        qsort(g->zs, V, sizeof *z, desc);
        const double kth = g->zs[top_k - 1];
        for (int j = 0; j < V; j++) if (z[j] < kth) z[j] = -INFINITY;
    }
    for (int j = 0; j < V; j++) if (z[j] > zmax) zmax = z[j];
    double s = 0;
    for (int j = 0; j < V; j++) { z[j] = exp(z[j] - zmax); s += z[j]; }
    const double target = u * s;
    double c = 0;
    int last = -1;
    for (int j = 0; j < V; j++) {
        if (z[j] > 0) {
            last = j;
            c += z[j];
            if (c > target) return j;
        }
    }
    return last;
}

/* Tokens out[0 .. length-1]: out[0] = first if first >= 0, else picked from logits0; each next
   one picked from the logits after stepping with the one before. hs (h): the state in, and out
   the state the last logits came from. temperature <= 0: greedy; else sampling with u[i].
   Returns length, or the index i where it stopped: greedy and out[i] not certain, or NaN logits. */
int fp32_gen_run(gen_t *g, float *hs, const float *logits0, int first, int length, int *out,
                 double temperature, int top_k, const double *u) {
    const int h = g->h;
    float *cur = hs, *nxt = g->hb;
    const float *lg = logits0;
    int i = 0;
    for (; i < length; i++) {
        int y;
        if (i == 0 && first >= 0) y = first;
        else y = temperature > 0 ? sample(g, lg, temperature, top_k, u[i]) : sure_argmax(g, lg);
        if (y < 0 || y >= g->V) break;
        out[i] = y;
        if (i == length - 1) { i++; break; }
        matvec(h, cur, g->packW, g->npw, g->acc);
        gen_tanh(h, g->acc, g->E + (long)y * h, nxt);
        float *t = cur; cur = nxt; nxt = t;
        gen_head(g, cur);
        lg = g->logits;
    }
    if (cur != hs) memcpy(hs, cur, (size_t)h * sizeof(float));
    return i;
}
