/* qos_backend.c -- host hooks for generated TVM kernels (see qos_backend.h).
 *
 * Workspace: malloc-based, 64-byte aligned (the original pointer is stored just
 * before the aligned block). TVM allocates workspace per kernel call for
 * temporaries that do not fit its stack threshold; the calls are LIFO and few.
 *
 * Parallelism: TVMBackendParallelLaunch runs the closure SERIALLY in the calling
 * thread as one task (num_task = 1, task_id 0), whatever num_task was asked
 * for. TVM's parallel loops split their range by penv->num_task, so they are
 * correct with one task; kernels are single-threaded and qos_run needs no
 * thread pool (deterministic, no global threads, works under qemu).
 *
 * Errors: kernels report failures by calling TVMFFIErrorSetRaisedFromCStrParts
 * and returning non-zero. The message is kept in a thread-local buffer (the
 * hook has no context argument), which qos_run reads.
 *
 * All hooks are WEAK: linked together with another provider (the TVM
 * system-lib shim qos_compile/tvm/shim/qos_tvm_shim.c, or a TVM runtime),
 * the other's strong definitions win; qos_backend_last_error then reads the
 * shim's message buffer (qos_shim_last_error, a weak reference).
 */
#include "qos_backend.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__GNUC__) || defined(__clang__)
#define QOS_WEAK __attribute__((weak))
#define QOS_TLS __thread
#elif defined(_MSC_VER)
#define QOS_WEAK
#define QOS_TLS __declspec(thread)
#else
#define QOS_WEAK
#define QOS_TLS _Thread_local
#endif

#define QOS_BACKEND_ERR_MAX 512
#define QOS_WS_ALIGN 64

static QOS_TLS char g_err[QOS_BACKEND_ERR_MAX];

#if defined(__GNUC__) || defined(__clang__)
/* When the TVM system-lib shim (qos_compile/tvm/shim/qos_tvm_shim.c) is linked too, its strong
 * TVMFFIErrorSetRaisedFromCStrParts replaces the weak one below and keeps the message in ITS
 * thread-local buffer: read it from there (weak references: NULL when the shim is absent). */
extern const char* qos_shim_last_error(void) __attribute__((weak));
extern void qos_shim_clear_error(void) __attribute__((weak));
#define QOS_HAVE_SHIM_FALLBACK 1
#endif

const char* qos_backend_last_error(void) {
#ifdef QOS_HAVE_SHIM_FALLBACK
  if (!g_err[0] && qos_shim_last_error) {
    const char* s = qos_shim_last_error();
    if (s) return s;
  }
#endif
  return g_err;
}

void qos_backend_clear_error(void) {
  g_err[0] = 0;
#ifdef QOS_HAVE_SHIM_FALLBACK
  if (qos_shim_clear_error) qos_shim_clear_error();
#endif
}

static void append(size_t* pos, const char* s) {
  while (s && *s && *pos + 1 < QOS_BACKEND_ERR_MAX) g_err[(*pos)++] = *s++;
  g_err[*pos] = 0;
}

QOS_WEAK void TVMFFIErrorSetRaisedFromCStrParts(const char* kind, const char** message_parts, int32_t num_parts) {
  size_t pos = 0;
  int32_t i;
  g_err[0] = 0;
  if (kind && *kind) {
    append(&pos, kind);
    append(&pos, ": ");
  }
  for (i = 0; message_parts && i < num_parts; i++) append(&pos, message_parts[i]);
}

QOS_WEAK void TVMFFIErrorSetRaisedFromCStr(const char* kind, const char* message) {
  TVMFFIErrorSetRaisedFromCStrParts(kind, &message, 1);
}

QOS_WEAK void* TVMBackendAllocWorkspace(int device_type, int device_id, uint64_t nbytes, int dtype_code_hint,
                                        int dtype_bits_hint) {
  unsigned char* raw;
  uintptr_t aligned;
  (void)device_type, (void)device_id, (void)dtype_code_hint, (void)dtype_bits_hint;
  if (nbytes > (uint64_t)SIZE_MAX - QOS_WS_ALIGN - sizeof(void*)) return NULL;
  raw = (unsigned char*)malloc((size_t)nbytes + QOS_WS_ALIGN + sizeof(void*));
  if (!raw) return NULL;
  aligned = ((uintptr_t)(raw + sizeof(void*)) + QOS_WS_ALIGN - 1) & ~(uintptr_t)(QOS_WS_ALIGN - 1);
  memcpy((unsigned char*)aligned - sizeof(void*), &raw, sizeof(void*));
  return (void*)aligned;
}

QOS_WEAK int TVMBackendFreeWorkspace(int device_type, int device_id, void* ptr) {
  void* raw;
  (void)device_type, (void)device_id;
  if (!ptr) return 0;
  memcpy(&raw, (unsigned char*)ptr - sizeof(void*), sizeof(void*));
  free(raw);
  return 0;
}

QOS_WEAK int TVMBackendParallelLaunch(qos_parallel_lambda flambda, void* cdata, int num_task) {
  qos_parallel_group_env env;
  (void)num_task;
  if (!flambda) return -1;
  env.sync_handle = NULL;
  env.num_task = 1;
  return flambda(0, &env, cdata);
}

QOS_WEAK int TVMBackendParallelBarrier(int task_id, qos_parallel_group_env* penv) {
  (void)task_id, (void)penv;
  return 0;
}
