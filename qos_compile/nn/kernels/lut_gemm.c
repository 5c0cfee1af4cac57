/* C kernels of qos-compile's approximate-multiplier emulation (loaded with ctypes).
 *
 * qos_lut_gemm: the general approximate GEMM, every product a table lookup;
 * qos_quantize / qos_expand: activation quantization and term expansion for the
 * convolution-based strategies (see qos_compile/nn/functional.py).
 *
 * Threads: OpenMP with the caller's thread count. torch's CPU wheels ship GNU OpenMP
 * under the soname libgomp.so.1, so inside a torch process this library binds to torch's
 * runtime and shares its thread pool (a second runtime, or Python threads, would spin
 * against torch's idle-waiting threads on the same cores).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

/* OpenMP loops only in the -fopenmp build; the single-threaded fallback build (a compiler
 * without OpenMP) drops them instead of warning about unknown pragmas. */
#ifdef _OPENMP
#define QOS_OMP(directive) _Pragma(directive)
#else
#define QOS_OMP(directive)
#endif

#define PBLK 256 /* positions per tile: 4 zmm of 64 bytes */
#define KCHUNK 256 /* k steps per 16-bit flush: 256 * 255 < 2^16 */

#if defined(__AVX512VBMI__) && defined(__AVX512BW__) && !defined(QOS_PORTABLE)
#include <immintrin.h>
#define QOS_VBMI 1
#else
#define QOS_VBMI 0
#endif

int qos_lut_gemm_simd(void) { return QOS_VBMI; }

/* General approximate GEMM over tiles (bg, position block, o), tile index
 * (bg * npb + pb) * O + o, npb = ceil(P / PBLK):
 *
 *   out[bg, o, p] = sum_k lut[w[g, o, k]][x[bg, k, p]]        (g = bg % G)
 *
 * x: (BG, K, P) uint8 table indices (activation code + offset, im2col'd, padding already
 * holding the pad code); w: (G, O, K) uint8 table indices (weight code + offset);
 * lut: (256, 256) int32, row = port A = weight; out: (BG, O, P) int32. The caller
 * guarantees that no accumulator leaves int32 (K * max|lut| < 2^31).
 *
 * AVX-512 VBMI path (x86-64 Ice Lake and later, Zen 4): ``planes`` holds the table minus
 * ``lo`` (non-negative) split into ``np_planes`` (2 when it fits 16 bits, else 4) byte
 * planes, (np_planes, 256, 256) uint8. One weight's 256-entry row of one plane is four zmm
 * registers, looked up for 64 activations at once with two vpermi2b and a blend on bit 7
 * of the index. Bytes are summed in 16-bit lanes (exact for KCHUNK steps) and flushed to
 * 32-bit sums; planes are recombined modulo 2^32, exact because the result fits int32.
 * Portable path: a blocked scalar loop over ``lut`` (gcc vectorises it with gathers).
 */
#if QOS_VBMI
static void vbmi_tile(const uint8_t *xb, const uint8_t *wrow, const uint8_t *planes, int np_planes, int64_t K,
                      int64_t P, int64_t npos, uint32_t *sums /* [np_planes][PBLK] */) {
    __mmask64 lmask[PBLK / 64];
    for (int v = 0; v < PBLK / 64; v++) {
        int64_t left = npos - 64 * v;
        lmask[v] = left >= 64 ? ~(__mmask64)0 : (left <= 0 ? 0 : (((__mmask64)1 << left) - 1));
    }
    memset(sums, 0, sizeof(uint32_t) * (size_t)np_planes * PBLK);
    const __m512i lo_byte = _mm512_set1_epi16(0x00ff);
    for (int64_t k0 = 0; k0 < K; k0 += KCHUNK) {
        int64_t k1 = k0 + KCHUNK < K ? k0 + KCHUNK : K;
        for (int pl = 0; pl < np_planes; pl += 2) {
            /* two planes per pass: 8 table + 16 accumulator registers */
            __m512i ae[2][PBLK / 64], ao[2][PBLK / 64];
            for (int q = 0; q < 2; q++)
                for (int v = 0; v < PBLK / 64; v++) ae[q][v] = ao[q][v] = _mm512_setzero_si512();
            for (int64_t k = k0; k < k1; k++) {
                const uint8_t *t0 = planes + ((size_t)pl * 256 + wrow[k]) * 256;
                const uint8_t *t1 = t0 + 256 * 256;
                __m512i a0 = _mm512_loadu_si512(t0), a1 = _mm512_loadu_si512(t0 + 64);
                __m512i a2 = _mm512_loadu_si512(t0 + 128), a3 = _mm512_loadu_si512(t0 + 192);
                __m512i b0 = _mm512_loadu_si512(t1), b1 = _mm512_loadu_si512(t1 + 64);
                __m512i b2 = _mm512_loadu_si512(t1 + 128), b3 = _mm512_loadu_si512(t1 + 192);
                const uint8_t *xk = xb + k * P;
                for (int v = 0; v < PBLK / 64; v++) {
                    __m512i xv = _mm512_maskz_loadu_epi8(lmask[v], xk + 64 * v);
                    __mmask64 hi = _mm512_movepi8_mask(xv);
                    __m512i r0 = _mm512_mask_blend_epi8(hi, _mm512_permutex2var_epi8(a0, xv, a1),
                                                        _mm512_permutex2var_epi8(a2, xv, a3));
                    __m512i r1 = _mm512_mask_blend_epi8(hi, _mm512_permutex2var_epi8(b0, xv, b1),
                                                        _mm512_permutex2var_epi8(b2, xv, b3));
                    ae[0][v] = _mm512_add_epi16(ae[0][v], _mm512_and_si512(r0, lo_byte));
                    ao[0][v] = _mm512_add_epi16(ao[0][v], _mm512_srli_epi16(r0, 8));
                    ae[1][v] = _mm512_add_epi16(ae[1][v], _mm512_and_si512(r1, lo_byte));
                    ao[1][v] = _mm512_add_epi16(ao[1][v], _mm512_srli_epi16(r1, 8));
                }
            }
            for (int q = 0; q < 2; q++)
                for (int v = 0; v < PBLK / 64; v++) {
                    uint16_t e[32], o[32];
                    _mm512_storeu_si512(e, ae[q][v]);
                    _mm512_storeu_si512(o, ao[q][v]);
                    uint32_t *s = sums + (size_t)(pl + q) * PBLK + 64 * v;
                    for (int j = 0; j < 32; j++) {
                        s[2 * j] += e[j];
                        s[2 * j + 1] += o[j];
                    }
                }
        }
    }
}
#endif

int qos_lut_gemm(const uint8_t *x, const uint8_t *w, const int32_t *lut, const uint8_t *planes, int np_planes,
                 int32_t lo, int32_t *out, int64_t BG, int64_t G, int64_t O, int64_t K, int64_t P, int nthreads) {
    if (BG < 0 || G < 1 || BG % G || O < 0 || K < 0 || P < 0 || (np_planes != 2 && np_planes != 4) || nthreads < 1)
        return -1;
    int64_t npb = (P + PBLK - 1) / PBLK, tiles = BG * npb * O;
#if QOS_VBMI
    (void)lut;
    uint32_t base = (uint32_t)((int64_t)lo * K); /* modulo 2^32, like the recombination */
#else
    (void)planes;
    (void)lo;
    const uint32_t *t = (const uint32_t *)lut;
#endif
QOS_OMP("omp parallel for schedule(dynamic, 1) num_threads(nthreads)")
    for (int64_t tile = 0; tile < tiles; tile++) {
        int64_t o = tile % O, pb = (tile / O) % npb, bg = tile / O / npb;
        int64_t g = bg % G, p0 = pb * PBLK, npos = P - p0 < PBLK ? P - p0 : PBLK;
        const uint8_t *xb = x + bg * K * P + p0, *wrow = w + (g * O + o) * K;
        int32_t *dst = out + (bg * O + o) * P + p0;
#if QOS_VBMI
        uint32_t sums[4 * PBLK];
        vbmi_tile(xb, wrow, planes, np_planes, K, P, npos, sums);
        for (int64_t p = 0; p < npos; p++) {
            uint32_t a = base;
            for (int pl = 0; pl < np_planes; pl++) a += sums[pl * PBLK + p] << (8 * pl);
            dst[p] = (int32_t)a;
        }
#else
        /* unsigned sums wrap modulo 2^32 and are exact because the result fits int32 */
        uint32_t acc[PBLK];
        memset(acc, 0, sizeof acc);
        for (int64_t k = 0; k < K; k++) {
            const uint8_t *xk = xb + k * P;
            const uint32_t *r = t + 256 * wrow[k];
            for (int64_t p = 0; p < npos; p++) acc[p] += r[xk[p]];
        }
        memcpy(dst, acc, (size_t)npos * sizeof(int32_t));
#endif
    }
    return 0;
}

/* Quantize activations to table indices, the formula of torch's fake quantization
 * (float32 product with the reciprocal scale, round half to even, clamp):
 *   idx[i] = clamp(nearbyintf(x[i] * inv) + z, qmin, qmax) + off
 * and store the smallest and largest index in range[0], range[1]. Built with
 * -ffp-contract=off so the product is rounded exactly as torch rounds it. */
int qos_quantize(const float *x, int64_t n, float inv, float z, float qmin, float qmax, float off, uint8_t *idx,
                 uint8_t *range, int nthreads) {
    if (n < 0 || nthreads < 1) return -1;
    int lo = 255, hi = 0;
QOS_OMP("omp parallel for reduction(min : lo) reduction(max : hi) schedule(static) num_threads(nthreads)")
    for (int64_t i = 0; i < n; i++) {
        float q = nearbyintf(x[i] * inv) + z;
        q = q < qmin ? qmin : (q > qmax ? qmax : q);
        int v = (int)(q + off);
        idx[i] = (uint8_t)v;
        lo = v < lo ? v : lo;
        hi = v > hi ? v : hi;
    }
    range[0] = (uint8_t)lo;
    range[1] = (uint8_t)hi;
    return 0;
}

/* Expand indices into T transformed activation planes (the stacked input of the term
 * strategies), rows r = ng * T + t:
 *   out[r * inner + i] = tab[t * 256 + idx[ng * inner + i]] */
int qos_expand(const uint8_t *idx, const float *tab, float *out, int64_t rows, int64_t T, int64_t inner,
               int nthreads) {
    if (rows < 0 || T < 1 || inner < 0 || nthreads < 1) return -1;
QOS_OMP("omp parallel for schedule(static) num_threads(nthreads)")
    for (int64_t r = 0; r < rows; r++) {
        const uint8_t *src = idx + (r / T) * inner;
        const float *row = tab + (r % T) * 256;
        float *dst = out + r * inner;
        for (int64_t i = 0; i < inner; i++) dst[i] = row[src[i]];
    }
    return 0;
}
