/* fuzz_recipes.c -- run many structure-aware mutants of one manifest through the loader and the
 * executor, one process for all (qos_compile/runtime/fuzzing.py writes the mutants; the tests
 * build this with AddressSanitizer + UndefinedBehaviorSanitizer).
 *
 *   fuzz_recipes BASE.qosm MUTANTS.bin [SECONDS]
 *
 * MUTANTS.bin: a sequence of mutants, each "u32 count" then count patches "u64 offset, u32 length,
 * bytes" (little-endian), applied in order to a fresh copy of BASE. The mutator rewrites the
 * CRC-32 as one of the patches, so a normal (checking) build reaches the parser. A patch outside
 * BASE is a usage error (exit 3).
 *
 * Every mutant is opened from an exact-size heap copy (ASan sees any read past its end) with the
 * kernels linked with this file: with -DQOS_FUZZ_TOUCH every name resolves to the touching kernel
 * of runtime/tests/qos_touch_kernel.c (reads the first and last byte of every argument); otherwise
 * through the table qos_linked_kernels (a compiled model's real kernels, or the test kernels).
 * An opened model is inspected and run once per OP (at most 8 OPs, zero inputs of at most 16 MiB).
 *
 * Output: "B <i>" before mutant i (flushed, so a crash or hang names its mutant) and
 * "R <i> <open code> <run code> <message>" after it. SECONDS (default 10): alarm() per mutant, so
 * a hang ends the process with SIGALRM right after its "B" line.
 */
#if !defined(_POSIX_C_SOURCE) || _POSIX_C_SOURCE < 200809L
#undef _POSIX_C_SOURCE
#define _POSIX_C_SOURCE 200809L
#endif
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "qos_runtime.h"

#ifdef QOS_FUZZ_TOUCH
qos_packed_fn qos_touch_lookup(const char* name, void* user);
#define FUZZ_LOOKUP qos_touch_lookup
#define FUZZ_USER NULL
#else
extern const qos_kernel_entry qos_linked_kernels[];
#define FUZZ_LOOKUP qos_table_lookup
#define FUZZ_USER ((void*)qos_linked_kernels)
#endif

#define FUZZ_MAX_IO_BYTES ((uint64_t)16 << 20)
#define FUZZ_MAX_OPS 8u

static unsigned char* read_file(const char* path, size_t* len) {
  FILE* f = fopen(path, "rb");
  unsigned char* buf;
  long n;
  if (!f) return NULL;
  if (fseek(f, 0, SEEK_END) != 0 || (n = ftell(f)) < 0 || fseek(f, 0, SEEK_SET) != 0) {
    fclose(f);
    return NULL;
  }
  buf = (unsigned char*)malloc(n ? (size_t)n : 1);
  if (buf && n && fread(buf, 1, (size_t)n, f) != (size_t)n) {
    free(buf);
    buf = NULL;
  }
  fclose(f);
  *len = (size_t)n;
  return buf;
}

static int rd_le(const unsigned char* p, size_t* pos, size_t end, int bytes, uint64_t* out) {
  int k;
  uint64_t v = 0;
  if (end - *pos < (size_t)bytes) return 0;
  for (k = bytes - 1; k >= 0; k--) v = (v << 8) | p[*pos + (size_t)k];
  *pos += (size_t)bytes;
  *out = v;
  return 1;
}

/* Open, inspect and run one manifest; returns the open code, *run_rc the first failed run's code. */
static int exercise(const unsigned char* data, size_t len, int* run_rc, char* err, size_t errlen) {
  qos_model* m = NULL;
  qos_tensor_info info;
  uint32_t i, op, ni, no;
  uint64_t total = 0;
  size_t mlen;
  volatile unsigned sink = 0;
  const unsigned char* meta;
  int rc = qos_open_memory(data, len, FUZZ_LOOKUP, FUZZ_USER, &m, err, errlen);
  *run_rc = 0;
  if (rc != QOS_OK) {
    if (m || !err[0]) abort(); /* a failure leaves no model and always a message */
    return rc;
  }
  meta = (const unsigned char*)qos_metadata(m, &mlen);
  if (mlen) sink += meta[0] + meta[mlen - 1];
  for (op = 0; op < qos_num_ops(m); op++) sink += (unsigned)strlen(qos_op_name(m, op));
  for (i = 0; i < qos_num_steps(m); i++) sink += (unsigned)strlen(qos_step_kernel(m, i));
  if (qos_select(m, qos_num_ops(m)) == QOS_OK) abort();
  ni = qos_num_inputs(m);
  no = qos_num_outputs(m);
  for (i = 0; i < ni; i++) qos_input_info(m, i, &info), total += info.nbytes;
  for (i = 0; i < no; i++) qos_output_info(m, i, &info), total += info.nbytes;
  if (total <= FUZZ_MAX_IO_BYTES) {
    const void** ins = (const void**)calloc(ni ? ni : 1, sizeof(void*));
    void** outs = (void**)calloc(no ? no : 1, sizeof(void*));
    size_t* ib = (size_t*)calloc(ni ? ni : 1, sizeof(size_t));
    size_t* ob = (size_t*)calloc(no ? no : 1, sizeof(size_t));
    if (!ins || !outs || !ib || !ob) abort();
    for (i = 0; i < ni; i++) qos_input_info(m, i, &info), ib[i] = info.nbytes, ins[i] = calloc(1, info.nbytes ? info.nbytes : 1);
    for (i = 0; i < no; i++) qos_output_info(m, i, &info), ob[i] = info.nbytes, outs[i] = calloc(1, info.nbytes ? info.nbytes : 1);
    for (op = 0; op < qos_num_ops(m) && op < FUZZ_MAX_OPS && *run_rc == 0; op++) {
      if (qos_select(m, op) != QOS_OK) abort();
      *run_rc = qos_run_multi(m, ins, ib, outs, ob);
      if (*run_rc != QOS_OK && !qos_last_error(m)[0]) abort(); /* a failed run always says why */
    }
    for (i = 0; i < ni; i++) free((void*)ins[i]);
    for (i = 0; i < no; i++) free(outs[i]);
    free(ins), free(outs), free(ib), free(ob);
  }
  if (*run_rc) snprintf(err, errlen, "%s", qos_last_error(m));
  else snprintf(err, errlen, "ok");
  qos_close(m);
  (void)sink;
  return QOS_OK;
}

int main(int argc, char** argv) {
  size_t base_len, pack_len, pos = 0;
  unsigned char *base, *pack;
  unsigned seconds = 10;
  long idx = 0;
  if (argc < 3 || argc > 4) {
    fprintf(stderr, "usage: fuzz_recipes BASE.qosm MUTANTS.bin [SECONDS]\n");
    return 2;
  }
  if (argc == 4) seconds = (unsigned)strtoul(argv[3], NULL, 10);
  base = read_file(argv[1], &base_len);
  pack = read_file(argv[2], &pack_len);
  if (!base || !pack) {
    fprintf(stderr, "fuzz_recipes: cannot read %s or %s\n", argv[1], argv[2]);
    return 2;
  }
  while (pos < pack_len) {
    uint64_t count, k;
    unsigned char* buf = (unsigned char*)malloc(base_len ? base_len : 1);
    char err[QOS_ERROR_MAX];
    int rc, run_rc;
    if (!buf || !rd_le(pack, &pos, pack_len, 4, &count)) return 3;
    memcpy(buf, base, base_len);
    for (k = 0; k < count; k++) {
      uint64_t off, n;
      if (!rd_le(pack, &pos, pack_len, 8, &off) || !rd_le(pack, &pos, pack_len, 4, &n) || n > pack_len - pos ||
          off > base_len || n > base_len - off)
        return 3;
      memcpy(buf + off, pack + pos, (size_t)n);
      pos += (size_t)n;
    }
    printf("B %ld\n", idx);
    fflush(stdout);
    alarm(seconds);
    err[0] = 0;
    rc = exercise(buf, base_len, &run_rc, err, sizeof err);
    alarm(0);
    free(buf);
    for (k = 0; err[k]; k++)
      if ((unsigned char)err[k] < 0x20 || (unsigned char)err[k] > 0x7e) err[k] = '?'; /* one line, ASCII */
    printf("R %ld %d %d %s\n", idx, rc, run_rc, err);
    fflush(stdout);
    idx++;
  }
  free(base);
  free(pack);
  return 0;
}
