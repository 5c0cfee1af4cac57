/*
 * qos_tvm_shim: the few host functions a TVM "system-lib" kernel object needs, so that
 * kernels compiled by TVM 0.27 run in a plain static C program with no TVM runtime.
 *
 * An LLVM object built with mod.with_attr("system_lib_prefix", P) calls, from a
 * static constructor, TVMFFIEnvModRegisterSystemLibSymbol(name, ptr) once per kernel
 * (name "__tvm_ffi_<global_symbol>") and once for its library context ("P__tvm_ffi__library_ctx").
 * While running it calls TVMBackendAllocWorkspace/FreeWorkspace (temporary buffers),
 * TVMBackendParallelLaunch (parallel loops) and, when an argument check fails,
 * TVMFFIErrorSetRaisedFromCStrParts before returning -1. This file provides those,
 * plus a lookup for the registered kernels and a persistent pthread pool.
 *
 * Kernels use the packed ABI:
 *     int32_t kernel(void* self, const TVMFFIAny* args, int32_t num_args, TVMFFIAny* ret);
 * each tensor argument is {type_index = kTVMFFIDLTensorPtr (7), v_ptr = DLTensor*}
 * (strides NULL = compact row-major, device kDLCPU 0); see qos_shim_tensor_arg().
 *
 * C99 + pthreads. Include paths: the wheel's tvm_ffi/include (tvm/ffi/c_api.h, dlpack).
 */
#ifndef QOS_TVM_SHIM_H_
#define QOS_TVM_SHIM_H_

#include <stdint.h>
#include <tvm/ffi/c_api.h>

#ifdef __cplusplus
extern "C" {
#endif

/* The packed calling convention of every generated kernel. */
typedef int (*qos_shim_packed_fn)(void* self, const TVMFFIAny* args, int32_t num_args, TVMFFIAny* ret);

/* Raw registry: the pointer registered under exactly `name`, or NULL. */
void* qos_shim_lookup_symbol(const char* name);

/* The kernel whose global symbol is `name` ("foo" or "__tvm_ffi_foo"), or NULL: only kernel entries
 * ("__tvm_ffi_<symbol>"), never other registered data such as a library context. A compiled model's
 * qos-run resolves manifest names through its own kernel table instead (qos_compile/tvm/plan.py). */
qos_shim_packed_fn qos_shim_get_function(const char* name);

/* Registered symbols, for listing: count and the i-th name (NULL when out of range). */
int qos_shim_num_symbols(void);
const char* qos_shim_symbol_name(int i);

/* Message of the last error raised on this thread by a kernel ("" if none); clear it. */
const char* qos_shim_last_error(void);
void qos_shim_clear_error(void);

/* Threads used by parallel loops. n <= 0: QOS_NUM_THREADS, else TVM_NUM_THREADS, else the
 * online CPU count. Takes effect for the next launch (the pool is re-created). Returns n used. */
int qos_shim_set_num_threads(int n);
int qos_shim_num_threads(void);

/* A packed argument: a tensor (DLTensor*) or a 64-bit integer. */
TVMFFIAny qos_shim_tensor_arg(DLTensor* t);
TVMFFIAny qos_shim_int_arg(int64_t v);

#ifdef __cplusplus
}
#endif
#endif /* QOS_TVM_SHIM_H_ */
