/* Paged decode attention on a CPU, straight over the engine's block pool.
 *
 * Each decode row is one query token per head; its keys and values sit in the blocks its block-table
 * row names, in the pool layout [num_blocks, block_size, kv_heads, head_dim]. One task per (row, KV
 * head) reads those blocks in place, once, and keeps an online softmax (a running max, a running sum
 * and a running weighted sum of values) for the query heads that share the KV head. Nothing is
 * gathered, so the cost is one read of the context instead of a copy, a second read and a write.
 *
 * Tokens go sixteen at a time (a tile): sixteen dot products are summed across lanes together by a
 * butterfly of shuffles into one vector of sixteen scores, so the softmax of a tile is vector code too.
 *
 * Built at run time by services/engine/attention/cpu_kernel.py with -fopenmp: the OpenMP runtime it
 * links by soname is the one torch already loaded, so its threads are torch's threads, and the count
 * torch.set_num_threads set on the calling thread applies.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define MAX_GROUP 32 /* query heads per KV head */
#define MAX_HEAD_DIM 256
#define MAX_BLOCK 128 /* tokens per block */
#define LANES 16

/* Sixteen lanes: GCC and Clang vector extensions, lowered to AVX-512, AVX2 or SSE by -march=native.
 * The aligned(4) type makes any float pointer a valid (unaligned) load. */
typedef float vf __attribute__((vector_size(64)));
typedef float vf_u __attribute__((vector_size(64), aligned(4)));
typedef int32_t vi __attribute__((vector_size(64)));
typedef uint32_t vu __attribute__((vector_size(64)));
typedef uint16_t vh_u __attribute__((vector_size(32), aligned(2)));

#if defined(__clang__)
#define SHUFFLE(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define SHUFFLE(a, b, ...) __builtin_shuffle(a, b, (vi){__VA_ARGS__})
#endif

static inline vf as_vf(vi x) {
    vf f;
    memcpy(&f, &x, sizeof f);
    return f;
}
static inline vi as_vi(vf x) {
    vi i;
    memcpy(&i, &x, sizeof i);
    return i;
}
static inline vf select_vf(vi mask, vf a, vf b) { return as_vf((as_vi(a) & mask) | (as_vi(b) & ~mask)); }
static inline vf splat(float x) { return (vf){0} + x; }

static inline vf load(const void *p, int64_t i, const int bf16) {
    if (!bf16) return *(const vf_u *)((const float *)p + i);
    vu bits = __builtin_convertvector(*(const vh_u *)((const uint16_t *)p + i), vu) << 16;
    vf f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline void store(void *p, int64_t i, float x, const int bf16) {
    if (!bf16) {
        ((float *)p)[i] = x;
        return;
    }
    uint32_t bits;
    memcpy(&bits, &x, sizeof bits);
    bits += 0x7FFFu + ((bits >> 16) & 1u); /* round to nearest even, as torch does */
    ((uint16_t *)p)[i] = (uint16_t)(bits >> 16);
}

/* Lane t of the result is the sum of the lanes of v[t]: four levels, each halving the vectors and
 * folding each token's partial sums in half. */
static inline vf sum_lanes_16(vf v[LANES]) {
    vf w[8], x[4], y[2];
    for (int i = 0; i < 8; ++i)
        w[i] = SHUFFLE(v[2 * i], v[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
               SHUFFLE(v[2 * i], v[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    for (int i = 0; i < 4; ++i)
        x[i] = SHUFFLE(w[2 * i], w[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
               SHUFFLE(w[2 * i], w[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
    for (int i = 0; i < 2; ++i)
        y[i] = SHUFFLE(x[2 * i], x[2 * i + 1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29) +
               SHUFFLE(x[2 * i], x[2 * i + 1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
    return SHUFFLE(y[0], y[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) +
           SHUFFLE(y[0], y[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}

static inline float max_lanes(vf x) {
    x = select_vf(x > SHUFFLE(x, x, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7), x,
                  SHUFFLE(x, x, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7));
    x = select_vf(x > SHUFFLE(x, x, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11), x,
                  SHUFFLE(x, x, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11));
    x = select_vf(x > SHUFFLE(x, x, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13), x,
                  SHUFFLE(x, x, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13));
    return x[0] > x[1] ? x[0] : x[1];
}

static inline float sum_lanes(vf x) {
    x += SHUFFLE(x, x, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
    x += SHUFFLE(x, x, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11);
    x += SHUFFLE(x, x, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
    return x[0] + x[1];
}

/* exp(x) for x <= 0 (a score minus the running max): x = n ln2 + r with |r| <= ln2 / 2, exp(r) by
 * Cephes' degree-6 polynomial (about 1 ulp), 2^n through the exponent bits; below -87 (and for the
 * -inf of lanes past the context) it is 0. */
static inline vf exp_lanes(vf x) {
    const vi normal = x >= -87.0f;
    x = select_vf(normal, x, splat(-87.0f));
    const vf magic = splat(12582912.0f); /* 1.5 * 2^23: adding it rounds to the nearest integer */
    vf n = x * 1.44269504088896341f + magic;
    n = n - magic;
    vf r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    vf p = splat(1.9875691500e-4f);
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    return p * as_vf(((__builtin_convertvector(n, vi) + 127) << 23) & normal);
}

/* One (row, KV head): the `group` query heads at q + g * q_head_stride attend to the `context` tokens
 * whose keys and values sit in `blocks` (token t of a block at t * token_stride), head_dim = 16 *
 * chunks. Per tile of up to sixteen tokens and per head: sixteen scores, their softmax weights, the
 * weighted values. Inlined with constant `chunks` and `bf16`, so that a head's accumulators live in
 * registers and its loops unroll. */
static inline __attribute__((always_inline)) void attend_row(
    const void *q, int64_t q_head_stride, const void *k, const void *v, int64_t token_stride,
    const int32_t *blocks, int32_t context, int block_size, int group, float scale, void *out,
    const int chunks, const int bf16) {
    vf qv[MAX_GROUP][MAX_HEAD_DIM / LANES], acc[MAX_GROUP][MAX_HEAD_DIM / LANES];
    float run_max[MAX_GROUP], run_sum[MAX_GROUP];
    const vi lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    for (int g = 0; g < group; ++g) {
        for (int c = 0; c < chunks; ++c) {
            qv[g][c] = load(q, g * q_head_stride + c * LANES, bf16) * scale;
            acc[g][c] = splat(0.0f);
        }
        run_max[g] = -INFINITY;
        run_sum[g] = 0.0f;
    }
    for (int32_t start = 0, b = 0; start < context; start += block_size, ++b) {
        const int in_block = context - start < block_size ? context - start : block_size;
        const int64_t base = (int64_t)blocks[b] * block_size * token_stride;
        for (int t0 = 0; t0 < in_block; t0 += LANES) {
            const int n = in_block - t0 < LANES ? in_block - t0 : LANES;
            const int64_t tile = base + t0 * token_stride;
            for (int g = 0; g < group; ++g) {
                vf dots[LANES], a[MAX_HEAD_DIM / LANES];
                for (int t = 0; t < LANES; ++t) dots[t] = splat(0.0f);
                for (int t = 0; t < n; ++t)
                    for (int c = 0; c < chunks; ++c)
                        dots[t] += qv[g][c] * load(k, tile + t * token_stride + c * LANES, bf16);
                const vf scores = select_vf(lane < n, sum_lanes_16(dots), splat(-INFINITY));
                const float tile_max = max_lanes(scores);
                const float m = tile_max > run_max[g] ? tile_max : run_max[g];
                const float rescale = expf(run_max[g] - m);
                const vf p = exp_lanes(scores - m);
                run_sum[g] = run_sum[g] * rescale + sum_lanes(p);
                run_max[g] = m;
                for (int c = 0; c < chunks; ++c) a[c] = acc[g][c] * rescale;
                for (int t = 0; t < n; ++t)
                    for (int c = 0; c < chunks; ++c) a[c] += p[t] * load(v, tile + t * token_stride + c * LANES, bf16);
                for (int c = 0; c < chunks; ++c) acc[g][c] = a[c];
            }
        }
    }
    for (int g = 0; g < group; ++g) {
        const float inv = run_sum[g] > 0.0f ? 1.0f / run_sum[g] : 0.0f;
        for (int c = 0; c < chunks; ++c)
            for (int i = 0; i < LANES; ++i)
                store(out, g * chunks * LANES + c * LANES + i, acc[g][c][i] * inv, bf16);
    }
}

/* One specialised copy per dtype for the common head dims (64 and 128), a generic one for the rest. */
typedef void (*row_fn)(const void *, int64_t, const void *, const void *, int64_t, const int32_t *, int32_t,
                       int, int, float, void *, int);
#define ROW_FN(NAME, CHUNKS, BF16)                                                                        \
    static void NAME(const void *q, int64_t qs, const void *k, const void *v, int64_t ts,                 \
                     const int32_t *blocks, int32_t context, int bs, int group, float scale, void *out,   \
                     int chunks) {                                                                        \
        (void)chunks;                                                                                     \
        attend_row(q, qs, k, v, ts, blocks, context, bs, group, scale, out, CHUNKS, BF16);                \
    }
ROW_FN(row_f32_d64, 4, 0)
ROW_FN(row_f32_d128, 8, 0)
ROW_FN(row_f32_any, chunks, 0)
ROW_FN(row_bf16_d64, 4, 1)
ROW_FN(row_bf16_d128, 8, 1)
ROW_FN(row_bf16_any, chunks, 1)

static row_fn pick_row_fn(int bf16, int chunks) {
    if (chunks == 4) return bf16 ? row_bf16_d64 : row_f32_d64;
    if (chunks == 8) return bf16 ? row_bf16_d128 : row_f32_d128;
    return bf16 ? row_bf16_any : row_f32_any;
}

/* Limits the caller checks before calling. */
int epd_paged_decode_limits(int *max_group, int *max_head_dim, int *max_block) {
    *max_group = MAX_GROUP;
    *max_head_dim = MAX_HEAD_DIM;
    *max_block = MAX_BLOCK;
    return 0;
}

/* Attention of `rows` decode rows. q: row r, head h at q + r * q_row_stride + h * q_head_stride
 * (head_dim contiguous); out: [rows, heads, head_dim] contiguous; k, v: one layer's pool,
 * [num_blocks, block_size, kv_heads, head_dim] contiguous; table: [rows, table_width] block ids;
 * contexts: [rows] tokens each row attends to (its own included). dtype: 0 float32, 1 bfloat16.
 * Returns 0, or -1 for arguments outside the limits. */
int epd_paged_decode(int dtype, const void *q, int64_t q_row_stride, int64_t q_head_stride, const void *k,
                     const void *v, const int32_t *table, int32_t table_width, const int32_t *contexts,
                     int32_t rows, int heads, int kv_heads, int head_dim, int block_size, float scale,
                     void *out) {
    if (kv_heads <= 0 || heads % kv_heads || heads / kv_heads > MAX_GROUP || head_dim > MAX_HEAD_DIM ||
        head_dim % LANES || block_size > MAX_BLOCK || (dtype != 0 && dtype != 1))
        return -1;
    const int group = heads / kv_heads;
    const int64_t token_stride = (int64_t)kv_heads * head_dim;
    const int64_t tasks = (int64_t)rows * kv_heads;
    const size_t item = dtype == 0 ? sizeof(float) : sizeof(uint16_t);
    const row_fn row = pick_row_fn(dtype == 1, head_dim / LANES);
    int64_t work = 0; /* tokens read over all tasks: fork threads only when it pays */
    for (int32_t r = 0; r < rows; ++r) work += (int64_t)contexts[r] * kv_heads;
#pragma omp parallel for schedule(dynamic, 1) if (work >= 256 && tasks > 1)
    for (int64_t i = 0; i < tasks; ++i) {
        const int32_t r = (int32_t)(i / kv_heads);
        const int h = (int)(i % kv_heads);
        const char *qp = (const char *)q + (r * q_row_stride + (int64_t)h * group * q_head_stride) * item;
        const char *kp = (const char *)k + (int64_t)h * head_dim * item;
        const char *vp = (const char *)v + (int64_t)h * head_dim * item;
        char *op = (char *)out + ((int64_t)r * heads + (int64_t)h * group) * head_dim * item;
        row(qp, q_head_stride, kp, vp, token_stride, table + (int64_t)r * table_width, contexts[r], block_size,
            group, scale, op, head_dim / LANES);
    }
    return 0;
}
