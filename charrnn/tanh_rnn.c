/* The step loops of the bf16 tanh RNN layer (charrnn/models.py, TanhRNNLayer with bf16=True).

   The same loops in Python cost one dispatch per op, about as long as the matmul itself at these
   sizes; here a whole layer's forward or backward is one call. The matmuls are MKL's
   cblas_gemm_bf16bf16f32, whose address charrnn/native.py passes in, so this file needs no
   headers but the C library's and builds in a fraction of a second (charrnn/native.py does it).

   forward:   A[t] += Hb[t] @ op(W);  A[t] = tanh(A[t]);  Hb[t+1] = bf16(A[t])       t = 0 .. steps-1
   backward:  dA[t] = dH[t] + dAb[t+1] @ op(W);  dA[t] *= 1 - H[t]^2;  dAb[t] = bf16(dA[t])
              for t = steps-1 .. 0 (the matmul term is absent at the last step)

   A, dA, dH, H: fp32 (steps, batch, h); Hb: bf16 (steps+1, batch, h); dAb: bf16 (steps, batch, h);
   all contiguous. op(W) is W or W^T as the caller says (101/111/112 are CBLAS's row-major,
   no-transpose and transpose).
*/
#include <math.h>
#include <stdint.h>
#include <string.h>

typedef void (*gemm_fn)(int, int, int, int, int, int, float, const void *, int,
                        const void *, int, float, float *, int);

static inline uint16_t to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);  /* NaN stays NaN */
    u += 0x7fffu + ((u >> 16) & 1u);                                             /* round to nearest even */
    return (uint16_t)(u >> 16);
}

void forward(gemm_fn gemm, int op_w, int ld_w, const void *W,
             int steps, int batch, int h, float *A, uint16_t *Hb) {
    const size_t n = (size_t)batch * (size_t)h;
    for (size_t t = 0; t < (size_t)steps; t++) {
        float *a = A + t * n;
        uint16_t *next = Hb + (t + 1) * n;
        gemm(101, 111, op_w, batch, h, h, 1.0f, Hb + t * n, h, W, ld_w, 1.0f, a, h);
        #pragma omp simd
        for (size_t i = 0; i < n; i++) a[i] = tanhf(a[i]);
        for (size_t i = 0; i < n; i++) next[i] = to_bf16(a[i]);
    }
}

void backward(gemm_fn gemm, int op_w, int ld_w, const void *W,
              int steps, int batch, int h, const float *dH, float *dA, const float *H, uint16_t *dAb) {
    const size_t n = (size_t)batch * (size_t)h;
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
            gemm(101, 111, op_w, batch, h, h, 1.0f, db, h, W, ld_w, 1.0f, d - n, h);
        }
    }
}
