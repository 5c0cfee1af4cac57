/* qos_race.c -- qos_select racing with qos_run must never mix two OPs in one inference.
 *
 *   qos_race MODEL.qosm IN.bin EXPECTED_OP0.bin EXPECTED_OP1.bin SECONDS [--spin N] [--expect-mix]
 *
 * One thread toggles qos_select(0/1) as fast as it can; the main thread runs
 * inferences for SECONDS and classifies each output as exactly OP 0's, exactly
 * OP 1's, or mixed. Prints "runs=.. op0=.. op1=.. mixed=.. selects=..". Exit 0
 * when no output was mixed and both OPs were seen; with --expect-mix (for a
 * runtime deliberately built broken) exit 0 when some output WAS mixed.
 */
#if !defined(_POSIX_C_SOURCE) || _POSIX_C_SOURCE < 200809L
#undef _POSIX_C_SOURCE
#define _POSIX_C_SOURCE 200809L
#endif
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "qos_runtime.h"

qos_packed_fn qos_linked_kernel_lookup(const char* name, void* user);
extern volatile long qos_test_spin;

static volatile int g_stop = 0;
static long g_selects = 0;

static unsigned char* read_all(const char* path, size_t* len) {
  FILE* f = fopen(path, "rb");
  unsigned char* buf;
  long n;
  if (!f) return NULL;
  fseek(f, 0, SEEK_END);
  n = ftell(f);
  fseek(f, 0, SEEK_SET);
  buf = (unsigned char*)malloc(n > 0 ? (size_t)n : 1);
  if (buf && n > 0 && fread(buf, 1, (size_t)n, f) != (size_t)n) {
    free(buf);
    buf = NULL;
  }
  fclose(f);
  *len = n > 0 ? (size_t)n : 0;
  return buf;
}

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void* selector(void* arg) {
  qos_model* m = (qos_model*)arg;
  long k = 0;
  while (!__atomic_load_n(&g_stop, __ATOMIC_RELAXED)) {
    qos_select(m, (uint32_t)(k & 1));
    k++;
  }
  g_selects = k;
  return NULL;
}

int main(int argc, char** argv) {
  char err[QOS_ERROR_MAX];
  qos_model* m;
  unsigned char *in, *e0, *e1, *out;
  size_t in_len, e0_len, e1_len;
  double seconds, t_end;
  long runs = 0, n0 = 0, n1 = 0, mixed = 0;
  int expect_mix = 0, i, rc;
  pthread_t th;
  qos_tensor_info oi;

  if (argc < 6) {
    fprintf(stderr, "usage: qos_race MODEL IN EXP0 EXP1 SECONDS [--spin N] [--expect-mix]\n");
    return 2;
  }
  for (i = 6; i < argc; i++) {
    if (!strcmp(argv[i], "--spin") && i + 1 < argc) qos_test_spin = strtol(argv[++i], NULL, 10);
    else if (!strcmp(argv[i], "--expect-mix")) expect_mix = 1;
  }
  seconds = atof(argv[5]);
  if (qos_open_file(argv[1], qos_linked_kernel_lookup, NULL, &m, err, sizeof err) != QOS_OK) {
    fprintf(stderr, "qos_race: %s\n", err);
    return 1;
  }
  in = read_all(argv[2], &in_len);
  e0 = read_all(argv[3], &e0_len);
  e1 = read_all(argv[4], &e1_len);
  qos_output_info(m, 0, &oi);
  out = (unsigned char*)malloc(oi.nbytes);
  if (!in || !e0 || !e1 || !out || e0_len != oi.nbytes || e1_len != oi.nbytes || !memcmp(e0, e1, e0_len)) {
    fprintf(stderr, "qos_race: bad input/expected files (they must differ and match the output size)\n");
    return 2;
  }
  if (pthread_create(&th, NULL, selector, m) != 0) return 1;
  t_end = now_s() + seconds;
  while (now_s() < t_end || (!expect_mix && (n0 == 0 || n1 == 0) && now_s() < t_end + 5 * seconds)) {
    rc = qos_run(m, in, in_len, out, oi.nbytes);
    if (rc != QOS_OK) {
      fprintf(stderr, "qos_race: run failed: %s\n", qos_last_error(m));
      __atomic_store_n(&g_stop, 1, __ATOMIC_RELAXED);
      pthread_join(th, NULL);
      return 1;
    }
    runs++;
    if (!memcmp(out, e0, oi.nbytes)) n0++;
    else if (!memcmp(out, e1, oi.nbytes)) n1++;
    else mixed++;
    if (expect_mix && mixed > 0 && runs > 100) break;
  }
  __atomic_store_n(&g_stop, 1, __ATOMIC_RELAXED);
  pthread_join(th, NULL);
  printf("runs=%ld op0=%ld op1=%ld mixed=%ld selects=%ld\n", runs, n0, n1, mixed, g_selects);
  qos_close(m);
  free(in), free(e0), free(e1), free(out);
  if (expect_mix) return mixed > 0 ? 0 : 1;
  return (mixed == 0 && n0 > 0 && n1 > 0) ? 0 : 1;
}
