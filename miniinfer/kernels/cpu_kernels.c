// MiniInfer's CPU kernels (x86-64 with AVX-512), built at run time by cpu_kernels.py
// (gcc -O3 -march=native -fopenmp) and called through ctypes:
//   q4_1_gemm               Y[M, N] = X[M, K] @ W[N, K]^T, W in GGUF's Q4_1 kept 4-bit, fp32 X, Y
//   q8_0_gemm               the same for GGUF's Q8_0 (w = d * q, q int8; e.g. a tied LM head)
//   paged_decode_attention  one query token per sequence against its paged fp32 K/V cache
//   rms_norm, silu_and_mul  a decoder layer's element-wise ops (fp32), one call each
//   rope_neox, store_kv     RoPE on q and k together; the new K/V rows into their cache slots
//
// Q4_1: blocks of 32 weights along K; w = d * q + m with fp16 d, m and q in 0..15.
// The weights are regrouped once at load time so that one 512-bit register holds the
// nibbles of 16 output rows (one 32-bit lane per row); a "record" covers 16 rows x one
// 32-wide block of K, 320 bytes:
//
//     bytes [0, 32)            d of rows 0..15 (fp16)
//     bytes [32, 64)           m of rows 0..15 (fp16)
//     bytes [64 + 64h, +64)    lane l = row l's nibble bytes 4h..4h+3   (h = 0..3)
//
// A nibble byte j holds weight j (low nibble) and weight j + 16 (high nibble), so nibble s
// (0..7) of lane l in group h is weight 4h + s/2 (+16 when s is odd). The product is
//
//     y[n] = sum_b ( d[n,b] * sum_j q[n,b,j] x[32b+j] + m[n,b] * sum_j x[32b+j] )
//
// with every sum in fp32: the same arithmetic as an fp32 GEMM over the dequantized
// weights, in another order. Each lane accumulates one output row: no horizontal sums.
#include <immintrin.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>

#if !defined(__AVX512F__)
#error "cpu_kernels.c needs AVX-512F"
#endif

#define ROWS 16          // output rows per record / per vector
#define RECORD_Q4_1 320  // bytes per Q4_1 record: 16 d, 16 m (fp16), 16 x 16 nibble bytes
#define RECORD_Q8_0 544  // bytes per Q8_0 record: 16 d (fp16), 16 x 32 int8
#define TILE_M 6         // activation rows per register tile
#define CHUNK_M 96       // activation rows kept hot in cache per pass over the weights

#define INLINE static inline __attribute__((always_inline))

// One record group (16 rows, all K blocks) times mr activation rows starting at m0.
// q8 = 0: Q4_1 records (see the top of the file). q8 = 1: Q8_0 records, w = d * q with q
// int8: bytes [0, 32) the 16 fp16 d, then for h = 0..7 a 64-byte group whose lane l holds
// row l's weights 4h..4h+3.
INLINE void tile(const uint8_t* rec, const float* X, const float* xsum, float* Y,
                 int N, int K, int n0, int m0, const int mr, const int q8) {
    const int nb = K / 32;
    const int record = q8 ? RECORD_Q8_0 : RECORD_Q4_1;
    const int chains = mr == 1 ? 4 : (mr == 2 ? 2 : 1);  // independent FMA chains at small mr
    const __m512 nibble_value = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    __m512 acc[TILE_M];
    for (int i = 0; i < mr; i++) acc[i] = _mm512_setzero_ps();
    for (int b = 0; b < nb; b++, rec += record) {
        __m512 part[TILE_M][4];
        for (int i = 0; i < mr; i++)
            for (int c = 0; c < chains; c++) part[i][c] = _mm512_setzero_ps();
#pragma GCC unroll 8
        for (int h = 0; h < (q8 ? 8 : 4); h++) {
            const __m512i packed = _mm512_loadu_si512(rec + (q8 ? 32 : 64) + 64 * h);
#pragma GCC unroll 8
            for (int s = 0; s < (q8 ? 4 : 8); s++) {
                __m512 q;
                int k;
                if (q8) {  // byte s of each lane, sign-extended
                    q = _mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(packed, 24 - 8 * s), 24));
                    k = 32 * b + 4 * h + s;
                } else {  // nibble s: its low 4 bits index the 0..15 table
                    q = _mm512_permutexvar_ps(s ? _mm512_srli_epi32(packed, 4 * s) : packed, nibble_value);
                    k = 32 * b + 4 * h + (s >> 1) + ((s & 1) ? 16 : 0);
                }
                const int c = (8 * h + s) % chains;
#pragma GCC unroll 6
                for (int i = 0; i < mr; i++)
                    part[i][c] = _mm512_fmadd_ps(q, _mm512_set1_ps(X[(size_t)(m0 + i) * K + k]), part[i][c]);
            }
        }
        const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)rec));
        const __m512 m = q8 ? _mm512_setzero_ps() : _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(rec + 32)));
#pragma GCC unroll 6
        for (int i = 0; i < mr; i++) {
            __m512 p = part[i][0];
            for (int c = 1; c < chains; c++) p = _mm512_add_ps(p, part[i][c]);
            acc[i] = _mm512_fmadd_ps(d, p, acc[i]);
            if (!q8) acc[i] = _mm512_fmadd_ps(m, _mm512_set1_ps(xsum[(size_t)(m0 + i) * nb + b]), acc[i]);
        }
    }
    for (int i = 0; i < mr; i++) _mm512_storeu_ps(Y + (size_t)(m0 + i) * N + n0, acc[i]);
}

static void group_rows(const uint8_t* rec, const float* X, const float* xsum, float* Y,
                       int N, int K, int n0, int m_begin, int m_end, const int q8) {
    int m = m_begin;
    for (; m + TILE_M <= m_end; m += TILE_M) tile(rec, X, xsum, Y, N, K, n0, m, TILE_M, q8);
    switch (m_end - m) {  // constant mr per call: the compiler unrolls each
        case 5: tile(rec, X, xsum, Y, N, K, n0, m, 5, q8); break;
        case 4: tile(rec, X, xsum, Y, N, K, n0, m, 4, q8); break;
        case 3: tile(rec, X, xsum, Y, N, K, n0, m, 3, q8); break;
        case 2: tile(rec, X, xsum, Y, N, K, n0, m, 2, q8); break;
        case 1: tile(rec, X, xsum, Y, N, K, n0, m, 1, q8); break;
        default: break;
    }
}

// packed: N/16 * K/32 records; X: [M, K]; xsum: scratch of M * K/32 floats (Q4_1 only);
// Y: [M, N]. N must be a multiple of 16 and K of 32 (the Python side checks).
static void gemm(const uint8_t* packed, const float* X, float* xsum, float* Y, int M, int N, int K,
                 const int q8) {
    const int nb = K / 32, groups = N / ROWS, record = q8 ? RECORD_Q8_0 : RECORD_Q4_1;
    for (int j = 0; !q8 && j < M * nb; j++) {
        const __m512 a = _mm512_loadu_ps(X + (size_t)j * 32), c = _mm512_loadu_ps(X + (size_t)j * 32 + 16);
        xsum[j] = _mm512_reduce_add_ps(_mm512_add_ps(a, c));
    }
#pragma omp parallel
    for (int mc = 0; mc < M; mc += CHUNK_M) {
        const int me = mc + CHUNK_M < M ? mc + CHUNK_M : M;
#pragma omp for schedule(static)
        for (int g = 0; g < groups; g++)
            group_rows(packed + (size_t)g * nb * record, X, xsum, Y, N, K, g * ROWS, mc, me, q8);
    }
}

void q4_1_gemm(const uint8_t* packed, const float* X, float* Y, int M, int N, int K) {
    float* xsum = (float*)malloc(sizeof(float) * (size_t)M * (K / 32));  // per-block sums of x
    if (!xsum) return;  // (M * K / 32 floats: never large; Y is left as allocated)
    gemm(packed, X, xsum, Y, M, N, K, 0);
    free(xsum);
}

void q8_0_gemm(const uint8_t* packed, const float* X, float* Y, int M, int N, int K) {
    gemm(packed, X, 0, Y, M, N, K, 1);
}

// ------------------------------------------------------------------------------------------
// exp(x) for x <= 0, 16 lanes: 2^k * p(r) with k = round(x / ln 2), r = x - k ln 2 (ln 2 split
// in two for accuracy), p a degree-6 Taylor polynomial: relative error ~1e-7 on |r| <= ln2/2.
// (libm's scalar expf made the softmax the slowest part of decode attention.)
INLINE __m512 exp_nonpositive(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));  // exp(-87) ~ 1.6e-38: underflow to ~0
    const __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693145751953125f), x);
    r = _mm512_fnmadd_ps(k, _mm512_set1_ps(1.428606765330187e-06f), r);
    __m512 p = _mm512_set1_ps(1.0f / 720);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, k);
}

// s[t] <- exp(s[t] - mx) for t < n; returns their sum.
static float exp_minus_max(float* s, int n, float mx) {
    const __m512 m = _mm512_set1_ps(mx);
    __m512 total = _mm512_setzero_ps();
    int t = 0;
    for (; t + 16 <= n; t += 16) {
        const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(s + t), m));
        _mm512_storeu_ps(s + t, e);
        total = _mm512_add_ps(total, e);
    }
    if (t < n) {
        const __mmask16 live = (__mmask16)((1u << (n - t)) - 1);
        const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(live, s + t), m));
        _mm512_mask_storeu_ps(s + t, live, e);
        total = _mm512_mask_add_ps(total, live, total, e);
    }
    return _mm512_reduce_add_ps(total);
}

// ------------------------------------------------------------------------------------------
// Decode attention over the paged cache: q [B, H, D], caches [blocks, block_size, Hkv, D],
// block_tables [B, bt_stride], seq_lens [B] (tokens to attend, including the new one, whose
// K/V are already stored), out [B, H, D]; scores: scratch of B * H * max_len floats.
// Query head j of sequence b reads KV head j / (H / Hkv). fp32 softmax with the max
// subtracted. One (sequence, KV head) pair per task: its K/V rows are read once for all the
// query heads that share them.
// One (sequence, KV head) task with head_dim = 16 * dv: each query head of the group in turn,
// its q (QK) or its output (PV) held in dv registers while the sequence's rows stream by
// (they stay in L1/L2 between the group's heads).
INLINE void attend_task(const float* qh, const float* k_cache, const float* v_cache, const int32_t* table,
                        int L, float* s, int max_len, float* oh, int group, int Hkv, int kvh, int D,
                        int block_size, float scale, const int dv) {
    const size_t token_stride = (size_t)Hkv * D;  // floats between consecutive tokens of a block
    for (int j = 0; j < group; j++) {
        __m512 qv[8];
        for (int c = 0; c < dv; c++) qv[c] = _mm512_loadu_ps(qh + (size_t)j * D + 16 * c);
        float* sj = s + (size_t)j * max_len;
        for (int t0 = 0, blk = 0; t0 < L; t0 += block_size, blk++) {
            const int n = L - t0 < block_size ? L - t0 : block_size;
            const float* kb = k_cache + ((size_t)table[blk] * block_size * Hkv + kvh) * D;
            for (int i = 0; i < n; i++) {
                const float* kv = kb + i * token_stride;
                __m512 acc = _mm512_mul_ps(qv[0], _mm512_loadu_ps(kv));
                for (int c = 1; c < dv; c++) acc = _mm512_fmadd_ps(qv[c], _mm512_loadu_ps(kv + 16 * c), acc);
                sj[t0 + i] = _mm512_reduce_add_ps(acc) * scale;
            }
        }
        float mx = -INFINITY;
#pragma omp simd reduction(max : mx)
        for (int t = 0; t < L; t++) mx = sj[t] > mx ? sj[t] : mx;
        const __m512 inv = _mm512_set1_ps(1.0f / exp_minus_max(sj, L, mx));
        __m512 o[8];
        for (int c = 0; c < dv; c++) o[c] = _mm512_setzero_ps();
        for (int t0 = 0, blk = 0; t0 < L; t0 += block_size, blk++) {
            const int n = L - t0 < block_size ? L - t0 : block_size;
            const float* vb = v_cache + ((size_t)table[blk] * block_size * Hkv + kvh) * D;
            for (int i = 0; i < n; i++) {
                const float* vv = vb + i * token_stride;
                const __m512 pr = _mm512_set1_ps(sj[t0 + i]);
                for (int c = 0; c < dv; c++) o[c] = _mm512_fmadd_ps(pr, _mm512_loadu_ps(vv + 16 * c), o[c]);
            }
        }
        for (int c = 0; c < dv; c++) _mm512_storeu_ps(oh + (size_t)j * D + 16 * c, _mm512_mul_ps(o[c], inv));
    }
}

void paged_decode_attention(const float* q, const float* k_cache, const float* v_cache,
                            const int32_t* block_tables, int bt_stride, const int32_t* seq_lens,
                            float* out, float* scores, int B, int H, int Hkv, int D, int block_size,
                            int max_len, float scale) {
    // D is a multiple of 16 and at most 128 (checked in Python): head vectors fit in registers.
    const int group = H / Hkv;
#pragma omp parallel for collapse(2) schedule(dynamic, 1)
    for (int b = 0; b < B; b++) {
        for (int kvh = 0; kvh < Hkv; kvh++) {
            const size_t first = (size_t)b * H + (size_t)kvh * group;  // first query head of the group
            const int32_t* table = block_tables + (size_t)b * bt_stride;
            const float* qh = q + first * D;
            float* s = scores + first * max_len;
            float* oh = out + first * D;
            switch (D / 16) {  // a constant register count per call: the loops over it unroll
                case 4: attend_task(qh, k_cache, v_cache, table, seq_lens[b], s, max_len, oh, group, Hkv, kvh, D, block_size, scale, 4); break;
                case 8: attend_task(qh, k_cache, v_cache, table, seq_lens[b], s, max_len, oh, group, Hkv, kvh, D, block_size, scale, 8); break;
                default: attend_task(qh, k_cache, v_cache, table, seq_lens[b], s, max_len, oh, group, Hkv, kvh, D, block_size, scale, D / 16); break;
            }
        }
    }
}

// ------------------------------------------------------------------------------------------
// Element-wise ops of a decoder layer, fp32, rows of length n (a multiple of 16).

static float sum_of_squares(const float* x, int n) {
    __m512 acc = _mm512_setzero_ps();
    for (int i = 0; i < n; i += 16) {
        const __m512 v = _mm512_loadu_ps(x + i);
        acc = _mm512_fmadd_ps(v, v, acc);
    }
    return _mm512_reduce_add_ps(acc);
}

// out[r] = x[r] / sqrt(mean(x[r]^2) + eps) * weight; with residual != 0, first
// residual[r] += x[r] and the norm is taken of the sum (x is not modified; out may be x).
void rms_norm(const float* x, float* residual, const float* weight, float* out, int rows, int n, float eps) {
#pragma omp parallel for schedule(static) if (rows >= 64)
    for (int r = 0; r < rows; r++) {
        const float* src = x + (size_t)r * n;
        if (residual) {
            float* res = residual + (size_t)r * n;
            for (int i = 0; i < n; i += 16)
                _mm512_storeu_ps(res + i, _mm512_add_ps(_mm512_loadu_ps(res + i), _mm512_loadu_ps(src + i)));
            src = res;
        }
        const __m512 scale = _mm512_set1_ps(1.0f / sqrtf(sum_of_squares(src, n) / (float)n + eps));
        float* dst = out + (size_t)r * n;
        for (int i = 0; i < n; i += 16)
            _mm512_storeu_ps(dst + i, _mm512_mul_ps(_mm512_mul_ps(_mm512_loadu_ps(src + i), scale),
                                                    _mm512_loadu_ps(weight + i)));
    }
}

// out[r, i] = silu(x[r, i]) * x[r, n + i] for x [rows, 2n], out [rows, n].
// silu(g) = g * sigmoid(g), sigmoid from e = exp(-|g|) <= 1 (no overflow either side).
void silu_and_mul(const float* x, float* out, int rows, int n) {
#pragma omp parallel for schedule(static) if (rows >= 64)
    for (int r = 0; r < rows; r++) {
        const float* gate = x + (size_t)r * 2 * n;
        const float* up = gate + n;
        float* dst = out + (size_t)r * n;
        for (int i = 0; i < n; i += 16) {
            const __m512 g = _mm512_loadu_ps(gate + i);
            const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(g)));
            const __m512 one = _mm512_set1_ps(1.0f);
            const __mmask16 positive = _mm512_cmp_ps_mask(g, _mm512_setzero_ps(), _CMP_GE_OQ);
            const __m512 num = _mm512_mask_blend_ps(positive, e, one);  // g >= 0: 1, else e
            const __m512 sig = _mm512_div_ps(num, _mm512_add_ps(one, e));
            _mm512_storeu_ps(dst + i, _mm512_mul_ps(_mm512_mul_ps(g, sig), _mm512_loadu_ps(up + i)));
        }
    }
}

// NeoX RoPE: out[t, h] = rotate(x[t, h]) for the first `rot` of D dims (the rest copied);
// x rows are `row_stride` floats apart (q and k side by side in the qkv output), out is
// [T, heads, D]; cos_sin rows: cos for rot/2 dims, then sin.
void rope_neox(const float* x, long row_stride, int T, int heads, int D, int rot,
               const int64_t* positions, const float* cos_sin, float* out) {
    const int half = rot / 2;
    for (int t = 0; t < T; t++) {
        const float* cs = cos_sin + (size_t)positions[t] * rot;
        for (int h = 0; h < heads; h++) {
            const float* src = x + (size_t)t * row_stride + (size_t)h * D;
            float* dst = out + ((size_t)t * heads + h) * D;
            for (int i = 0; i < half; i++) {
                const float c = cs[i], s = cs[half + i], x1 = src[i], x2 = src[half + i];
                dst[i] = x1 * c - x2 * s;
                dst[half + i] = x2 * c + x1 * s;
            }
            for (int i = rot; i < D; i++) dst[i] = src[i];
        }
    }
}

// Copy the step's new K and V rows (width floats each, rows `k_stride` / `v_stride` apart)
// into their cache slots; slot -1 is skipped.
void store_kv(const float* k, long k_stride, const float* v, long v_stride, const int64_t* slots,
              float* k_cache, float* v_cache, int T, int width) {
    for (int t = 0; t < T; t++) {
        const int64_t slot = slots[t];
        if (slot < 0) continue;
        memcpy(k_cache + (size_t)slot * width, k + (size_t)t * k_stride, sizeof(float) * width);
        memcpy(v_cache + (size_t)slot * width, v + (size_t)t * v_stride, sizeof(float) * width);
    }
}
