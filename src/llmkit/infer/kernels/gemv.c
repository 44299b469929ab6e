/* Decode-time matrix-vector kernels: y = x @ W^T for a few rows of x, each weight read once from memory.
 *
 * At one token per step a decoder's Linear layers are matrix-vector products: every weight byte is read once
 * per token for a handful of multiply-adds, so a step costs weight bytes / memory bandwidth, and a kernel
 * wins by streaming W in its natural (out, in) order at full bandwidth and by reading fewer bytes (INT8,
 * INT4). The output rows are split over OpenMP threads; this library links the libgomp torch itself loaded,
 * so both share one thread pool instead of two pools spinning against each other on a small CPU.
 *
 * Weight formats (N = out rows, K = in columns, g = quantization group along K, K % 32 == 0, g % 32 == 0):
 *   f32: float W[N][K].
 *   q8:  int8  q[N][K],   float s[N][K/g],  w = s * q              (g = K: per-output-channel INT8)
 *   q4:  uint8 q[N][K/2], float s[N][K/g],  w = s * (nibble - 8). Within each block of 32 weights byte j
 *        holds weight j in its low nibble and weight j + 16 in its high nibble: the layout of GGUF's Q4_0
 *        blocks (ggml's block_q4_0), so a Q4_0 tensor loads without repacking.
 *
 * The q8 / q4 kernels take the activations quantized to int8 in blocks of 32 (`quant_rows_q8`, one scale
 * per block, as ggml's Q8_0 activations for its Q4_0 / Q8_0 dot products) and accumulate exact int8 x int8
 * products in int32 per block, scaled once per block: several times fewer instructions per weight than
 * converting every weight to float, which is what keeps a 2-core CPU at memory speed on 1-byte and
 * half-byte weights. Vector paths: AVX2 (+ AVX512-VNNI's dpbusd where present); plain C otherwise.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <stdint.h>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define LLMKIT_AVX2 1
#endif

#ifdef LLMKIT_AVX2
static inline float hsum8(__m256 v) {
    __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
    lo = _mm_add_ps(lo, hi);
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
    return _mm_cvtss_f32(lo);
}

/* e^x for 8 floats (Cephes' expf: range reduction by ln 2 in two parts, degree-6 polynomial; relative error
 * ~2e-7 over [-87, 88], clamped outside). libm's expf is scalar, and at 32 rows the SwiGLU and softmax
 * exponentials were a tenth of a decode step. */
static inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
    const __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

/* 32 signed int8 x 32 signed int8 -> 8 int32 partial sums. maddubs wants (unsigned, signed): move w's sign
 * onto x (|w| * sign(w) x == w x). */
static inline __m256i dot_i8x32(__m256i w, __m256i x) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w));
#else
    __m256i p = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w));
    return _mm256_madd_epi16(p, _mm256_set1_epi16(1));
#endif
}
#endif

#if defined(__AVX512F__)
/* y[m0..m0+mr)[n0..n0+4) for mr <= 4 input rows: a 4 x 4 tile of 512-bit accumulators (AVX-512 has the 32
 * registers it takes), eight loads per sixteen FMAs; the four weight rows stay in L1 while the input rows
 * pass over them. K % 16 == 0. */
static inline void tile4_f32(const float *x, int64_t ldx, int64_t m0, int64_t mr, const float *W, int64_t n0,
                             float *y, int64_t ldy, int64_t K) {
    const float *w0 = W + n0 * K, *w1 = w0 + K, *w2 = w1 + K, *w3 = w2 + K;
    const float *xr[4];
    for (int r = 0; r < 4; r++) xr[r] = x + (m0 + (r < mr ? r : 0)) * ldx;
    __m512 a[4][4];
    for (int r = 0; r < 4; r++) for (int c = 0; c < 4; c++) a[r][c] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 16) {
        const __m512 v0 = _mm512_loadu_ps(w0 + k), v1 = _mm512_loadu_ps(w1 + k);
        const __m512 v2 = _mm512_loadu_ps(w2 + k), v3 = _mm512_loadu_ps(w3 + k);
        for (int r = 0; r < 4; r++) {
            const __m512 u = _mm512_loadu_ps(xr[r] + k);
            a[r][0] = _mm512_fmadd_ps(v0, u, a[r][0]); a[r][1] = _mm512_fmadd_ps(v1, u, a[r][1]);
            a[r][2] = _mm512_fmadd_ps(v2, u, a[r][2]); a[r][3] = _mm512_fmadd_ps(v3, u, a[r][3]);
        }
    }
    for (int r = 0; r < mr; r++)
        for (int c = 0; c < 4; c++) y[(m0 + r) * ldy + n0 + c] = _mm512_reduce_add_ps(a[r][c]);
}
#endif

/* y[m][n] = sum_k x[m][k] W[n][k];  x: (M, K) with row stride ldx, y: (M, N) with row stride ldy.
 * One or two rows (batch-1 decode): a dot product per output, the weights streamed once at memory speed.
 * More rows: 4 x 4 register tiles (AVX-512), the rows then share every weight load. */
void gemv_f32(const float *x, int64_t M, int64_t ldx, const float *W, float *y, int64_t ldy,
              int64_t N, int64_t K, int threads) {
#if defined(__AVX512F__)
    if (M > 2 && K % 16 == 0 && N % 4 == 0) {
        #pragma omp parallel for schedule(static) num_threads(threads)
        for (int64_t t = 0; t < N / 4; t++)
            for (int64_t m = 0; m < M; m += 4) tile4_f32(x, ldx, m, M - m < 4 ? M - m : 4, W, 4 * t, y, ldy, K);
        return;
    }
#endif
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = 0; n < N; n++) {
        const float *w = W + n * K;
        for (int64_t m = 0; m < M; m++) {
            const float *xm = x + m * ldx;
            int64_t k = 0;
            float acc = 0.f;
#ifdef LLMKIT_AVX2
            __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
            for (; k + 16 <= K; k += 16) {
                a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k), _mm256_loadu_ps(xm + k), a0);
                a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k + 8), _mm256_loadu_ps(xm + k + 8), a1);
            }
            acc = hsum8(_mm256_add_ps(a0, a1));
#endif
            for (; k < K; k++) acc += w[k] * xm[k];
            y[m * ldy + n] = acc;
        }
    }
}

/* x: (M, K) float, row stride ldx -> xq: (M, K) int8 and dx: (M, K/32), xq * dx ~= x (round to nearest). */
void quant_rows_q8(const float *x, int64_t M, int64_t ldx, int8_t *xq, float *dx, int64_t K) {
    const int64_t B = K / 32;
    for (int64_t m = 0; m < M; m++) {
        for (int64_t b = 0; b < B; b++) {
            const float *xb = x + m * ldx + b * 32;
            float amax = 0.f;
            for (int t = 0; t < 32; t++) amax = fmaxf(amax, fabsf(xb[t]));
            const float d = amax / 127.f, inv = d > 0.f ? 1.f / d : 0.f;
            dx[m * B + b] = d;
            for (int t = 0; t < 32; t++) xq[m * K + b * 32 + t] = (int8_t)lrintf(xb[t] * inv);
        }
    }
}

#ifdef LLMKIT_AVX2
/* 32 unsigned x 32 signed int8 -> 8 int32 partial sums. Without VNNI maddubs saturates pairs at 16 bits: fine
 * for nibbles (0..15), not for bytes, so INT8 weights then keep the sign trick (Q8_OFFSET 0). */
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define Q8_OFFSET 128
#else
#define Q8_OFFSET 0
#endif
static inline __m256i dot_u8x32(__m256i u, __m256i x) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, x);
#else
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, x), _mm256_set1_epi16(1));
#endif
}

/* Bytes j * 32 .. j * 32 + 31 of w. */
static inline __m256i load32(const void *w, int64_t j) {
    return _mm256_loadu_si256((const __m256i *)((const uint8_t *)w + j * 32));
}

/* A block of 32 Q4 weights as unsigned nibbles 0..15, in the order of the 32 activations they multiply. */
static inline __m256i nibbles32(const uint8_t *p) {
    const __m128i raw = _mm_loadu_si128((const __m128i *)p), low4 = _mm_set1_epi8(0x0F);
    return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(raw, 4), low4), _mm_and_si128(raw, low4));
}

/* Two output rows (w0, w1) against one activation row: each block's exact int32 dot, scaled by the weight
 * group's scale times the activation block's scale. Two accumulators, so neither waits on the other's FMA,
 * and the activation block is loaded once for both rows. fmt 1: int8 weights; 2: Q4 nibbles; 3: nibbles
 * unpacked one per byte. Weights go in as unsigned bytes (nibbles 0..15, int8 + 128 with VNNI) and the
 * offset comes off afterwards, as offset * sum_j scale_j * dx_j * sum(x block j) (`xsum`), not per weight. */
static inline __attribute__((always_inline)) void dot2_blocks(
        int fmt, const void *w0, const void *w1, const float *s0, const float *s1, const int8_t *xm,
        const float *dm, const int32_t *xsum, int64_t B, int64_t per, float *out0, float *out1) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    float c0 = 0.f, c1 = 0.f;
    for (int64_t j0 = 0, gi = 0; j0 < B; j0 += per, gi++) {
        const int64_t j1 = j0 + per < B ? j0 + per : B;
        const float g0 = s0[gi], g1 = s1[gi];
        for (int64_t j = j0; j < j1; j++) {
            const __m256i x = _mm256_loadu_si256((const __m256i *)(xm + j * 32));
            __m256i d0, d1;
            if (fmt == 1 && !Q8_OFFSET) {
                d0 = dot_i8x32(load32(w0, j), x);
                d1 = dot_i8x32(load32(w1, j), x);
            } else {
                if (fmt == 3) {  /* Q4 nibbles already unpacked to one byte each (gemv_quant, several rows) */
                    d0 = dot_u8x32(load32(w0, j), x);
                    d1 = dot_u8x32(load32(w1, j), x);
                } else if (fmt == 1) {  /* w ^ 0x80 read as unsigned is w + 128 */
                    const __m256i flip = _mm256_set1_epi8((char)0x80);
                    d0 = dot_u8x32(_mm256_xor_si256(load32(w0, j), flip), x);
                    d1 = dot_u8x32(_mm256_xor_si256(load32(w1, j), flip), x);
                } else {
                    d0 = dot_u8x32(nibbles32((const uint8_t *)w0 + j * 16), x);
                    d1 = dot_u8x32(nibbles32((const uint8_t *)w1 + j * 16), x);
                }
                c0 += g0 * dm[j] * (float)xsum[j];
                c1 += g1 * dm[j] * (float)xsum[j];
            }
            a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d0), _mm256_set1_ps(g0 * dm[j]), a0);
            a1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d1), _mm256_set1_ps(g1 * dm[j]), a1);
        }
    }
    const float offset = fmt == 1 ? (float)Q8_OFFSET : 8.f;
    *out0 = hsum8(a0) - offset * c0;
    *out1 = hsum8(a1) - offset * c1;
}

/* One output row against one activation row, alternate blocks into two accumulators (same formats as
 * dot2_blocks): one weight stream. */
static inline __attribute__((always_inline)) float dot1_blocks(int fmt, const void *w, const float *sw,
                                                               const int8_t *xm, const float *dm,
                                                               const int32_t *xsum, int64_t B, int64_t per) {
    __m256 a[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
    float c = 0.f;
    int64_t gi = 0, left = per;  /* the group of block j, and blocks left in it */
    for (int64_t j = 0; j < B; j++) {
        const __m256i x = _mm256_loadu_si256((const __m256i *)(xm + j * 32));
        const float sc = sw[gi] * dm[j];
        __m256i d;
        if (fmt == 1 && !Q8_OFFSET) {
            d = dot_i8x32(load32(w, j), x);
        } else {
            d = fmt == 1 ? dot_u8x32(_mm256_xor_si256(load32(w, j), _mm256_set1_epi8((char)0x80)), x)
                         : dot_u8x32(nibbles32((const uint8_t *)w + j * 16), x);
            c += sc * (float)xsum[j];
        }
        a[j & 1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), _mm256_set1_ps(sc), a[j & 1]);
        if (--left == 0) { gi++; left = per; }
    }
    return hsum8(_mm256_add_ps(a[0], a[1])) - (fmt == 1 ? (float)Q8_OFFSET : 8.f) * c;
}

/* The activations' block sums (M, B), which the Q4 kernel's "- 8" needs. Caller frees. */
static int32_t *block_sums(const int8_t *xq, int64_t M, int64_t K) {
    const int64_t B = K / 32;
    int32_t *out = (int32_t *)malloc(sizeof(int32_t) * (size_t)(M * B > 0 ? M * B : 1));
    for (int64_t i = 0; i < M * B; i++) {
        int32_t t = 0;
        for (int k = 0; k < 32; k++) t += xq[i * 32 + k];
        out[i] = t;
    }
    return out;
}

/* The weight rows in pairs (an odd last row is paired with itself), every activation row against each pair:
 * each activation block is loaded once for two rows and compute-bound cases (Q4, several rows) run ~1.3-1.8x
 * faster than one row at a time (python benchmarks/gemv_kernels.py). A single INT8 row is memory-bound and
 * reads faster as one stream per thread. */
static inline __attribute__((always_inline)) void gemv_quant(
        int fmt, const int8_t *xq, const float *dx, int64_t M, const void *q, const float *s, int64_t g, float *y,
        int64_t ldy, int64_t N, int64_t K, int threads) {
    const int64_t G = (K + g - 1) / g, B = K / 32, per = g / 32;  /* the last group may be shorter */
    const int64_t row_bytes = fmt == 1 ? K : K / 2;
    int32_t *xsum = fmt == 2 || Q8_OFFSET ? block_sums(xq, M, K) : NULL;
    if (fmt == 1 && M == 1) {  /* memory-bound: one weight stream per thread measured faster than two */
        #pragma omp parallel for schedule(static) num_threads(threads)
        for (int64_t n = 0; n < N; n++)
            y[n] = dot1_blocks(fmt, (const uint8_t *)q + n * row_bytes, s + n * G, xq, dx, xsum, B, per);
        free(xsum);
        return;
    }
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t p = 0; p < (N + 1) / 2; p++) {
        const int64_t n0 = 2 * p, n1 = n0 + 1 < N ? n0 + 1 : n0;
        const uint8_t *w0 = (const uint8_t *)q + n0 * row_bytes, *w1 = (const uint8_t *)q + n1 * row_bytes;
        if (fmt == 2 && M > 1) {  /* unpack the two rows' nibbles once, not once per activation row */
            uint8_t u0[K], u1[K];
            for (int64_t j = 0; j < B; j++) {
                _mm256_storeu_si256((__m256i *)(u0 + j * 32), nibbles32(w0 + j * 16));
                _mm256_storeu_si256((__m256i *)(u1 + j * 32), nibbles32(w1 + j * 16));
            }
            for (int64_t m = 0; m < M; m++)
                dot2_blocks(3, u0, u1, s + n0 * G, s + n1 * G, xq + m * K, dx + m * B, xsum + m * B, B, per,
                            y + m * ldy + n0, y + m * ldy + n1);
            continue;
        }
        for (int64_t m = 0; m < M; m++) {
            float r0, r1;
            dot2_blocks(fmt, w0, w1, s + n0 * G, s + n1 * G, xq + m * K, dx + m * B, xsum ? xsum + m * B : NULL,
                        B, per, &r0, &r1);
            y[m * ldy + n0] = r0;
            y[m * ldy + n1] = r1;
        }
    }
    free(xsum);
}
#endif

void gemv_q8(const int8_t *xq, const float *dx, int64_t M, const int8_t *q, const float *s, int64_t g,
             float *y, int64_t ldy, int64_t N, int64_t K, int threads) {
#ifdef LLMKIT_AVX2
    gemv_quant(1, xq, dx, M, q, s, g, y, ldy, N, K, threads);
#else
    const int64_t G = (K + g - 1) / g, B = K / 32, per = g / 32;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = 0; n < N; n++) {
        const int8_t *qn = q + n * K;
        const float *sn = s + n * G;
        for (int64_t m = 0; m < M; m++) {
            const int8_t *xm = xq + m * K;
            const float *dm = dx + m * B;
            float acc = 0.f;
            for (int64_t j = 0; j < B; j++) {
                int32_t d = 0;
                for (int t = 0; t < 32; t++) d += (int32_t)qn[j * 32 + t] * xm[j * 32 + t];
                acc += (float)d * sn[j / per] * dm[j];
            }
            y[m * ldy + n] = acc;
        }
    }
#endif
}

void gemv_q4(const int8_t *xq, const float *dx, int64_t M, const uint8_t *q, const float *s, int64_t g,
             float *y, int64_t ldy, int64_t N, int64_t K, int threads) {
#ifdef LLMKIT_AVX2
    gemv_quant(2, xq, dx, M, q, s, g, y, ldy, N, K, threads);
#else
    const int64_t G = (K + g - 1) / g, B = K / 32, per = g / 32;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = 0; n < N; n++) {
        const uint8_t *qn = q + n * (K / 2);
        const float *sn = s + n * G;
        for (int64_t m = 0; m < M; m++) {
            const int8_t *xm = xq + m * K;
            const float *dm = dx + m * B;
            float acc = 0.f;
            for (int64_t j = 0; j < B; j++) {
                const uint8_t *qb = qn + j * 16;
                const int8_t *xb = xm + j * 32;
                int32_t d = 0;
                for (int t = 0; t < 16; t++)
                    d += ((int32_t)(qb[t] & 0x0F) - 8) * xb[t] + ((int32_t)(qb[t] >> 4) - 8) * xb[t + 16];
                acc += (float)d * sn[j / per] * dm[j];
            }
            y[m * ldy + n] = acc;
        }
    }
#endif
}

/* The weights back to fp32, out: (N, K): for inputs of many rows (prefill, large batches) a BLAS matrix product
 * of the dequantized weight beats the matrix-vector kernels, and dequantizing in C streams at memory speed. */
void dequant_q8(const int8_t *q, const float *s, int64_t g, float *out, int64_t N, int64_t K, int threads) {
    const int64_t G = (K + g - 1) / g;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = 0; n < N; n++) {
        const int8_t *qn = q + n * K;
        float *o = out + n * K;
        for (int64_t j = 0; j < K; j += g) {  /* one scale per group: the inner loop vectorizes */
            const float d = s[n * G + j / g];
            const int64_t end = j + g < K ? j + g : K;
            for (int64_t k = j; k < end; k++) o[k] = d * (float)qn[k];
        }
    }
}

void dequant_q4(const uint8_t *q, const float *s, int64_t g, float *out, int64_t N, int64_t K, int threads) {
    const int64_t G = (K + g - 1) / g;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = 0; n < N; n++) {
        const uint8_t *qn = q + n * (K / 2);
        float *o = out + n * K;
        for (int64_t j = 0; j < K; j += 32) {
            const float d = s[n * G + j / g];
            for (int t = 0; t < 16; t++) {
                o[j + t] = d * (float)((int)(qn[j / 2 + t] & 0x0F) - 8);
                o[j + t + 16] = d * (float)((int)(qn[j / 2 + t] >> 4) - 8);
            }
        }
    }
}

/* ---------------------------------------------------------------------------------------------------------
 * One decoder layer of a decode step, fused: the Llama block (RMSNorm, fused qkv, optional q/k RMSNorm, RoPE,
 * grouped-query attention over a block-paged KV cache, output projection, RMSNorm, SwiGLU MLP, residuals) for
 * n <= a few rows (tokens of different requests), so a step costs 1 call per layer instead of ~40 PyTorch
 * operators. Covers Llama / Mistral / Qwen2 / Qwen3 / SmolLM-style layers; anything else stays in PyTorch.
 */

typedef struct {
    int32_t fmt;        /* 0 f32 (N, K); 1 q8 int8 (N, K) + scales (N, K/g); 2 q4 uint8 (N, K/2) + scales */
    int32_t _pad;
    const void *w;
    const float *s;
    int64_t g, N, K;
    const float *bias;  /* (N,) or NULL */
} lin_t;

/* y (M, N) = x (M, K) @ W^T (+ bias); xq / dx: scratch for the int8 activations, (M, K) and (M, K/32). */
static void linear_rows(const lin_t *L, const float *x, int64_t M, float *y, int8_t *xq, float *dx, int threads) {
    if (L->fmt == 0) {
        gemv_f32(x, M, L->K, (const float *)L->w, y, L->N, L->N, L->K, threads);
    } else {
        quant_rows_q8(x, M, L->K, xq, dx, L->K);
        if (L->fmt == 1) gemv_q8(xq, dx, M, (const int8_t *)L->w, L->s, L->g, y, L->N, L->N, L->K, threads);
        else gemv_q4(xq, dx, M, (const uint8_t *)L->w, L->s, L->g, y, L->N, L->N, L->K, threads);
    }
    if (L->bias)
        for (int64_t m = 0; m < M; m++)
            for (int64_t j = 0; j < L->N; j++) y[m * L->N + j] += L->bias[j];
}

static void rms_norm_row(const float *x, const float *w, float eps, int64_t d, float *out) {
    double ss = 0.0;
    for (int64_t j = 0; j < d; j++) ss += (double)x[j] * x[j];
    const float r = 1.f / sqrtf((float)(ss / d) + eps);
    for (int64_t j = 0; j < d; j++) out[j] = x[j] * r * w[j];
}

static inline float dot_f32(const float *a, const float *b, int64_t n) {
    int64_t k = 0;
    float acc = 0.f;
#ifdef LLMKIT_AVX2
    __m256 v = _mm256_setzero_ps();
    for (; k + 8 <= n; k += 8) v = _mm256_fmadd_ps(_mm256_loadu_ps(a + k), _mm256_loadu_ps(b + k), v);
    acc = hsum8(v);
#endif
    for (; k < n; k++) acc += a[k] * b[k];
    return acc;
}

/* rotate halves (x[:h], x[h:]) by cos/sin (h = hd / 2 values each): the Llama / GPT-NeoX pairing */
static void rope_row(float *x, const float *cos_, const float *sin_, int64_t hd) {
    const int64_t h = hd / 2;
    for (int64_t j = 0; j < h; j++) {
        const float a = x[j], b = x[j + h];
        x[j] = a * cos_[j] - b * sin_[j];
        x[j + h] = a * sin_[j] + b * cos_[j];
    }
}

/* g = silu(g) * u = g / (1 + e^-g) * u, over `len` floats. */
static void silu_mul(float *g, const float *u, int64_t len, int threads) {
    const int64_t chunks = (len + 255) / 256;
    #pragma omp parallel for schedule(static) num_threads(threads) if (chunks > 8)
    for (int64_t c = 0; c < chunks; c++) {
        const int64_t end = (c + 1) * 256 < len ? (c + 1) * 256 : len;
        int64_t i = c * 256;
#ifdef LLMKIT_AVX2
        const __m256 one = _mm256_set1_ps(1.f);
        for (; i + 8 <= end; i += 8) {
            const __m256 x = _mm256_loadu_ps(g + i);
            const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), x));
            _mm256_storeu_ps(g + i, _mm256_mul_ps(_mm256_div_ps(x, _mm256_add_ps(one, e)), _mm256_loadu_ps(u + i)));
        }
#endif
        for (; i < end; i++) g[i] = g[i] / (1.f + expf(-g[i])) * u[i];
    }
}

/* x: (n, d) residual stream, updated in place. k_pool / v_pool: this layer's (num_blocks, Hkv, bs, hd);
 * block_table: (n, max_blocks) block ids; pos: (n,) the new token's position (its key is written there and
 * it attends to keys 0..pos, or the last `window` of them). cos / sin: (n, hd/2) or NULL (no RoPE).
 * scratch: floats, at least n * (d + qkv_N + H * hd + 2 * ff + H * max_keys) + n * 2 * max(d, ff) / 4 + ...
 * (the caller sizes it with `decode_layer_scratch`). */
int64_t decode_layer_scratch(int64_t n, int64_t d, int64_t qkv_n, int64_t q_dim, int64_t ff, int64_t H,
                             int64_t max_keys) {
    const int64_t kmax = d > ff ? d : ff;
    return n * (d + qkv_n + q_dim + 2 * ff + H * max_keys) + n * kmax / 4 + n * kmax / 32 + 64;
}

void decode_layer(float *x, int64_t n, int64_t d, const float *norm1, const float *norm2, float eps,
                  const lin_t *qkv, const lin_t *proj, const lin_t *gate, const lin_t *up, const lin_t *down,
                  const float *q_norm, const float *k_norm, float qk_eps,
                  int64_t H, int64_t Hkv, int64_t hd, float scale, int64_t window,
                  const float *cos_, const float *sin_,
                  float *k_pool, float *v_pool, int64_t bs, const int64_t *block_table, int64_t max_blocks,
                  const int64_t *pos, int64_t max_keys, float *scratch, int threads) {
    const int64_t q_dim = H * hd, kv_dim = Hkv * hd, qn = qkv->N, ff = gate->N;
    const int64_t kmax = d > ff ? d : ff;
    float *h = scratch;                    /* (n, d) */
    float *qkv_out = h + n * d;            /* (n, qn) */
    float *att = qkv_out + n * qn;         /* (n, q_dim) */
    float *g = att + n * q_dim;            /* (n, ff) */
    float *u = g + n * ff;                 /* (n, ff) */
    float *scores = u + n * ff;            /* (n * H, max_keys) */
    float *dx = scores + n * H * max_keys; /* (n, kmax / 32) */
    int8_t *xq = (int8_t *)(dx + n * kmax / 32);  /* (n, kmax) */

    for (int64_t i = 0; i < n; i++) rms_norm_row(x + i * d, norm1, eps, d, h + i * d);
    linear_rows(qkv, h, n, qkv_out, xq, dx, threads);
    for (int64_t i = 0; i < n; i++) {
        float *row = qkv_out + i * qn;
        const int64_t p = pos[i];
        for (int64_t hh = 0; hh < H + Hkv; hh++) {  /* q heads, then k heads */
            float *v = row + hh * hd;
            if (q_norm) rms_norm_row(v, hh < H ? q_norm : k_norm, qk_eps, hd, v);
            if (cos_) rope_row(v, cos_ + i * (hd / 2), sin_ + i * (hd / 2), hd);
        }
        const int64_t blk = block_table[i * max_blocks + p / bs], off = p % bs;
        for (int64_t kh = 0; kh < Hkv; kh++) {
            memcpy(k_pool + ((blk * Hkv + kh) * bs + off) * hd, row + q_dim + kh * hd, hd * sizeof(float));
            memcpy(v_pool + ((blk * Hkv + kh) * bs + off) * hd, row + q_dim + kv_dim + kh * hd, hd * sizeof(float));
        }
    }
    const int64_t group = H / Hkv;
    #pragma omp parallel for collapse(2) schedule(static) num_threads(threads)
    for (int64_t i = 0; i < n; i++) {
        for (int64_t hh = 0; hh < H; hh++) {
            const float *q = qkv_out + i * qn + hh * hd;
            const int64_t kh = hh / group, L = pos[i] + 1;
            const int64_t start = window > 0 && L > window ? L - window : 0;
            float *sc = scores + (i * H + hh) * max_keys;
            float mx = -INFINITY;
            for (int64_t t = start; t < L; t++) {
                const int64_t blk = block_table[i * max_blocks + t / bs];
                const float s_ = dot_f32(q, k_pool + ((blk * Hkv + kh) * bs + t % bs) * hd, hd) * scale;
                sc[t - start] = s_;
                if (s_ > mx) mx = s_;
            }
            float sum = 0.f;
            int64_t t = 0;
#ifdef LLMKIT_AVX2
            __m256 vs = _mm256_setzero_ps();
            for (; t + 8 <= L - start; t += 8) {
                const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(sc + t), _mm256_set1_ps(mx)));
                _mm256_storeu_ps(sc + t, e);
                vs = _mm256_add_ps(vs, e);
            }
            sum = hsum8(vs);
#endif
            for (; t < L - start; t++) { sc[t] = expf(sc[t] - mx); sum += sc[t]; }
            float *o = att + i * q_dim + hh * hd;
            for (int64_t j = 0; j < hd; j++) o[j] = 0.f;
            for (int64_t t = start; t < L; t++) {
                const int64_t blk = block_table[i * max_blocks + t / bs];
                const float *vv = v_pool + ((blk * Hkv + kh) * bs + t % bs) * hd;
                const float p_ = sc[t - start] / sum;
                for (int64_t j = 0; j < hd; j++) o[j] += p_ * vv[j];
            }
        }
    }
    linear_rows(proj, att, n, h, xq, dx, threads);  /* h reused for the projection's output (n, d) */
    for (int64_t i = 0; i < n * d; i++) x[i] += h[i];
    for (int64_t i = 0; i < n; i++) rms_norm_row(x + i * d, norm2, eps, d, h + i * d);
    linear_rows(gate, h, n, g, xq, dx, threads);
    linear_rows(up, h, n, u, xq, dx, threads);
    silu_mul(g, u, n * ff, threads);
    linear_rows(down, g, n, h, xq, dx, threads);
    for (int64_t i = 0; i < n * d; i++) x[i] += h[i];
}
