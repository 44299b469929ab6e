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
    const int64_t G = (K + g - 1) / g, B = K / 32, per = g / 32;  /* the last group may be shorter */
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
    const int64_t G = (K + g - 1) / g, B = K / 32, per = g / 32;  /* the last group may be shorter */
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
            for (int64_t t = 0; t < L - start; t++) { sc[t] = expf(sc[t] - mx); sum += sc[t]; }
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
    for (int64_t i = 0; i < n * ff; i++) g[i] = g[i] / (1.f + expf(-g[i])) * u[i];
    linear_rows(down, g, n, h, xq, dx, threads);
    for (int64_t i = 0; i < n * d; i++) x[i] += h[i];
}
