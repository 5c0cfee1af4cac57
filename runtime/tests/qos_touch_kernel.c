/* qos_touch_kernel.c -- a kernel that accepts any arguments and reads the first and last byte of
 * every tensor it gets (so AddressSanitizer sees any DLTensor that points outside its memory), and
 * qos_touch_lookup, which resolves EVERY kernel name to it. Used by the fuzzer and qos_open_many. */
#include <stdint.h>

#include "qos_runtime.h"

static volatile unsigned qos_touch_sink;

int32_t qos_touch_kernel(void* self, const qos_ffi_any* args, int32_t n, qos_ffi_any* ret) {
  int32_t i, k;
  (void)self;
  if (!ret || n < 0 || (n > 0 && !args)) return -1;
  for (i = 0; i < n; i++) {
    const qos_dltensor* t = (const qos_dltensor*)args[i].u.v_ptr;
    uint64_t bytes;
    if (args[i].type_index != QOS_FFI_TYPE_DLTENSOR_PTR || !t || !t->data || t->strides || t->byte_offset) return -1;
    bytes = t->dtype.bits / 8;
    for (k = 0; k < t->ndim; k++) bytes *= (uint64_t)t->shape[k];
    if (bytes == 0) return -1;
    qos_touch_sink += ((const uint8_t*)t->data)[0] + ((const uint8_t*)t->data)[bytes - 1];
  }
  return 0;
}

qos_packed_fn qos_touch_lookup(const char* name, void* user) {
  (void)user;
  return (name && name[0]) ? qos_touch_kernel : 0;
}
