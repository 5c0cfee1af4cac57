/* qos_test_kernels.c -- small kernels with TVM's packed ABI, for the runtime's tests.
 *
 * Like TVM's generated wrappers they check every argument (type index, ndim,
 * dtype, shape consistency) and report a mismatch through
 * TVMFFIErrorSetRaisedFromCStrParts + a non-zero return. Build with
 * -ffp-contract=off so float results are bit-identical on x86-64 and aarch64
 * (and equal to NumPy's float32 arithmetic).
 *
 *   qos_test_lut_dot(x int8 (1,K), w int8 (O,K), lut int32 (256,256), y int32 (1,O)):
 *       y[0,o] = sum_k lut[w[o,k] + 128][x[0,k] + 128]        (port A = weight code)
 *   qos_test_requant(acc int32 (1,O), scale f32 (O), shift f32 (O), h int8 (1,O)):
 *       h = (int8) trunc(clamp(float(acc) * scale + shift, -128, 127))
 *   qos_test_scale(acc int32 (1,O), scale f32 (O), shift f32 (O), y f32 (1,O)):
 *       y = float(acc) * scale + shift
 *
 * qos_linked_kernels (the table qos_run_main.c uses) and qos_linked_kernel_lookup() resolve these
 * names (for programs linked with this file).
 * qos_test_spin (default 0) adds a busy loop per kernel call (race tests widen their window with it).
 */
#include <stddef.h>
#include <stdint.h>

#include "qos_runtime.h"

void TVMFFIErrorSetRaisedFromCStrParts(const char* kind, const char** message_parts, int32_t num_parts);

volatile long qos_test_spin = 0;

static int32_t fail(const char* kernel, const char* msg) {
  const char* parts[3];
  parts[0] = kernel;
  parts[1] = ": ";
  parts[2] = msg;
  TVMFFIErrorSetRaisedFromCStrParts("ValueError", parts, 3);
  return -1;
}

static void spin(void) {
  volatile long i;
  for (i = 0; i < qos_test_spin; i++) {
  }
}

/* The tensor in args[i] if it is a DLTensor* of that dtype and ndim, else NULL. */
static const qos_dltensor* arg(const qos_ffi_any* args, int i, uint8_t code, uint8_t bits, int ndim) {
  const qos_dltensor* t;
  if (args[i].type_index != QOS_FFI_TYPE_DLTENSOR_PTR) return NULL;
  t = (const qos_dltensor*)args[i].u.v_ptr;
  if (!t || !t->data || t->ndim != ndim || t->dtype.code != code || t->dtype.bits != bits || t->dtype.lanes != 1 ||
      t->device.device_type != QOS_DL_CPU || t->strides != NULL || t->byte_offset != 0)
    return NULL;
  return t;
}

int32_t qos_test_lut_dot(void* self, const qos_ffi_any* args, int32_t n, qos_ffi_any* ret) {
  const qos_dltensor *x, *w, *lut, *y;
  int64_t o, k, K, O;
  (void)self, (void)ret;
  if (n != 4) return fail("qos_test_lut_dot", "expected 4 arguments");
  x = arg(args, 0, 0, 8, 2);
  w = arg(args, 1, 0, 8, 2);
  lut = arg(args, 2, 0, 32, 2);
  y = arg(args, 3, 0, 32, 2);
  if (!x || !w || !lut || !y) return fail("qos_test_lut_dot", "argument type mismatch");
  K = x->shape[1];
  O = w->shape[0];
  if (x->shape[0] != 1 || w->shape[1] != K || lut->shape[0] != 256 || lut->shape[1] != 256 || y->shape[0] != 1 ||
      y->shape[1] != O)
    return fail("qos_test_lut_dot", "shape mismatch");
  spin();
  {
    const int8_t* xs = (const int8_t*)x->data;
    const int8_t* ws = (const int8_t*)w->data;
    const int32_t* table = (const int32_t*)lut->data;
    int32_t* ys = (int32_t*)y->data;
    for (o = 0; o < O; o++) {
      int32_t acc = 0;
      for (k = 0; k < K; k++) acc += table[(ws[o * K + k] + 128) * 256 + (xs[k] + 128)];
      ys[o] = acc;
    }
  }
  return 0;
}

static int32_t affine(const char* name, const qos_ffi_any* args, int32_t n, int to_int8) {
  const qos_dltensor *acc, *scale, *shift, *y;
  int64_t o, O;
  if (n != 4) return fail(name, "expected 4 arguments");
  acc = arg(args, 0, 0, 32, 2);
  scale = arg(args, 1, 2, 32, 1);
  shift = arg(args, 2, 2, 32, 1);
  y = to_int8 ? arg(args, 3, 0, 8, 2) : arg(args, 3, 2, 32, 2);
  if (!acc || !scale || !shift || !y) return fail(name, "argument type mismatch");
  O = acc->shape[1];
  if (acc->shape[0] != 1 || scale->shape[0] != O || shift->shape[0] != O || y->shape[0] != 1 || y->shape[1] != O)
    return fail(name, "shape mismatch");
  spin();
  for (o = 0; o < O; o++) {
    float v = (float)((const int32_t*)acc->data)[o] * ((const float*)scale->data)[o];
    v = v + ((const float*)shift->data)[o];
    if (to_int8) {
      if (!(v >= -128.0f)) v = -128.0f; /* also maps NaN */
      if (v > 127.0f) v = 127.0f;
      ((int8_t*)y->data)[o] = (int8_t)(int32_t)v;
    } else {
      ((float*)y->data)[o] = v;
    }
  }
  return 0;
}

int32_t qos_test_requant(void* self, const qos_ffi_any* args, int32_t n, qos_ffi_any* ret) {
  (void)self, (void)ret;
  return affine("qos_test_requant", args, n, 1);
}

int32_t qos_test_scale(void* self, const qos_ffi_any* args, int32_t n, qos_ffi_any* ret) {
  (void)self, (void)ret;
  return affine("qos_test_scale", args, n, 0);
}

/* The table qos-run (qos_run_main.c) resolves kernel names through. */
const qos_kernel_entry qos_linked_kernels[] = {
    {"qos_test_lut_dot", qos_test_lut_dot},
    {"qos_test_requant", qos_test_requant},
    {"qos_test_scale", qos_test_scale},
    {NULL, NULL},
};

qos_packed_fn qos_linked_kernel_lookup(const char* name, void* user) {
  (void)user;
  return qos_table_lookup(name, (void*)qos_linked_kernels);
}
