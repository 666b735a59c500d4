/* The step loops of the bf16 tanh RNN layer (charrnn/kernels/fused.py, TanhRNNLayer with bf16=True).

   The same loops in Python cost one dispatch per op, about as long as the matmul itself at these
   sizes; here a whole layer's forward or backward is one call. Each step's matmul runs on AMX
   tiles where it can (below), else it is MKL's cblas_gemm_bf16bf16f32, whose address
   charrnn/kernels/bf16.py passes in; so this file needs only the C library and the compiler's own
   headers, and builds in a fraction of a second (charrnn/kernels/bf16.py does it).

   forward:   A[t] += Hb[t] @ op(W);  A[t] = tanh(A[t]);  Hb[t+1] = bf16(A[t])       t = 0 .. steps-1
   backward:  dA[t] = dH[t] + dAb[t+1] @ op(W);  dA[t] *= 1 - H[t]^2;  dAb[t] = bf16(dA[t])
              for t = steps-1 .. 0 (the matmul term is absent at the last step)

   A, dA, dH, H: fp32 (steps, batch, h); Hb: bf16 (steps+1, batch, h); dAb: bf16 (steps, batch, h);
   all contiguous. op(W) is W or W^T as the caller says (101/111/112 are CBLAS's row-major,
   no-transpose and transpose).

   On a CPU with AMX (compiled with -march=native there) and shapes that fill whole tiles (batch
   and h multiples of 32), the step matmul runs on AMX tiles instead of MKL: op(W) is packed once
   per call into the tiles' pair-interleaved (VNNI) layout, where MKL packs it again at every step,
   which is most of its time at these sizes.
*/
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AMX_BF16__) || defined(__AVX512BF16__)
#include <immintrin.h>
#endif
#ifdef __AMX_BF16__
#include <sys/syscall.h>
#include <unistd.h>
#endif

typedef void (*gemm_fn)(int, int, int, int, int, int, float, const void *, int,
                        const void *, int, float, float *, int);

static inline uint16_t to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);  /* NaN stays NaN */
    u += 0x7fffu + ((u >> 16) & 1u);                                             /* round to nearest even */
    return (uint16_t)(u >> 16);
}

/* y[i] = bf16(x[i]) for n values: 16 at a time with AVX512-BF16's conversion (round to nearest
   even and NaN stays NaN, as to_bf16, but subnormal inputs become zero), the rest one by one. (GCC 12 vectorizes a plain loop over
   to_bf16 too, NaN branch and all, about as fast: the step loops keep theirs.) */
static void to_bf16_n(const float *x, uint16_t *y, size_t n) {
    size_t i = 0;
#ifdef __AVX512BF16__
    for (; i + 16 <= n; i += 16)
        _mm256_storeu_si256((__m256i *)(y + i), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(x + i)));
#endif
    for (; i < n; i++) y[i] = to_bf16(x[i]);
}


/* ---- AMX tiles (compiled only where the compiler targets them) ---------------------------- */

#ifdef __AMX_BF16__
struct tile_config { uint8_t palette, start_row, reserved[14]; uint16_t colsb[16]; uint8_t rows[16]; };

static int amx_allowed(void) {          /* Linux hands out the tile state on request, once */
    static int state = 0;                /* 0: not asked yet, 1: granted, -1: refused */
    if (state == 0)
        state = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0 ? 1 : -1;
    return state == 1;
}

/* op(W) (K x N) in VNNI pairs: P[(k/2)*2N + 2j + k%2] = op(W)[k][j]. NULL if out of memory. */
static uint16_t *pack_vnni(const uint16_t *W, int trans, int ld, int K, int N) {
    uint16_t *P = aligned_alloc(64, (size_t)K * N * sizeof *P);   /* K*N*2 is a multiple of 64 */
    if (P == NULL) return NULL;
    for (size_t k = 0; k < (size_t)K; k++)
        for (size_t j = 0; j < (size_t)N; j++)
            P[(k / 2) * 2 * N + 2 * j + (k & 1)] = trans ? W[j * ld + k] : W[k * ld + j];
    return P;
}

/* 8 tiles of 16 rows x 64 bytes. A constant in memory: GCC 12 was seen to drop the stores that
   filled a local config, as if ldtilecfg did not read them, and the CPU then refused it. */
static const struct tile_config TILES = {
    .palette = 1,
    .colsb = {64, 64, 64, 64, 64, 64, 64, 64},
    .rows = {16, 16, 16, 16, 16, 16, 16, 16},
};

static void tiles_on(void) { _tile_loadconfig(&TILES); }

/* C (M x N fp32, row-major) += A (M x K bf16, row-major) @ P (packed); M, N, K multiples of 32.
   With accumulate = 0, C = A @ P instead (C's old contents are never read).
   Each 32 x 32 block of C is four accumulator tiles fed by two tiles of A and two of P. */
static void tile_gemm(int M, int N, int K, const uint16_t *A, const uint16_t *P, float *C, int accumulate) {
    for (size_t m = 0; m < (size_t)M; m += 32)
        for (size_t n = 0; n < (size_t)N; n += 32) {
            float *c00 = C + m * N + n, *c01 = c00 + 16, *c10 = c00 + 16 * (size_t)N, *c11 = c10 + 16;
            if (accumulate) {
                _tile_loadd(0, c00, N * 4); _tile_loadd(1, c01, N * 4);
                _tile_loadd(2, c10, N * 4); _tile_loadd(3, c11, N * 4);
            } else {
                _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
            }
            for (size_t k = 0; k < (size_t)K; k += 32) {
                _tile_loadd(4, A + m * K + k, K * 2);
                _tile_loadd(5, A + (m + 16) * K + k, K * 2);
                _tile_loadd(6, P + (k / 2) * 2 * N + 2 * n, N * 4);
                _tile_loadd(7, P + (k / 2) * 2 * N + 2 * (n + 16), N * 4);
                _tile_dpbf16ps(0, 4, 6); _tile_dpbf16ps(1, 4, 7);
                _tile_dpbf16ps(2, 5, 6); _tile_dpbf16ps(3, 5, 7);
            }
            _tile_stored(0, c00, N * 4); _tile_stored(1, c01, N * 4);
            _tile_stored(2, c10, N * 4); _tile_stored(3, c11, N * 4);
        }
}
#endif

/* The step matmul C += A @ op(W) (batch x h by h x h): AMX tiles when set up, else MKL. */
struct stepper { gemm_fn gemm; int op_w, ld_w, batch, h; const void *W; uint16_t *packed; };

static struct stepper stepper_start(gemm_fn gemm, int op_w, int ld_w, const void *W, int batch, int h) {
    struct stepper s = {gemm, op_w, ld_w, batch, h, W, NULL};
#ifdef __AMX_BF16__
    if (batch % 32 == 0 && h % 32 == 0 && amx_allowed()) {
        s.packed = pack_vnni(W, op_w == 112, ld_w, h, h);
        if (s.packed != NULL) tiles_on();
    }
#endif
    return s;
}

static void stepper_run(const struct stepper *s, const uint16_t *A, float *C) {
#ifdef __AMX_BF16__
    if (s->packed != NULL) { tile_gemm(s->batch, s->h, s->h, A, s->packed, C, 1); return; }
#endif
    s->gemm(101, 111, s->op_w, s->batch, s->h, s->h, 1.0f, A, s->h, s->W, s->ld_w, 1.0f, C, s->h);
}

static void stepper_end(struct stepper *s) {
#ifdef __AMX_BF16__
    if (s->packed != NULL) { _tile_release(); free(s->packed); s->packed = NULL; }
#endif
}

/* With ids (steps, batch) not NULL, A's contents on entry are not read: step t first fills A[t]
   with the rows table[ids[t][i]] (the input term x_t W_in + b of token ids, table (vocab, h)),
   just before its matmul reads them, while they are in cache, where a lookup of all steps up front
   would write 2.3 MB (the seed's sizes) that the matmuls then read back from memory.
   Returns 0, or -1 at an id outside 0 .. vocab-1 (A is then partly written). */
int forward(gemm_fn gemm, int op_w, int ld_w, const void *W,
            int steps, int batch, int h, float *A, uint16_t *Hb,
            const int64_t *ids, const float *table, int vocab) {
    const size_t n = (size_t)batch * (size_t)h;
    struct stepper s = stepper_start(gemm, op_w, ld_w, W, batch, h);
    for (size_t t = 0; t < (size_t)steps; t++) {
        float *a = A + t * n;
        uint16_t *next = Hb + (t + 1) * n;
        if (ids != NULL)
            for (size_t i = 0; i < (size_t)batch; i++) {
                int64_t id = ids[t * batch + i];
                if (id < 0 || id >= vocab) { stepper_end(&s); return -1; }
                memcpy(a + i * h, table + id * h, (size_t)h * sizeof *a);
            }
        stepper_run(&s, Hb + t * n, a);
        #pragma omp simd
        for (size_t i = 0; i < n; i++) a[i] = tanhf(a[i]);
        for (size_t i = 0; i < n; i++) next[i] = to_bf16(a[i]);
    }
    stepper_end(&s);
    return 0;
}

/* With ids (steps, batch) not NULL, also G[ids[t][i]] += dA[t][i] and G[vocab] += dA[t][i] for every
   step and row, in fp32 while dA[t] is in cache: the gradients of the lookup table's rows (W_in)
   and of b. G (vocab + 1, h) must be zero on entry. Returns 0, or -1 at an id out of range. */
int backward(gemm_fn gemm, int op_w, int ld_w, const void *W,
             int steps, int batch, int h, const float *dH, float *dA, const float *H, uint16_t *dAb,
             const int64_t *ids, float *G, int vocab) {
    const size_t n = (size_t)batch * (size_t)h;
    struct stepper s = stepper_start(gemm, op_w, ld_w, W, batch, h);
    for (long t = (long)steps - 1; t >= 0; t--) {
        float *d = dA + (size_t)t * n;
        const float *y = H + (size_t)t * n;
        uint16_t *db = dAb + (size_t)t * n;
        if (t == steps - 1) memcpy(d, dH + (size_t)t * n, n * sizeof *d);
        #pragma omp simd
        for (size_t i = 0; i < n; i++) d[i] *= 1.0f - y[i] * y[i];
        for (size_t i = 0; i < n; i++) db[i] = to_bf16(d[i]);
        if (ids != NULL)
            for (size_t i = 0; i < (size_t)batch; i++) {
                int64_t id = ids[(size_t)t * batch + i];
                if (id < 0 || id >= vocab) { stepper_end(&s); return -1; }
                float *g = G + id * h, *gb = G + (size_t)vocab * h;
                const float *di = d + i * h;
                for (size_t k = 0; k < (size_t)h; k++) { g[k] += di[k]; gb[k] += di[k]; }
            }
        if (t > 0) {
            memcpy(d - n, dH + (size_t)(t - 1) * n, n * sizeof *d);
            stepper_run(&s, db, d - n);
        }
    }
    stepper_end(&s);
    return 0;
}

/* `reps` step matmuls C += A @ op(W) exactly as the loops above run them, for measuring their
   rate (charrnn/bench.py): A bf16 (batch, h), C fp32 (batch, h). */
void step_matmuls(gemm_fn gemm, int op_w, int ld_w, const void *W, int batch, int h,
                  const uint16_t *A, float *C, int reps) {
    struct stepper s = stepper_start(gemm, op_w, ld_w, W, batch, h);
    for (int r = 0; r < reps; r++) stepper_run(&s, A, C);
    stepper_end(&s);
}


/* ---- the output layer on AMX tiles ------------------------------------------------------------

   Y = H W + b for all of a minibatch's tokens at once: H (T x h), W (h x V), b (V), Y (T x V), all
   fp32, T = steps * batch. Its three matmuls have V (28 for the seed's vocabulary) as N or K, a
   shape MKL runs far below its usual rate (fp32 or bf16: most of its time goes into packing). On tiles V is padded with zeros to Vp, the next multiple of 32:

   forward:   Y = Hb @ bf16(W) + b          Hb = bf16(H), usually the recurrence's own copy
   backward:  dH = bf16(dY) @ bf16(W)^T;  dW^T = bf16(dY)^T @ Hb;  db = sum_t dY[t] (in fp32)

   At these sizes the matmuls take less time than one pass over H (2.3 MB, more than L2 holds), so
   what counts is how often H is read: the forward takes Hb from the recurrence's forward loop,
   which wrote it anyway (Hb[t+1] there), and the weight gradient reads Hb as it is, with no
   repacking (head_weight_grad below).

   W's element (k, j) is at W[k * sk + j * sj]: row-major (sk = V, sj = 1), or the transposed view
   of nn.Linear's (V, h) weight (sk = 1, sj = h); dW is written with the same layout, so autograd
   need not copy it. T and h must be multiples of 32 and head_ready() true (charrnn/kernels/bf16.py
   checks both); the functions return 0, -1 out of memory, -2 without AMX. */

int head_ready(void) {
#ifdef __AMX_BF16__
    return amx_allowed();
#else
    return 0;
#endif
}

#ifdef __AMX_BF16__
static int pad32(int n) { return (n + 31) / 32 * 32; }

/* The K x N matrix whose (k, j) is X[k * sk + j * sj], rounded to bf16, padded with zeros to
   Kp x Np (multiples of 32) and packed in VNNI pairs as pack_vnni does. NULL if out of memory. */
static uint16_t *pack_f32(const float *X, size_t sk, size_t sj, int K, int N, int Kp, int Np) {
    uint16_t *P = aligned_alloc(64, (size_t)Kp * Np * sizeof *P);
    if (P == NULL) return NULL;
    for (size_t k = 0; k < (size_t)Kp; k++)
        for (size_t j = 0; j < (size_t)Np; j++)
            P[(k / 2) * 2 * Np + 2 * j + (k & 1)] =
                k < (size_t)K && j < (size_t)N ? to_bf16(X[k * sk + j * sj]) : 0;   /* 0: bf16 zero */
    return P;
}

/* Se, So (Vp x h/2) = the even and odd columns of dW^T = dY^T @ Hb, over T tokens.

   A tile product pairs consecutive K: C[m][n] += A[m][2k] B[k][2n] + A[m][2k+1] B[k][2n+1], B
   read 32 bf16 per row. With K = tokens, B would need Hb's rows zipped in pairs (a full pass over
   Hb). Read as it is instead, row k of a B tile is token k's 32 columns, as 16 pairs (2n, 2n+1);
   then Ae, holding dY[t][m] at 2t and 0 at 2t+1, gives the even columns, and Ao, holding them the
   other way round, the odd ones. Twice the tile products (a few microseconds), no pass over Hb.
   Ae, Ao: (Vp, 2T) bf16. Tiles: 0-3 accumulate (even/odd x two row blocks), 4 Hb, 5-6 Ae/Ao. */
static void head_weight_grad(int T, int h, int Vp, const uint16_t *Ae, const uint16_t *Ao,
                             const uint16_t *Hb, float *Se, float *So) {
    const size_t h2 = h / 2, ldA = 2 * (size_t)T;
    for (size_t m = 0; m < (size_t)Vp; m += 32)
        for (size_t n = 0; n < h2; n += 16) {            /* pairs n .. n+15: columns 2n .. 2n+31 */
            _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
            for (size_t t = 0; t < (size_t)T; t += 16) {
                _tile_loadd(4, Hb + t * h + 2 * n, h * 2);                /* 16 tokens x 32 columns */
                _tile_loadd(5, Ae + m * ldA + 2 * t, ldA * 2);
                _tile_loadd(6, Ao + m * ldA + 2 * t, ldA * 2);
                _tile_dpbf16ps(0, 5, 4); _tile_dpbf16ps(1, 6, 4);
                _tile_loadd(5, Ae + (m + 16) * ldA + 2 * t, ldA * 2);
                _tile_loadd(6, Ao + (m + 16) * ldA + 2 * t, ldA * 2);
                _tile_dpbf16ps(2, 5, 4); _tile_dpbf16ps(3, 6, 4);
            }
            _tile_stored(0, Se + m * h2 + n, h2 * 4); _tile_stored(1, So + m * h2 + n, h2 * 4);
            _tile_stored(2, Se + (m + 16) * h2 + n, h2 * 4); _tile_stored(3, So + (m + 16) * h2 + n, h2 * 4);
        }
}
#endif

/* Y (T, V) fp32 from Hb (T, h) bf16; with H (T, h) fp32 not NULL, Hb = bf16(H) is written first. */
int head_forward(int T, int h, int V, const float *W, long sk, long sj, const float *b,
                 const float *H, uint16_t *Hb, float *Y) {
#ifdef __AMX_BF16__
    if (!amx_allowed()) return -2;
    const int Vp = pad32(V);
    uint16_t *P = pack_f32(W, sk, sj, h, V, h, Vp);               /* bf16(W): (h, Vp) packed */
    float *S = aligned_alloc(64, (size_t)T * Vp * sizeof *S);     /* the padded logits (T, Vp) */
    if (P == NULL || S == NULL) { free(P); free(S); return -1; }
    if (H != NULL) to_bf16_n(H, Hb, (size_t)T * h);
    tiles_on();
    tile_gemm(T, Vp, h, Hb, P, S, 0);
    _tile_release();
    for (size_t t = 0; t < (size_t)T; t++)
        for (size_t j = 0; j < (size_t)V; j++) Y[t * V + j] = S[t * Vp + j] + b[j];
    free(P); free(S);
    return 0;
#else
    (void)T; (void)h; (void)V; (void)W; (void)sk; (void)sj; (void)b; (void)H; (void)Hb; (void)Y;
    return -2;
#endif
}

/* dY (T, V) fp32 and the forward's Hb (T, h) -> dH (T, h), dW (h, V, W's layout), db (V), fp32. */
int head_backward(int T, int h, int V, const float *W, long sk, long sj, const float *dY,
                  const uint16_t *Hb, float *dH, float *dW, float *db) {
#ifdef __AMX_BF16__
    if (!amx_allowed()) return -2;
    const size_t Vp = pad32(V), t_n = T, h_n = h, v_n = V, h2 = h_n / 2;
    uint16_t *Pt = pack_f32(W, sj, sk, V, h, Vp, h);              /* bf16(W)^T: (Vp, h) packed */
    uint16_t *dYb = aligned_alloc(64, t_n * Vp * sizeof *dYb);     /* bf16(dY), padded: (T, Vp) */
    uint16_t *Ae = calloc(Vp * 2 * t_n, sizeof *Ae);               /* dY^T, even slots: (Vp, 2T) */
    uint16_t *Ao = calloc(Vp * 2 * t_n, sizeof *Ao);               /* dY^T, odd slots */
    float *Se = aligned_alloc(64, Vp * h2 * sizeof *Se);           /* dW^T's even columns: (Vp, h/2) */
    float *So = aligned_alloc(64, Vp * h2 * sizeof *So);           /* and its odd ones */
    int status = -1;
    if (Pt == NULL || dYb == NULL || Ae == NULL || Ao == NULL || Se == NULL || So == NULL) goto done;

    for (size_t j = 0; j < v_n; j++) db[j] = 0.0f;
    for (size_t t = 0; t < t_n; t++)
        for (size_t j = 0; j < Vp; j++) {
            uint16_t v = 0;
            if (j < v_n) { v = to_bf16(dY[t * v_n + j]); db[j] += dY[t * v_n + j]; }
            dYb[t * Vp + j] = v;
            Ae[j * 2 * t_n + 2 * t] = v;
            Ao[j * 2 * t_n + 2 * t + 1] = v;
        }
    tiles_on();
    tile_gemm(T, h, Vp, dYb, Pt, dH, 0);                           /* dH = bf16(dY) @ bf16(W)^T */
    head_weight_grad(T, h, Vp, Ae, Ao, Hb, Se, So);                /* dW^T = bf16(dY)^T @ Hb */
    _tile_release();
    for (size_t j = 0; j < v_n; j++)
        for (size_t k = 0; k < h2; k++) {
            dW[2 * k * sk + j * sj] = Se[j * h2 + k];
            dW[(2 * k + 1) * sk + j * sj] = So[j * h2 + k];
        }
    status = 0;
done:
    free(Pt); free(dYb); free(Ae); free(Ao); free(Se); free(So);
    return status;
#else
    (void)T; (void)h; (void)V; (void)W; (void)sk; (void)sj; (void)dY; (void)Hb; (void)dH; (void)dW; (void)db;
    return -2;
#endif
}
