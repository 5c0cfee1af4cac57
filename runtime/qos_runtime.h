/* qos_runtime.h -- public API of the qos-compile C runtime (C99).
 *
 * The runtime opens a .qosm manifest (docs/manifest.md), resolves the plan's
 * kernels by name through a host-supplied lookup callback, and runs the plan:
 * an ordered list of kernel calls with TVM's packed calling convention. One
 * network carries several operating points (OPs); qos_select() switches between
 * them by storing one index (no copy, no allocation), and qos_run() reads that
 * index exactly once when it starts, so an inference never mixes two OPs.
 *
 * Library rules: no global mutable state except the thread-local kernel error
 * message of qos_backend.c (TVM's error hook has no context argument), no
 * printing, no exit(). Every function that can fail returns a QOS_* code.
 *
 * Memory: qos_open_* copy the manifest into one 64-byte aligned block owned by
 * the model (tensor data pointers point into it), and allocate one zeroed arena
 * for the intermediate buffers plus a staging area for inputs/outputs whose
 * caller pointer is not 64-byte aligned. Nothing is allocated by qos_select or
 * qos_run (kernels may allocate workspace through TVMBackendAllocWorkspace).
 *
 * Threads: qos_select may be called from any thread at any time, also while
 * qos_run is executing. qos_run is serialised per model by a mutex (the model
 * has one arena): concurrent calls on the same model wait for each other; use
 * one model per thread for parallel inference. qos_last_error describes the
 * last failed qos_run and is meant to be read by the thread that called it.
 */
#ifndef QOS_RUNTIME_H
#define QOS_RUNTIME_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define QOS_RUNTIME_VERSION "0.1.0"

/* ------------------------------------------------------------------ error codes */
#define QOS_OK 0
#define QOS_ERR_ARG (-1)            /* invalid argument (NULL, index out of range) */
#define QOS_ERR_IO (-2)             /* the file cannot be opened or read */
#define QOS_ERR_NOMEM (-3)          /* out of memory */
#define QOS_ERR_FORMAT (-4)         /* malformed manifest */
#define QOS_ERR_VERSION (-5)        /* unsupported manifest major version */
#define QOS_ERR_CHECKSUM (-6)       /* CRC-32 mismatch: the file is corrupted */
#define QOS_ERR_KERNEL_MISSING (-7) /* the lookup callback did not resolve a kernel */
#define QOS_ERR_KERNEL (-8)         /* a kernel returned an error */
#define QOS_ERR_SIZE (-9)           /* input/output byte count does not match the model */
#define QOS_ERR_LIMIT (-10)         /* the arena is larger than QOS_MAX_ARENA_BYTES */

/* Longest message stored by the runtime (including the NUL). */
#define QOS_ERROR_MAX 512

/* --------------------------------------------------- the packed ABI (TVM FFI)
 * Layout-compatible copies of DLPack's DLTensor and TVM FFI's TVMFFIAny, so
 * that neither TVM's nor DLPack's headers are needed (and no name clashes with
 * them). Generated TVM kernels are called as
 *     int32_t fn(void* self, const TVMFFIAny* args, int32_t num_args, TVMFFIAny* ret)
 * and every argument here is a tensor: type_index 7 (kTVMFFIDLTensorPtr),
 * zero_padding 0, v_ptr = DLTensor*. Sizes on LP64 (x86-64, aarch64):
 *   qos_dldevice 8 = {int32 device_type (kDLCPU = 1); int32 device_id (0)}
 *   qos_dldatatype 4 = {uint8 code (kDLInt 0, kDLUInt 1, kDLFloat 2); uint8 bits; uint16 lanes (1)}
 *   qos_dltensor 48 = {void* data @0; device @8; int32 ndim @16; dtype @20;
 *                      int64* shape @24; int64* strides @32 (NULL = compact); uint64 byte_offset @40 (0)}
 *   qos_ffi_any 16 = {int32 type_index @0; uint32 zero_padding @4; union {int64; double; void*} @8}
 * (checked by static assertions in qos_runtime.c). */
typedef struct {
  int32_t device_type;
  int32_t device_id;
} qos_dldevice;

typedef struct {
  uint8_t code;
  uint8_t bits;
  uint16_t lanes;
} qos_dldatatype;

typedef struct {
  void* data;
  qos_dldevice device;
  int32_t ndim;
  qos_dldatatype dtype;
  int64_t* shape;
  int64_t* strides;
  uint64_t byte_offset;
} qos_dltensor;

typedef struct {
  int32_t type_index;
  uint32_t zero_padding;
  union {
    int64_t v_int64;
    double v_float64;
    void* v_ptr;
  } u;
} qos_ffi_any;

#define QOS_DL_CPU 1
#define QOS_FFI_TYPE_NONE 0
#define QOS_FFI_TYPE_DLTENSOR_PTR 7

/* A kernel: TVMFFISafeCallType. Returns 0, or non-zero after calling
 * TVMFFIErrorSetRaisedFromCStrParts (see qos_backend.c). */
typedef int32_t (*qos_packed_fn)(void* self, const qos_ffi_any* args, int32_t num_args, qos_ffi_any* ret);

/* Resolves a kernel symbol name (as stored in the manifest) to its function,
 * or returns NULL. Called only inside qos_open_*, once per kernel. */
typedef qos_packed_fn (*qos_kernel_lookup)(const char* name, void* user);

/* Convenience lookup over a table ending with {NULL, NULL}: pass
 * qos_table_lookup as the lookup and the table as `user`. */
typedef struct {
  const char* name;
  qos_packed_fn fn;
} qos_kernel_entry;
qos_packed_fn qos_table_lookup(const char* name, void* table);

/* ------------------------------------------------------------------ model */
typedef struct qos_model qos_model;

/* Element type codes (= the manifest's; see QOSM_DTYPE_* in qos_manifest_format.h). */
#define QOS_DTYPE_INT8 1
#define QOS_DTYPE_UINT8 2
#define QOS_DTYPE_INT16 3
#define QOS_DTYPE_INT32 4
#define QOS_DTYPE_FLOAT32 5

typedef struct {
  const char* name;   /* owned by the model */
  int32_t dtype;      /* QOS_DTYPE_* */
  int32_t ndim;
  int64_t shape[6];   /* [0, ndim) valid */
  size_t nbytes;      /* exact byte count qos_run expects */
  float scale;        /* quantization scale (information; NaN if none) */
  int32_t zero_point; /* quantization zero point (information) */
} qos_tensor_info;

/* Open a manifest from a file or a memory buffer (copied; the caller may free
 * it afterwards). `lookup` may be NULL: the model can then be inspected but
 * qos_run fails with QOS_ERR_KERNEL_MISSING. On failure *out is NULL and, if
 * err != NULL and errlen > 0, a NUL-terminated message is written to err. */
int qos_open_file(const char* path, qos_kernel_lookup lookup, void* user, qos_model** out, char* err,
                  size_t errlen);
int qos_open_memory(const void* buf, size_t len, qos_kernel_lookup lookup, void* user, qos_model** out,
                    char* err, size_t errlen);
void qos_close(qos_model* model); /* NULL is fine; not while qos_run runs */

uint32_t qos_num_ops(const qos_model* model);
const char* qos_op_name(const qos_model* model, uint32_t op); /* NULL if out of range */
int32_t qos_find_op(const qos_model* model, const char* name); /* index, or -1 */

/* Select the OP used by the next qos_run calls: one atomic store, O(1), no
 * copy, no allocation. QOS_ERR_ARG if op is out of range (nothing changes). */
int qos_select(qos_model* model, uint32_t op);
uint32_t qos_selected(const qos_model* model);

uint32_t qos_num_inputs(const qos_model* model);
uint32_t qos_num_outputs(const qos_model* model);
int qos_input_info(const qos_model* model, uint32_t index, qos_tensor_info* info);
int qos_output_info(const qos_model* model, uint32_t index, qos_tensor_info* info);

/* Run one inference of a model with one input and one output. Byte counts
 * must equal the model's (qos_input_info().nbytes). Any alignment works;
 * 64-byte aligned buffers avoid a staging copy. The OP is read once, at the
 * start. Kernels must not write to their INPUT arguments. */
int qos_run(qos_model* model, const void* input, size_t in_bytes, void* output, size_t out_bytes);
/* The general form: arrays of qos_num_inputs / qos_num_outputs entries. */
int qos_run_multi(qos_model* model, const void* const* inputs, const size_t* in_bytes, void* const* outputs,
                  const size_t* out_bytes);

const char* qos_last_error(const qos_model* model); /* "" if none; never NULL */
const char* qos_strerror(int code);
const char* qos_dtype_name(int32_t dtype);

/* The manifest's free-form metadata (JSON text, not NUL-terminated); *len = its size. */
const void* qos_metadata(const qos_model* model, size_t* len);
/* Bytes of the arena (intermediate buffers) and of the model's copy of the file. */
uint64_t qos_arena_bytes(const qos_model* model);
/* Per-step profiling: while step_ns (an array of qos_num_steps() counters) is set, every run
 * adds each plan step's wall time in ns to it; NULL turns profiling off. */
uint32_t qos_num_steps(const qos_model* model);
const char* qos_step_kernel(const qos_model* model, uint32_t step); /* kernel name; NULL if out of range */
int qos_profile_steps(qos_model* model, uint64_t* step_ns);
uint64_t qos_file_bytes(const qos_model* model);

#ifdef __cplusplus
}
#endif
#endif /* QOS_RUNTIME_H */
