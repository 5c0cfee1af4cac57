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
 * Kernels come from whatever is linked with this file: it calls
 *     qos_packed_fn qos_linked_kernel_lookup(const char* name, void* user);
 * which the kernel side provides (the test kernels, or a shim over TVM's
 * system-lib registry). Exit status: 0 ok, 1 runtime error, 2 usage.
 */
#if !defined(_POSIX_C_SOURCE) || _POSIX_C_SOURCE < 200809L
#undef _POSIX_C_SOURCE
#define _POSIX_C_SOURCE 200809L
#endif
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "qos_runtime.h"

qos_packed_fn qos_linked_kernel_lookup(const char* name, void* user);

static unsigned char* read_all(const char* path, size_t* len) {
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
  double* t = (double*)malloc((size_t)n * sizeof(double));
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
  while (*p && n < cap) {
    char name[128];
    size_t k = strcspn(p, ",");
    char* end;
    long op;
    if (k == 0 || k >= sizeof name) return -1;
    memcpy(name, p, k);
    name[k] = 0;
    op = strtol(name, &end, 10);
    if (*end) op = qos_find_op(m, name);
    if (op < 0 || (uint32_t)op >= qos_num_ops(m)) return -1;
    ops[n++] = (uint32_t)op;
    p += k + (p[k] == ',');
  }
  return *p ? -1 : n;
}

/* --profile N: N inferences (zero input) at the selected OP; mean time of every plan step. */
static int profile_steps(qos_model* m, long n) {
  uint32_t k, steps = qos_num_steps(m);
  uint64_t* ns = (uint64_t*)calloc(steps ? steps : 1, sizeof *ns);
  qos_tensor_info ii, oi;
  unsigned char *in, *out;
  double total = 0;
  long r;
  int rc = QOS_OK;
  qos_input_info(m, 0, &ii);
  qos_output_info(m, 0, &oi);
  in = (unsigned char*)calloc(ii.nbytes ? ii.nbytes : 1, 1);
  out = (unsigned char*)malloc(oi.nbytes ? oi.nbytes : 1);
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

int main(int argc, char** argv) {
  const char *model_path = NULL, *op_arg = NULL, *in_path = NULL, *out_path = NULL;
  long repeat = 1, bench = 0, switch_bench = 0, nseq = 0, profile = 0;
  const char* seq_arg = NULL;
  uint32_t seq[256];
  int info = 0, rc, i;
  char err[QOS_ERROR_MAX];
  qos_model* m = NULL;
  qos_tensor_info ii, oi;
  unsigned char *in = NULL, *out = NULL;
  size_t in_len = 0;

  for (i = 1; i < argc; i++) {
    if (!strcmp(argv[i], "--op") && i + 1 < argc) op_arg = argv[++i];
    else if (!strcmp(argv[i], "--input") && i + 1 < argc) in_path = argv[++i];
    else if (!strcmp(argv[i], "--output") && i + 1 < argc) out_path = argv[++i];
    else if (!strcmp(argv[i], "--repeat") && i + 1 < argc) repeat = strtol(argv[++i], NULL, 10);
    else if (!strcmp(argv[i], "--op-sequence") && i + 1 < argc) seq_arg = argv[++i];
    else if (!strcmp(argv[i], "--bench") && i + 1 < argc) bench = strtol(argv[++i], NULL, 10);
    else if (!strcmp(argv[i], "--switch-bench") && i + 1 < argc) switch_bench = strtol(argv[++i], NULL, 10);
    else if (!strcmp(argv[i], "--profile") && i + 1 < argc) profile = strtol(argv[++i], NULL, 10);
    else if (!strcmp(argv[i], "--info")) info = 1;
    else if (argv[i][0] != '-' && !model_path) model_path = argv[i];
    else {
      usage();
      return 2;
    }
  }
  if (!model_path || repeat < 1 || bench < 0 || switch_bench < 0 || profile < 0) {
    usage();
    return 2;
  }
  rc = qos_open_file(model_path, qos_linked_kernel_lookup, NULL, &m, err, sizeof err);
  if (rc != QOS_OK) {
    fprintf(stderr, "qos-run: %s: %s (%s)\n", model_path, err, qos_strerror(rc));
    return 1;
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
    char* end;
    long op = strtol(op_arg, &end, 10);
    if (*end) op = qos_find_op(m, op_arg);
    if (op < 0 || qos_select(m, (uint32_t)op) != QOS_OK) {
      fprintf(stderr, "qos-run: no operating point '%s'\n", op_arg);
      qos_close(m);
      return 2;
    }
  }
  if (seq_arg && (nseq = parse_ops(m, seq_arg, seq, 256)) <= 0) {
    fprintf(stderr, "qos-run: bad --op-sequence '%s' (OP indices or names, comma-separated)\n", seq_arg);
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
    if (rc != QOS_OK) fprintf(stderr, "qos-run: %s (%s)\n", qos_last_error(m), qos_strerror(rc));
    qos_close(m);
    return rc == QOS_OK ? 0 : 1;
  }
  if (bench && !in_path) {
    qos_input_info(m, 0, &ii);
    qos_output_info(m, 0, &oi);
    in = (unsigned char*)calloc(ii.nbytes ? ii.nbytes : 1, 1);
    out = (unsigned char*)malloc(oi.nbytes ? oi.nbytes : 1);
    rc = (in && out) ? bench_ops(m, in, ii.nbytes, out, oi.nbytes, bench) : QOS_ERR_NOMEM;
    if (rc != QOS_OK) fprintf(stderr, "qos-run: %s (%s)\n", qos_last_error(m), qos_strerror(rc));
    free(in), free(out), qos_close(m);
    return rc == QOS_OK ? 0 : 1;
  }
  if (in_path) {
    double t0, t1;
    long r;
    size_t items, it;
    if (qos_num_inputs(m) != 1 || qos_num_outputs(m) != 1) {
      fprintf(stderr, "qos-run: the model has %u inputs and %u outputs; qos-run handles 1 and 1\n",
              qos_num_inputs(m), qos_num_outputs(m));
      qos_close(m);
      return 1;
    }
    qos_input_info(m, 0, &ii);
    qos_output_info(m, 0, &oi);
    in = read_all(in_path, &in_len);
    /* a stream: the file holds `items` inputs back to back (a single input when sizes differ,
       so qos_run reports the size mismatch) */
    items = (ii.nbytes && in_len > ii.nbytes && in_len % ii.nbytes == 0) ? in_len / ii.nbytes : 1;
    out = (unsigned char*)malloc(oi.nbytes ? items * oi.nbytes : 1);
    if (!in || !out) {
      fprintf(stderr, "qos-run: cannot read %s\n", in_path);
      free(in), free(out), qos_close(m);
      return 1;
    }
    if (bench) {
      rc = bench_ops(m, in, items > 1 ? ii.nbytes : in_len, out, oi.nbytes, bench);
      if (rc != QOS_OK) fprintf(stderr, "qos-run: %s (%s)\n", qos_last_error(m), qos_strerror(rc));
      free(in), free(out), qos_close(m);
      return rc == QOS_OK ? 0 : 1;
    }
    t0 = now_s();
    for (r = 0; r < repeat; r++) {
      for (it = 0; it < items; it++) {
        if (nseq) qos_select(m, seq[it % (size_t)nseq]);
        rc = qos_run(m, in + it * (items > 1 ? ii.nbytes : 0), items > 1 ? ii.nbytes : in_len,
                     out + it * oi.nbytes, oi.nbytes);
        if (rc != QOS_OK) {
          fprintf(stderr, "qos-run: %s (%s)\n", qos_last_error(m), qos_strerror(rc));
          free(in), free(out), qos_close(m);
          return 1;
        }
      }
    }
    t1 = now_s();
    repeat *= (long)items;
    if (repeat > 1) printf("mean time per inference: %.3f us over %ld runs\n", 1e6 * (t1 - t0) / (double)repeat, repeat);
    if (out_path) {
      FILE* f = fopen(out_path, "wb");
      if (!f || fwrite(out, 1, items * oi.nbytes, f) != items * oi.nbytes || fclose(f) != 0) {
        fprintf(stderr, "qos-run: cannot write %s\n", out_path);
        free(in), free(out), qos_close(m);
        return 1;
      }
    }
  }
  free(in);
  free(out);
  qos_close(m);
  return 0;
}
