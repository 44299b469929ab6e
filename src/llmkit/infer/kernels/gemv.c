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

/* y[m][n] = sum_k x[m][k] W[n][k];  x: (M, K) with row stride ldx, y: (M, N) with row stride ldy. */
void gemv_f32(const float *x, int64_t M, int64_t ldx, const float *W, float *y, int64_t ldy,
              int64_t N, int64_t K, int threads) {
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

void gemv_q8(const int8_t *xq, const float *dx, int64_t M, const int8_t *q, const float *s, int64_t g,
             float *y, int64_t ldy, int64_t N, int64_t K, int threads) {
    const int64_t G = K / g, B = K / 32, per = g / 32;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = 0; n < N; n++) {
        const int8_t *qn = q + n * K;
        const float *sn = s + n * G;
        for (int64_t m = 0; m < M; m++) {
            const int8_t *xm = xq + m * K;
            const float *dm = dx + m * B;
#ifdef LLMKIT_AVX2
            __m256 acc = _mm256_setzero_ps();
            for (int64_t j = 0; j < B; j++) {
                __m256i d = dot_i8x32(_mm256_loadu_si256((const __m256i *)(qn + j * 32)),
                                      _mm256_loadu_si256((const __m256i *)(xm + j * 32)));
                acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), _mm256_set1_ps(sn[j / per] * dm[j]), acc);
            }
            y[m * ldy + n] = hsum8(acc);
#else
            float acc = 0.f;
            for (int64_t j = 0; j < B; j++) {
                int32_t d = 0;
                for (int t = 0; t < 32; t++) d += (int32_t)qn[j * 32 + t] * xm[j * 32 + t];
                acc += (float)d * sn[j / per] * dm[j];
            }
            y[m * ldy + n] = acc;
#endif
        }
    }
}

void gemv_q4(const int8_t *xq, const float *dx, int64_t M, const uint8_t *q, const float *s, int64_t g,
             float *y, int64_t ldy, int64_t N, int64_t K, int threads) {
    const int64_t G = K / g, B = K / 32, per = g / 32;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = 0; n < N; n++) {
        const uint8_t *qn = q + n * (K / 2);
        const float *sn = s + n * G;
        for (int64_t m = 0; m < M; m++) {
            const int8_t *xm = xq + m * K;
            const float *dm = dx + m * B;
#ifdef LLMKIT_AVX2
            const __m128i low4 = _mm_set1_epi8(0x0F);
            const __m256i eight = _mm256_set1_epi8(8);
            __m256 acc = _mm256_setzero_ps();
            for (int64_t j = 0; j < B; j++) {
                __m128i raw = _mm_loadu_si128((const __m128i *)(qn + j * 16));
                __m256i w = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(raw, 4), low4), _mm_and_si128(raw, low4));
                __m256i d = dot_i8x32(_mm256_sub_epi8(w, eight), _mm256_loadu_si256((const __m256i *)(xm + j * 32)));
                acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), _mm256_set1_ps(sn[j / per] * dm[j]), acc);
            }
            y[m * ldy + n] = hsum8(acc);
#else
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
#endif
        }
    }
}
