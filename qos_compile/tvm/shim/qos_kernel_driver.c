/*
 * qos_kernel_driver: run one system-lib kernel on tensors stored in files (a test tool).
 *
 *   qos_kernel_driver [-l] [-t THREADS] [-r REPEAT] FUNCTION ARG...
 *     ARG = in:PATH    tensor read from PATH
 *         | out:PATH   tensor read from PATH (shape, dtype), written back after the call
 *         | int:N      64-bit integer argument
 *     -l  list the registered symbols and exit
 *     -t  threads for parallel loops (default: QOS_NUM_THREADS / TVM_NUM_THREADS / all CPUs)
 *     -r  after the checked call, time REPEAT more calls; prints "time_ns min=... mean=..."
 *
 * Tensor file ("QTNS", little-endian): char magic[4] = "QTNS"; uint32 version = 1;
 * uint8 dtype code (DLDataTypeCode: 0 int, 1 uint, 2 float); uint8 bits; uint16 lanes;
 * uint32 ndim; int64 shape[ndim]; then the C-order data.
 * Exit status: 0 ok, 1 the kernel reported an error (message on stderr), 2 usage or I/O error.
 */
#define _POSIX_C_SOURCE 200809L
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "qos_tvm_shim.h"

#define MAX_ARGS 64

typedef struct {
  DLTensor t;
  int64_t shape[8];
  const char* path;
  int is_out;
  size_t nbytes;
} FileTensor;

static int fail(const char* msg, const char* detail) {
  fprintf(stderr, "qos_kernel_driver: %s%s%s\n", msg, detail ? ": " : "", detail ? detail : "");
  return 2;
}

static int read_tensor(FileTensor* ft) {
  FILE* f = fopen(ft->path, "rb");
  unsigned char head[16];
  uint32_t version, ndim, i;
  size_t n = 1;
  if (f == NULL) return fail("cannot open", ft->path);
  if (fread(head, 1, 16, f) != 16 || memcmp(head, "QTNS", 4) != 0) { fclose(f); return fail("not a QTNS file", ft->path); }
  memcpy(&version, head + 4, 4);
  memcpy(&ndim, head + 12, 4);
  if (version != 1 || ndim > 8) { fclose(f); return fail("unsupported QTNS version or ndim", ft->path); }
  ft->t.dtype.code = head[8];
  ft->t.dtype.bits = head[9];
  ft->t.dtype.lanes = (uint16_t)(head[10] | (head[11] << 8));
  if (ndim && fread(ft->shape, sizeof(int64_t), ndim, f) != ndim) { fclose(f); return fail("truncated header", ft->path); }
  for (i = 0; i < ndim; ++i) {
    if (ft->shape[i] < 0) { fclose(f); return fail("negative dimension", ft->path); }
    n *= (size_t)ft->shape[i];
  }
  ft->nbytes = n * ((ft->t.dtype.bits * ft->t.dtype.lanes + 7u) / 8u);
  ft->t.data = NULL;
  if (posix_memalign(&ft->t.data, 64, ft->nbytes ? ft->nbytes : 1) != 0) { fclose(f); return fail("out of memory", ft->path); }
  if (fread(ft->t.data, 1, ft->nbytes, f) != ft->nbytes) { fclose(f); return fail("truncated data", ft->path); }
  fclose(f);
  ft->t.device.device_type = kDLCPU;
  ft->t.device.device_id = 0;
  ft->t.ndim = (int32_t)ndim;
  ft->t.shape = ft->shape;
  ft->t.strides = NULL;
  ft->t.byte_offset = 0;
  return 0;
}

static int write_tensor(const FileTensor* ft) {
  FILE* f = fopen(ft->path, "r+b");
  long offset = 16 + 8L * ft->t.ndim;
  int ok;
  if (f == NULL) return fail("cannot write", ft->path);
  ok = fseek(f, offset, SEEK_SET) == 0 && fwrite(ft->t.data, 1, ft->nbytes, f) == ft->nbytes;
  ok = (fclose(f) == 0) && ok;
  return ok ? 0 : fail("cannot write", ft->path);
}

static double now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec * 1e9 + (double)ts.tv_nsec;
}

int main(int argc, char** argv) {
  static FileTensor tensors[MAX_ARGS];
  TVMFFIAny args[MAX_ARGS], ret;
  int i, a = 1, nargs = 0, ntensors = 0, repeat = 0, rc;
  const char* fname;
  qos_shim_packed_fn fn;

  while (a < argc && argv[a][0] == '-') {
    if (strcmp(argv[a], "-l") == 0) {
      for (i = 0; i < qos_shim_num_symbols(); ++i) printf("%s\n", qos_shim_symbol_name(i));
      return 0;
    } else if (strcmp(argv[a], "-t") == 0 && a + 1 < argc) {
      qos_shim_set_num_threads(atoi(argv[a + 1]));
      a += 2;
    } else if (strcmp(argv[a], "-r") == 0 && a + 1 < argc) {
      repeat = atoi(argv[a + 1]);
      a += 2;
    } else {
      return fail("unknown option", argv[a]);
    }
  }
  if (a >= argc) return fail("usage: qos_kernel_driver [-l] [-t THREADS] [-r REPEAT] FUNCTION ARG...", NULL);
  fname = argv[a++];
  fn = qos_shim_get_function(fname);
  if (fn == NULL) return fail("no such kernel (try -l)", fname);

  for (; a < argc; ++a) {
    const char* s = argv[a];
    if (nargs == MAX_ARGS) return fail("too many arguments", NULL);
    if (strncmp(s, "in:", 3) == 0 || strncmp(s, "out:", 4) == 0) {
      FileTensor* ft = &tensors[ntensors++];
      ft->is_out = s[0] == 'o';
      ft->path = s + (ft->is_out ? 4 : 3);
      if ((rc = read_tensor(ft)) != 0) return rc;
      args[nargs++] = qos_shim_tensor_arg(&ft->t);
    } else if (strncmp(s, "int:", 4) == 0) {
      args[nargs++] = qos_shim_int_arg(strtoll(s + 4, NULL, 10));
    } else {
      return fail("argument must be in:PATH, out:PATH or int:N", s);
    }
  }

  memset(&ret, 0, sizeof(ret));
  if (fn(NULL, args, nargs, &ret) != 0) {
    fprintf(stderr, "qos_kernel_driver: %s failed: %s\n", fname, qos_shim_last_error());
    return 1;
  }
  if (repeat > 0) {
    double best = 1e300, total = 0;
    for (i = 0; i < repeat; ++i) {
      double t0 = now_ns(), dt;
      fn(NULL, args, nargs, &ret);
      dt = now_ns() - t0;
      total += dt;
      if (dt < best) best = dt;
    }
    printf("time_ns min=%.0f mean=%.0f repeat=%d threads=%d\n", best, total / repeat, repeat,
           qos_shim_num_threads());
  }
  for (i = 0; i < ntensors; ++i)
    if (tensors[i].is_out && (rc = write_tensor(&tensors[i])) != 0) return rc;
  for (i = 0; i < ntensors; ++i) free(tensors[i].t.data);
  return 0;
}
