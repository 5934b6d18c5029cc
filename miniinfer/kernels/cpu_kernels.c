// MiniInfer's CPU kernels, built at run time by cpu_kernels.py and called through ctypes:
//   q4_1_gemm               Y[M, N] = X[M, K] @ W[N, K]^T, W in GGUF's Q4_1 kept 4-bit, fp32 X, Y
//   q4_1_gemm_int8          the same with X quantized to int8 per row and 32-block (as llama.cpp's
//                           Q8_1) and integer dot products: AVX-512 VNNI, or AVX2 vpmaddubsw
//   q8_0_gemm               the same for GGUF's Q8_0 (w = d * q, q int8; e.g. a tied LM head)
//   paged_decode_attention  one query token per sequence against its paged fp32 K/V cache
//                           (optionally a tree-mask row: speculative verify of a draft tree)
//   rms_norm, silu_and_mul  a decoder layer's element-wise ops (fp32), one call each
//   rope_neox, store_kv     RoPE on q and k together; the new K/V rows into their cache slots
//
// Every kernel has three implementations, picked at run time (miniinfer_set_isa, below):
//   avx512  AVX-512F (+ FMA, F16C)                         x86-64
//   avx2    AVX2 + FMA + F16C                              x86-64
//   scalar  portable C, vectorised by the compiler for the build's baseline (SSE2 on x86-64,
//           NEON on ARM64): any machine
// The library is built without -march: one build runs on every machine of its architecture.
// This file includes itself once per ISA (MI_ISA = 0 scalar, 1 avx2, 2 avx512), the x86
// passes under `#pragma GCC target`, so only that pass's functions (named name_<isa> through
// F()) may use its instructions; the exported functions at the end call the chosen pass's
// through a table. rope_neox and store_kv are one portable source compiled in every pass.
//
// Q4_1: blocks of 32 weights along K; w = d * q + m with fp16 d, m and q in 0..15.
// The weights are regrouped once at load time (the same layout for every ISA) so that one
// 512-bit register holds the nibbles of 16 output rows (one 32-bit lane per row; AVX2 takes
// them as two 256-bit halves of 8 rows); a "record" covers 16 rows x one 32-wide block of K,
// 320 bytes:
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
// Q8_0 records (544 bytes): the 16 fp16 d, then for h = 0..7 a 64-byte group whose lane l
// holds row l's int8 weights 4h..4h+3.

#ifndef MI_ISA  // ------------------------------------------------------- shared definitions
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) && !defined(MI_PORTABLE_ONLY)  // -DMI_PORTABLE_ONLY: the build of other
#include <immintrin.h>                                 // architectures, on x86-64 (a test builds it)
#define MI_X86 1
#else
#define MI_X86 0
#endif

#define ROWS 16          // output rows per record
#define RECORD_Q4_1 320  // bytes per Q4_1 record: 16 d, 16 m (fp16), 16 x 16 nibble bytes
#define RECORD_Q8_0 544  // bytes per Q8_0 record: 16 d (fp16), 16 x 32 int8
#define CHUNK_M 96       // activation rows kept hot in cache per pass over the weights
#define CHUNK_M_Q8 256   // the same for int8 activation rows (K bytes each)
#define MAX_HEAD_DIM 128

#define INLINE static inline __attribute__((always_inline))

// fp16 bits -> fp32 without F16C (scalar pass); exact for every value, subnormals included.
static inline float half_to_float(const uint8_t* p) {
    const uint16_t h = (uint16_t)(p[0] | p[1] << 8);
    const uint32_t exponent = (h >> 10) & 0x1f, mantissa = h & 0x3ff;
    float f;
    if (exponent == 0) {
        f = (float)mantissa * 0x1p-24f;  // zero and subnormals (no subnormal float arithmetic)
    } else {
        const uint32_t bits = exponent == 0x1f ? 0x7f800000u | mantissa << 13  // inf, nan
                                               : (exponent + 112) << 23 | mantissa << 13;
        memcpy(&f, &bits, sizeof f);
    }
    return (h & 0x8000) ? -f : f;
}

// A tree row (the verify of a draft tree) of L keys sees every key below the window [L - 64, L)
// and key L - 64 + i of the window iff bit i of `bits` is set (bits == -1: not a tree row, never
// called). The others get -inf before the softmax; the exps clamp at exp(-87) ~ 1e-38, so a
// masked key weighs nothing next to the row's own key in fp32.
static inline void mask_tree_window(float* s, int L, int64_t bits) {
    const int w0 = L - 64;
    for (int t = w0 > 0 ? w0 : 0; t < L; t++)
        if (!(((uint64_t)bits >> (t - w0)) & 1)) s[t] = -INFINITY;
}

// ---- one pass per ISA (#include "cpu_kernels.c": this file, found next to itself however the
// compiler was called)
#define MI_ISA 0
#include "cpu_kernels.c"
#undef MI_ISA

#if MI_X86 && defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#define MI_ISA 1
#include "cpu_kernels.c"
#undef MI_ISA
#pragma clang attribute pop
#pragma clang attribute push(__attribute__((target("avx512f,avx2,fma,f16c"))), apply_to = function)
#define MI_ISA 2
#include "cpu_kernels.c"
#undef MI_ISA
#pragma clang attribute pop
#elif MI_X86
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define MI_ISA 1
#include "cpu_kernels.c"
#undef MI_ISA
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx2,fma,f16c")
#define MI_ISA 2
#include "cpu_kernels.c"
#undef MI_ISA
#pragma GCC pop_options
#endif

// ---- run-time dispatch
typedef struct {
    void (*gemm)(const uint8_t*, const float*, float*, float*, int, int, int, int);
    void (*paged_decode_attention)(const float*, const float*, const float*, const int32_t*, int,
                                   const int32_t*, const int64_t*, float*, float*, int, int, int, int, int,
                                   int, float);
    void (*rms_norm)(const float*, float*, const float*, float*, int, int, float);
    void (*silu_and_mul)(const float*, float*, int, int);
    void (*rope_neox)(const float*, long, int, int, int, int, const int64_t*, const float*, float*);
    void (*store_kv)(const float*, long, const float*, long, const int64_t*, float*, float*, int, int);
} Kernels;

#define KERNELS(isa) {gemm_##isa, paged_decode_attention_##isa, rms_norm_##isa, silu_and_mul_##isa, \
                      rope_neox_##isa, store_kv_##isa}
static const Kernels kernel_table[] = {
    KERNELS(scalar),
#if MI_X86
    KERNELS(avx2),
    KERNELS(avx512),
#endif
};

// Bit i set: ISA i (0 scalar, 1 avx2, 2 avx512) runs on this CPU (and the OS saves its
// registers: __builtin_cpu_supports checks XCR0 too).
int miniinfer_cpu_isas(void) {
    int mask = 1;
#if MI_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) {
        mask |= 2;
        if (__builtin_cpu_supports("avx512f")) mask |= 4;
    }
#endif
    return mask;
}

typedef void (*GemmQ8)(const uint8_t*, const int8_t*, const float*, const float*, float*, int, int, int);

static int active_isa = 0;
static const Kernels* active = &kernel_table[0];
static GemmQ8 active_q8 = 0;  // Q4_1 x int8 activations of the active path (none: portable)

#if MI_X86
static int cpu_has_avx512_vnni(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vnni");
}
#endif

// Use ISA `isa` from now on; returns it, or -1 (and changes nothing) where this CPU can't.
int miniinfer_set_isa(int isa) {
    if (isa < 0 || isa > 2 || !(miniinfer_cpu_isas() >> isa & 1)) return -1;
    active = &kernel_table[isa];
    active_isa = isa;
#if MI_X86
    active_q8 = isa == 2 && cpu_has_avx512_vnni() ? gemm_q8_avx512 : isa >= 1 ? gemm_q8_avx2 : 0;
#endif
    return isa;
}

int miniinfer_isa(void) { return active_isa; }

__attribute__((constructor)) static void pick_best_isa(void) {
    const int mask = miniinfer_cpu_isas();
    miniinfer_set_isa(mask & 4 ? 2 : mask & 2 ? 1 : 0);
}

void q4_1_gemm(const uint8_t* packed, const float* X, float* Y, int M, int N, int K) {
    float* xsum = (float*)malloc(sizeof(float) * (size_t)M * (K / 32));  // per-block sums of x
    if (!xsum) return;  // (M * K / 32 floats: never large; Y is left as allocated)
    active->gemm(packed, X, xsum, Y, M, N, K, 0);
    free(xsum);
}

// X [rows, K] -> int8 per 32-block (Q8_1 as llama.cpp): xq = round(x / xd), xd = max|x| / 127,
// xs = xd * sum(xq) (the sum of the values the products see: the result is then exactly a GEMM
// of the dequantized weights and dequantized activations, up to fp32 summation order).
static void quantize_q8(const float* X, int8_t* xq, float* xd, float* xs, size_t blocks) {
    for (size_t j = 0; j < blocks; j++) {
        const float* x = X + 32 * j;
        float amax = 0.0f;
        for (int i = 0; i < 32; i++) {
            const float a = fabsf(x[i]);
            amax = a > amax ? a : amax;
        }
        const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
        int sum = 0;
        for (int i = 0; i < 32; i++) {
            const float r = (x[i] * inv + 12582912.0f) - 12582912.0f;  // round to nearest (|.| <= 127)
            const int q = (int)r;
            xq[32 * j + i] = (int8_t)q;
            sum += q;
        }
        xd[j] = amax / 127.0f;
        xs[j] = xd[j] * (float)sum;
    }
}

// Bytes of int8-activation scratch for `rows` rows of K: q8_scratch_gemm's `scratch`.
static size_t q8_scratch_bytes(int rows, int K) { return (size_t)rows * (K / 32) * (32 + 2 * sizeof(float)); }

// Q4_1 x int8 activations with the active path's int8 kernel (which must exist). Row i's result
// depends on row i alone (quantize_q8 and every q8_tile are per row): the same bits for any M.
static void q8_scratch_gemm(const uint8_t* packed, const float* X, float* Y, int M, int N, int K, void* scratch) {
    const size_t blocks = (size_t)M * (K / 32);
    float* xd = (float*)scratch;
    float* xs = xd + blocks;
    int8_t* xq = (int8_t*)(xs + blocks);
    quantize_q8(X, xq, xd, xs, blocks);
    active_q8(packed, xq, xd, xs, Y, M, N, K);
}

// Q4_1 x int8 activations where the active path has it (avx512: VNNI, else the AVX2 code;
// avx2: AVX2): returns 0; on the portable path it runs q4_1_gemm (fp32) and returns 1.
int q4_1_gemm_int8(const uint8_t* packed, const float* X, float* Y, int M, int N, int K) {
    if (!active_q8) {
        q4_1_gemm(packed, X, Y, M, N, K);
        return 1;
    }
    void* scratch = malloc(q8_scratch_bytes(M, K));
    if (!scratch) return 2;  // (M * K * 1.25 bytes: never large; Y is left as allocated)
    q8_scratch_gemm(packed, X, Y, M, N, K, scratch);
    free(scratch);
    return 0;
}

// Which int8 kernel q4_1_gemm_int8 runs now: 0 none (fp32), 1 AVX2 (vpmaddubsw), 2 AVX-512 VNNI.
int miniinfer_int8_kernel(void) {
#if MI_X86
    return active_q8 == gemm_q8_avx512 ? 2 : active_q8 == gemm_q8_avx2 ? 1 : 0;
#else
    return 0;
#endif
}

void q8_0_gemm(const uint8_t* packed, const float* X, float* Y, int M, int N, int K) {
    active->gemm(packed, X, 0, Y, M, N, K, 1);
}

// The exported kernels check what would make them read or write out of bounds (cheap loops
// here instead of torch reductions per call in Python) and return nonzero, doing nothing, when
// it fails; the Python side raises.

// tree_bits: NULL, or B int64 (-1: a plain row; else a tree row, whose seq_lens entry must be
// its sequence's whole KV length: see mask_tree_window).
// Returns 1 (nothing done) if a seq_len is outside [1, min(max_len, bt_stride * block_size)],
// 2 if a block that a sequence reads is outside [0, num_blocks), 3 if out of memory.
int paged_decode_attention(const float* q, const float* k_cache, const float* v_cache,
                           const int32_t* block_tables, int bt_stride, const int32_t* seq_lens,
                           float* out, int B, int H, int Hkv, int D, int block_size, int max_len,
                           float scale, int num_blocks, const int64_t* tree_bits) {
    const long limit = max_len < (long)bt_stride * block_size ? max_len : (long)bt_stride * block_size;
    for (int b = 0; b < B; b++) {
        if (seq_lens[b] < 1 || seq_lens[b] > limit) return 1;
        const int32_t* table = block_tables + (size_t)b * bt_stride;
        for (int i = 0; i < (seq_lens[b] + block_size - 1) / block_size; i++)
            if (table[i] < 0 || table[i] >= num_blocks) return 2;
    }
    if (B == 0) return 0;
    float* scores = (float*)malloc(sizeof(float) * (size_t)B * H * max_len);  // softmax rows
    if (!scores) return 3;
    active->paged_decode_attention(q, k_cache, v_cache, block_tables, bt_stride, seq_lens, tree_bits, out,
                                   scores, B, H, Hkv, D, block_size, max_len, scale);
    free(scores);
    return 0;
}

void rms_norm(const float* x, float* residual, const float* weight, float* out, int rows, int n, float eps) {
    active->rms_norm(x, residual, weight, out, rows, n, eps);
}

void silu_and_mul(const float* x, float* out, int rows, int n) { active->silu_and_mul(x, out, rows, n); }

// Returns 1 (nothing done) if a position is outside [0, n_positions).
int rope_neox(const float* x, long row_stride, int T, int heads, int D, int rot,
              const int64_t* positions, const float* cos_sin, float* out, long n_positions) {
    for (int t = 0; t < T; t++)
        if (positions[t] < 0 || positions[t] >= n_positions) return 1;
    active->rope_neox(x, row_stride, T, heads, D, rot, positions, cos_sin, out);
    return 0;
}

// Returns 1 (nothing done) if a slot is outside [-1, n_slots).
int store_kv(const float* k, long k_stride, const float* v, long v_stride, const int64_t* slots,
             float* k_cache, float* v_cache, int T, int width, long n_slots) {
    for (int t = 0; t < T; t++)
        if (slots[t] < -1 || slots[t] >= n_slots) return 1;
    active->store_kv(k, k_stride, v, v_stride, slots, k_cache, v_cache, T, width);
    return 0;
}

// A step's new tokens through L decoder layers in one call, the exported kernels above chained
// without returning to Python (batch-1 decode spent ~40 % of its step in the Python between
// them). Row b is one token: its position, cache slot, block table and the number of keys it
// sees (a decode: its sequence's length; a token of an extend chunk: up to itself, as in
// paged_decode_attention's rows; a tree row: its sequence's length, masked by tree_bits[b],
// tree_bits NULL or B int64 as there). Every row's K/V is stored before any row attends. Per layer
// (Llama / Qwen2 / Qwen3):
//   residual += hidden; xn = rms_norm(residual) * ln1          (layer 0: residual starts at 0)
//   qkv = xn @ Wqkv.T (+ bias); [Qwen3: q, k rms-normed per head]; q, k NeoX-rotated
//   K/V stored at their slots; attn = paged decode attention; hidden = attn @ Wo.T
//   residual += hidden; xn = rms_norm(residual) * ln2; hidden = down(silu(gate) * up)
// The caller applies the final norm (residual += hidden). `layers` holds DECODE_PTRS int64 per
// layer: Wqkv, Wo, Wgate_up, Wdown (packed), their formats (0 Q4_1, 1 Q8_0), qkv bias or 0,
// ln1, ln2, q_norm or 0, k_norm or 0, k_cache, v_cache. Scratch: decode_scratch_floats().
// int8 != 0: every Q4_1 GEMM takes int8 activations as q4_1_gemm_int8 (the portable path: fp32);
// Q8_0 ones stay fp32.
// Returns what the exported kernels return for the same bad input (1: a position, slot or
// seq_len out of range, 2: a block out of range), or 3 out of memory, doing nothing.
#define DECODE_PTRS 15

long decode_scratch_floats(int B, int H, int Hq, int Hkv, int D, int I) {
    const long qkv = (long)(Hq + 2 * Hkv) * D;
    return (long)B * (H + qkv + 2L * (Hq + Hkv) * D + (long)Hq * D + 2L * I + I);
}

int decode_layers(const int64_t* layers, int L, float* hidden, float* residual, float* scratch,
                  int B, int H, int Hq, int Hkv, int D, int I, float eps,
                  const int64_t* positions, const float* cos_sin, int rot, long n_positions,
                  const int64_t* slots, long n_slots, const int32_t* block_tables, int bt_stride,
                  const int32_t* seq_lens, int block_size, int max_len, float scale, int num_blocks,
                  const int64_t* tree_bits, int int8) {
    const long limit = max_len < (long)bt_stride * block_size ? max_len : (long)bt_stride * block_size;
    for (int b = 0; b < B; b++) {
        if (positions[b] < 0 || positions[b] >= n_positions || slots[b] < -1 || slots[b] >= n_slots) return 1;
        if (seq_lens[b] < 1 || seq_lens[b] > limit) return 1;
        const int32_t* table = block_tables + (size_t)b * bt_stride;
        for (int i = 0; i < (seq_lens[b] + block_size - 1) / block_size; i++)
            if (table[i] < 0 || table[i] >= num_blocks) return 2;
    }
    const int nqkv = (Hq + 2 * Hkv) * D, kv = Hkv * D;
    float* xn = scratch;                               // [B, H]
    float* qkv = xn + (size_t)B * H;                   // [B, nqkv]
    float* qn = qkv + (size_t)B * nqkv;                // [B, Hq, D]  (normed, Qwen3)
    float* kn = qn + (size_t)B * Hq * D;               // [B, Hkv, D]
    float* qr = kn + (size_t)B * kv;                   // [B, Hq, D]  rotated
    float* kr = qr + (size_t)B * Hq * D;               // [B, Hkv, D]
    float* attn = kr + (size_t)B * kv;                 // [B, Hq, D]
    float* gu = attn + (size_t)B * Hq * D;             // [B, 2I]
    float* act = gu + (size_t)B * 2 * I;               // [B, I]
    float* scores = (float*)malloc(sizeof(float) * (size_t)B * Hq * max_len);
    float* xsum = (float*)malloc(sizeof(float) * (size_t)B * ((H > I ? H : I) + Hq * D) / 32 + 64);
    int kmax = H > I ? H : I;  // the widest GEMM input
    if (Hq * D > kmax) kmax = Hq * D;
    void* q8 = int8 && active_q8 ? malloc(q8_scratch_bytes(B, kmax)) : 0;  // 0: every GEMM fp32
    if (!scores || !xsum || (int8 && active_q8 && !q8)) { free(scores); free(xsum); free(q8); return 3; }
    memset(residual, 0, sizeof(float) * (size_t)B * H);
#define GEMM(w, fmt, X, Y, N, K)                                                                 \
    do {                                                                                        \
        if (q8 && !(fmt)) q8_scratch_gemm((const uint8_t*)(w), X, Y, B, N, K, q8);              \
        else active->gemm((const uint8_t*)(w), X, (fmt) ? 0 : xsum, Y, B, N, K, (int)(fmt));    \
    } while (0)
    for (int l = 0; l < L; l++) {
        const int64_t* p = layers + (size_t)l * DECODE_PTRS;
        const float* bias = (const float*)p[8];
        const float *q_norm = (const float*)p[11], *k_norm = (const float*)p[12];
        float *k_cache = (float*)p[13], *v_cache = (float*)p[14];
        active->rms_norm(hidden, residual, (const float*)p[9], xn, B, H, eps);
        GEMM(p[0], p[4], xn, qkv, nqkv, H);
        if (bias)
            for (int b = 0; b < B; b++)
                for (int j = 0; j < nqkv; j++) qkv[(size_t)b * nqkv + j] += bias[j];
        const float *qsrc = qkv, *ksrc = qkv + (size_t)Hq * D;
        long qstride = nqkv, kstride = nqkv;
        if (q_norm) {
            for (int b = 0; b < B; b++) {
                active->rms_norm(qkv + (size_t)b * nqkv, 0, q_norm, qn + (size_t)b * Hq * D, Hq, D, eps);
                active->rms_norm(qkv + (size_t)b * nqkv + (size_t)Hq * D, 0, k_norm, kn + (size_t)b * kv, Hkv, D, eps);
            }
            qsrc = qn, ksrc = kn, qstride = (long)Hq * D, kstride = kv;
        }
        active->rope_neox(qsrc, qstride, B, Hq, D, rot, positions, cos_sin, qr);
        active->rope_neox(ksrc, kstride, B, Hkv, D, rot, positions, cos_sin, kr);
        active->store_kv(kr, kv, qkv + (size_t)(Hq + Hkv) * D, nqkv, slots, k_cache, v_cache, B, kv);
        active->paged_decode_attention(qr, k_cache, v_cache, block_tables, bt_stride, seq_lens, tree_bits, attn,
                                       scores, B, Hq, Hkv, D, block_size, max_len, scale);
        GEMM(p[1], p[5], attn, hidden, H, Hq * D);
        active->rms_norm(hidden, residual, (const float*)p[10], xn, B, H, eps);
        GEMM(p[2], p[6], xn, gu, 2 * I, H);
        active->silu_and_mul(gu, act, B, I);
        GEMM(p[3], p[7], act, hidden, H, I);
    }
#undef GEMM
    free(scores);
    free(xsum);
    free(q8);
    return 0;
}

#else  // ---------------------------------------------- the kernels of one ISA (MI_ISA 0, 1, 2)

#if MI_ISA == 0
#define F(name) name##_scalar
#elif MI_ISA == 1
#define F(name) name##_avx2
#else
#define F(name) name##_avx512
#endif

#if MI_ISA == 2  // ==================================================================== AVX-512
#define TILE_M 5  // activation rows per register tile (Q8_0)
#define TILE_M_Q4_1 4  // Q4_1 (5 rows measured slower: 4 chains x 5 rows + the nibble table)

// One record group (16 rows, all K blocks) times mr activation rows starting at m0.
// Every row sums in the same order whatever mr (a row's bits do not depend on how many rows
// share the call: speculative decoding's verify rows equal the decode rows they replace):
// per 32-block, q * x in 4 chains (position 8h + s in chain (8h + s) % 4), added in chain
// order, then acc = fma(d, p, acc) (Q4_1: then acc = fma(m, sum x, acc)).
INLINE void F(tile)(const uint8_t* rec, const float* X, const float* xsum, float* Y,
                    int N, int K, int n0, int m0, const int mr, const int q8) {
    const int nb = K / 32;
    const int record = q8 ? RECORD_Q8_0 : RECORD_Q4_1;
    const int chains = 4, groups = q8 ? 8 : 4, per_lane = q8 ? 4 : 8;
    const __m512 nibble_value = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    __m512 acc[TILE_M];
    for (int i = 0; i < mr; i++) acc[i] = _mm512_setzero_ps();
    for (int b = 0; b < nb; b++, rec += record) {
        __m512 part[TILE_M][4];
        for (int i = 0; i < mr; i++)
            for (int c = 0; c < chains; c++) part[i][c] = _mm512_setzero_ps();
#pragma GCC unroll 8
        for (int h = 0; h < groups; h++) {  // (a bound in a variable: the pragma applies)
            const __m512i packed = _mm512_loadu_si512(rec + (q8 ? 32 : 64) + 64 * h);
#pragma GCC unroll 8
            for (int s = 0; s < per_lane; s++) {
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

// ---- Q4_1 x int8 activations (q4_1_gemm_int8), VNNI: X quantized per row and 32-block to
// int8 (xq, scale xd, xs = xd * sum of the block's xq). In a record's 64-byte group h, lane l
// masked with 0x0f holds row l's weights 4h..4h+3 as bytes, shifted down 4 its weights
// 4h+16..4h+19: one vpdpbusd against the broadcast int8 word h (x[4h..4h+3]), resp. word
// 4 + h, adds 4 exact products per row. Per row and block the integer sum is scaled once:
// y += d * xd * sum(q * xq) + m * xs.
#define Q8_TILE_M 8
#define TARGET_VNNI __attribute__((target("avx512f,avx512bw,avx512vnni,avx2,fma,f16c")))

TARGET_VNNI INLINE __m512i F(x_word)(const int8_t* p) {  // 4 int8 at p, broadcast to 16 lanes
    int32_t v;
    memcpy(&v, p, sizeof v);
    return _mm512_set1_epi32(v);
}

TARGET_VNNI INLINE void F(q8_tile)(const uint8_t* rec, const int8_t* xq, const float* xd, const float* xs,
                                   float* Y, int N, int K, int n0, int m0, const int mr) {
    const int nb = K / 32;
    const __m512i low = _mm512_set1_epi8(0x0f);
    __m512 acc[Q8_TILE_M];
    for (int i = 0; i < mr; i++) acc[i] = _mm512_setzero_ps();
    for (int b = 0; b < nb; b++, rec += RECORD_Q4_1) {
        __m512i w[8];  // w[t]: the weights that multiply x word t of the block
#pragma GCC unroll 4
        for (int h = 0; h < 4; h++) {
            const __m512i p = _mm512_loadu_si512(rec + 64 + 64 * h);
            w[h] = _mm512_and_si512(p, low);
            w[4 + h] = _mm512_and_si512(_mm512_srli_epi32(p, 4), low);
        }
        const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)rec));
        const __m512 m = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(rec + 32)));
#pragma GCC unroll 8
        for (int i = 0; i < mr; i++) {
            const int8_t* x = xq + (size_t)(m0 + i) * K + 32 * b;
            __m512i s0 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w[0], F(x_word)(x));
            __m512i s1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w[4], F(x_word)(x + 16));
#pragma GCC unroll 3
            for (int t = 1; t < 4; t++) {
                s0 = _mm512_dpbusd_epi32(s0, w[t], F(x_word)(x + 4 * t));
                s1 = _mm512_dpbusd_epi32(s1, w[4 + t], F(x_word)(x + 16 + 4 * t));
            }
            const size_t j = (size_t)(m0 + i) * nb + b;
            acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(s0, s1)),
                                     _mm512_mul_ps(d, _mm512_set1_ps(xd[j])), acc[i]);
            acc[i] = _mm512_fmadd_ps(m, _mm512_set1_ps(xs[j]), acc[i]);
        }
    }
    for (int i = 0; i < mr; i++) _mm512_storeu_ps(Y + (size_t)(m0 + i) * N + n0, acc[i]);
}
#define Q8_TARGET TARGET_VNNI

INLINE void F(block_sums)(const float* X, float* xsum, int n) {  // xsum[j] = sum of X[32j, 32j + 32)
    for (int j = 0; j < n; j++) {
        const __m512 a = _mm512_loadu_ps(X + (size_t)j * 32), c = _mm512_loadu_ps(X + (size_t)j * 32 + 16);
        xsum[j] = _mm512_reduce_add_ps(_mm512_add_ps(a, c));
    }
}

// exp(x) for x <= 0, 16 lanes: 2^k * p(r) with k = round(x / ln 2), r = x - k ln 2 (ln 2 split
// in two for accuracy), p a degree-6 Taylor polynomial: relative error ~1e-7 on |r| <= ln2/2.
// (libm's scalar expf made the softmax the slowest part of decode attention.)
INLINE __m512 F(exp_nonpositive)(__m512 x) {
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
static float F(exp_minus_max)(float* s, int n, float mx) {
    const __m512 m = _mm512_set1_ps(mx);
    __m512 total = _mm512_setzero_ps();
    int t = 0;
    for (; t + 16 <= n; t += 16) {
        const __m512 e = F(exp_nonpositive)(_mm512_sub_ps(_mm512_loadu_ps(s + t), m));
        _mm512_storeu_ps(s + t, e);
        total = _mm512_add_ps(total, e);
    }
    if (t < n) {
        const __mmask16 live = (__mmask16)((1u << (n - t)) - 1);
        const __m512 e = F(exp_nonpositive)(_mm512_sub_ps(_mm512_maskz_loadu_ps(live, s + t), m));
        _mm512_mask_storeu_ps(s + t, live, e);
        total = _mm512_mask_add_ps(total, live, total, e);
    }
    return _mm512_reduce_add_ps(total);
}

// One (sequence, KV head) task with head_dim = 16 * dv: each query head of the group in turn,
// its q (QK) or its output (PV) held in dv registers while the sequence's rows stream by
// (they stay in L1/L2 between the group's heads).
INLINE void F(attend_task)(const float* qh, const float* k_cache, const float* v_cache, const int32_t* table,
                           int L, int64_t bits, float* s, int max_len, float* oh, int group, int Hkv,
                           int kvh, int D, int block_size, float scale, const int dv) {
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
        if (bits != -1) mask_tree_window(sj, L, bits);
        float mx = -INFINITY;
#pragma omp simd reduction(max : mx)
        for (int t = 0; t < L; t++) mx = sj[t] > mx ? sj[t] : mx;
        const __m512 inv = _mm512_set1_ps(1.0f / F(exp_minus_max)(sj, L, mx));
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

#define ATTEND_TASK_CASES                                            \
    case 4: ATTEND_TASK(4); break;                                   \
    case 8: ATTEND_TASK(8); break;                                   \
    default: ATTEND_TASK(D / 16); break;
#define ATTEND_VECTORS (D / 16)

static float F(sum_of_squares)(const float* x, int n) {
    __m512 acc = _mm512_setzero_ps();
    for (int i = 0; i < n; i += 16) {
        const __m512 v = _mm512_loadu_ps(x + i);
        acc = _mm512_fmadd_ps(v, v, acc);
    }
    return _mm512_reduce_add_ps(acc);
}

INLINE void F(rms_norm_row)(const float* x, float* res, const float* weight, float* dst, int n, float eps) {
    if (res) {
        for (int i = 0; i < n; i += 16)
            _mm512_storeu_ps(res + i, _mm512_add_ps(_mm512_loadu_ps(res + i), _mm512_loadu_ps(x + i)));
        x = res;
    }
    const __m512 scale = _mm512_set1_ps(1.0f / sqrtf(F(sum_of_squares)(x, n) / (float)n + eps));
    for (int i = 0; i < n; i += 16)
        _mm512_storeu_ps(dst + i, _mm512_mul_ps(_mm512_mul_ps(_mm512_loadu_ps(x + i), scale),
                                                _mm512_loadu_ps(weight + i)));
}

INLINE void F(silu_and_mul_row)(const float* gate, const float* up, float* dst, int n) {
    for (int i = 0; i < n; i += 16) {
        const __m512 g = _mm512_loadu_ps(gate + i);
        const __m512 e = F(exp_nonpositive)(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(g)));
        const __m512 one = _mm512_set1_ps(1.0f);
        const __mmask16 positive = _mm512_cmp_ps_mask(g, _mm512_setzero_ps(), _CMP_GE_OQ);
        const __m512 num = _mm512_mask_blend_ps(positive, e, one);  // g >= 0: 1, else e
        const __m512 sig = _mm512_div_ps(num, _mm512_add_ps(one, e));
        _mm512_storeu_ps(dst + i, _mm512_mul_ps(_mm512_mul_ps(g, sig), _mm512_loadu_ps(up + i)));
    }
}

#elif MI_ISA == 1  // ================================================================= AVX2 + FMA
// 8 lanes: a 16-row record is two halves (rows 0..7: the first 32 bytes of each 64-byte
// group and d/m 0..7; rows 8..15: the second 32 bytes and d/m 8..15).
#define TILE_M 4

INLINE float F(hsum)(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

// Weight s of each of 8 lanes as floats, in one integer op and a conversion, times a power of
// two that the activations carry instead (the tiles read X prescaled by prescale_x below):
// Q4_1 nibble s masked in place is q * 16^s (s = 7 shifted down: q); Q8_0 byte s moved to the
// top byte is q * 2^24 (signed). Products q16^s * x16^-s equal q * x exactly.
INLINE __m256 F(lane_weights)(__m256i packed, const int s, const int q8) {
    if (q8) {
        __m256i top;
        if (s == 0) top = _mm256_slli_epi32(packed, 24);
        else if (s == 3) top = _mm256_and_si256(packed, _mm256_set1_epi32((int)0xff000000u));
        else  // byte s of each lane to its top byte, the rest zero
            top = _mm256_shuffle_epi8(packed, _mm256_setr_epi8(
                -128, -128, -128, s, -128, -128, -128, 4 + s, -128, -128, -128, 8 + s, -128, -128, -128, 12 + s,
                -128, -128, -128, s, -128, -128, -128, 4 + s, -128, -128, -128, 8 + s, -128, -128, -128, 12 + s));
        return _mm256_cvtepi32_ps(top);
    }
    if (s == 7) return _mm256_cvtepi32_ps(_mm256_srli_epi32(packed, 28));
    return _mm256_cvtepi32_ps(_mm256_and_si256(packed, _mm256_set1_epi32(15 << (4 * s))));
}

// xs = X times the power of two that lane_weights leaves out: Q8_0 2^-24 everywhere; Q4_1
// 16^-s for position k of a block, k = 4h + s/2 (+16 if s odd): s = 2 (k % 4) + (k % 32 >= 16),
// 1 for s = 7. |x| < 2^-100 becomes 0 (its product is far below fp32 resolution of any sum;
// this keeps every scaled value a normal float: no denormal slow paths).
static void F(prescale_x)(const float* X, float* xs, size_t n, int q8) {
    float pattern[32];
    for (int k = 0; k < 32; k++) {
        const int s = 2 * (k % 4) + (k >= 16);
        pattern[k] = q8 ? 0x1p-24f : s == 7 ? 1.0f : ldexpf(1.0f, -4 * s);
    }
    const __m256 tiny = _mm256_set1_ps(0x1p-100f), magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    for (size_t j = 0; j < n; j += 32)
        for (int c = 0; c < 4; c++) {
            const __m256 x = _mm256_loadu_ps(X + j + 8 * c);
            const __m256 keep = _mm256_cmp_ps(_mm256_and_ps(x, magnitude), tiny, _CMP_GE_OQ);
            _mm256_storeu_ps(xs + j + 8 * c, _mm256_and_ps(_mm256_mul_ps(x, _mm256_loadu_ps(pattern + 8 * c)), keep));
        }
}
#define PRESCALE_X 1

// One record group (16 rows, all K blocks) times mr activation rows starting at m0.
// Every row sums in the same order whatever mr (a row's bits do not depend on how many rows
// share the call: speculative decoding's verify rows equal the decode rows they replace):
// per 32-block and half, q * x in `chains` chains (position (h, s) in chain s % chains, in
// (h, s) order), added (p0 + p1) or (p0 + p1) + (p2 + p3), then acc = fma(d, p, acc) (Q4_1:
// then acc = fma(m, sum x, acc)).
// mr = 1 (decode): both halves' chains at once. mr > 1: the chains in phases of
// TILE_PHASE(mr, chains) (each (h, s) belongs to one phase: no weight is decoded twice), so that
// 2 halves x chains per phase x mr partial sums fit the 16 ymm registers with the weights and x.
#define TILE_PHASE(mr, chains) ((mr) == 2 ? 2 : 1)
INLINE void F(tile)(const uint8_t* rec, const float* X, const float* xsum, float* Y,
                    int N, int K, int n0, int m0, const int mr, const int q8) {
    const int nb = K / 32;
    const int record = q8 ? RECORD_Q8_0 : RECORD_Q4_1;
    const int groups = q8 ? 8 : 4, per_lane = q8 ? 4 : 8, first = q8 ? 32 : 64;
    // [half][chain]: independent FMA chains to cover the FMA latency (Q8_0: 4 measured
    // faster than 8, Q4_1: 8 faster than 4, on Zen 4)
    const int chains = q8 ? 2 : 4;
    __m256 acc[TILE_M][2];
    for (int i = 0; i < mr; i++) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
    for (int b = 0; b < nb; b++, rec += record) {
        const __m256 d0 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)rec));
        const __m256 d1 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(rec + 16)));
        if (mr == 1) {
            const float* x = X + (size_t)m0 * K + 32 * b;
            __m256 part[2][4];
            for (int c = 0; c < 4; c++) part[0][c] = part[1][c] = _mm256_setzero_ps();
#pragma GCC unroll 8
            for (int h = 0; h < groups; h++) {
                const __m256i lo = _mm256_loadu_si256((const __m256i*)(rec + first + 64 * h));
                const __m256i hi = _mm256_loadu_si256((const __m256i*)(rec + first + 64 * h + 32));
#pragma GCC unroll 8
                for (int s = 0; s < per_lane; s++) {
                    const int k = q8 ? 4 * h + s : 4 * h + (s >> 1) + ((s & 1) ? 16 : 0);
                    const __m256 xb = _mm256_broadcast_ss(x + k);
                    const int c = s % chains;
                    part[0][c] = _mm256_fmadd_ps(F(lane_weights)(lo, s, q8), xb, part[0][c]);
                    part[1][c] = _mm256_fmadd_ps(F(lane_weights)(hi, s, q8), xb, part[1][c]);
                }
            }
            for (int half = 0; half < 2; half++) {
                const __m256 p = chains == 2 ? _mm256_add_ps(part[half][0], part[half][1])
                                             : _mm256_add_ps(_mm256_add_ps(part[half][0], part[half][1]),
                                                             _mm256_add_ps(part[half][2], part[half][3]));
                acc[0][half] = _mm256_fmadd_ps(half ? d1 : d0, p, acc[0][half]);
            }
        } else {
            const int per_phase = TILE_PHASE(mr, chains) < chains ? TILE_PHASE(mr, chains) : chains;
            __m256 sum[TILE_M][2][4];  // [row][half][chain]: the finished chains
            __m256 pair[TILE_M][2][2];  // [row][half]: p0 + p1, p2 + p3
#pragma GCC unroll 4
            for (int ph = 0; ph < chains; ph += per_phase) {
                // (each phase loads the weights again: a compiler that kept one phase's loads
                // for the next would hold all 2 x groups of them in registers, and spill)
                __asm__ volatile("" ::: "memory");
                __m256 part[TILE_M][2][4];
                for (int i = 0; i < mr; i++)
                    for (int c = 0; c < per_phase; c++) part[i][0][c] = part[i][1][c] = _mm256_setzero_ps();
#pragma GCC unroll 8
                for (int h = 0; h < groups; h++) {
                    const __m256i lo = _mm256_loadu_si256((const __m256i*)(rec + first + 64 * h));
                    const __m256i hi = _mm256_loadu_si256((const __m256i*)(rec + first + 64 * h + 32));
#pragma GCC unroll 8
                    for (int s = 0; s < per_lane; s++) {
                        const int c = s % chains - ph;
                        if (c < 0 || c >= per_phase) continue;
                        const int k = 32 * b + (q8 ? 4 * h + s : 4 * h + (s >> 1) + ((s & 1) ? 16 : 0));
                        const __m256 w0 = F(lane_weights)(lo, s, q8), w1 = F(lane_weights)(hi, s, q8);
#pragma GCC unroll 6
                        for (int i = 0; i < mr; i++) {
                            const __m256 xb = _mm256_broadcast_ss(X + (size_t)(m0 + i) * K + k);
                            part[i][0][c] = _mm256_fmadd_ps(w0, xb, part[i][0][c]);
                            part[i][1][c] = _mm256_fmadd_ps(w1, xb, part[i][1][c]);
                        }
                    }
                }
                for (int i = 0; i < mr; i++)
                    for (int c = 0; c < per_phase; c++) {
                        sum[i][0][ph + c] = part[i][0][c];
                        sum[i][1][ph + c] = part[i][1][c];
                    }
                const int done = ph + per_phase;  // chains 0 .. done - 1 are finished
                for (int i = 0; i < mr; i++)
                    for (int half = 0; half < 2; half++) {
                        if (ph < 2 && done >= 2) pair[i][half][0] = _mm256_add_ps(sum[i][half][0], sum[i][half][1]);
                        if (done == 4) pair[i][half][1] = _mm256_add_ps(sum[i][half][2], sum[i][half][3]);
                    }
            }
#pragma GCC unroll 6
            for (int i = 0; i < mr; i++)
                for (int half = 0; half < 2; half++) {
                    const __m256 p = chains == 2 ? pair[i][half][0] : _mm256_add_ps(pair[i][half][0], pair[i][half][1]);
                    const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(rec + 16 * half)));
                    acc[i][half] = _mm256_fmadd_ps(d, p, acc[i][half]);
                }
        }
        if (!q8) {
            const __m256 m0v = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(rec + 32)));
            const __m256 m1v = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(rec + 48)));
#pragma GCC unroll 4
            for (int i = 0; i < mr; i++) {
                const __m256 xs = _mm256_broadcast_ss(xsum + (size_t)(m0 + i) * nb + b);
                acc[i][0] = _mm256_fmadd_ps(m0v, xs, acc[i][0]);
                acc[i][1] = _mm256_fmadd_ps(m1v, xs, acc[i][1]);
            }
        }
    }
    for (int i = 0; i < mr; i++) {
        _mm256_storeu_ps(Y + (size_t)(m0 + i) * N + n0, acc[i][0]);
        _mm256_storeu_ps(Y + (size_t)(m0 + i) * N + n0 + 8, acc[i][1]);
    }
}

// The decode tile (mr = 1) in functions of their own: inlined into the GEMM next to the
// mr > 1 tiles, the compiler's register allocation of the whole function spilled one of its
// FMA chains to the stack (measured ~2 % slower decode GEMM).
static __attribute__((noinline)) void F(tile_1_q4_1)(const uint8_t* rec, const float* X, const float* xsum, float* Y,
                                                     int N, int K, int n0, int m0) {
    F(tile)(rec, X, xsum, Y, N, K, n0, m0, 1, 0);
}
static __attribute__((noinline)) void F(tile_1_q8_0)(const uint8_t* rec, const float* X, const float* xsum, float* Y,
                                                     int N, int K, int n0, int m0) {
    F(tile)(rec, X, xsum, Y, N, K, n0, m0, 1, 1);
}
#define TILE_1(rec, X, xsum, Y, N, K, n0, m, q8) \
    ((q8) ? F(tile_1_q8_0)(rec, X, xsum, Y, N, K, n0, m) : F(tile_1_q4_1)(rec, X, xsum, Y, N, K, n0, m))

// ---- Q4_1 x int8 activations (q4_1_gemm_int8; also the avx512 path's where the CPU lacks
// AVX-512 VNNI): as the VNNI version, per 8-row half of a record; vpmaddubsw multiplies the
// unsigned nibbles by the int8 x word's bytes and adds pairs (|.| <= 2 * 15 * 127), the 8
// words' results add up in int16 (|.| <= 30480: no overflow), vpmaddwd by 1 makes them int32.
#define Q8_TILE_M 4
#define Q8_TARGET

INLINE __m256i F(x_word)(const int8_t* p) {  // 4 int8 at p, broadcast to 8 lanes
    int32_t v;
    memcpy(&v, p, sizeof v);
    return _mm256_set1_epi32(v);
}

INLINE void F(q8_tile)(const uint8_t* rec, const int8_t* xq, const float* xd, const float* xs,
                       float* Y, int N, int K, int n0, int m0, const int mr) {
    const int nb = K / 32;
    const __m256i low = _mm256_set1_epi8(0x0f), ones = _mm256_set1_epi16(1);
    __m256 acc[Q8_TILE_M][2];
    for (int i = 0; i < mr; i++) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
    for (int b = 0; b < nb; b++, rec += RECORD_Q4_1) {
#pragma GCC unroll 2
        for (int half = 0; half < 2; half++) {
            __m256i s[Q8_TILE_M];
#pragma GCC unroll 8
            for (int t = 0; t < 8; t++) {  // x word t: low nibbles of group t, high of group t - 4
                const __m256i p = _mm256_loadu_si256((const __m256i*)(rec + 64 + 64 * (t & 3) + 32 * half));
                const __m256i w = t < 4 ? _mm256_and_si256(p, low) : _mm256_and_si256(_mm256_srli_epi16(p, 4), low);
#pragma GCC unroll 4
                for (int i = 0; i < mr; i++) {
                    const __m256i prod = _mm256_maddubs_epi16(w, F(x_word)(xq + (size_t)(m0 + i) * K + 32 * b + 4 * t));
                    s[i] = t ? _mm256_add_epi16(s[i], prod) : prod;
                }
            }
            const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(rec + 16 * half)));
            const __m256 m = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(rec + 32 + 16 * half)));
#pragma GCC unroll 4
            for (int i = 0; i < mr; i++) {
                const size_t j = (size_t)(m0 + i) * nb + b;
                const __m256 q = _mm256_cvtepi32_ps(_mm256_madd_epi16(s[i], ones));
                acc[i][half] = _mm256_fmadd_ps(q, _mm256_mul_ps(d, _mm256_set1_ps(xd[j])), acc[i][half]);
                acc[i][half] = _mm256_fmadd_ps(m, _mm256_set1_ps(xs[j]), acc[i][half]);
            }
        }
    }
    for (int i = 0; i < mr; i++) {
        _mm256_storeu_ps(Y + (size_t)(m0 + i) * N + n0, acc[i][0]);
        _mm256_storeu_ps(Y + (size_t)(m0 + i) * N + n0 + 8, acc[i][1]);
    }
}

INLINE void F(block_sums)(const float* X, float* xsum, int n) {
    for (int j = 0; j < n; j++) {
        const float* x = X + (size_t)j * 32;
        const __m256 a = _mm256_add_ps(_mm256_loadu_ps(x), _mm256_loadu_ps(x + 8));
        const __m256 c = _mm256_add_ps(_mm256_loadu_ps(x + 16), _mm256_loadu_ps(x + 24));
        xsum[j] = F(hsum)(_mm256_add_ps(a, c));
    }
}

// exp(x) for x <= 0, 8 lanes: as the AVX-512 version, 2^k built in the exponent bits.
INLINE __m256 F(exp_nonpositive)(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));  // k >= -126: 2^k stays a normal float
    const __m256 k = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(k, _mm256_set1_ps(0.693145751953125f), x);
    r = _mm256_fnmadd_ps(k, _mm256_set1_ps(1.428606765330187e-06f), r);
    __m256 p = _mm256_set1_ps(1.0f / 720);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    const __m256i two_k = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(two_k));
}

static float F(exp_minus_max)(float* s, int n, float mx) {
    const __m256 m = _mm256_set1_ps(mx);
    __m256 total = _mm256_setzero_ps();
    int t = 0;
    for (; t + 8 <= n; t += 8) {
        const __m256 e = F(exp_nonpositive)(_mm256_sub_ps(_mm256_loadu_ps(s + t), m));
        _mm256_storeu_ps(s + t, e);
        total = _mm256_add_ps(total, e);
    }
    if (t < n) {
        const __m256i live = _mm256_cmpgt_epi32(_mm256_set1_epi32(n - t), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        const __m256 e = F(exp_nonpositive)(_mm256_sub_ps(_mm256_maskload_ps(s + t, live), m));
        _mm256_maskstore_ps(s + t, live, e);
        total = _mm256_add_ps(total, _mm256_and_ps(e, _mm256_castsi256_ps(live)));
    }
    return F(hsum)(total);
}

// As the AVX-512 task with head_dim = 8 * dv (dv <= 16): q is read from L1 for QK; the
// output is held in registers for at most 64 dims at a time (dv > 8: two passes over V).
INLINE void F(attend_task)(const float* qh, const float* k_cache, const float* v_cache, const int32_t* table,
                           int L, int64_t bits, float* s, int max_len, float* oh, int group, int Hkv,
                           int kvh, int D, int block_size, float scale, const int dv) {
    const size_t token_stride = (size_t)Hkv * D;
    for (int j = 0; j < group; j++) {
        const float* qj = qh + (size_t)j * D;
        float* sj = s + (size_t)j * max_len;
        for (int t0 = 0, blk = 0; t0 < L; t0 += block_size, blk++) {
            const int n = L - t0 < block_size ? L - t0 : block_size;
            const float* kb = k_cache + ((size_t)table[blk] * block_size * Hkv + kvh) * D;
            for (int i = 0; i < n; i++) {
                const float* kv = kb + i * token_stride;
                __m256 a0 = _mm256_mul_ps(_mm256_loadu_ps(qj), _mm256_loadu_ps(kv));
                __m256 a1 = _mm256_setzero_ps();
                for (int c = 1; c < dv; c++) {
                    if (c & 1) a1 = _mm256_fmadd_ps(_mm256_loadu_ps(qj + 8 * c), _mm256_loadu_ps(kv + 8 * c), a1);
                    else a0 = _mm256_fmadd_ps(_mm256_loadu_ps(qj + 8 * c), _mm256_loadu_ps(kv + 8 * c), a0);
                }
                sj[t0 + i] = F(hsum)(_mm256_add_ps(a0, a1)) * scale;
            }
        }
        if (bits != -1) mask_tree_window(sj, L, bits);
        float mx = -INFINITY;
#pragma omp simd reduction(max : mx)
        for (int t = 0; t < L; t++) mx = sj[t] > mx ? sj[t] : mx;
        const __m256 inv = _mm256_set1_ps(1.0f / F(exp_minus_max)(sj, L, mx));
        for (int c0 = 0; c0 < dv; c0 += 8) {
            const int nc = dv - c0 < 8 ? dv - c0 : 8;
            __m256 o[8];
            for (int c = 0; c < nc; c++) o[c] = _mm256_setzero_ps();
            for (int t0 = 0, blk = 0; t0 < L; t0 += block_size, blk++) {
                const int n = L - t0 < block_size ? L - t0 : block_size;
                const float* vb = v_cache + ((size_t)table[blk] * block_size * Hkv + kvh) * D + 8 * c0;
                for (int i = 0; i < n; i++) {
                    const float* vv = vb + i * token_stride;
                    const __m256 pr = _mm256_broadcast_ss(sj + t0 + i);
                    for (int c = 0; c < nc; c++) o[c] = _mm256_fmadd_ps(pr, _mm256_loadu_ps(vv + 8 * c), o[c]);
                }
            }
            for (int c = 0; c < nc; c++)
                _mm256_storeu_ps(oh + (size_t)j * D + 8 * (c0 + c), _mm256_mul_ps(o[c], inv));
        }
    }
}

#define ATTEND_TASK_CASES                                            \
    case 8: ATTEND_TASK(8); break;                                   \
    case 16: ATTEND_TASK(16); break;                                 \
    default: ATTEND_TASK(D / 8); break;
#define ATTEND_VECTORS (D / 8)

static float F(sum_of_squares)(const float* x, int n) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0;
    for (int i = 0; i < n; i += 16) {
        const __m256 u = _mm256_loadu_ps(x + i), v = _mm256_loadu_ps(x + i + 8);
        a0 = _mm256_fmadd_ps(u, u, a0);
        a1 = _mm256_fmadd_ps(v, v, a1);
    }
    return F(hsum)(_mm256_add_ps(a0, a1));
}

INLINE void F(rms_norm_row)(const float* x, float* res, const float* weight, float* dst, int n, float eps) {
    if (res) {
        for (int i = 0; i < n; i += 8)
            _mm256_storeu_ps(res + i, _mm256_add_ps(_mm256_loadu_ps(res + i), _mm256_loadu_ps(x + i)));
        x = res;
    }
    const __m256 scale = _mm256_set1_ps(1.0f / sqrtf(F(sum_of_squares)(x, n) / (float)n + eps));
    for (int i = 0; i < n; i += 8)
        _mm256_storeu_ps(dst + i, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i), scale),
                                                _mm256_loadu_ps(weight + i)));
}

INLINE void F(silu_and_mul_row)(const float* gate, const float* up, float* dst, int n) {
    const __m256 one = _mm256_set1_ps(1.0f), sign = _mm256_set1_ps(-0.0f);
    for (int i = 0; i < n; i += 8) {
        const __m256 g = _mm256_loadu_ps(gate + i);
        const __m256 e = F(exp_nonpositive)(_mm256_or_ps(g, sign));  // exp(-|g|)
        const __m256 num = _mm256_blendv_ps(e, one, _mm256_cmp_ps(g, _mm256_setzero_ps(), _CMP_GE_OQ));
        const __m256 sig = _mm256_div_ps(num, _mm256_add_ps(one, e));
        _mm256_storeu_ps(dst + i, _mm256_mul_ps(_mm256_mul_ps(g, sig), _mm256_loadu_ps(up + i)));
    }
}

#else  // ============================================================ portable C (any machine)
// Plain loops the compiler vectorises: over the 16 rows of a record (one lane per row, as
// the SIMD versions), or along a row.
#define TILE_M 4

// The 32-bit lane of row l in a 64-byte group (bytes 4l..4l+3, little-endian as the SIMD loads).
static inline uint32_t lane_bits(const uint8_t* group, int l) {
    const uint8_t* p = group + 4 * l;
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

INLINE void F(tile)(const uint8_t* rec, const float* X, const float* xsum, float* Y,
                    int N, int K, int n0, int m0, const int mr, const int q8) {
    const int nb = K / 32;
    const int record = q8 ? RECORD_Q8_0 : RECORD_Q4_1;
    const int groups = q8 ? 8 : 4, per_lane = q8 ? 4 : 8, first = q8 ? 32 : 64;
    float acc[TILE_M][ROWS];
    memset(acc, 0, sizeof acc);
    for (int b = 0; b < nb; b++, rec += record) {
        float part[TILE_M][ROWS];  // sum_j q x of the block, per row and lane
        memset(part, 0, sizeof part);
        for (int h = 0; h < groups; h++) {
            uint32_t u[ROWS];
            for (int l = 0; l < ROWS; l++) u[l] = lane_bits(rec + first + 64 * h, l);
            for (int s = 0; s < per_lane; s++) {
                const int k = 32 * b + (q8 ? 4 * h + s : 4 * h + (s >> 1) + ((s & 1) ? 16 : 0));
                float w[ROWS];  // weight s of every lane
                for (int l = 0; l < ROWS; l++)
                    w[l] = q8 ? (float)((int32_t)(u[l] << (24 - 8 * s)) >> 24) : (float)((u[l] >> (4 * s)) & 15);
                for (int i = 0; i < mr; i++) {
                    const float xv = X[(size_t)(m0 + i) * K + k];
                    for (int l = 0; l < ROWS; l++) part[i][l] += w[l] * xv;
                }
            }
        }
        float d[ROWS], mn[ROWS];
        for (int l = 0; l < ROWS; l++) {
            d[l] = half_to_float(rec + 2 * l);
            mn[l] = q8 ? 0.0f : half_to_float(rec + 32 + 2 * l);
        }
        for (int i = 0; i < mr; i++) {
            const float xs = q8 ? 0.0f : xsum[(size_t)(m0 + i) * nb + b];
            for (int l = 0; l < ROWS; l++) acc[i][l] += d[l] * part[i][l] + mn[l] * xs;
        }
    }
    for (int i = 0; i < mr; i++) memcpy(Y + (size_t)(m0 + i) * N + n0, acc[i], sizeof acc[i]);
}

static void F(block_sums)(const float* X, float* xsum, int n) {
    for (int j = 0; j < n; j++) {
        float s = 0.0f;
#pragma omp simd reduction(+ : s)
        for (int i = 0; i < 32; i++) s += X[(size_t)j * 32 + i];
        xsum[j] = s;
    }
}

// exp(x) for x <= 0: the SIMD versions' range reduction and polynomial, in plain C.
static inline float F(exp_nonpositive)(float x) {
    x = x < -87.0f ? -87.0f : x;
    const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
    const float t = x * 1.44269504f + magic;
    const float k = t - magic;
    int32_t kbits;
    memcpy(&kbits, &t, sizeof kbits);  // the integer k sits in t's low mantissa bits
    const uint32_t two_k = (uint32_t)(kbits - 0x4B400000 + 127) << 23;
    float scale;
    memcpy(&scale, &two_k, sizeof scale);
    float r = x - k * 0.693145751953125f;
    r = r - k * 1.428606765330187e-06f;
    float p = 1.0f / 720;
    p = p * r + 1.0f / 120;
    p = p * r + 1.0f / 24;
    p = p * r + 1.0f / 6;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    return p * scale;
}

static float F(exp_minus_max)(float* s, int n, float mx) {
    float total = 0.0f;
#pragma omp simd reduction(+ : total)
    for (int t = 0; t < n; t++) {
        s[t] = F(exp_nonpositive)(s[t] - mx);
        total += s[t];
    }
    return total;
}

INLINE void F(attend_task)(const float* qh, const float* k_cache, const float* v_cache, const int32_t* table,
                           int L, int64_t bits, float* s, int max_len, float* oh, int group, int Hkv,
                           int kvh, int D, int block_size, float scale, const int dv) {
    (void)dv;
    const size_t token_stride = (size_t)Hkv * D;
    for (int j = 0; j < group; j++) {
        const float* qj = qh + (size_t)j * D;
        float* sj = s + (size_t)j * max_len;
        for (int t0 = 0, blk = 0; t0 < L; t0 += block_size, blk++) {
            const int n = L - t0 < block_size ? L - t0 : block_size;
            const float* kb = k_cache + ((size_t)table[blk] * block_size * Hkv + kvh) * D;
            for (int i = 0; i < n; i++) {
                const float* kv = kb + i * token_stride;
                float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
                for (int c = 0; c < D; c++) dot += qj[c] * kv[c];
                sj[t0 + i] = dot * scale;
            }
        }
        if (bits != -1) mask_tree_window(sj, L, bits);
        float mx = -INFINITY;
#pragma omp simd reduction(max : mx)
        for (int t = 0; t < L; t++) mx = sj[t] > mx ? sj[t] : mx;
        const float inv = 1.0f / F(exp_minus_max)(sj, L, mx);
        float o[MAX_HEAD_DIM] = {0};
        for (int t0 = 0, blk = 0; t0 < L; t0 += block_size, blk++) {
            const int n = L - t0 < block_size ? L - t0 : block_size;
            const float* vb = v_cache + ((size_t)table[blk] * block_size * Hkv + kvh) * D;
            for (int i = 0; i < n; i++) {
                const float* vv = vb + i * token_stride;
                const float pr = sj[t0 + i];
#pragma omp simd
                for (int c = 0; c < D; c++) o[c] += pr * vv[c];
            }
        }
        for (int c = 0; c < D; c++) oh[(size_t)j * D + c] = o[c] * inv;
    }
}

#define ATTEND_TASK_CASES default: ATTEND_TASK(0); break;
#define ATTEND_VECTORS 0

static void F(rms_norm_row)(const float* x, float* res, const float* weight, float* dst, int n, float eps) {
    if (res) {
        for (int i = 0; i < n; i++) res[i] += x[i];
        x = res;
    }
    float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
    for (int i = 0; i < n; i++) ss += x[i] * x[i];
    const float scale = 1.0f / sqrtf(ss / (float)n + eps);
    for (int i = 0; i < n; i++) dst[i] = x[i] * scale * weight[i];
}

static void F(silu_and_mul_row)(const float* gate, const float* up, float* dst, int n) {
#pragma omp simd
    for (int i = 0; i < n; i++) {
        const float g = gate[i];
        const float e = F(exp_nonpositive)(g < 0.0f ? g : -g);  // exp(-|g|) <= 1
        const float sig = (g >= 0.0f ? 1.0f : e) / (1.0f + e);
        dst[i] = g * sig * up[i];
    }
}
#endif  // ====================================================== the same drivers for every ISA
#ifndef TILE_M_Q4_1
#define TILE_M_Q4_1 TILE_M
#endif

// Tiles of near-equal height (6 rows at a cap of 5: 3 + 3, not 5 + 1: a lone-row tile re-decodes
// every weight for one row). On paths whose tiles are row-independent (every height sums in one
// order) the split does not change any row's bits.
INLINE void F(group_rows)(const uint8_t* rec, const float* X, const float* xsum, float* Y,
                          int N, int K, int n0, int m_begin, int m_end, const int q8) {
    const int cap = (q8 || TILE_M_Q4_1 == TILE_M) ? TILE_M : TILE_M_Q4_1;
    const int rows = m_end - m_begin, tiles = (rows + cap - 1) / cap;
    for (int t = 0, m = m_begin; t < tiles; t++) {
        const int h = (m_end - m + (tiles - t) - 1) / (tiles - t);  // ceil(rows left / tiles left)
        switch (h) {  // constant mr per call: the compiler unrolls each
#if TILE_M > 5
            case 6: F(tile)(rec, X, xsum, Y, N, K, n0, m, 6, q8); break;
#endif
#if TILE_M > 4
            case 5: F(tile)(rec, X, xsum, Y, N, K, n0, m, 5, q8); break;
#endif
            case 4: F(tile)(rec, X, xsum, Y, N, K, n0, m, 4, q8); break;
            case 3: F(tile)(rec, X, xsum, Y, N, K, n0, m, 3, q8); break;
            case 2: F(tile)(rec, X, xsum, Y, N, K, n0, m, 2, q8); break;
#ifdef TILE_1
            default: TILE_1(rec, X, xsum, Y, N, K, n0, m, q8); break;
#else
            default: F(tile)(rec, X, xsum, Y, N, K, n0, m, 1, q8); break;
#endif
        }
        m += h;
    }
}

// packed: N/16 * K/32 records; X: [M, K]; xsum: scratch of M * K/32 floats (Q4_1 only);
// Y: [M, N]. N must be a multiple of 16 and K of 32 (the Python side checks).
static void F(gemm)(const uint8_t* packed, const float* X, float* xsum, float* Y, int M, int N, int K,
                    int q8) {
    const int nb = K / 32, groups = N / ROWS, record = q8 ? RECORD_Q8_0 : RECORD_Q4_1;
    if (!q8) F(block_sums)(X, xsum, M * nb);
#ifdef PRESCALE_X
    float* xs = (float*)malloc(sizeof(float) * (size_t)M * K);
    if (!xs) return;  // (as the x sums: M * K floats, never large; Y is left as allocated)
    F(prescale_x)(X, xs, (size_t)M * K, q8);
    X = xs;
#endif
#pragma omp parallel
    for (int mc = 0; mc < M; mc += CHUNK_M) {
        const int me = mc + CHUNK_M < M ? mc + CHUNK_M : M;
#pragma omp for schedule(static)
        for (int g = 0; g < groups; g++) {
            if (q8) F(group_rows)(packed + (size_t)g * nb * record, X, xsum, Y, N, K, g * ROWS, mc, me, 1);
            else F(group_rows)(packed + (size_t)g * nb * record, X, xsum, Y, N, K, g * ROWS, mc, me, 0);
        }
    }
#ifdef PRESCALE_X
    free(xs);
#endif
}

#ifdef Q8_TILE_M
// Q4_1 weights x int8 activations (quantized by the caller, see quantize_q8): Y [M, N].
Q8_TARGET static void F(gemm_q8)(const uint8_t* packed, const int8_t* xq, const float* xd, const float* xs,
                                 float* Y, int M, int N, int K) {
    const int nb = K / 32, groups = N / ROWS;
#pragma omp parallel
    for (int mc = 0; mc < M; mc += CHUNK_M_Q8) {
        const int me = mc + CHUNK_M_Q8 < M ? mc + CHUNK_M_Q8 : M;
#pragma omp for schedule(static)
        for (int g = 0; g < groups; g++) {
            const uint8_t* rec = packed + (size_t)g * nb * RECORD_Q4_1;
            int m = mc;
            for (; m + Q8_TILE_M <= me; m += Q8_TILE_M) F(q8_tile)(rec, xq, xd, xs, Y, N, K, g * ROWS, m, Q8_TILE_M);
            switch (me - m) {  // constant mr per call
#if Q8_TILE_M > 4
                case 7: F(q8_tile)(rec, xq, xd, xs, Y, N, K, g * ROWS, m, 7); break;
                case 6: F(q8_tile)(rec, xq, xd, xs, Y, N, K, g * ROWS, m, 6); break;
                case 5: F(q8_tile)(rec, xq, xd, xs, Y, N, K, g * ROWS, m, 5); break;
                case 4: F(q8_tile)(rec, xq, xd, xs, Y, N, K, g * ROWS, m, 4); break;
#endif
                case 3: F(q8_tile)(rec, xq, xd, xs, Y, N, K, g * ROWS, m, 3); break;
                case 2: F(q8_tile)(rec, xq, xd, xs, Y, N, K, g * ROWS, m, 2); break;
                case 1: F(q8_tile)(rec, xq, xd, xs, Y, N, K, g * ROWS, m, 1); break;
                default: break;
            }
        }
    }
}
#endif

// Decode attention over the paged cache: q [B, H, D], caches [blocks, block_size, Hkv, D],
// block_tables [B, bt_stride], seq_lens [B] (tokens to attend, including the new one, whose
// K/V are already stored), tree_bits NULL or [B] (mask_tree_window; -1: none), out [B, H, D];
// scores: scratch of B * H * max_len floats.
// Query head j of sequence b reads KV head j / (H / Hkv). fp32 softmax with the max
// subtracted. One (sequence, KV head) pair per task: its K/V rows are read once for all the
// query heads that share them. D is a multiple of 16, at most 128 (checked in Python).
static void F(paged_decode_attention)(const float* q, const float* k_cache, const float* v_cache,
                                      const int32_t* block_tables, int bt_stride, const int32_t* seq_lens,
                                      const int64_t* tree_bits, float* out, float* scores, int B, int H,
                                      int Hkv, int D, int block_size, int max_len, float scale) {
    const int group = H / Hkv;
#pragma omp parallel for collapse(2) schedule(dynamic, 1)
    for (int b = 0; b < B; b++) {
        for (int kvh = 0; kvh < Hkv; kvh++) {
            const size_t first = (size_t)b * H + (size_t)kvh * group;  // first query head of the group
            const int32_t* table = block_tables + (size_t)b * bt_stride;
            const float* qh = q + first * D;
            float* s = scores + first * max_len;
            float* oh = out + first * D;
            const int64_t bits = tree_bits ? tree_bits[b] : -1;
#define ATTEND_TASK(dv) F(attend_task)(qh, k_cache, v_cache, table, seq_lens[b], bits, s, max_len, oh, group, \
                                       Hkv, kvh, D, block_size, scale, dv)
            switch (ATTEND_VECTORS) {  // a constant register count per call: the loops over it unroll
                ATTEND_TASK_CASES
            }
#undef ATTEND_TASK
        }
    }
}

// out[r] = x[r] / sqrt(mean(x[r]^2) + eps) * weight; with residual != 0, first
// residual[r] += x[r] and the norm is taken of the sum (x is not modified; out may be x).
// Rows of n floats, n a multiple of 16.
static void F(rms_norm)(const float* x, float* residual, const float* weight, float* out, int rows, int n,
                        float eps) {
#pragma omp parallel for schedule(static) if (rows >= 64)
    for (int r = 0; r < rows; r++)
        F(rms_norm_row)(x + (size_t)r * n, residual ? residual + (size_t)r * n : 0, weight, out + (size_t)r * n,
                        n, eps);
}

// out[r, i] = silu(x[r, i]) * x[r, n + i] for x [rows, 2n], out [rows, n] (n a multiple of 16).
// silu(g) = g * sigmoid(g), sigmoid from e = exp(-|g|) <= 1 (no overflow either side).
static void F(silu_and_mul)(const float* x, float* out, int rows, int n) {
#pragma omp parallel for schedule(static) if (rows >= 64)
    for (int r = 0; r < rows; r++)
        F(silu_and_mul_row)(x + (size_t)r * 2 * n, x + (size_t)r * 2 * n + n, out + (size_t)r * n, n);
}

// NeoX RoPE: out[t, h] = rotate(x[t, h]) for the first `rot` of D dims (the rest copied);
// x rows are `row_stride` floats apart (q and k side by side in the qkv output), out is
// [T, heads, D]; cos_sin rows: cos for rot/2 dims, then sin. Portable C for every ISA.
static void F(rope_neox)(const float* x, long row_stride, int T, int heads, int D, int rot,
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
static void F(store_kv)(const float* k, long k_stride, const float* v, long v_stride, const int64_t* slots,
                        float* k_cache, float* v_cache, int T, int width) {
    for (int t = 0; t < T; t++) {
        const int64_t slot = slots[t];
        if (slot < 0) continue;
        memcpy(k_cache + (size_t)slot * width, k + (size_t)t * k_stride, sizeof(float) * width);
        memcpy(v_cache + (size_t)slot * width, v + (size_t)t * v_stride, sizeof(float) * width);
    }
}

#undef TILE_M
#undef TILE_PHASE
#undef TILE_1
#undef TILE_M_Q4_1
#undef PRESCALE_X
#undef Q8_TILE_M
#undef Q8_TARGET
#undef TARGET_VNNI
#undef ATTEND_TASK_CASES
#undef ATTEND_VECTORS
#undef F
#endif  // MI_ISA
