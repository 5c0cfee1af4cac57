/* qos_bench_select.c -- micro-benchmark of qos_select (and of one qos_run of the model).
 *
 *   qos_bench_select MODEL.qosm [CALLS] [IN.bin]
 *
 * Prints "qos_select: X ns/call (N calls, K operating points)" and, given an
 * input file, "qos_run: Y us/call". Not a test: timing varies by machine.
 */
#if !defined(_POSIX_C_SOURCE) || _POSIX_C_SOURCE < 200809L
#undef _POSIX_C_SOURCE
#define _POSIX_C_SOURCE 200809L
#endif
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "qos_runtime.h"

qos_packed_fn qos_linked_kernel_lookup(const char* name, void* user);

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

int main(int argc, char** argv) {
  char err[QOS_ERROR_MAX];
  qos_model* m;
  long calls = argc > 2 ? strtol(argv[2], NULL, 10) : 10000000L, i;
  uint32_t nops;
  volatile int sink = 0;
  double t0, t1;
  if (argc < 2 || calls < 1) {
    fprintf(stderr, "usage: qos_bench_select MODEL [CALLS] [IN.bin]\n");
    return 2;
  }
  if (qos_open_file(argv[1], qos_linked_kernel_lookup, NULL, &m, err, sizeof err) != QOS_OK) {
    fprintf(stderr, "qos_bench_select: %s\n", err);
    return 1;
  }
  nops = qos_num_ops(m);
  t0 = now_s();
  for (i = 0; i < calls; i++) sink += qos_select(m, (uint32_t)(i % nops));
  t1 = now_s();
  printf("qos_select: %.3f ns/call (%ld calls, %u operating points)\n", 1e9 * (t1 - t0) / (double)calls, calls, nops);
  if (argc > 3) {
    FILE* f = fopen(argv[3], "rb");
    qos_tensor_info ii, oi;
    unsigned char *in, *out;
    long runs = 2000;
    qos_input_info(m, 0, &ii);
    qos_output_info(m, 0, &oi);
    in = (unsigned char*)calloc(1, ii.nbytes);
    out = (unsigned char*)calloc(1, oi.nbytes);
    if (f) {
      if (fread(in, 1, ii.nbytes, f) != ii.nbytes) fprintf(stderr, "short input file\n");
      fclose(f);
    }
    t0 = now_s();
    for (i = 0; i < runs; i++) sink += qos_run(m, in, ii.nbytes, out, oi.nbytes);
    t1 = now_s();
    printf("qos_run: %.3f us/call (%ld calls)\n", 1e6 * (t1 - t0) / (double)runs, runs);
    free(in), free(out);
  }
  qos_close(m);
  return sink ? 1 : 0;
}
