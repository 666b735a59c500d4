/* The fp32 tanh RNN recurrence, forward and backpropagation through time, without MKL.

     forward:   A[t] += H[t-1] @ M;  A[t] = tanh(A[t])        (H[-1] = H0; A becomes H in place)
     backward:  dA[t] = (dH[t] + dA[t+1] @ M^T) * (1 - H[t]^2)  (no dA[steps] term);  dH0 = dA[0] @ M^T

   M is the (h, h) matrix the layer multiplies by, read through element strides (M[k][j] =
   W[k*sk + j*sj]), so the scratch model's W_hh (row-major) and nn.RNN's W_hh.t() (a transposed
   view) are both read in place. Each call packs M (or M^T) once into column panels NR wide,
   zero-padded, and every step runs an MR x NR register-blocked micro-kernel over its output
   tiles, with the tanh (forward) or the tanh' product (backward) fused into the tile's store.

   The same file is compiled once per instruction set (charrnn/kernels/fp32.py): the vector width
   comes from the target (AVX-512: 16 floats, AVX2: 8, anything else: 4, GCC vector extensions),
   so one source gives every variant. The tanh is the file's own (vtanh), on whole vectors.

   Threads: each step's output panels are split across a persistent team (created on first use,
   grown on demand, reused by later calls); the caller is thread 0. Steps are separated by a
   barrier that spins for a short while (CHARRNN_SPIN_US, default 50 us) and then sleeps on a
   futex, so a team whose core was taken by another process waits in the kernel instead of
   burning the other core. With one thread there is no barrier at all. One call at a time uses
   the team; a concurrent caller runs alone (one thread) rather than wait. */
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
#ifndef NV              /* vectors per panel row: NR = NV * VL columns */
#define NV 2
#endif
#ifndef MR              /* rows per micro-tile: MR * NV accumulators */
#if VL == 16
#define MR 8
#else
#define MR 6
#endif
#endif
#define NR (NV * VL)
#if MR > 8 || MR < 1
#error "MR must be 1..8"
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

enum { FWD = 0, BWD = 1, STO = 2 };

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
     FWD: out = tanh(out + acc)
     BWD: out = (x1 + acc) * (1 - x2 * x2)        (x1, x2 with stride ld, like out)
     STO: out = acc */
static inline __attribute__((always_inline)) void
tile(const int m, const int kind, int k, const float *restrict a, long lda,
     const float *restrict panel, float *restrict out, const float *x1, const float *x2, long ld, int nr)
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
        for (int v = 0; v < NV; v++) b[v] = *(const vf *)(panel + (long)p * NR + v * VL);
        #pragma GCC unroll 8
        for (int r = 0; r < m; r++) {
            const float s = a[r * lda + p];
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
                if (kind == FWD) x = vtanh(x + loadu(o + v * VL));
                if (kind == BWD) {
                    vf y = loadu(x2 + r * ld + v * VL);
                    x = (x + loadu(x1 + r * ld + v * VL)) * (1.0f - y * y);
                }
                storeu(o + v * VL, x);
            }
        } else {
            float t[NR] __attribute__((aligned(64)));
            #pragma GCC unroll 4
            for (int v = 0; v < NV; v++) *(vf *)(t + v * VL) = acc[r][v];
            for (int j = 0; j < nr; j++) {
                if (kind == FWD) o[j] += t[j];
                if (kind == BWD) { float y = x2[r * ld + j]; o[j] = (x1[r * ld + j] + t[j]) * (1.0f - y * y); }
                if (kind == STO) o[j] = t[j];
            }
            if (kind == FWD) tanh_any(o, nr);
        }
    }
}

#define KINDS(M) case M: \
    if (kind == FWD) tile(M, FWD, k, a, lda, panel, out, x1, x2, ld, nr); \
    else if (kind == BWD) tile(M, BWD, k, a, lda, panel, out, x1, x2, ld, nr); \
    else tile(M, STO, k, a, lda, panel, out, x1, x2, ld, nr); \
    break;

static void tile_any(int m, int kind, int k, const float *a, long lda, const float *panel,
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

static double spin_us = -1.0;

/* Waits until *word != old: spins for spin_us, then sleeps on the futex. */
static void wait_change(atomic_uint *word, unsigned old, atomic_int *sleepers) {
    if (atomic_load_explicit(word, memory_order_acquire) != old) return;
    double until = -1.0;
    for (unsigned i = 1;; i++) {
        if (atomic_load_explicit(word, memory_order_acquire) != old) return;
        cpu_relax();
        if ((i & 63) == 0) {
            double t = now_us();
            if (until < 0) until = t + spin_us;
            else if (t >= until) break;
        }
    }
    while (atomic_load(word) == old) {
        atomic_fetch_add(sleepers, 1);            /* seq_cst: see wake() */
        futex(word, FUTEX_WAIT, old);
        atomic_fetch_sub(sleepers, 1);
    }
}

/* Changes *word and wakes its sleepers: a sleeper either sees the new value in the kernel's
   check or has counted itself before this load (both seq_cst). */
static void bump(atomic_uint *word, atomic_int *sleepers) {
    atomic_fetch_add(word, 1);
    if (atomic_load(sleepers) > 0) futex(word, FUTEX_WAKE, INT_MAX);
}

typedef struct {
    _Alignas(64) atomic_int count;
    _Alignas(64) atomic_uint gen;
    atomic_int sleepers;
    int n;
} barrier_t;

static void barrier_wait(barrier_t *b) {
    if (b->n <= 1) return;
    unsigned g = atomic_load_explicit(&b->gen, memory_order_acquire);
    if (atomic_fetch_add(&b->count, 1) == b->n - 1) {
        atomic_store(&b->count, 0);
        bump(&b->gen, &b->sleepers);
        return;
    }
    wait_change(&b->gen, g, &b->sleepers);
}

typedef struct {
    int kind;                   /* FWD or BWD */
    int steps, B, h, T;         /* T threads */
    float *A;                   /* FWD: (steps, B, h), x W_in + b in, H out */
    const float *H0;            /* FWD: (B, h) */
    const float *W; long sk, sj;/* M[k][j] = W[k*sk + j*sj]; BWD packs M^T */
    const float *dH, *H;        /* BWD: (steps, B, h) */
    float *dA, *dH0;            /* BWD: (steps, B, h) out; (B, h) out or NULL */
    float *pack;                /* ceil(h / NR) panels of h x NR */
    barrier_t *bar;
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

/* One thread's share of a call: panels [p0, p1) of every step. */
static void run_part(const job_t *J, int tid) {
    const int h = J->h, B = J->B, T = J->T, np = (h + NR - 1) / NR;
    const int p0 = (int)((long)np * tid / T), p1 = (int)((long)np * (tid + 1) / T);
    const long n = (long)B * h;
    for (int p = p0; p < p1; p++) pack_panel(J, p);
    if (J->kind == FWD) {
        for (int t = 0; t < J->steps; t++) {
            const float *prev = t ? J->A + (t - 1) * n : J->H0;
            float *out = J->A + t * n;
            for (int p = p0; p < p1; p++) {
                const int c0 = p * NR, nr = h - c0 < NR ? h - c0 : NR;
                const float *panel = J->pack + (long)p * h * NR;
                for (int r0 = 0; r0 < B; r0 += MR)
                    tile_any(B - r0 < MR ? B - r0 : MR, FWD, h, prev + (long)r0 * h, h, panel,
                             out + (long)r0 * h + c0, NULL, NULL, h, nr);
            }
            if (t + 1 < J->steps) barrier_wait(J->bar);
        }
    } else {
        for (int t = J->steps - 1; t >= 0; t--) {
            const float *next = J->dA + (t + 1) * n;   /* dA[t+1]: not read at the last step */
            const int k = t == J->steps - 1 ? 0 : h;
            float *out = J->dA + t * n;
            for (int p = p0; p < p1; p++) {
                const int c0 = p * NR, nr = h - c0 < NR ? h - c0 : NR;
                const float *panel = J->pack + (long)p * h * NR;
                for (int r0 = 0; r0 < B; r0 += MR) {
                    const long o = (long)r0 * h + c0;
                    tile_any(B - r0 < MR ? B - r0 : MR, BWD, k, next + (long)r0 * h, h, panel,
                             out + o, J->dH + t * n + o, J->H + t * n + o, h, nr);
                }
            }
            if (t > 0 || J->dH0) barrier_wait(J->bar);
        }
        if (J->dH0)
            for (int p = p0; p < p1; p++) {
                const int c0 = p * NR, nr = h - c0 < NR ? h - c0 : NR;
                const float *panel = J->pack + (long)p * h * NR;
                for (int r0 = 0; r0 < B; r0 += MR)
                    tile_any(B - r0 < MR ? B - r0 : MR, STO, h, J->dA + (long)r0 * h, h, panel,
                             J->dH0 + (long)r0 * h + c0, NULL, NULL, h, nr);
            }
    }
}

#define MAX_THREADS 256

typedef struct {
    _Alignas(64) atomic_uint go;
    atomic_int sleepers;
    unsigned start;             /* go's value when the worker was created */
} mailbox_t;

static struct {
    pthread_mutex_t lock;       /* held by the call using the team */
    int workers;                /* threads started, besides callers */
    const job_t *job;
    barrier_t bar;
    mailbox_t box[MAX_THREADS];
} team = { .lock = PTHREAD_MUTEX_INITIALIZER };

static void *worker(void *arg) {
    const int tid = (int)(intptr_t)arg;
    mailbox_t *box = &team.box[tid];
    unsigned seen = box->start;           /* a bump made before this thread ran counts */
    for (;;) {
        wait_change(&box->go, seen, &box->sleepers);
        seen = atomic_load(&box->go);
        const job_t *J = team.job;          /* set before go was bumped; kept until the end barrier */
        run_part(J, tid);
        barrier_wait(J->bar);
    }
    return NULL;
}

static void after_fork_child(void) {          /* the team's threads do not exist in a child */
    pthread_mutex_init(&team.lock, NULL);
    team.workers = 0;
}

static void init_once(void) {
    const char *s = getenv("CHARRNN_SPIN_US");
    spin_us = s ? atof(s) : 50.0;
    if (!(spin_us >= 0)) spin_us = 50.0;
    pthread_atfork(NULL, NULL, after_fork_child);
}
static pthread_once_t once = PTHREAD_ONCE_INIT;

/* Starts workers 1 .. T-1 if need be; returns how many threads the team can give (>= 1). */
static int team_grow(int T) {
    if (T > MAX_THREADS) T = MAX_THREADS;
    while (team.workers < T - 1) {
        pthread_t th;
        pthread_attr_t at;
        pthread_attr_init(&at);
        pthread_attr_setdetachstate(&at, PTHREAD_CREATE_DETACHED);
        team.box[team.workers + 1].start = atomic_load(&team.box[team.workers + 1].go);
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
    const int np = (J->h + NR - 1) / NR;
    if (T > np) T = np;
    if (T < 1) T = 1;
    void *pack = NULL;
    if (posix_memalign(&pack, 64, (size_t)np * J->h * NR * sizeof(float)) != 0) return -1;
    J->pack = pack;
    barrier_t solo = { .n = 1 };
    if (T > 1 && pthread_mutex_trylock(&team.lock) == 0) {
        T = team_grow(T);
        J->T = T;
        team.bar.n = T;
        J->bar = &team.bar;
        team.job = J;
        for (int i = 1; i < T; i++) bump(&team.box[i].go, &team.box[i].sleepers);
        run_part(J, 0);
        barrier_wait(J->bar);               /* every worker is done with J */
        team.job = NULL;
        pthread_mutex_unlock(&team.lock);
    } else {                                /* one thread, or the team is busy with another call */
        J->T = 1;
        J->bar = &solo;
        run_part(J, 0);
    }
    free(pack);
    return 0;
}

/* ---- the entry points ---- */

int fp32_vector_width(void) { return VL; }
void fp32_tanh(float *x, long n) { tanh_any(x, n); }
int fp32_panel_width(void) { return NR; }
int fp32_tile_rows(void) { return MR; }

/* A (steps, B, h): x_t W_in + b in, H_t out. H0 (B, h). M[k][j] = W[k*sk + j*sj]. */
int fp32_forward(int steps, int B, int h, float *A, const float *H0, const float *W, long sk, long sj,
                 int threads) {
    if (steps <= 0 || B <= 0 || h <= 0) return 0;
    job_t J = { .kind = FWD, .steps = steps, .B = B, .h = h, .A = A, .H0 = H0, .W = W, .sk = sk, .sj = sj };
    return run(&J, threads);
}

/* dA (steps, B, h) out: dA[t] = (dH[t] + dA[t+1] M^T) * (1 - H[t]^2); dH0 (B, h) = dA[0] M^T unless NULL. */
int fp32_backward(int steps, int B, int h, const float *dH, const float *H, float *dA, float *dH0,
                  const float *W, long sk, long sj, int threads) {
    if (steps <= 0 || B <= 0 || h <= 0) return 0;
    job_t J = { .kind = BWD, .steps = steps, .B = B, .h = h, .W = W, .sk = sk, .sj = sj,
                .dH = dH, .H = H, .dA = dA, .dH0 = dH0 };
    return run(&J, threads);
}
