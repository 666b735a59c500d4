/* The step loops of the bf16 tanh RNN layer (charrnn/models.py, TanhRNNLayer with bf16=True).

   The same loops in Python cost one dispatch per op, about as long as the matmul itself at these
   sizes; here a whole layer's forward or backward is one call. Each step's matmul runs on AMX
   tiles where it can (below), else it is MKL's cblas_gemm_bf16bf16f32, whose address
   charrnn/native.py passes in; so this file needs only the C library and the compiler's own
   headers, and builds in a fraction of a second (charrnn/native.py does it).

   forward:   A[t] += Hb[t] @ op(W);  A[t] = tanh(A[t]);  Hb[t+1] = bf16(A[t])       t = 0 .. steps-1
   backward:  dA[t] = dH[t] + dAb[t+1] @ op(W);  dA[t] *= 1 - H[t]^2;  dAb[t] = bf16(dA[t])
              for t = steps-1 .. 0 (the matmul term is absent at the last step)

   A, dA, dH, H: fp32 (steps, batch, h); Hb: bf16 (steps+1, batch, h); dAb: bf16 (steps, batch, h);
   all contiguous. op(W) is W or W^T as the caller says (101/111/112 are CBLAS's row-major,
   no-transpose and transpose).

   On a CPU with AMX (compiled with -march=native there) and shapes that fill whole tiles (batch
   and h multiples of 32), the step matmul runs on AMX tiles instead of MKL: op(W) is packed once
   per call into the tiles' pair-interleaved (VNNI) layout, where MKL packs it again at every step,
   which is most of its time at these sizes (h = 256: 2.6 us a step against MKL's 10).
*/
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AMX_BF16__
#include <immintrin.h>
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
   Each 32 x 32 block of C is four accumulator tiles fed by two tiles of A and two of P. */
static void tile_gemm(int M, int N, int K, const uint16_t *A, const uint16_t *P, float *C) {
    for (size_t m = 0; m < (size_t)M; m += 32)
        for (size_t n = 0; n < (size_t)N; n += 32) {
            float *c00 = C + m * N + n, *c01 = c00 + 16, *c10 = c00 + 16 * (size_t)N, *c11 = c10 + 16;
            _tile_loadd(0, c00, N * 4); _tile_loadd(1, c01, N * 4);
            _tile_loadd(2, c10, N * 4); _tile_loadd(3, c11, N * 4);
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
    if (s->packed != NULL) { tile_gemm(s->batch, s->h, s->h, A, s->packed, C); return; }
#endif
    s->gemm(101, 111, s->op_w, s->batch, s->h, s->h, 1.0f, A, s->h, s->W, s->ld_w, 1.0f, C, s->h);
}

static void stepper_end(struct stepper *s) {
#ifdef __AMX_BF16__
    if (s->packed != NULL) { _tile_release(); free(s->packed); s->packed = NULL; }
#endif
}

void forward(gemm_fn gemm, int op_w, int ld_w, const void *W,
             int steps, int batch, int h, float *A, uint16_t *Hb) {
    const size_t n = (size_t)batch * (size_t)h;
    struct stepper s = stepper_start(gemm, op_w, ld_w, W, batch, h);
    for (size_t t = 0; t < (size_t)steps; t++) {
        float *a = A + t * n;
        uint16_t *next = Hb + (t + 1) * n;
        stepper_run(&s, Hb + t * n, a);
        #pragma omp simd
        for (size_t i = 0; i < n; i++) a[i] = tanhf(a[i]);
        for (size_t i = 0; i < n; i++) next[i] = to_bf16(a[i]);
    }
    stepper_end(&s);
}

void backward(gemm_fn gemm, int op_w, int ld_w, const void *W,
              int steps, int batch, int h, const float *dH, float *dA, const float *H, uint16_t *dAb) {
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
        if (t > 0) {
            memcpy(d - n, dH + (size_t)(t - 1) * n, n * sizeof *d);
            stepper_run(&s, db, d - n);
        }
    }
    stepper_end(&s);
}

/* `reps` step matmuls C += A @ op(W) exactly as the loops above run them, for measuring their
   rate (charrnn/bench.py): A bf16 (batch, h), C fp32 (batch, h). */
void step_matmuls(gemm_fn gemm, int op_w, int ld_w, const void *W, int batch, int h,
                  const uint16_t *A, float *C, int reps) {
    struct stepper s = stepper_start(gemm, op_w, ld_w, W, batch, h);
    for (int r = 0; r < reps; r++) stepper_run(&s, A, C);
    stepper_end(&s);
}
