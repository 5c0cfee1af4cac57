/* qos_manifest.c -- validating loader of .qosm manifests (C99).
 *
 * Every field is decoded byte by byte as little-endian (no unaligned or
 * type-punned loads), every count/offset/index is checked before use, and all
 * arithmetic on values from the file is overflow-safe: sizes are compared by
 * division (`count > limit / size`) or subtraction (`nbytes > end - offset`)
 * instead of being multiplied or added first. The checks are the same, in the
 * same order, as read_manifest() in qos_compile/runtime/manifest.py.
 */
#include "qos_manifest.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "qos_runtime.h"

static const uint32_t kEntrySize[QOSM_SEC_COUNT] = QOSM_SEC_ENTRY_SIZES;
static const char* const kSecName[QOSM_SEC_COUNT] = QOSM_SEC_NAMES;
static const uint32_t kDtypeSize[QOSM_DTYPE_MAX + 1] = QOSM_DTYPE_SIZES;

/* ------------------------------------------------------------------ helpers */
static uint16_t rd16(const uint8_t* p) { return (uint16_t)(p[0] | (p[1] << 8)); }
static uint32_t rd32(const uint8_t* p) {
  return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}
static uint64_t rd64(const uint8_t* p) { return (uint64_t)rd32(p) | ((uint64_t)rd32(p + 4) << 32); }
static int64_t rdi64(const uint8_t* p) {
  uint64_t u = rd64(p);
  int64_t v;
  memcpy(&v, &u, sizeof v);
  return v;
}
static int32_t rdi32(const uint8_t* p) {
  uint32_t u = rd32(p);
  int32_t v;
  memcpy(&v, &u, sizeof v);
  return v;
}
static float rdf32(const uint8_t* p) {
  uint32_t u = rd32(p);
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
}

static int fail(char* err, size_t errlen, int code, const char* fmt, ...) {
  if (err && errlen) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
  }
  return code;
}

#define FAIL(...) \
  do {            \
    rc = fail(err, errlen, QOS_ERR_FORMAT, __VA_ARGS__); \
    goto bad;     \
  } while (0)

static void* alloc_n(uint64_t n, size_t size) {
  if (n == 0) n = 1;
  if (n > (uint64_t)(SIZE_MAX / size)) return NULL;
  return calloc((size_t)n, size);
}

typedef unsigned long long ull;

/* ------------------------------------------------------------------ CRC-32 */
static uint32_t crc_table_entry(uint32_t c) {
  int k;
  for (k = 0; k < 8; k++) c = (c & 1u) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
  return c;
}

uint32_t qosm_crc32(uint32_t crc, const uint8_t* p, size_t n) {
  /* A 256-entry table built on the stack per call (1 KiB, ~2k operations):
   * no global state, and negligible next to the bytes hashed. */
  uint32_t table[256];
  uint32_t i;
  for (i = 0; i < 256; i++) table[i] = crc_table_entry(i);
  crc = ~crc;
  while (n--) crc = table[(crc ^ *p++) & 0xFFu] ^ (crc >> 8);
  return ~crc;
}

uint32_t qosm_checksum(const uint8_t* buf, size_t len) {
  uint32_t crc = qosm_crc32(0, buf, QOSM_CHECKSUM_OFFSET);
  return qosm_crc32(crc, buf + QOSM_CHECKSUM_OFFSET + QOSM_CHECKSUM_SIZE,
                    len - QOSM_CHECKSUM_OFFSET - QOSM_CHECKSUM_SIZE);
}

/* ------------------------------------------------------------------ SHA-256 (FIPS 180-4) */
/* Only what the bank check needs: hash one byte stream whose length is a whole number of bytes.
 * Words are assembled from bytes big-endian as the standard specifies, so the result does not
 * depend on the host's byte order. */
typedef struct {
  uint32_t h[8];
  uint8_t block[64];
  size_t fill;     /* bytes in block */
  uint64_t total;  /* message bytes so far */
} sha256_ctx;

/* K: the first 32 bits of the fractional parts of the cube roots of the first 64 primes (4.2.2). */
static const uint32_t kSha256K[64] = {
    0x428a2f98u, 0x71374491u, 0xb5c0fbcfu, 0xe9b5dba5u, 0x3956c25bu, 0x59f111f1u, 0x923f82a4u, 0xab1c5ed5u,
    0xd807aa98u, 0x12835b01u, 0x243185beu, 0x550c7dc3u, 0x72be5d74u, 0x80deb1feu, 0x9bdc06a7u, 0xc19bf174u,
    0xe49b69c1u, 0xefbe4786u, 0x0fc19dc6u, 0x240ca1ccu, 0x2de92c6fu, 0x4a7484aau, 0x5cb0a9dcu, 0x76f988dau,
    0x983e5152u, 0xa831c66du, 0xb00327c8u, 0xbf597fc7u, 0xc6e00bf3u, 0xd5a79147u, 0x06ca6351u, 0x14292967u,
    0x27b70a85u, 0x2e1b2138u, 0x4d2c6dfcu, 0x53380d13u, 0x650a7354u, 0x766a0abbu, 0x81c2c92eu, 0x92722c85u,
    0xa2bfe8a1u, 0xa81a664bu, 0xc24b8b70u, 0xc76c51a3u, 0xd192e819u, 0xd6990624u, 0xf40e3585u, 0x106aa070u,
    0x19a4c116u, 0x1e376c08u, 0x2748774cu, 0x34b0bcb5u, 0x391c0cb3u, 0x4ed8aa4au, 0x5b9cca4fu, 0x682e6ff3u,
    0x748f82eeu, 0x78a5636fu, 0x84c87814u, 0x8cc70208u, 0x90befffau, 0xa4506cebu, 0xbef9a3f7u, 0xc67178f2u};

static uint32_t ror32(uint32_t x, unsigned n) { return (x >> n) | (x << (32u - n)); }

static void sha256_init(sha256_ctx* c) {
  /* H(0): the first 32 bits of the fractional parts of the square roots of the first 8 primes (5.3.3). */
  static const uint32_t h0[8] = {0x6a09e667u, 0xbb67ae85u, 0x3c6ef372u, 0xa54ff53au,
                                 0x510e527fu, 0x9b05688cu, 0x1f83d9abu, 0x5be0cd19u};
  memcpy(c->h, h0, sizeof h0);
  c->fill = 0;
  c->total = 0;
}

/* One 512-bit block (6.2.2). */
static void sha256_block(uint32_t h[8], const uint8_t* p) {
  uint32_t w[64], a, b, cc, dd, e, f, g, hh, t1, t2;
  int t;
  for (t = 0; t < 16; t++)
    w[t] = ((uint32_t)p[4 * t] << 24) | ((uint32_t)p[4 * t + 1] << 16) | ((uint32_t)p[4 * t + 2] << 8) |
           (uint32_t)p[4 * t + 3];
  for (t = 16; t < 64; t++) {
    uint32_t s0 = ror32(w[t - 15], 7) ^ ror32(w[t - 15], 18) ^ (w[t - 15] >> 3);
    uint32_t s1 = ror32(w[t - 2], 17) ^ ror32(w[t - 2], 19) ^ (w[t - 2] >> 10);
    w[t] = s1 + w[t - 7] + s0 + w[t - 16];
  }
  a = h[0], b = h[1], cc = h[2], dd = h[3], e = h[4], f = h[5], g = h[6], hh = h[7];
  for (t = 0; t < 64; t++) {
    t1 = hh + (ror32(e, 6) ^ ror32(e, 11) ^ ror32(e, 25)) + ((e & f) ^ (~e & g)) + kSha256K[t] + w[t];
    t2 = (ror32(a, 2) ^ ror32(a, 13) ^ ror32(a, 22)) + ((a & b) ^ (a & cc) ^ (b & cc));
    hh = g, g = f, f = e, e = dd + t1, dd = cc, cc = b, b = a, a = t1 + t2;
  }
  h[0] += a, h[1] += b, h[2] += cc, h[3] += dd, h[4] += e, h[5] += f, h[6] += g, h[7] += hh;
}

static void sha256_update(sha256_ctx* c, const uint8_t* p, size_t n) {
  c->total += n;
  while (n) {
    size_t take = 64 - c->fill;
    if (take > n) take = n;
    if (c->fill == 0 && take == 64) {
      sha256_block(c->h, p); /* whole block straight from the input */
    } else {
      memcpy(c->block + c->fill, p, take);
      c->fill += take;
      if (c->fill < 64) return;
      sha256_block(c->h, c->block);
    }
    c->fill = 0;
    p += take;
    n -= take;
  }
}

/* Padding (5.1.1): a 1 bit, zeros up to 56 mod 64 bytes, the bit length as a big-endian 64-bit number. */
static void sha256_final(sha256_ctx* c, uint8_t out[32]) {
  uint64_t bits = c->total * 8u;
  int k;
  c->block[c->fill++] = 0x80;
  if (c->fill > 56) {
    memset(c->block + c->fill, 0, 64 - c->fill);
    sha256_block(c->h, c->block);
    c->fill = 0;
  }
  memset(c->block + c->fill, 0, 56 - c->fill);
  for (k = 0; k < 8; k++) c->block[56 + k] = (uint8_t)(bits >> (56 - 8 * k));
  sha256_block(c->h, c->block);
  for (k = 0; k < 32; k++) out[k] = (uint8_t)(c->h[k / 4] >> (24 - 8 * (k % 4)));
}

/* Does a bank table (256 x 256 cells, int32 or int16 in the file, little-endian) hash to `hex` (64
 * lowercase hex digits, already checked) when taken as little-endian int32 in C order, as the writer
 * (add_bank_entry) and read_manifest hash it? int32 data is hashed in place; int16 cells are widened
 * one row at a time into a 1 KiB stack buffer (sign-extended byte by byte), so nothing is allocated.
 * Cost: one SHA-256 of 256 KiB per bank entry at load (entries sharing a table hash it again): this
 * portable code runs at roughly 200 MB/s on an x86-64 core, about 1.3 ms per table; expect several
 * ms per table on small ARM cores, so a bank of dozens of circuits adds tens of ms to qos_open. */
static int table_matches_sha256(const uint8_t* data, uint8_t dtype, const char* hex) {
  static const char kHexDigits[] = "0123456789abcdef";
  sha256_ctx c;
  uint8_t digest[32];
  int k;
  sha256_init(&c);
  if (dtype == QOSM_DTYPE_INT32) {
    sha256_update(&c, data, (size_t)256 * 256 * 4);
  } else {
    uint8_t row[256 * 4];
    int r, col;
    for (r = 0; r < 256; r++) {
      for (col = 0; col < 256; col++) {
        const uint8_t* cell = data + 2 * (256 * r + col);
        uint8_t sign = (cell[1] & 0x80u) ? 0xFFu : 0x00u;
        row[4 * col] = cell[0];
        row[4 * col + 1] = cell[1];
        row[4 * col + 2] = sign;
        row[4 * col + 3] = sign;
      }
      sha256_update(&c, row, sizeof row);
    }
  }
  sha256_final(&c, digest);
  for (k = 0; k < 32; k++)
    if (hex[2 * k] != kHexDigits[digest[k] >> 4] || hex[2 * k + 1] != kHexDigits[digest[k] & 15u]) return 0;
  return 1;
}

/* ------------------------------------------------------------------ parsing */
const char* qosm_str(const qosm_desc* d, uint32_t ref) { return d->strings + ref; }

/* A string reference: inside STRINGS and NUL-terminated within QOSM_MAX_STRING bytes. */
static int check_str(const qosm_desc* d, uint32_t ref, int nonempty, const char* what, uint32_t idx, char* err,
                     size_t errlen) {
  uint64_t window;
  if ((uint64_t)ref >= d->strings_size)
    return fail(err, errlen, QOS_ERR_FORMAT, "%s %u: string offset %u outside the string table (%llu bytes)", what,
                idx, ref, (ull)d->strings_size);
  window = d->strings_size - ref;
  if (window > QOSM_MAX_STRING + 1) window = QOSM_MAX_STRING + 1;
  if (!memchr(d->strings + ref, 0, (size_t)window))
    return fail(err, errlen, QOS_ERR_FORMAT, "%s %u: string at %u is not NUL-terminated within %d bytes", what, idx,
                ref, QOSM_MAX_STRING);
  if (nonempty && d->strings[ref] == 0) return fail(err, errlen, QOS_ERR_FORMAT, "%s %u: empty name", what, idx);
  return QOS_OK;
}

/* dtype, ndim, shape and nbytes of a tensor-like record (tensor, buffer, io). */
static int check_shape(uint8_t dtype, uint8_t ndim, const int64_t* shape, uint64_t nbytes, const char* what,
                       uint32_t idx, char* err, size_t errlen) {
  uint64_t prod;
  int k;
  if (dtype < 1 || dtype > QOSM_DTYPE_MAX)
    return fail(err, errlen, QOS_ERR_FORMAT, "%s %u: bad dtype code %u", what, idx, (unsigned)dtype);
  if (ndim > QOSM_MAX_NDIM)
    return fail(err, errlen, QOS_ERR_FORMAT, "%s %u: ndim %u > %d", what, idx, (unsigned)ndim, QOSM_MAX_NDIM);
  prod = kDtypeSize[dtype];
  for (k = 0; k < QOSM_MAX_NDIM; k++) {
    if (k < ndim) {
      if (shape[k] < 1 || shape[k] > QOSM_MAX_DIM)
        return fail(err, errlen, QOS_ERR_FORMAT, "%s %u: dim %d = %lld outside 1..%lld", what, idx, k,
                    (long long)shape[k], (long long)QOSM_MAX_DIM);
      if ((uint64_t)shape[k] > QOSM_MAX_NBYTES / prod)
        return fail(err, errlen, QOS_ERR_FORMAT, "%s %u: shape too large", what, idx);
      prod *= (uint64_t)shape[k];
    } else if (shape[k] != 0) {
      return fail(err, errlen, QOS_ERR_FORMAT, "%s %u: unused dim %d is not 0", what, idx, k);
    }
  }
  if (nbytes != prod)
    return fail(err, errlen, QOS_ERR_FORMAT, "%s %u: nbytes %llu != shape x element size = %llu", what, idx,
                (ull)nbytes, (ull)prod);
  return QOS_OK;
}

static void read_shape(const uint8_t* p, int64_t* shape) {
  int k;
  for (k = 0; k < QOSM_MAX_NDIM; k++) shape[k] = rdi64(p + 8 * k);
}

/* A name from the file, for an error message: printable ASCII kept, every other byte shown as '?',
 * at most 64 characters (then "..."), so the message stays one line of plain text whatever the file
 * holds. read_manifest's _printable() does the same. `out` holds at least 68 bytes. */
static const char* printable(const char* s, char* out) {
  size_t i;
  for (i = 0; s[i] && i < 64; i++) {
    unsigned char c = (unsigned char)s[i];
    out[i] = (c >= 0x20 && c <= 0x7E) ? (char)c : '?';
  }
  if (s[i])
    memcpy(out + i, "...", 4);
  else
    out[i] = 0;
  return out;
}

static int is_lower_hex(const char* s) {
  size_t i;
  if (strlen(s) != 64) return 0;
  for (i = 0; i < 64; i++)
    if (!((s[i] >= '0' && s[i] <= '9') || (s[i] >= 'a' && s[i] <= 'f'))) return 0;
  return 1;
}

void qosm_free(qosm_desc* d) {
  if (!d) return;
  free(d->tensors);
  free(d->bank);
  free(d->kernel_names);
  free(d->op_names);
  free(d->layer_names);
  free(d->assign);
  free(d->slot_names);
  free(d->slot_layers);
  free(d->slot_tensors);
  free(d->buffers);
  free(d->steps);
  free(d->args);
  free(d->inputs);
  free(d->outputs);
  memset(d, 0, sizeof *d);
}

static int decode_io(qosm_desc* d, const uint8_t* p, uint32_t n, qosm_io** out, const char* what, char* err,
                     size_t errlen) {
  uint32_t i;
  int rc;
  qosm_io* io = (qosm_io*)alloc_n(n, sizeof(qosm_io));
  if (!io) return fail(err, errlen, QOS_ERR_NOMEM, "out of memory");
  *out = io;
  for (i = 0; i < n; i++, p += QOSM_IO_SIZE) {
    qosm_io* r = &io[i];
    r->name = rd32(p + QOSM_OFF_IO_NAME);
    r->dtype = p[QOSM_OFF_IO_DTYPE];
    r->ndim = p[QOSM_OFF_IO_NDIM];
    r->scale = rdf32(p + QOSM_OFF_IO_SCALE);
    r->zero_point = rdi32(p + QOSM_OFF_IO_ZERO_POINT);
    r->nbytes = rd64(p + QOSM_OFF_IO_NBYTES);
    read_shape(p + QOSM_OFF_IO_SHAPE, r->shape);
    if ((rc = check_str(d, r->name, 0, what, i, err, errlen)) != QOS_OK) return rc;
    if (rd16(p + QOSM_OFF_IO_RESERVED))
      return fail(err, errlen, QOS_ERR_FORMAT, "%s %u: reserved field is not zero", what, i);
    if ((rc = check_shape(r->dtype, r->ndim, r->shape, r->nbytes, what, i, err, errlen)) != QOS_OK) return rc;
  }
  if (n == 0) return fail(err, errlen, QOS_ERR_FORMAT, "the model has no %ss", what);
  return QOS_OK;
}

int qosm_parse(const uint8_t* buf, size_t len, qosm_desc* d, char* err, size_t errlen) {
  uint64_t sec_off[QOSM_MAX_SECTIONS], sec_size[QOSM_MAX_SECTIONS], cnt[QOSM_SEC_COUNT];
  uint64_t file_size, hs, arena_end = 0, nassign, nslot_tensors;
  uint32_t ns, i, j, op;
  const uint8_t* p;
  uint8_t* written = NULL;
  int rc = QOS_ERR_FORMAT;

  if (!d) return fail(err, errlen, QOS_ERR_ARG, "no descriptor given");
  memset(d, 0, sizeof *d);
  if (!buf) return fail(err, errlen, QOS_ERR_ARG, "no buffer given");
  if (err && errlen) err[0] = 0;

  /* 1. header */
  if (len < QOSM_HEADER_SIZE)
    return fail(err, errlen, QOS_ERR_FORMAT, "file too short for a manifest header (%llu < %d bytes)", (ull)len,
                QOSM_HEADER_SIZE);
  if (memcmp(buf + QOSM_OFF_HEADER_MAGIC, QOSM_MAGIC, 4) != 0)
    return fail(err, errlen, QOS_ERR_FORMAT, "not a qos manifest (bad magic)");
  d->version_major = rd16(buf + QOSM_OFF_HEADER_VERSION_MAJOR);
  d->version_minor = rd16(buf + QOSM_OFF_HEADER_VERSION_MINOR);
  if (d->version_major != QOSM_VERSION_MAJOR)
    return fail(err, errlen, QOS_ERR_VERSION, "unsupported manifest version %u.%u (this runtime reads %d.x)",
                (unsigned)d->version_major, (unsigned)d->version_minor, QOSM_VERSION_MAJOR);
  file_size = rd64(buf + QOSM_OFF_HEADER_FILE_SIZE);
  if (file_size != (uint64_t)len)
    return fail(err, errlen, QOS_ERR_FORMAT,
                "file size mismatch: header says %llu bytes, got %llu (truncated or padded?)", (ull)file_size,
                (ull)len);
  ns = rd32(buf + QOSM_OFF_HEADER_NUM_SECTIONS);
  if (ns < QOSM_SEC_COUNT || ns > QOSM_MAX_SECTIONS)
    return fail(err, errlen, QOS_ERR_FORMAT, "bad section count %u (expected %d..%d)", ns, QOSM_SEC_COUNT,
                QOSM_MAX_SECTIONS);
  hs = rd32(buf + QOSM_OFF_HEADER_HEADER_SIZE);
  if (hs != (uint64_t)QOSM_HEADER_SIZE + (uint64_t)QOSM_SECTION_SIZE * ns || hs > len)
    return fail(err, errlen, QOS_ERR_FORMAT, "bad header size %llu", (ull)hs);
  if (rd32(buf + QOSM_OFF_HEADER_FLAGS) != 0 || rd64(buf + QOSM_OFF_HEADER_RESERVED) != 0 ||
      rd64(buf + QOSM_OFF_HEADER_RESERVED + 8) != 0 || rd64(buf + QOSM_OFF_HEADER_RESERVED + 16) != 0)
    return fail(err, errlen, QOS_ERR_FORMAT, "reserved header fields are not zero");

  /* 2. checksum. A fuzzing-only build (-DFUZZING_BUILD_MODE_UNSAFE_FOR_PRODUCTION, libFuzzer's
   * convention; qos_compile/runtime/build.py FUZZ_FLAGS) skips it, so that every mutated input
   * reaches the structural checks below. Never define it for a build that loads real files. */
#ifndef FUZZING_BUILD_MODE_UNSAFE_FOR_PRODUCTION
  if (qosm_checksum(buf, len) != rd32(buf + QOSM_OFF_HEADER_CHECKSUM))
    return fail(err, errlen, QOS_ERR_CHECKSUM, "checksum mismatch (file corrupted)");
#endif
  d->base = buf;
  d->size = len;
  d->arena_size = rd64(buf + QOSM_OFF_HEADER_ARENA_SIZE);

  /* 3. section table */
  for (i = 0; i < ns; i++) {
    uint64_t off, count;
    uint32_t esz, align;
    p = buf + QOSM_HEADER_SIZE + (size_t)QOSM_SECTION_SIZE * i;
    off = rd64(p + QOSM_OFF_SECTION_OFFSET);
    count = rd64(p + QOSM_OFF_SECTION_COUNT);
    esz = rd32(p + QOSM_OFF_SECTION_ENTRY_SIZE);
    if (rd32(p + QOSM_OFF_SECTION_RESERVED) != 0)
      return fail(err, errlen, QOS_ERR_FORMAT, "section %u: reserved field is not zero", i);
    if (i < QOSM_SEC_COUNT && esz != kEntrySize[i])
      return fail(err, errlen, QOS_ERR_FORMAT, "section %s: entry size %u (expected %u)", kSecName[i], esz,
                  kEntrySize[i]);
    if (esz != 0 && count > (uint64_t)len / esz)
      return fail(err, errlen, QOS_ERR_FORMAT, "section %u: %llu entries do not fit the file", i, (ull)count);
    sec_size[i] = count * esz;
    sec_off[i] = off;
    if (sec_size[i] == 0) {
      if (off != 0) return fail(err, errlen, QOS_ERR_FORMAT, "section %u: empty but offset %llu is not 0", i, (ull)off);
    } else {
      if (off < hs || off > (uint64_t)len - sec_size[i])
        return fail(err, errlen, QOS_ERR_FORMAT, "section %u: bytes [%llu, +%llu) outside the file body [%llu, %llu)",
                    i, (ull)off, (ull)sec_size[i], (ull)hs, (ull)len);
      align = (i == QOSM_SEC_DATA) ? QOSM_ALIGN : QOSM_TABLE_ALIGN;
      if (off % align)
        return fail(err, errlen, QOS_ERR_FORMAT, "section %u: offset %llu not a multiple of %u", i, (ull)off, align);
    }
    if (i < QOSM_SEC_COUNT) {
      cnt[i] = count;
      if (esz > 1 && count > 0xFFFFFFFFull)
        return fail(err, errlen, QOS_ERR_FORMAT, "section %s: too many entries", kSecName[i]);
    }
  }
  for (i = 0; i < ns; i++)
    for (j = i + 1; j < ns; j++)
      if (sec_size[i] && sec_size[j] && sec_off[i] < sec_off[j] + sec_size[j] && sec_off[j] < sec_off[i] + sec_size[i])
        return fail(err, errlen, QOS_ERR_FORMAT, "sections %u and %u overlap", i, j);

  d->strings = (const char*)buf + sec_off[QOSM_SEC_STRINGS];
  d->strings_size = sec_size[QOSM_SEC_STRINGS];
  d->data_offset = sec_off[QOSM_SEC_DATA];
  d->data_size = sec_size[QOSM_SEC_DATA];
  d->metadata = buf + sec_off[QOSM_SEC_METADATA];
  d->metadata_size = sec_size[QOSM_SEC_METADATA];
  d->num_tensors = (uint32_t)cnt[QOSM_SEC_TENSORS];
  d->num_bank = (uint32_t)cnt[QOSM_SEC_BANK];
  d->num_kernels = (uint32_t)cnt[QOSM_SEC_KERNELS];
  d->num_ops = (uint32_t)cnt[QOSM_SEC_OPS];
  d->num_layers = (uint32_t)cnt[QOSM_SEC_LAYERS];
  d->num_slots = (uint32_t)cnt[QOSM_SEC_SLOTS];
  d->num_buffers = (uint32_t)cnt[QOSM_SEC_BUFFERS];
  d->num_steps = (uint32_t)cnt[QOSM_SEC_STEPS];
  d->num_args = (uint32_t)cnt[QOSM_SEC_ARGS];
  d->num_inputs = (uint32_t)cnt[QOSM_SEC_INPUTS];
  d->num_outputs = (uint32_t)cnt[QOSM_SEC_OUTPUTS];

  /* 4. tensors */
  d->tensors = (qosm_tensor*)alloc_n(d->num_tensors, sizeof(qosm_tensor));
  if (!d->tensors) goto nomem;
  p = buf + sec_off[QOSM_SEC_TENSORS];
  for (i = 0; i < d->num_tensors; i++, p += QOSM_TENSOR_SIZE) {
    qosm_tensor* t = &d->tensors[i];
    t->name = rd32(p + QOSM_OFF_TENSOR_NAME);
    t->dtype = p[QOSM_OFF_TENSOR_DTYPE];
    t->ndim = p[QOSM_OFF_TENSOR_NDIM];
    t->role = rd16(p + QOSM_OFF_TENSOR_ROLE);
    t->offset = rd64(p + QOSM_OFF_TENSOR_OFFSET);
    t->nbytes = rd64(p + QOSM_OFF_TENSOR_NBYTES);
    read_shape(p + QOSM_OFF_TENSOR_SHAPE, t->shape);
    if ((rc = check_str(d, t->name, 0, "tensor", i, err, errlen)) != QOS_OK) goto bad;
    if ((rc = check_shape(t->dtype, t->ndim, t->shape, t->nbytes, "tensor", i, err, errlen)) != QOS_OK) goto bad;
    if (t->role >= QOSM_ROLE_COUNT) FAIL("tensor %u: bad role %u", i, (unsigned)t->role);
    if (t->offset % QOSM_ALIGN) FAIL("tensor %u: data offset %llu not a multiple of %d", i, (ull)t->offset, QOSM_ALIGN);
    if (t->offset < d->data_offset || t->offset - d->data_offset > d->data_size ||
        t->nbytes > d->data_size - (t->offset - d->data_offset))
      FAIL("tensor %u: data [%llu, +%llu) outside the data section", i, (ull)t->offset, (ull)t->nbytes);
  }

  /* 5. bank */
  d->bank = (qosm_bank*)alloc_n(d->num_bank, sizeof(qosm_bank));
  if (!d->bank) goto nomem;
  p = buf + sec_off[QOSM_SEC_BANK];
  for (i = 0; i < d->num_bank; i++, p += QOSM_BANK_SIZE) {
    qosm_bank* b = &d->bank[i];
    const qosm_tensor* t;
    char shown[68];
    b->name = rd32(p + QOSM_OFF_BANK_NAME);
    b->sha256 = rd32(p + QOSM_OFF_BANK_SHA256);
    b->table = rd32(p + QOSM_OFF_BANK_TABLE);
    b->power_mw = rdf32(p + QOSM_OFF_BANK_POWER_MW);
    if ((rc = check_str(d, b->name, 1, "bank entry", i, err, errlen)) != QOS_OK) goto bad;
    if ((rc = check_str(d, b->sha256, 0, "bank entry sha256", i, err, errlen)) != QOS_OK) goto bad;
    if (!is_lower_hex(qosm_str(d, b->sha256))) FAIL("bank entry %u: sha256 is not 64 lowercase hex digits", i);
    if (b->table >= d->num_tensors) FAIL("bank entry %u: table tensor %u out of range", i, b->table);
    t = &d->tensors[b->table];
    if ((t->dtype != QOSM_DTYPE_INT32 && t->dtype != QOSM_DTYPE_INT16) || t->ndim != 2 || t->shape[0] != 256 ||
        t->shape[1] != 256 || t->role != QOSM_ROLE_LUT)
      FAIL("bank entry %u: table must be a (256, 256) int32/int16 tensor with role LUT", i);
    /* The hash names the circuit: a table changed after compilation, CRC recomputed, is refused.
     * The tensor's bytes lie inside DATA (step 4) and its nbytes is 256 x 256 x element size. */
    if (!table_matches_sha256(buf + t->offset, t->dtype, qosm_str(d, b->sha256)))
      FAIL("bank entry %u (%s): table does not match its sha256", i, printable(qosm_str(d, b->name), shown));
  }

  /* 6. kernels, OPs, layers */
  d->kernel_names = (uint32_t*)alloc_n(d->num_kernels, sizeof(uint32_t));
  if (!d->kernel_names) goto nomem;
  p = buf + sec_off[QOSM_SEC_KERNELS];
  for (i = 0; i < d->num_kernels; i++, p += QOSM_KERNEL_SIZE) {
    d->kernel_names[i] = rd32(p + QOSM_OFF_KERNEL_NAME);
    if ((rc = check_str(d, d->kernel_names[i], 1, "kernel", i, err, errlen)) != QOS_OK) goto bad;
    if (rd32(p + QOSM_OFF_KERNEL_FLAGS)) FAIL("kernel %u: flags are not zero", i);
  }
  if (d->num_ops < 1 || d->num_ops > QOSM_MAX_OPS)
    FAIL("operating point count %u outside 1..%d", d->num_ops, QOSM_MAX_OPS);
  d->op_names = (uint32_t*)alloc_n(d->num_ops, sizeof(uint32_t));
  if (!d->op_names) goto nomem;
  p = buf + sec_off[QOSM_SEC_OPS];
  for (i = 0; i < d->num_ops; i++, p += QOSM_OP_SIZE) {
    char shown[68];
    d->op_names[i] = rd32(p + QOSM_OFF_OP_NAME);
    if ((rc = check_str(d, d->op_names[i], 1, "operating point", i, err, errlen)) != QOS_OK) goto bad;
    if (rd32(p + QOSM_OFF_OP_RESERVED)) FAIL("operating point %u: reserved field is not zero", i);
    for (j = 0; j < i; j++)
      if (strcmp(qosm_str(d, d->op_names[j]), qosm_str(d, d->op_names[i])) == 0)
        FAIL("operating point %u: duplicate name '%s'", i, printable(qosm_str(d, d->op_names[i]), shown));
  }
  d->layer_names = (uint32_t*)alloc_n(d->num_layers, sizeof(uint32_t));
  if (!d->layer_names) goto nomem;
  p = buf + sec_off[QOSM_SEC_LAYERS];
  for (i = 0; i < d->num_layers; i++, p += QOSM_LAYER_SIZE) {
    d->layer_names[i] = rd32(p + QOSM_OFF_LAYER_NAME);
    if ((rc = check_str(d, d->layer_names[i], 0, "layer", i, err, errlen)) != QOS_OK) goto bad;
    if (rd32(p + QOSM_OFF_LAYER_RESERVED)) FAIL("layer %u: reserved field is not zero", i);
  }

  /* 7. assign */
  nassign = (uint64_t)d->num_ops * d->num_layers;
  if (cnt[QOSM_SEC_ASSIGN] != nassign)
    FAIL("assign has %llu entries, expected %u x %u", (ull)cnt[QOSM_SEC_ASSIGN], d->num_ops, d->num_layers);
  d->assign = (uint32_t*)alloc_n(nassign, sizeof(uint32_t));
  if (!d->assign) goto nomem;
  p = buf + sec_off[QOSM_SEC_ASSIGN];
  for (i = 0; i < nassign; i++, p += QOSM_ASSIGN_SIZE) {
    d->assign[i] = rd32(p + QOSM_OFF_ASSIGN_BANK);
    if (d->assign[i] >= d->num_bank)
      FAIL("assign[%u][%u] = %u: bank index out of range", i / d->num_layers, i % d->num_layers, d->assign[i]);
  }

  /* 8. slots */
  nslot_tensors = (uint64_t)d->num_ops * d->num_slots;
  if (cnt[QOSM_SEC_SLOT_TENSORS] != nslot_tensors)
    FAIL("slot tensor table has %llu entries, expected %u x %u", (ull)cnt[QOSM_SEC_SLOT_TENSORS], d->num_ops,
         d->num_slots);
  d->slot_names = (uint32_t*)alloc_n(d->num_slots, sizeof(uint32_t));
  d->slot_layers = (uint32_t*)alloc_n(d->num_slots, sizeof(uint32_t));
  d->slot_tensors = (uint32_t*)alloc_n(nslot_tensors, sizeof(uint32_t));
  if (!d->slot_names || !d->slot_layers || !d->slot_tensors) goto nomem;
  p = buf + sec_off[QOSM_SEC_SLOT_TENSORS];
  for (i = 0; i < nslot_tensors; i++, p += QOSM_SLOT_TENSOR_SIZE) d->slot_tensors[i] = rd32(p);
  p = buf + sec_off[QOSM_SEC_SLOTS];
  for (i = 0; i < d->num_slots; i++, p += QOSM_SLOT_SIZE) {
    uint32_t layer = rd32(p + QOSM_OFF_SLOT_LAYER);
    d->slot_names[i] = rd32(p + QOSM_OFF_SLOT_NAME);
    d->slot_layers[i] = layer;
    if ((rc = check_str(d, d->slot_names[i], 0, "slot", i, err, errlen)) != QOS_OK) goto bad;
    if (layer != QOSM_NO_LAYER && layer >= d->num_layers) FAIL("slot %u: layer %u out of range", i, layer);
    for (op = 0; op < d->num_ops; op++) {
      uint32_t t = d->slot_tensors[(uint64_t)op * d->num_slots + i];
      const qosm_tensor *ref, *cur;
      if (t >= d->num_tensors) FAIL("slot %u, operating point %u: tensor %u out of range", i, op, t);
      ref = &d->tensors[d->slot_tensors[i]];
      cur = &d->tensors[t];
      if (cur->dtype != ref->dtype || cur->ndim != ref->ndim ||
          memcmp(cur->shape, ref->shape, sizeof(cur->shape)) != 0)
        FAIL("slot %u: operating point %u's tensor differs in dtype/shape from operating point 0's", i, op);
      if (layer != QOSM_NO_LAYER &&
          t != d->bank[d->assign[(uint64_t)op * d->num_layers + layer]].table)
        FAIL("slot %u: operating point %u's tensor is not the table of assign[%u][%u]", i, op, op, layer);
    }
  }

  /* 9. buffers (arena) */
  d->buffers = (qosm_tensor*)alloc_n(d->num_buffers, sizeof(qosm_tensor));
  if (!d->buffers) goto nomem;
  p = buf + sec_off[QOSM_SEC_BUFFERS];
  for (i = 0; i < d->num_buffers; i++, p += QOSM_BUFFER_SIZE) {
    qosm_tensor* b = &d->buffers[i];
    b->name = rd32(p + QOSM_OFF_BUFFER_NAME);
    b->dtype = p[QOSM_OFF_BUFFER_DTYPE];
    b->ndim = p[QOSM_OFF_BUFFER_NDIM];
    b->offset = rd64(p + QOSM_OFF_BUFFER_OFFSET);
    b->nbytes = rd64(p + QOSM_OFF_BUFFER_NBYTES);
    read_shape(p + QOSM_OFF_BUFFER_SHAPE, b->shape);
    if ((rc = check_str(d, b->name, 0, "buffer", i, err, errlen)) != QOS_OK) goto bad;
    if (rd16(p + QOSM_OFF_BUFFER_RESERVED)) FAIL("buffer %u: reserved field is not zero", i);
    if ((rc = check_shape(b->dtype, b->ndim, b->shape, b->nbytes, "buffer", i, err, errlen)) != QOS_OK) goto bad;
    if (b->offset % QOSM_ALIGN)
      FAIL("buffer %u: arena offset %llu not a multiple of %d", i, (ull)b->offset, QOSM_ALIGN);
    if (b->offset > d->arena_size || b->nbytes > d->arena_size - b->offset)
      FAIL("buffer %u: [%llu, +%llu) outside the arena (%llu bytes)", i, (ull)b->offset, (ull)b->nbytes,
           (ull)d->arena_size);
    if (b->offset + b->nbytes > arena_end) arena_end = b->offset + b->nbytes;
  }
  /* arena_end <= arena_size < 2^64, so rounding up cannot overflow unless arena_size is within 63 of 2^64 */
  if (arena_end > UINT64_MAX - (QOSM_ALIGN - 1) ||
      d->arena_size != (arena_end + (QOSM_ALIGN - 1)) / QOSM_ALIGN * QOSM_ALIGN)
    FAIL("arena size %llu is not the buffers' extent rounded up to %d", (ull)d->arena_size, QOSM_ALIGN);

  /* 10. inputs and outputs */
  if ((rc = decode_io(d, buf + sec_off[QOSM_SEC_INPUTS], d->num_inputs, &d->inputs, "input", err, errlen)) != QOS_OK)
    goto bad;
  if ((rc = decode_io(d, buf + sec_off[QOSM_SEC_OUTPUTS], d->num_outputs, &d->outputs, "output", err, errlen)) !=
      QOS_OK)
    goto bad;

  /* 11. plan */
  d->args = (qosm_arg*)alloc_n(d->num_args, sizeof(qosm_arg));
  if (!d->args) goto nomem;
  p = buf + sec_off[QOSM_SEC_ARGS];
  for (i = 0; i < d->num_args; i++, p += QOSM_ARG_SIZE) {
    uint32_t limit;
    const char* kind;
    qosm_arg* a = &d->args[i];
    a->kind = rd32(p + QOSM_OFF_ARG_KIND);
    a->index = rd32(p + QOSM_OFF_ARG_INDEX);
    switch (a->kind) {
      case QOSM_ARG_CONST: limit = d->num_tensors; kind = "const"; break;
      case QOSM_ARG_SLOT: limit = d->num_slots; kind = "slot"; break;
      case QOSM_ARG_BUFFER: limit = d->num_buffers; kind = "buffer"; break;
      case QOSM_ARG_INPUT: limit = d->num_inputs; kind = "input"; break;
      case QOSM_ARG_OUTPUT: limit = d->num_outputs; kind = "output"; break;
      default: FAIL("argument %u: bad kind %u", i, a->kind);
    }
    if (a->index >= limit) FAIL("argument %u: %s index %u out of range (%u)", i, kind, a->index, limit);
  }
  if (d->num_steps < 1) FAIL("the plan has no steps");
  d->steps = (qosm_step*)alloc_n(d->num_steps, sizeof(qosm_step));
  written = (uint8_t*)alloc_n(d->num_outputs, 1);
  if (!d->steps || !written) goto nomem;
  p = buf + sec_off[QOSM_SEC_STEPS];
  for (i = 0; i < d->num_steps; i++, p += QOSM_STEP_SIZE) {
    qosm_step* s = &d->steps[i];
    s->kernel = rd32(p + QOSM_OFF_STEP_KERNEL);
    s->first_arg = rd32(p + QOSM_OFF_STEP_FIRST_ARG);
    s->num_args = rd32(p + QOSM_OFF_STEP_NUM_ARGS);
    if (s->kernel >= d->num_kernels) FAIL("step %u: kernel %u out of range", i, s->kernel);
    if (s->num_args > QOSM_MAX_STEP_ARGS || s->first_arg > d->num_args || s->num_args > d->num_args - s->first_arg)
      FAIL("step %u: arguments [%u, +%u) out of range (%u)", i, s->first_arg, s->num_args, d->num_args);
    if (rd32(p + QOSM_OFF_STEP_RESERVED)) FAIL("step %u: reserved field is not zero", i);
    for (j = 0; j < s->num_args; j++) {
      const qosm_arg* a = &d->args[s->first_arg + j];
      if (a->kind == QOSM_ARG_OUTPUT) written[a->index] = 1;
    }
  }
  for (i = 0; i < d->num_outputs; i++)
    if (!written[i]) FAIL("output %u is not an argument of any step", i);
  free(written);
  return QOS_OK;

nomem:
  rc = fail(err, errlen, QOS_ERR_NOMEM, "out of memory while loading the manifest");
bad:
  free(written);
  qosm_free(d);
  return rc;
}
