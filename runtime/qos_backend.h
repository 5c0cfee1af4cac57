/* qos_backend.h -- the host functions that generated TVM kernels call (implemented in qos_backend.c).
 *
 * TVM system-lib objects (and C-target kernels) need exactly these symbols from
 * their host: TVMBackendAllocWorkspace, TVMBackendFreeWorkspace,
 * TVMBackendParallelLaunch, TVMBackendParallelBarrier and
 * TVMFFIErrorSetRaisedFromCStrParts (+ TVMFFIErrorSetRaisedFromCStr). The
 * definitions in qos_backend.c are weak (GCC/Clang), so a program that links
 * another implementation (e.g. a TVM runtime) keeps that one.
 *
 * qos_run clears the calling thread's kernel error before each kernel call and
 * reads it when a kernel returns non-zero (qos_backend_last_error).
 */
#ifndef QOS_BACKEND_H
#define QOS_BACKEND_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Layout-compatible with TVM's TVMParallelGroupEnv / FTVMParallelLambda. */
typedef struct {
  void* sync_handle;
  int32_t num_task;
} qos_parallel_group_env;
typedef int (*qos_parallel_lambda)(int task_id, qos_parallel_group_env* penv, void* cdata);

void* TVMBackendAllocWorkspace(int device_type, int device_id, uint64_t nbytes, int dtype_code_hint,
                               int dtype_bits_hint);
int TVMBackendFreeWorkspace(int device_type, int device_id, void* ptr);
int TVMBackendParallelLaunch(qos_parallel_lambda flambda, void* cdata, int num_task);
int TVMBackendParallelBarrier(int task_id, qos_parallel_group_env* penv);
void TVMFFIErrorSetRaisedFromCStrParts(const char* kind, const char** message_parts, int32_t num_parts);
void TVMFFIErrorSetRaisedFromCStr(const char* kind, const char* message);

/* The calling thread's last kernel error message ("" if none) / forget it. */
const char* qos_backend_last_error(void);
void qos_backend_clear_error(void);

#ifdef __cplusplus
}
#endif
#endif /* QOS_BACKEND_H */
