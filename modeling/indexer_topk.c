/* Fused lightning-indexer top-k for CPUs: scores and selects in one pass, never materialising the [L, T]
 * score matrix (that matrix, and the passes over it, cost more than the multiply-adds; bench/indexer_costs.py).
 *
 *   I[t, s] = sum_h w[t, h] * ReLU(q[t, h] . k[s]),   top-k over visible s, ties -> the later s
 *
 * q and k are rounded to bfloat16 (round to nearest even) and their products accumulated in float32, as the
 * official V3.2 kernel does with even coarser FP8 inputs. On CPUs with AMX the dot products run on the tile
 * unit; elsewhere a portable loop computes the same rounded products. Keys are scanned from the latest
 * position backwards, so the tie rule is a strict ">" against the k-th best held so far (a min-heap ordered by
 * (score, position)) and rows where every score is 0 cost no more than any other row.
 *
 * Built by seekv4/modeling/indexer_kernel.py with the system C compiler; called through ctypes (which
 * releases the GIL, so Python threads run query ranges in parallel).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX512F__) || defined(__AMX_TILE__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif
#if !defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__)
#define SEEKV4_AVX2 1 /* AVX2 + FMA without AVX-512 (e.g. AMD EPYC before Zen 4): hand-blocked intrinsics */
#endif
#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512F__)
#define SEEKV4_AMX 1
#include <sys/syscall.h>
#include <unistd.h>
#endif

#define KEY_TILE 32 /* keys scored per step (two 16-wide AMX tiles) */
#define ROW_TILE 32 /* query-head rows per tile-unit step (two 16-row AMX tiles) */
#define LAG 2          /* key tiles between scoring a tile and ranking it (see the main loop) */
#define GROUP_ROWS 128 /* query-head rows that share each key tile while it is in L1 */

static uint16_t to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* NaN stays NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static float from_bf16(uint16_t b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* ---- key packing ---------------------------------------------------------------------------------------- */

int seekv4_padded_dim(int d) { return (d + 31) / 32 * 32; }
long seekv4_padded_keys(long t) { return (t + KEY_TILE - 1) / KEY_TILE * KEY_TILE; }

/* 32 floats -> 32 bf16 (as 16 dwords: dims 2p, 2p + 1 in the low, high half of dword p). */
static void to_bf16_32(const float *x, uint32_t *out) {
#ifdef __AVX512BF16__
    __m512bh v = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(x + 16), _mm512_loadu_ps(x)); /* RNE, as to_bf16 */
    _mm512_storeu_si512(out, (__m512i)v);
#else
    for (int p = 0; p < 16; p++) out[p] = (uint32_t)to_bf16(x[2 * p]) | (uint32_t)to_bf16(x[2 * p + 1]) << 16;
#endif
}

/* keys [T, D] float32 -> bf16 in AMX "VNNI" order: for each 16-key tile and each 32-dim chunk, 16 rows of
 * (16 keys x 2 adjacent dims), zero padded past T keys and D dims. pack_range writes tiles [j0, j1) from out on. */
static void pack_range(const float *keys, long t, int d, uint16_t *out, long j0, long j1) {
    int chunks = seekv4_padded_dim(d) / 32;
    float row[32];
    uint32_t tmp[16][16]; /* [key n][dim pair p] of one tile and chunk, transposed into the tile below */
    for (long j = j0; j < j1; j++)
        for (int c = 0; c < chunks; c++) {
            for (int n = 0; n < 16; n++) {
                long key = j * 16 + n;
                if (key < t && c * 32 + 32 <= d) {
                    to_bf16_32(keys + key * d + c * 32, tmp[n]);
                } else {
                    for (int e = 0; e < 32; e++) row[e] = key < t && c * 32 + e < d ? keys[key * d + c * 32 + e] : 0.f;
                    to_bf16_32(row, tmp[n]);
                }
            }
            uint32_t *tile = (uint32_t *)(out + (((j - j0) * chunks + c) * 16) * 32);
            for (int p = 0; p < 16; p++)
                for (int n = 0; n < 16; n++) tile[p * 16 + n] = tmp[n][p];
        }
}

/* The whole packed layout (seekv4_padded_keys(T) keys), tiles [j0, j1) of it (threads split the work). */
void seekv4_pack_keys(const float *keys, long t, int d, uint16_t *out, long j0, long j1) {
    pack_range(keys, t, d, out + (size_t)j0 * (seekv4_padded_dim(d) / 32) * 512, j0, j1);
}

/* ---- per-query top-k heap: min-heap on (score, position), the root is the entry to evict -------------------- */

typedef struct {
    float s;
    int64_t p;
} entry;

static int worse(entry a, entry b) { return (a.s < b.s) | ((a.s == b.s) & (a.p < b.p)); }

/* Put x in the heap's root slot and restore the order. The child choice compiles to conditional moves, so a
 * replacement costs about one mispredicted branch rather than one per level. */
static void replace_root(entry *h, int n, entry x) {
    int i = 0;
    for (;;) {
        int l = 2 * i + 1, r = l + 1;
        if (l >= n) break;
        int m = (r < n && worse(h[r], h[l])) ? r : l;
        if (!worse(h[m], x)) break;
        h[i] = h[m];
        i = m;
    }
    h[i] = x;
}

static void sift_down(entry *h, int n, int i) {
    for (;;) {
        int l = 2 * i + 1, r = l + 1, m = i;
        if (l < n && worse(h[l], h[m])) m = l;
        if (r < n && worse(h[r], h[m])) m = r;
        if (m == i) return;
        entry t = h[i];
        h[i] = h[m];
        h[m] = t;
        i = m;
    }
}

static void sift_up(entry *h, int i) {
    while (i > 0) {
        int parent = (i - 1) / 2;
        if (!worse(h[i], h[parent])) return;
        entry t = h[i];
        h[i] = h[parent];
        h[parent] = t;
        i = parent;
    }
}

/* Offer the keys base + n whose bit n is set in `mask` (latest first) with scores s[n]. */
static void offer(entry *h, int *count, int k, const float *s, int64_t base, uint32_t mask) {
    while (mask) {
        int n = 31 - __builtin_clz(mask);
        mask &= ~(1u << n);
        float v = s[n];
        if (*count < k) {
            h[*count].s = v;
            h[*count].p = base + n;
            sift_up(h, (*count)++);
        } else if (v > h[0].s) { /* equal scores: the held one is later, it stays */
            entry x = {v, base + n};
            replace_root(h, k, x);
        }
    }
}

/* Heap -> out[k] sorted by score desc, later position first on ties; -1 fills the missing. */
static void drain(entry *h, int count, int k, int64_t *out) {
    for (int i = count; i < k; i++) out[i] = -1;
    for (int n = count; n > 0; n--) {
        out[n - 1] = h[0].p;
        h[0] = h[n - 1];
        sift_down(h, n - 1, 0);
    }
}

/* ---- scoring ---------------------------------------------------------------------------------------------- */

#ifdef SEEKV4_AMX
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

typedef struct {
    uint8_t palette_id, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} __attribute__((packed)) tile_config;

static int amx_ready = -1;

int seekv4_amx_enable(void) {
    if (amx_ready < 0) amx_ready = syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
    return amx_ready;
}

/* rows [ROW_TILE x dp] bf16 (row stride dp) x one KEY_TILE of packed keys -> c[ROW_TILE][KEY_TILE] float32,
 * c's rows `ld` floats apart */
static void amx_block(const uint16_t *rows, const uint16_t *ktile, int chunks, float *c, int ld) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int ch = 0; ch < chunks; ch++) {
        _tile_loadd(4, rows + ch * 32, chunks * 64);
        _tile_loadd(5, rows + 16 * chunks * 32 + ch * 32, chunks * 64);
        _tile_loadd(6, ktile + ch * 512, 64);
        _tile_loadd(7, ktile + (chunks + ch) * 512, 64);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
    }
    _tile_stored(0, c, ld * 4);
    _tile_stored(1, c + 16, ld * 4);
    _tile_stored(2, c + 16 * ld, ld * 4);
    _tile_stored(3, c + 16 * ld + 16, ld * 4);
}
#else
int seekv4_amx_enable(void) { return 0; }
#endif

/* Portable path (no AMX): the same rounded products with float32 sums, vectorised by the compiler.
 * unpack_tile: one packed key tile -> kf [dp][KEY_TILE] float32 (once per tile, shared by all row blocks). */
static void unpack_tile(const uint16_t *ktile, int chunks, float *kf) {
    for (int ch = 0; ch < chunks; ch++)
        for (int half = 0; half < 2; half++) {
            const uint16_t *t = ktile + (half * chunks + ch) * 512;
#ifdef SEEKV4_AVX2
            /* dword n of row p holds dims 2p (low half) and 2p + 1 (high half) of key n: the float bits of a bf16
             * are its 16 bits shifted up, so a shift and a mask convert 8 keys at a time, exactly as from_bf16 */
            const __m256i hi = _mm256_set1_epi32((int)0xffff0000u);
            for (int p = 0; p < 16; p++)
                for (int n = 0; n < 16; n += 8) {
                    __m256i v = _mm256_loadu_si256((const __m256i *)(t + p * 32 + 2 * n));
                    float *o = kf + (size_t)(ch * 32 + 2 * p) * KEY_TILE + half * 16 + n;
                    _mm256_storeu_ps(o, _mm256_castsi256_ps(_mm256_slli_epi32(v, 16)));
                    _mm256_storeu_ps(o + KEY_TILE, _mm256_castsi256_ps(_mm256_and_si256(v, hi)));
                }
            continue;
#endif
            for (int p = 0; p < 16; p++)
                for (int n = 0; n < 16; n++)
                    for (int e = 0; e < 2; e++)
                        kf[(ch * 32 + 2 * p + e) * KEY_TILE + half * 16 + n] = from_bf16(t[p * 32 + 2 * n + e]);
        }
}

/* q rows [ROW_TILE][dp] float32 (bf16 values) x kf -> c[ROW_TILE][KEY_TILE], rows `ld` apart. Eight named
 * accumulators of the machine's vector width (4 rows x 2 vectors of 16 with AVX-512, else 2 rows x 4 of 8) stay in
 * registers (compilers spill arrays of vectors here), so each key vector loaded feeds several rows. With AVX2 + FMA,
 * a 6-row x 16-key block keeps 12 accumulators in the 16 ymm registers (the classic SGEMM blocking: 2 key loads
 * and 6 broadcasts feed 12 FMAs). Only the first d of the dp dims are summed: the padding is zero in q and k, and
 * adding +0 to a sum that starts at +0 changes nothing, so the sums equal the full ones bit for bit. */
#ifdef __AVX512F__
typedef float vf __attribute__((vector_size(64)));
#define RB 4
#else
typedef float vf __attribute__((vector_size(32)));
#define RB 2
#endif

#ifdef SEEKV4_AVX2
static void avx2_6x16(const float *q, int dp, int d, const float *kf, float *o, int ld) {
    __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00, c31 = c00,
           c40 = c00, c41 = c00, c50 = c00, c51 = c00;
    for (int e = 0; e < d; e++) {
        const float *kr = kf + (size_t)e * KEY_TILE;
        __m256 k0 = _mm256_loadu_ps(kr), k1 = _mm256_loadu_ps(kr + 8), x;
        x = _mm256_broadcast_ss(q + e), c00 = _mm256_fmadd_ps(x, k0, c00), c01 = _mm256_fmadd_ps(x, k1, c01);
        x = _mm256_broadcast_ss(q + dp + e), c10 = _mm256_fmadd_ps(x, k0, c10), c11 = _mm256_fmadd_ps(x, k1, c11);
        x = _mm256_broadcast_ss(q + 2 * dp + e), c20 = _mm256_fmadd_ps(x, k0, c20), c21 = _mm256_fmadd_ps(x, k1, c21);
        x = _mm256_broadcast_ss(q + 3 * dp + e), c30 = _mm256_fmadd_ps(x, k0, c30), c31 = _mm256_fmadd_ps(x, k1, c31);
        x = _mm256_broadcast_ss(q + 4 * dp + e), c40 = _mm256_fmadd_ps(x, k0, c40), c41 = _mm256_fmadd_ps(x, k1, c41);
        x = _mm256_broadcast_ss(q + 5 * dp + e), c50 = _mm256_fmadd_ps(x, k0, c50), c51 = _mm256_fmadd_ps(x, k1, c51);
    }
    _mm256_storeu_ps(o, c00), _mm256_storeu_ps(o + 8, c01), _mm256_storeu_ps(o + ld, c10);
    _mm256_storeu_ps(o + ld + 8, c11), _mm256_storeu_ps(o + 2 * ld, c20), _mm256_storeu_ps(o + 2 * ld + 8, c21);
    _mm256_storeu_ps(o + 3 * ld, c30), _mm256_storeu_ps(o + 3 * ld + 8, c31), _mm256_storeu_ps(o + 4 * ld, c40);
    _mm256_storeu_ps(o + 4 * ld + 8, c41), _mm256_storeu_ps(o + 5 * ld, c50), _mm256_storeu_ps(o + 5 * ld + 8, c51);
}

static void avx2_2x32(const float *q, int dp, int d, const float *kf, float *o, int ld) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
    for (int e = 0; e < d; e++) {
        const float *kr = kf + (size_t)e * KEY_TILE;
        __m256 k0 = _mm256_loadu_ps(kr), k1 = _mm256_loadu_ps(kr + 8), k2 = _mm256_loadu_ps(kr + 16);
        __m256 k3 = _mm256_loadu_ps(kr + 24), x = _mm256_broadcast_ss(q + e), y = _mm256_broadcast_ss(q + dp + e);
        a0 = _mm256_fmadd_ps(x, k0, a0), a1 = _mm256_fmadd_ps(x, k1, a1);
        a2 = _mm256_fmadd_ps(x, k2, a2), a3 = _mm256_fmadd_ps(x, k3, a3);
        b0 = _mm256_fmadd_ps(y, k0, b0), b1 = _mm256_fmadd_ps(y, k1, b1);
        b2 = _mm256_fmadd_ps(y, k2, b2), b3 = _mm256_fmadd_ps(y, k3, b3);
    }
    _mm256_storeu_ps(o, a0), _mm256_storeu_ps(o + 8, a1), _mm256_storeu_ps(o + 16, a2), _mm256_storeu_ps(o + 24, a3);
    _mm256_storeu_ps(o + ld, b0), _mm256_storeu_ps(o + ld + 8, b1);
    _mm256_storeu_ps(o + ld + 16, b2), _mm256_storeu_ps(o + ld + 24, b3);
}
#endif

static void portable_block(const float *qrows, int dp, int d, const float *kf, float *c, int ld) {
#ifdef SEEKV4_AVX2
    int r = 0;
    for (; r + 6 <= ROW_TILE; r += 6) {
        avx2_6x16(qrows + (size_t)r * dp, dp, d, kf, c + (size_t)r * ld, ld);
        avx2_6x16(qrows + (size_t)r * dp, dp, d, kf + 16, c + (size_t)r * ld + 16, ld);
    }
    for (; r < ROW_TILE; r += 2) avx2_2x32(qrows + (size_t)r * dp, dp, d, kf, c + (size_t)r * ld, ld);
    return;
#endif
    for (int r = 0; r < ROW_TILE; r += RB) {
        const float *q = qrows + (size_t)r * dp;
        float *o = c + (size_t)r * ld;
#ifdef __AVX512F__
        vf acc00 = {0}, acc01 = {0}, acc10 = {0}, acc11 = {0}, k0, k1;
        vf acc20 = {0}, acc21 = {0}, acc30 = {0}, acc31 = {0};
        for (int e = 0; e < d; e++) {
            const float *kr = kf + (size_t)e * KEY_TILE;
            memcpy(&k0, kr, 64), memcpy(&k1, kr + 16, 64);
            float x0 = q[e], x1 = q[dp + e], x2 = q[2 * dp + e], x3 = q[3 * dp + e];
            acc00 += x0 * k0, acc01 += x0 * k1, acc10 += x1 * k0, acc11 += x1 * k1;
            acc20 += x2 * k0, acc21 += x2 * k1, acc30 += x3 * k0, acc31 += x3 * k1;
        }
        memcpy(o, &acc00, 64), memcpy(o + 16, &acc01, 64), memcpy(o + ld, &acc10, 64), memcpy(o + ld + 16, &acc11, 64);
        memcpy(o + 2 * ld, &acc20, 64), memcpy(o + 2 * ld + 16, &acc21, 64);
        memcpy(o + 3 * ld, &acc30, 64), memcpy(o + 3 * ld + 16, &acc31, 64);
#else
        vf a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}, b0 = {0}, b1 = {0}, b2 = {0}, b3 = {0}, k0, k1, k2, k3;
        for (int e = 0; e < d; e++) {
            const float *kr = kf + (size_t)e * KEY_TILE;
            memcpy(&k0, kr, 32), memcpy(&k1, kr + 8, 32), memcpy(&k2, kr + 16, 32), memcpy(&k3, kr + 24, 32);
            float x0 = q[e], x1 = q[dp + e];
            a0 += x0 * k0, a1 += x0 * k1, a2 += x0 * k2, a3 += x0 * k3;
            b0 += x1 * k0, b1 += x1 * k1, b2 += x1 * k2, b3 += x1 * k3;
        }
        memcpy(o, &a0, 32), memcpy(o + 8, &a1, 32), memcpy(o + 16, &a2, 32), memcpy(o + 24, &a3, 32);
        memcpy(o + ld, &b0, 32), memcpy(o + ld + 8, &b1, 32);
        memcpy(o + ld + 16, &b2, 32), memcpy(o + ld + 24, &b3, 32);
#endif
    }
}

/* Rank the scores of key tile j (c [group * h rows][KEY_TILE]) into the heaps of queries g0 .. g0 + gn - 1. */
static void rank_tile(const float *c, long j, long g0, int gn, int h, int k, long t, const int64_t *limit,
                      const uint8_t *valid, const float *w, entry *heaps, int *counts) {
    int64_t base = j * KEY_TILE;
    uint32_t keep = 0xffffffffu; /* the tile's unpadded keys (the same for every query) */
    if (valid)
        for (int n = 0; n < KEY_TILE && base + n < t; n++)
            if (!valid[base + n]) keep &= ~(1u << n);
    if (!keep) return;
    for (int i = 0; i < gn; i++) {
        int64_t lim = limit[g0 + i] < t - 1 ? limit[g0 + i] : t - 1;
        if (lim < base) continue;
        const float *wi = w + (g0 + i) * (long)h, *ci = c + (size_t)i * h * KEY_TILE;
        entry *hi = heaps + (size_t)i * k;
        int fill = counts[i] < k;
        float s[KEY_TILE];
#ifdef __AVX512F__
        __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps(), z = _mm512_setzero_ps();
        for (int r = 0; r < h; r++) {
            __m512 wr = _mm512_set1_ps(wi[r]);
            s0 = _mm512_fmadd_ps(wr, _mm512_max_ps(_mm512_loadu_ps(ci + r * KEY_TILE), z), s0);
            s1 = _mm512_fmadd_ps(wr, _mm512_max_ps(_mm512_loadu_ps(ci + r * KEY_TILE + 16), z), s1);
        }
        uint32_t mask = (lim - base >= KEY_TILE - 1 ? 0xffffffffu : (1u << (lim - base + 1)) - 1u) & keep;
        if (!fill) {
            __m512 thr = _mm512_set1_ps(hi[0].s);
            mask &= (uint32_t)_mm512_cmp_ps_mask(s0, thr, _CMP_GT_OQ) |
                    (uint32_t)_mm512_cmp_ps_mask(s1, thr, _CMP_GT_OQ) << 16;
        }
        if (!mask) continue;
        _mm512_storeu_ps(s, s0);
        _mm512_storeu_ps(s + 16, s1);
#elif defined(SEEKV4_AVX2)
        __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0, z = s0;
        for (int r = 0; r < h; r++) {
            __m256 wr = _mm256_set1_ps(wi[r]);
            const float *cr = ci + r * KEY_TILE;
            s0 = _mm256_fmadd_ps(wr, _mm256_max_ps(_mm256_loadu_ps(cr), z), s0);
            s1 = _mm256_fmadd_ps(wr, _mm256_max_ps(_mm256_loadu_ps(cr + 8), z), s1);
            s2 = _mm256_fmadd_ps(wr, _mm256_max_ps(_mm256_loadu_ps(cr + 16), z), s2);
            s3 = _mm256_fmadd_ps(wr, _mm256_max_ps(_mm256_loadu_ps(cr + 24), z), s3);
        }
        uint32_t mask = (lim - base >= KEY_TILE - 1 ? 0xffffffffu : (1u << (lim - base + 1)) - 1u) & keep;
        if (!fill) {
            __m256 thr = _mm256_set1_ps(hi[0].s);
            mask &= (uint32_t)_mm256_movemask_ps(_mm256_cmp_ps(s0, thr, _CMP_GT_OQ)) |
                    (uint32_t)_mm256_movemask_ps(_mm256_cmp_ps(s1, thr, _CMP_GT_OQ)) << 8 |
                    (uint32_t)_mm256_movemask_ps(_mm256_cmp_ps(s2, thr, _CMP_GT_OQ)) << 16 |
                    (uint32_t)_mm256_movemask_ps(_mm256_cmp_ps(s3, thr, _CMP_GT_OQ)) << 24;
        }
        if (!mask) continue;
        _mm256_storeu_ps(s, s0), _mm256_storeu_ps(s + 8, s1), _mm256_storeu_ps(s + 16, s2);
        _mm256_storeu_ps(s + 24, s3);
#else
        for (int n = 0; n < KEY_TILE; n++) s[n] = 0.f;
        for (int r = 0; r < h; r++)
            for (int n = 0; n < KEY_TILE; n++) {
                float x = ci[r * KEY_TILE + n];
                s[n] = fmaf(wi[r], x > 0.f ? x : 0.f, s[n]);
            }
        uint32_t mask = (lim - base >= KEY_TILE - 1 ? 0xffffffffu : (1u << (lim - base + 1)) - 1u) & keep;
        if (!fill)
            for (int n = 0; n < KEY_TILE; n++)
                if (!(s[n] > hi[0].s)) mask &= ~(1u << n);
#endif
        if (mask) offer(hi, counts + i, k, s, base, mask);
    }
}

/* Top-k for queries [q0, q1) of one sequence.
 *   q [L, H, D] float32, w [L, H] float32 (scales folded in), packed keys from seekv4_pack_keys (t keys), or
 *   kpack NULL and keys [t, D] float32: each tile is packed just before use (decoding: every tile is read once,
 *   so a separate packing pass would only add a round trip through memory),
 *   limit [L]: the last visible key of each query (its cache index), valid [t] or NULL: key padding mask,
 *   out [L, k] int64 (only rows q0..q1-1 written).
 *   use_amx: 1 = tile unit (after seekv4_amx_enable), 0 = portable.
 * Returns 0, or -1 when memory runs out. */
int seekv4_indexer_topk(const float *q, const float *w, const uint16_t *kpack, const float *keys, long t, int h, int d,
                        const int64_t *limit, const uint8_t *valid, int k, long q0, long q1, int64_t *out,
                        int use_amx) {
    int dp = seekv4_padded_dim(d), chunks = dp / 32;
    int group = h >= GROUP_ROWS ? 1 : GROUP_ROWS / h;        /* queries per step */
    int rows = (group * h + ROW_TILE - 1) / ROW_TILE * ROW_TILE; /* their head rows, padded */
    uint16_t *qb = calloc((size_t)rows * dp, 2);
    float *c = malloc((size_t)(LAG + 1) * rows * KEY_TILE * 4); /* scores of LAG + 1 tiles: see the pipelining */
    float *kf = malloc((size_t)dp * KEY_TILE * 4), *qf = malloc((size_t)rows * dp * 4); /* portable path only */
    uint16_t *local = malloc((size_t)KEY_TILE * dp * 2); /* one packed tile (kpack NULL) */
    entry *heaps = malloc((size_t)group * k * sizeof(entry));
    int *counts = malloc((size_t)group * sizeof(int));
    if (!qb || !c || !kf || !qf || !local || !heaps || !counts) {
        free(qb), free(c), free(kf), free(qf), free(local), free(heaps), free(counts);
        return -1;
    }
#ifdef SEEKV4_AMX
    if (use_amx) {
        tile_config cfg = {0};
        cfg.palette_id = 1;
        for (int i = 0; i < 8; i++) cfg.rows[i] = 16, cfg.colsb[i] = 64;
        _tile_loadconfig(&cfg);
    }
#endif
    for (long g0 = q0; g0 < q1; g0 += group) {
        int gn = (int)(q1 - g0 < group ? q1 - g0 : group);
        int used = (gn * h + ROW_TILE - 1) / ROW_TILE * ROW_TILE; /* rows holding queries (decoding: 1 query) */
        memset(qb, 0, (size_t)rows * dp * 2);
        int64_t top = -1;
        for (int i = 0; i < gn; i++) {
            for (int r = 0; r < h; r++)
                for (int e = 0; e < d; e++)
                    qb[(size_t)(i * h + r) * dp + e] = to_bf16(q[((g0 + i) * h + r) * (long)d + e]);
            int64_t lim = limit[g0 + i] < t - 1 ? limit[g0 + i] : t - 1;
            if (lim > top) top = lim;
            counts[i] = 0;
        }
        if (!use_amx)
            for (size_t e = 0; e < (size_t)rows * dp; e++) qf[e] = from_bf16(qb[e]);
        /* Latest keys first, software-pipelined over a ring of LAG + 1 score buffers: tile j is scored before the
         * scores of tile j + LAG are ranked. */
        long first = top < 0 ? -1 : top / KEY_TILE;
        for (long j = first; j >= -LAG; j--) {
            if (j >= 0) {
                const uint16_t *ktile = local;
                if (kpack)
                    ktile = kpack + (size_t)j * 2 * chunks * 512;
                else
                    pack_range(keys, t, d, local, 2 * j, 2 * j + 2);
                float *cj = c + (size_t)(j % (LAG + 1)) * rows * KEY_TILE;
                if (!use_amx) unpack_tile(ktile, chunks, kf);
                for (int r0 = 0; r0 < used; r0 += ROW_TILE) {
#ifdef SEEKV4_AMX
                    if (use_amx) amx_block(qb + (size_t)r0 * dp, ktile, chunks, cj + (size_t)r0 * KEY_TILE, KEY_TILE);
                    else
#endif
                        portable_block(qf + (size_t)r0 * dp, dp, d, kf, cj + (size_t)r0 * KEY_TILE, KEY_TILE);
                }
            }
            long jr = j + LAG;
            if (jr <= first)
                rank_tile(c + (size_t)(jr % (LAG + 1)) * rows * KEY_TILE, jr, g0, gn, h, k, t, limit, valid, w, heaps,
                          counts);
        }
        for (int i = 0; i < gn; i++)
            drain(heaps + (size_t)i * k, counts[i], k, out + (g0 + i) * (long)k);
    }
#ifdef SEEKV4_AMX
    if (use_amx) _tile_release();
#endif
    free(qb), free(c), free(kf), free(qf), free(local), free(heaps), free(counts);
    return 0;
}
