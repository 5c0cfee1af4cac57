/* qos_run_main.c -- `qos-run`: run a manifest from the command line (the on-device driver).
 *
 *   qos-run MODEL.qosm [--op N|NAME] [--input IN.bin] [--output OUT.bin] [--repeat N]
 *                      [--op-sequence 0,2,1,...] [--bench N] [--switch-bench N] [--profile N] [--info]
 *
 * IN.bin holds the raw bytes of the model's single input, or of several inputs
 * back to back (a stream); OUT.bin receives the outputs in the same order.
 * --op-sequence runs stream item i at OP seq[i % len], switching with qos_select
 * between inferences (mid-stream switching). --repeat N runs N times and prints
 * the mean time per inference. --bench N prints the median latency of N runs per
 * OP (zero input if no --input); --switch-bench N the cost of one qos_select in
 * ns, averaged over N calls cycling through the OPs. --profile N runs N inferences
 * at the selected OP and prints each plan step's mean time. --info prints OPs and I/O.
 *
 * Kernels come from whatever is linked with this file, and ONLY from its table
 *     extern const qos_kernel_entry qos_linked_kernels[];   (ends with {NULL, NULL})
 * which the kernel side provides (the test kernels, or the table of a compiled model's own
 * kernel entry points that qos-compile generates): a manifest naming anything else is
 * rejected when it is opened.
 *
 * Numbers are parsed strictly: decimal digits only (no sign, spaces, exponent or trailing
 * text), counts in 1..10^9, an OP index below the model's OP count. Every size computation
 * is overflow-checked. --output is written atomically (a temporary file in the same folder,
 * then rename). Exit status: 0 ok, 1 runtime error (a kernel failed, out of memory),
 * 2 bad arguments or a bad file (manifest, input).
 */
#if !defined(_POSIX_C_SOURCE) || _POSIX_C_SOURCE < 200809L
#undef _POSIX_C_SOURCE
#define _POSIX_C_SOURCE 200809L
#endif
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "qos_runtime.h"

extern const qos_kernel_entry qos_linked_kernels[];

#define QOS_RUN_MAX_COUNT 1000000000L /* --repeat, --bench, --switch-bench, --profile: at most 10^9 */
#define QOS_RUN_MAX_SEQ 256           /* entries of --op-sequence */

/* n * size bytes, or NULL when that overflows size_t or malloc fails (never 0 bytes). */
static void* alloc_array(size_t n, size_t size, int zero) {
  if (size && n > SIZE_MAX / size) return NULL;
  if (n * size == 0) return zero ? calloc(1, 1) : malloc(1);
  return zero ? calloc(n, size) : malloc(n * size);
}

/* Strict decimal: digits only, value in [lo, hi] (hi <= 2^32 - 1, so no overflow below). */
static int parse_u32_range(const char* s, unsigned long lo, unsigned long hi, unsigned long* out) {
  unsigned long long v = 0;
  const char* p;
  if (!s || !*s) return 0;
  for (p = s; *p; p++) {
    if (*p < '0' || *p > '9') return 0;
    v = v * 10u + (unsigned)(*p - '0');
    if (v > hi) return 0;
  }
  if (v < lo) return 0;
  *out = (unsigned long)v;
  return 1;
}

static int parse_count(const char* s, long* out) {
  unsigned long v;
  if (!parse_u32_range(s, 1, (unsigned long)QOS_RUN_MAX_COUNT, &v)) return 0;
  *out = (long)v;
  return 1;
}

static int all_digits(const char* s) {
  if (!*s) return 0;
  for (; *s; s++)
    if (*s < '0' || *s > '9') return 0;
  return 1;
}

/* An OP: an index below the model's OP count (digits only), else an OP name. */
static int parse_op(qos_model* m, const char* s, uint32_t* op) {
  unsigned long v;
  int32_t k;
  if (all_digits(s)) {
    if (!parse_u32_range(s, 0, (unsigned long)qos_num_ops(m) - 1, &v)) return 0;
    *op = (uint32_t)v;
    return 1;
  }
  k = qos_find_op(m, s);
  if (k < 0) return 0;
  *op = (uint32_t)k;
  return 1;
}

static unsigned char* read_all(const char* path, size_t* len) {
  FILE* f = fopen(path, "rb");
  unsigned char* buf;
  long n;
  if (!f) return NULL;
  if (fseek(f, 0, SEEK_END) != 0 || (n = ftell(f)) < 0 || fseek(f, 0, SEEK_SET) != 0 ||
      (unsigned long)n > (unsigned long)(SIZE_MAX - 1)) {
    fclose(f);
    return NULL;
  }
  buf = (unsigned char*)alloc_array((size_t)n, 1, 0);
  if (buf && n && fread(buf, 1, (size_t)n, f) != (size_t)n) {
    free(buf);
    buf = NULL;
  }
  fclose(f);
  *len = (size_t)n;
  return buf;
}

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void usage(void) {
  fprintf(stderr,
          "usage: qos-run MODEL.qosm [--op N|NAME] [--input IN.bin] [--output OUT.bin] [--repeat N]\n"
          "               [--op-sequence 0,2,1,...] [--bench N] [--switch-bench N] [--profile N] [--info]\n");
}

static int cmp_double(const void* a, const void* b) {
  double x = *(const double*)a, y = *(const double*)b;
  return (x > y) - (x < y);
}

/* Median latency of `n` runs of every OP on `in`; prints one line per OP. */
static int bench_ops(qos_model* m, const unsigned char* in, size_t in_len, unsigned char* out, size_t out_len, long n) {
  double* t = (n > 0) ? (double*)alloc_array((size_t)n, sizeof(double), 0) : NULL;
  uint32_t op;
  long r;
  if (!t) return QOS_ERR_NOMEM;
  for (op = 0; op < qos_num_ops(m); op++) {
    qos_select(m, op);
    for (r = 0; r < n; r++) {
      double t0 = now_s();
      int rc = qos_run(m, in, in_len, out, out_len);
      if (rc != QOS_OK) {
        free(t);
        return rc;
      }
      t[r] = now_s() - t0;
    }
    qsort(t, (size_t)n, sizeof(double), cmp_double);
    printf("bench op %u %s: median %.3f us, min %.3f us, max %.3f us over %ld runs\n", op, qos_op_name(m, op),
           1e6 * t[n / 2], 1e6 * t[0], 1e6 * t[n - 1], n);
  }
  free(t);
  return QOS_OK;
}

/* Parse "0,2,1" (OP indices or names) into ops[]; returns the count or -1. */
static long parse_ops(qos_model* m, const char* text, uint32_t* ops, long cap) {
  long n = 0;
  const char* p = text;
  char name[4097];
  for (;;) {
    size_t k = strcspn(p, ",");
    if (k == 0 || k >= sizeof name || n >= cap) return -1; /* empty entry, too long, too many */
    memcpy(name, p, k);
    name[k] = 0;
    if (!parse_op(m, name, &ops[n])) return -1;
    n++;
    if (!p[k]) return n;
    p += k + 1; /* a trailing comma leaves an empty entry: an error above */
  }
}

/* Write len bytes to path atomically: a temporary file in the same folder, fsync, rename.
 * The result gets the old file's mode, else 0666 less the umask. Returns 0, or -1 with errno. */
static int write_atomic(const char* path, const unsigned char* data, size_t len) {
  const char* slash = strrchr(path, '/');
  size_t dirlen = slash ? (size_t)(slash - path) + 1 : 0, plen = strlen(path);
  const char* base = path + dirlen;
  char* tmp;
  struct stat st;
  mode_t mode, mask;
  int fd, saved;
  size_t done = 0;
  if (!*base || plen > SIZE_MAX - 16) {
    errno = EISDIR;
    return -1;
  }
  tmp = (char*)malloc(plen + 16);
  if (!tmp) return -1;
  memcpy(tmp, path, dirlen);
  snprintf(tmp + dirlen, plen - dirlen + 16, ".%s.XXXXXX", base);
  fd = mkstemp(tmp);
  if (fd < 0) {
    saved = errno;
    free(tmp);
    errno = saved;
    return -1;
  }
  mask = umask(0);
  umask(mask);
  mode = (stat(path, &st) == 0 && S_ISREG(st.st_mode)) ? (st.st_mode & 07777) : (0666 & ~mask);
  while (done < len) {
    ssize_t w = write(fd, data + done, len - done);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) goto fail;
    done += (size_t)w;
  }
  if (fchmod(fd, mode) != 0 || fsync(fd) != 0) goto fail;
  if (close(fd) != 0) {
    fd = -1;
    goto fail;
  }
  fd = -1;
  if (rename(tmp, path) != 0) goto fail;
  free(tmp);
  return 0;
fail:
  saved = errno ? errno : EIO;
  if (fd >= 0) close(fd);
  unlink(tmp);
  free(tmp);
  errno = saved;
  return -1;
}

/* --profile N: N inferences (zero input) at the selected OP; mean time of every plan step. */
static int profile_steps(qos_model* m, long n) {
  uint32_t k, steps = qos_num_steps(m);
  uint64_t* ns = (uint64_t*)alloc_array(steps, sizeof *ns, 1);
  qos_tensor_info ii, oi;
  unsigned char *in, *out;
  double total = 0;
  long r;
  int rc = QOS_OK;
  qos_input_info(m, 0, &ii);
  qos_output_info(m, 0, &oi);
  in = (unsigned char*)alloc_array(ii.nbytes, 1, 1);
  out = (unsigned char*)alloc_array(oi.nbytes, 1, 0);
  if (!ns || !in || !out) rc = QOS_ERR_NOMEM;
  if (rc == QOS_OK) rc = qos_run(m, in, ii.nbytes, out, oi.nbytes); /* warm-up, not counted */
  if (rc == QOS_OK) rc = qos_profile_steps(m, ns);
  for (r = 0; rc == QOS_OK && r < n; r++) rc = qos_run(m, in, ii.nbytes, out, oi.nbytes);
  qos_profile_steps(m, NULL);
  if (rc == QOS_OK) {
    for (k = 0; k < steps; k++) total += (double)ns[k];
    printf("step profile: OP %u (%s), %ld runs, mean us per step\n", qos_selected(m), qos_op_name(m, qos_selected(m)), n);
    for (k = 0; k < steps; k++)
      printf("  %3u %10.3f %5.1f%%  %s\n", k, 1e-3 * (double)ns[k] / (double)n, total > 0 ? 100.0 * (double)ns[k] / total : 0.0,
             qos_step_kernel(m, k));
    printf("  total %10.3f us\n", 1e-3 * total / (double)n);
  }
  free(ns), free(in), free(out);
  return rc;
}

/* "qos-run: [what: ]msg (code)" as ONE line: kernel messages (TVM's) span several lines, and a
 * manifest's names may hold control characters; both are shown with spaces instead. */
static void print_error(const char* what, const char* msg, int rc) {
  const char* p;
  int space = 0;
  fputs("qos-run: ", stderr);
  if (what) fprintf(stderr, "%s: ", what);
  for (p = msg ? msg : ""; *p; p++) {
    unsigned char c = (unsigned char)*p;
    if (c < 0x20 || c == 0x7f) {
      space = 1;
      continue;
    }
    if (space) fputc(' ', stderr);
    space = 0;
    fputc(c, stderr);
  }
  fprintf(stderr, " (%s)\n", qos_strerror(rc));
}

/* Exit status for a failed qos_open_*: a bad or unusable file is 2, running out of memory 1. */
static int open_status(int rc) { return rc == QOS_ERR_NOMEM ? 1 : 2; }

/* Exit status for a failed qos_run: the caller's input of the wrong size is 2, the rest 1. */
static int run_status(int rc) { return (rc == QOS_ERR_SIZE || rc == QOS_ERR_ARG) ? 2 : 1; }

static int bad_count(const char* opt, const char* val) {
  fprintf(stderr, "qos-run: bad %s '%s' (a whole number from 1 to %ld)\n", opt, val, QOS_RUN_MAX_COUNT);
  return 2;
}

int main(int argc, char** argv) {
  const char *model_path = NULL, *op_arg = NULL, *in_path = NULL, *out_path = NULL;
  long repeat = 1, bench = 0, switch_bench = 0, nseq = 0, profile = 0;
  const char* seq_arg = NULL;
  uint32_t seq[QOS_RUN_MAX_SEQ];
  int info = 0, rc, i;
  char err[QOS_ERROR_MAX];
  qos_model* m = NULL;
  qos_tensor_info ii, oi;
  unsigned char *in = NULL, *out = NULL;
  size_t in_len = 0;

  for (i = 1; i < argc; i++) {
    const char* a = argv[i];
    long* count = NULL;
    if (!strcmp(a, "--info")) {
      info = 1;
      continue;
    }
    if (a[0] != '-') {
      if (model_path) {
        usage();
        return 2;
      }
      model_path = a;
      continue;
    }
    if (i + 1 >= argc) {
      usage();
      return 2;
    }
    if (!strcmp(a, "--op")) op_arg = argv[++i];
    else if (!strcmp(a, "--input")) in_path = argv[++i];
    else if (!strcmp(a, "--output")) out_path = argv[++i];
    else if (!strcmp(a, "--op-sequence")) seq_arg = argv[++i];
    else if (!strcmp(a, "--repeat")) count = &repeat;
    else if (!strcmp(a, "--bench")) count = &bench;
    else if (!strcmp(a, "--switch-bench")) count = &switch_bench;
    else if (!strcmp(a, "--profile")) count = &profile;
    else {
      usage();
      return 2;
    }
    if (count && !parse_count(argv[++i], count)) return bad_count(a, argv[i]);
  }
  if (!model_path) {
    usage();
    return 2;
  }
  if (out_path && !in_path) {
    fprintf(stderr, "qos-run: --output needs --input (the outputs of which inputs?)\n");
    return 2;
  }
  rc = qos_open_file(model_path, qos_table_lookup, (void*)qos_linked_kernels, &m, err, sizeof err);
  if (rc != QOS_OK) {
    print_error(model_path, err, rc);
    return open_status(rc);
  }
  if (info) {
    uint32_t k;
    size_t mlen;
    qos_metadata(m, &mlen);
    printf("operating points: %u\n", qos_num_ops(m));
    for (k = 0; k < qos_num_ops(m); k++) printf("  %u %s\n", k, qos_op_name(m, k));
    for (k = 0; k < qos_num_inputs(m); k++) {
      qos_input_info(m, k, &ii);
      printf("input %u %s %s nbytes %lu\n", k, ii.name, qos_dtype_name(ii.dtype), (unsigned long)ii.nbytes);
    }
    for (k = 0; k < qos_num_outputs(m); k++) {
      qos_output_info(m, k, &oi);
      printf("output %u %s %s nbytes %lu\n", k, oi.name, qos_dtype_name(oi.dtype), (unsigned long)oi.nbytes);
    }
    printf("arena bytes: %llu, file bytes: %llu, metadata bytes: %lu\n", (unsigned long long)qos_arena_bytes(m),
           (unsigned long long)qos_file_bytes(m), (unsigned long)mlen);
  }
  if (op_arg) {
    uint32_t op;
    if (!parse_op(m, op_arg, &op) || qos_select(m, op) != QOS_OK) {
      fprintf(stderr, "qos-run: no operating point '%s' (the model has %u: an index 0..%u or a name)\n", op_arg,
              qos_num_ops(m), qos_num_ops(m) - 1);
      qos_close(m);
      return 2;
    }
  }
  if (seq_arg && (nseq = parse_ops(m, seq_arg, seq, QOS_RUN_MAX_SEQ)) <= 0) {
    fprintf(stderr, "qos-run: bad --op-sequence '%s' (1 to %d OP indices or names, comma-separated)\n", seq_arg,
            QOS_RUN_MAX_SEQ);
    qos_close(m);
    return 2;
  }
  if ((bench || profile || in_path) && (qos_num_inputs(m) != 1 || qos_num_outputs(m) != 1)) {
    fprintf(stderr, "qos-run: the model has %u inputs and %u outputs; qos-run handles 1 and 1\n",
            qos_num_inputs(m), qos_num_outputs(m));
    qos_close(m);
    return 2;
  }
  if (switch_bench) {
    uint32_t nops = qos_num_ops(m), cur = qos_selected(m);
    double t0 = now_s(), t1;
    long r;
    for (r = 0; r < switch_bench; r++) qos_select(m, (uint32_t)(r % nops));
    t1 = now_s();
    qos_select(m, cur);
    printf("qos_select: %.2f ns per call over %ld calls (%u OPs)\n", 1e9 * (t1 - t0) / (double)switch_bench,
           switch_bench, nops);
  }
  if (profile) {
    rc = profile_steps(m, profile);
    if (rc != QOS_OK) print_error(NULL, qos_last_error(m), rc);
    qos_close(m);
    return rc == QOS_OK ? 0 : run_status(rc);
  }
  if (bench && !in_path) {
    qos_input_info(m, 0, &ii);
    qos_output_info(m, 0, &oi);
    in = (unsigned char*)alloc_array(ii.nbytes, 1, 1);
    out = (unsigned char*)alloc_array(oi.nbytes, 1, 0);
    rc = (in && out) ? bench_ops(m, in, ii.nbytes, out, oi.nbytes, bench) : QOS_ERR_NOMEM;
    if (rc != QOS_OK) print_error(NULL, rc == QOS_ERR_NOMEM ? "out of memory" : qos_last_error(m), rc);
    free(in), free(out), qos_close(m);
    return rc == QOS_OK ? 0 : run_status(rc);
  }
  if (in_path) {
    double t0, t1, runs;
    long r;
    size_t items, it;
    qos_input_info(m, 0, &ii);
    qos_output_info(m, 0, &oi);
    in = read_all(in_path, &in_len);
    if (!in) {
      fprintf(stderr, "qos-run: cannot read %s\n", in_path);
      qos_close(m);
      return 2;
    }
    /* a stream: the file holds `items` inputs back to back (a single input when sizes differ,
       so qos_run reports the size mismatch) */
    items = (ii.nbytes && in_len > ii.nbytes && in_len % ii.nbytes == 0) ? in_len / ii.nbytes : 1;
    out = (unsigned char*)alloc_array(items, oi.nbytes, 0);
    if (!out) {
      fprintf(stderr, "qos-run: out of memory for %lu outputs of %lu bytes\n", (unsigned long)items,
              (unsigned long)oi.nbytes);
      free(in), qos_close(m);
      return 1;
    }
    if (bench) {
      rc = bench_ops(m, in, items > 1 ? ii.nbytes : in_len, out, oi.nbytes, bench);
      if (rc != QOS_OK) print_error(NULL, rc == QOS_ERR_NOMEM ? "out of memory" : qos_last_error(m), rc);
      free(in), free(out), qos_close(m);
      return rc == QOS_OK ? 0 : run_status(rc);
    }
    t0 = now_s();
    for (r = 0; r < repeat; r++) {
      for (it = 0; it < items; it++) {
        if (nseq) qos_select(m, seq[it % (size_t)nseq]);
        rc = qos_run(m, in + it * (items > 1 ? ii.nbytes : 0), items > 1 ? ii.nbytes : in_len,
                     out + it * oi.nbytes, oi.nbytes);
        if (rc != QOS_OK) {
          print_error(NULL, qos_last_error(m), rc);
          free(in), free(out), qos_close(m);
          return run_status(rc);
        }
      }
    }
    t1 = now_s();
    runs = (double)repeat * (double)items;
    if (runs > 1) printf("mean time per inference: %.3f us over %.0f runs\n", 1e6 * (t1 - t0) / runs, runs);
    if (out_path && write_atomic(out_path, out, items * oi.nbytes) != 0) {
      fprintf(stderr, "qos-run: cannot write %s: %s\n", out_path, strerror(errno));
      free(in), free(out), qos_close(m);
      return 2;
    }
  }
  free(in);
  free(out);
  qos_close(m);
  return 0;
}
