/* qos_runtime.c -- the executor: open a manifest, select an operating point, run the plan (C99 + pthreads).
 *
 * Open: the manifest is copied into one 64-byte aligned block, validated by
 * qosm_parse (qos_manifest.c), and turned into prebuilt packed-call arguments:
 * one DLTensor per file tensor, arena buffer, input and output, and one
 * TVMFFIAny array holding every step's arguments (a step uses a contiguous
 * range of it). Each DLTensor is checked once more against the memory it
 * points into. Kernels are resolved by name through the host's callback.
 *
 * Select: one atomic store of the OP index.
 *
 * Run: under the model's mutex, the OP index is loaded ONCE; before each step,
 * the step's SLOT arguments are pointed at slot_tensor[op][slot] of that OP.
 * A concurrent qos_select only affects the next run, never the current one.
 */
#if !defined(_POSIX_C_SOURCE) || _POSIX_C_SOURCE < 200809L
#undef _POSIX_C_SOURCE
#define _POSIX_C_SOURCE 200809L
#endif
#include "qos_runtime.h"

#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "qos_backend.h"
#include "qos_manifest.h"

/* ------------------------------------------------------------------ ABI checks (C99 static asserts) */
#define QOS_STATIC_ASSERT(cond, name) typedef char qos_static_assert_##name[(cond) ? 1 : -1]
QOS_STATIC_ASSERT(sizeof(qos_ffi_any) == 16, ffi_any_is_16_bytes);
QOS_STATIC_ASSERT(offsetof(qos_ffi_any, u) == 8, ffi_any_value_at_8);
QOS_STATIC_ASSERT(sizeof(qos_dldevice) == 8, dldevice_is_8_bytes);
QOS_STATIC_ASSERT(sizeof(qos_dldatatype) == 4, dldatatype_is_4_bytes);
QOS_STATIC_ASSERT(offsetof(qos_dltensor, device) == sizeof(void*), dltensor_device_offset);
QOS_STATIC_ASSERT(offsetof(qos_dltensor, ndim) == sizeof(void*) + 8, dltensor_ndim_offset);
QOS_STATIC_ASSERT(offsetof(qos_dltensor, dtype) == sizeof(void*) + 12, dltensor_dtype_offset);
QOS_STATIC_ASSERT(sizeof(void*) != 8 || sizeof(qos_dltensor) == 48, dltensor_is_48_bytes_on_lp64);
QOS_STATIC_ASSERT(sizeof(void*) != 8 || offsetof(qos_dltensor, shape) == 24, dltensor_shape_at_24);
QOS_STATIC_ASSERT(sizeof(void*) != 8 || offsetof(qos_dltensor, byte_offset) == 40, dltensor_byte_offset_at_40);
QOS_STATIC_ASSERT(QOS_DTYPE_FLOAT32 == QOSM_DTYPE_FLOAT32 && QOS_DTYPE_INT8 == QOSM_DTYPE_INT8, dtype_codes);

/* ------------------------------------------------------------------ atomics */
#if defined(__GNUC__) || defined(__clang__)
#define QOS_ATOMIC_STORE(p, v) __atomic_store_n((p), (v), __ATOMIC_RELEASE)
#define QOS_ATOMIC_LOAD(p) __atomic_load_n((p), __ATOMIC_ACQUIRE)
typedef uint32_t qos_atomic_u32;
#elif defined(__STDC_VERSION__) && __STDC_VERSION__ >= 201112L && !defined(__STDC_NO_ATOMICS__)
#include <stdatomic.h>
#define QOS_ATOMIC_STORE(p, v) atomic_store_explicit((p), (v), memory_order_release)
#define QOS_ATOMIC_LOAD(p) atomic_load_explicit((p), memory_order_acquire)
typedef _Atomic uint32_t qos_atomic_u32;
#else
#error "qos_runtime.c needs GCC/Clang __atomic builtins or C11 <stdatomic.h>"
#endif

/* The largest arena (+ I/O staging) qos_open_* will allocate; a manifest asking
 * for more gets QOS_ERR_LIMIT. Override with -DQOS_MAX_ARENA_BYTES=... */
#ifndef QOS_MAX_ARENA_BYTES
#define QOS_MAX_ARENA_BYTES ((uint64_t)1 << 40)
#endif

static const uint8_t kDlCode[QOSM_DTYPE_MAX + 1] = QOSM_DTYPE_DL_CODES;
static const uint8_t kDlBits[QOSM_DTYPE_MAX + 1] = QOSM_DTYPE_BITS;
static const char* const kDtypeName[QOSM_DTYPE_MAX + 1] = QOSM_DTYPE_NAMES;

typedef unsigned long long ull;

struct qos_model {
  void* file_raw;       /* malloc'd block */
  uint8_t* file;        /* 64-byte aligned copy of the manifest */
  size_t file_size;
  qosm_desc d;

  qos_dltensor* tensors; /* [num_tensors] file tensors */
  qos_dltensor* buffers; /* [num_buffers] arena buffers */
  qos_dltensor* inputs;  /* [num_inputs]; data set per run */
  qos_dltensor* outputs; /* [num_outputs]; data set per run */
  int64_t* shapes;       /* backing store of every DLTensor's shape */
  qos_packed_fn* kernels; /* [num_kernels]; NULL entries when opened without a lookup */
  int have_kernels;
  qos_ffi_any* args;      /* [num_args] */
  uint8_t* arg_kind;      /* [num_args] */

  void* arena_raw;
  uint8_t* arena;         /* 64-byte aligned, zeroed */
  uint64_t arena_size;
  uint8_t** in_stage;     /* [num_inputs] aligned staging areas in the arena block */
  uint8_t** out_stage;    /* [num_outputs] */

  qos_atomic_u32 op;
  pthread_mutex_t run_lock;
  uint64_t* step_ns;      /* optional per-step time accumulators (qos_profile_steps) */
  int lock_ok;
  char err[QOS_ERROR_MAX];
};

/* ------------------------------------------------------------------ small helpers */
static int set_err(char* err, size_t errlen, int code, const char* fmt, ...) {
  if (err && errlen) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
  }
  return code;
}

static int model_err(qos_model* m, int code, const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(m->err, sizeof m->err, fmt, ap);
  va_end(ap);
  return code;
}

static void* aligned_block(uint64_t size, void** raw) {
  uintptr_t a;
  if (size > (uint64_t)SIZE_MAX - QOSM_ALIGN) return NULL;
  *raw = calloc(1, (size_t)size + QOSM_ALIGN);
  if (!*raw) return NULL;
  a = ((uintptr_t)*raw + QOSM_ALIGN - 1) & ~(uintptr_t)(QOSM_ALIGN - 1);
  return (void*)a;
}

static uint64_t round_up(uint64_t n) { return (n + QOSM_ALIGN - 1) / QOSM_ALIGN * QOSM_ALIGN; }

qos_packed_fn qos_table_lookup(const char* name, void* table) {
  const qos_kernel_entry* e = (const qos_kernel_entry*)table;
  if (!name || !e) return NULL;
  for (; e->name; e++)
    if (strcmp(e->name, name) == 0) return e->fn;
  return NULL;
}

const char* qos_strerror(int code) {
  switch (code) {
    case QOS_OK: return "ok";
    case QOS_ERR_ARG: return "invalid argument";
    case QOS_ERR_IO: return "i/o error";
    case QOS_ERR_NOMEM: return "out of memory";
    case QOS_ERR_FORMAT: return "malformed manifest";
    case QOS_ERR_VERSION: return "unsupported manifest version";
    case QOS_ERR_CHECKSUM: return "manifest checksum mismatch";
    case QOS_ERR_KERNEL_MISSING: return "kernel not found";
    case QOS_ERR_KERNEL: return "kernel failed";
    case QOS_ERR_SIZE: return "input/output size mismatch";
    case QOS_ERR_LIMIT: return "arena too large";
    default: return "unknown error";
  }
}

const char* qos_dtype_name(int32_t dtype) {
  return (dtype >= 1 && dtype <= QOSM_DTYPE_MAX) ? kDtypeName[dtype] : "?";
}

static void fill_dltensor(qos_dltensor* t, void* data, uint8_t dtype, uint8_t ndim, const int64_t* shape,
                          int64_t* shape_store) {
  memcpy(shape_store, shape, sizeof(int64_t) * QOSM_MAX_NDIM);
  t->data = data;
  t->device.device_type = QOS_DL_CPU;
  t->device.device_id = 0;
  t->ndim = ndim;
  t->dtype.code = kDlCode[dtype];
  t->dtype.bits = kDlBits[dtype];
  t->dtype.lanes = 1;
  t->shape = shape_store;
  t->strides = NULL;
  t->byte_offset = 0;
}

/* Bytes a DLTensor covers, from its own fields (the independent re-check). */
static int dltensor_extent(const qos_dltensor* t, uint64_t* out) {
  uint64_t n;
  int32_t k;
  if (t->dtype.lanes != 1 || t->dtype.bits % 8 || t->ndim < 0 || t->ndim > QOSM_MAX_NDIM || t->strides ||
      t->byte_offset || t->device.device_type != QOS_DL_CPU)
    return 0;
  n = t->dtype.bits / 8;
  for (k = 0; k < t->ndim; k++) {
    if (t->shape[k] < 1 || (uint64_t)t->shape[k] > QOSM_MAX_NBYTES / n) return 0;
    n *= (uint64_t)t->shape[k];
  }
  *out = n;
  return 1;
}

/* t lies inside [lo, lo + size) and covers exactly `expect` bytes. */
static int dltensor_inside(const qos_dltensor* t, const uint8_t* lo, uint64_t size, uint64_t expect) {
  uint64_t ext, off;
  if (!dltensor_extent(t, &ext) || ext != expect) return 0;
  if ((const uint8_t*)t->data < lo) return 0;
  off = (uint64_t)((const uint8_t*)t->data - lo);
  return off <= size && ext <= size - off && ((uintptr_t)t->data % QOSM_ALIGN) == 0;
}

void qos_close(qos_model* m) {
  if (!m) return;
  if (m->lock_ok) pthread_mutex_destroy(&m->run_lock);
  qosm_free(&m->d);
  free(m->tensors);
  free(m->buffers);
  free(m->inputs);
  free(m->outputs);
  free(m->shapes);
  free(m->kernels);
  free(m->args);
  free(m->arg_kind);
  free(m->in_stage);
  free(m->out_stage);
  free(m->arena_raw);
  free(m->file_raw);
  free(m);
}

static void* xcalloc(uint64_t n, size_t size) {
  if (n == 0) n = 1;
  if (n > (uint64_t)(SIZE_MAX / size)) return NULL;
  return calloc((size_t)n, size);
}

/* Build everything from the validated copy in m->file. */
static int build_model(qos_model* m, qos_kernel_lookup lookup, void* user, char* err, size_t errlen) {
  qosm_desc* d = &m->d;
  uint64_t nshapes, staging = 0, total;
  uint32_t i, op;
  int64_t* sh;
  uint8_t* stage;
  int rc = qosm_parse(m->file, m->file_size, d, err, errlen);
  if (rc != QOS_OK) return rc;

  /* arena + staging areas, bounded */
  for (i = 0; i < d->num_inputs; i++) {
    if (round_up(d->inputs[i].nbytes) > QOS_MAX_ARENA_BYTES - staging) goto limit;
    staging += round_up(d->inputs[i].nbytes);
  }
  for (i = 0; i < d->num_outputs; i++) {
    if (round_up(d->outputs[i].nbytes) > QOS_MAX_ARENA_BYTES - staging) goto limit;
    staging += round_up(d->outputs[i].nbytes);
  }
  if (d->arena_size > QOS_MAX_ARENA_BYTES - staging) goto limit;
  total = d->arena_size + staging;
  m->arena_size = d->arena_size;
  m->arena = (uint8_t*)aligned_block(total, &m->arena_raw);
  if (!m->arena)
    return set_err(err, errlen, QOS_ERR_NOMEM, "cannot allocate the arena (%llu bytes)", (ull)total);

  nshapes = (uint64_t)d->num_tensors + d->num_buffers + d->num_inputs + d->num_outputs;
  m->tensors = (qos_dltensor*)xcalloc(d->num_tensors, sizeof(qos_dltensor));
  m->buffers = (qos_dltensor*)xcalloc(d->num_buffers, sizeof(qos_dltensor));
  m->inputs = (qos_dltensor*)xcalloc(d->num_inputs, sizeof(qos_dltensor));
  m->outputs = (qos_dltensor*)xcalloc(d->num_outputs, sizeof(qos_dltensor));
  m->shapes = (int64_t*)xcalloc(nshapes, sizeof(int64_t) * QOSM_MAX_NDIM);
  m->kernels = (qos_packed_fn*)xcalloc(d->num_kernels, sizeof(qos_packed_fn));
  m->args = (qos_ffi_any*)xcalloc(d->num_args, sizeof(qos_ffi_any));
  m->arg_kind = (uint8_t*)xcalloc(d->num_args, 1);
  m->in_stage = (uint8_t**)xcalloc(d->num_inputs, sizeof(uint8_t*));
  m->out_stage = (uint8_t**)xcalloc(d->num_outputs, sizeof(uint8_t*));
  if (!m->tensors || !m->buffers || !m->inputs || !m->outputs || !m->shapes || !m->kernels || !m->args ||
      !m->arg_kind || !m->in_stage || !m->out_stage)
    return set_err(err, errlen, QOS_ERR_NOMEM, "out of memory");

  sh = m->shapes;
  for (i = 0; i < d->num_tensors; i++, sh += QOSM_MAX_NDIM) {
    const qosm_tensor* t = &d->tensors[i];
    fill_dltensor(&m->tensors[i], m->file + t->offset, t->dtype, t->ndim, t->shape, sh);
    if (!dltensor_inside(&m->tensors[i], m->file + d->data_offset, d->data_size, t->nbytes))
      return set_err(err, errlen, QOS_ERR_FORMAT, "tensor %u: DLTensor does not match its data", i);
  }
  for (i = 0; i < d->num_buffers; i++, sh += QOSM_MAX_NDIM) {
    const qosm_tensor* b = &d->buffers[i];
    fill_dltensor(&m->buffers[i], m->arena + b->offset, b->dtype, b->ndim, b->shape, sh);
    if (!dltensor_inside(&m->buffers[i], m->arena, m->arena_size, b->nbytes))
      return set_err(err, errlen, QOS_ERR_FORMAT, "buffer %u: DLTensor does not match the arena", i);
  }
  stage = m->arena + m->arena_size;
  for (i = 0; i < d->num_inputs; i++, sh += QOSM_MAX_NDIM) {
    fill_dltensor(&m->inputs[i], NULL, d->inputs[i].dtype, d->inputs[i].ndim, d->inputs[i].shape, sh);
    m->in_stage[i] = stage;
    stage += round_up(d->inputs[i].nbytes);
  }
  for (i = 0; i < d->num_outputs; i++, sh += QOSM_MAX_NDIM) {
    fill_dltensor(&m->outputs[i], NULL, d->outputs[i].dtype, d->outputs[i].ndim, d->outputs[i].shape, sh);
    m->out_stage[i] = stage;
    stage += round_up(d->outputs[i].nbytes);
  }
  for (i = 0; i < d->num_inputs; i++) {
    uint64_t ext;
    if (!dltensor_extent(&m->inputs[i], &ext) || ext != d->inputs[i].nbytes)
      return set_err(err, errlen, QOS_ERR_FORMAT, "input %u: DLTensor does not match its size", i);
  }
  for (i = 0; i < d->num_outputs; i++) {
    uint64_t ext;
    if (!dltensor_extent(&m->outputs[i], &ext) || ext != d->outputs[i].nbytes)
      return set_err(err, errlen, QOS_ERR_FORMAT, "output %u: DLTensor does not match its size", i);
  }

  /* packed arguments: everything but SLOT is fixed now */
  for (i = 0; i < d->num_args; i++) {
    const qosm_arg* a = &d->args[i];
    qos_dltensor* t = NULL;
    m->args[i].type_index = QOS_FFI_TYPE_DLTENSOR_PTR;
    m->args[i].zero_padding = 0;
    m->arg_kind[i] = (uint8_t)a->kind;
    switch (a->kind) {
      case QOSM_ARG_CONST: t = &m->tensors[a->index]; break;
      case QOSM_ARG_BUFFER: t = &m->buffers[a->index]; break;
      case QOSM_ARG_INPUT: t = &m->inputs[a->index]; break;
      case QOSM_ARG_OUTPUT: t = &m->outputs[a->index]; break;
      case QOSM_ARG_SLOT: /* every OP's tensor for this slot was validated in qosm_parse; re-check the range */
        for (op = 0; op < d->num_ops; op++)
          if (d->slot_tensors[(uint64_t)op * d->num_slots + a->index] >= d->num_tensors)
            return set_err(err, errlen, QOS_ERR_FORMAT, "argument %u: slot tensor out of range", i);
        t = &m->tensors[d->slot_tensors[a->index]];
        break;
      default: return set_err(err, errlen, QOS_ERR_FORMAT, "argument %u: bad kind", i);
    }
    m->args[i].u.v_ptr = t;
  }

  /* kernels */
  m->have_kernels = lookup != NULL;
  if (lookup) {
    for (i = 0; i < d->num_kernels; i++) {
      const char* name = qosm_str(d, d->kernel_names[i]);
      m->kernels[i] = lookup(name, user);
      if (!m->kernels[i])
        return set_err(err, errlen, QOS_ERR_KERNEL_MISSING,
                       "kernel '%s' not found: not one of the kernels this program was built with", name);
    }
  }
  if (pthread_mutex_init(&m->run_lock, NULL) != 0)
    return set_err(err, errlen, QOS_ERR_NOMEM, "cannot create the model's mutex");
  m->lock_ok = 1;
  QOS_ATOMIC_STORE(&m->op, 0u);
  return QOS_OK;

limit:
  return set_err(err, errlen, QOS_ERR_LIMIT, "the arena and I/O staging exceed QOS_MAX_ARENA_BYTES (%llu bytes)",
                 (ull)QOS_MAX_ARENA_BYTES);
}

static int is_little_endian(void) {
  const uint16_t one = 1;
  return *(const uint8_t*)&one == 1;
}

static int open_common(qos_model* m, qos_kernel_lookup lookup, void* user, qos_model** out, char* err,
                       size_t errlen) {
  int rc = build_model(m, lookup, user, err, errlen);
  if (rc != QOS_OK) {
    qos_close(m);
    return rc;
  }
  *out = m;
  return QOS_OK;
}

int qos_open_memory(const void* buf, size_t len, qos_kernel_lookup lookup, void* user, qos_model** out, char* err,
                    size_t errlen) {
  qos_model* m;
  if (err && errlen) err[0] = 0;
  if (!out) return set_err(err, errlen, QOS_ERR_ARG, "no output pointer given");
  *out = NULL;
  if (!buf && len) return set_err(err, errlen, QOS_ERR_ARG, "no buffer given");
  if (!is_little_endian()) return set_err(err, errlen, QOS_ERR_FORMAT, "big-endian hosts are not supported");
  m = (qos_model*)calloc(1, sizeof *m);
  if (!m) return set_err(err, errlen, QOS_ERR_NOMEM, "out of memory");
  m->file = (uint8_t*)aligned_block(len, &m->file_raw);
  if (!m->file) {
    free(m);
    return set_err(err, errlen, QOS_ERR_NOMEM, "cannot allocate %llu bytes for the manifest", (ull)len);
  }
  if (len) memcpy(m->file, buf, len);
  m->file_size = len;
  return open_common(m, lookup, user, out, err, errlen);
}

int qos_open_file(const char* path, qos_kernel_lookup lookup, void* user, qos_model** out, char* err,
                  size_t errlen) {
  FILE* f;
  long size;
  qos_model* m;
  if (err && errlen) err[0] = 0;
  if (!out) return set_err(err, errlen, QOS_ERR_ARG, "no output pointer given");
  *out = NULL;
  if (!path) return set_err(err, errlen, QOS_ERR_ARG, "no path given");
  if (!is_little_endian()) return set_err(err, errlen, QOS_ERR_FORMAT, "big-endian hosts are not supported");
  f = fopen(path, "rb");
  if (!f) return set_err(err, errlen, QOS_ERR_IO, "cannot open %s", path);
  if (fseek(f, 0, SEEK_END) != 0 || (size = ftell(f)) < 0 || fseek(f, 0, SEEK_SET) != 0) {
    fclose(f);
    return set_err(err, errlen, QOS_ERR_IO, "cannot determine the size of %s", path);
  }
  m = (qos_model*)calloc(1, sizeof *m);
  if (!m || !(m->file = (uint8_t*)aligned_block((uint64_t)size, &m->file_raw))) {
    free(m);
    fclose(f);
    return set_err(err, errlen, QOS_ERR_NOMEM, "cannot allocate %ld bytes for %s", size, path);
  }
  m->file_size = (size_t)size;
  if (size > 0 && fread(m->file, 1, (size_t)size, f) != (size_t)size) {
    fclose(f);
    qos_close(m);
    return set_err(err, errlen, QOS_ERR_IO, "cannot read %s", path);
  }
  fclose(f);
  return open_common(m, lookup, user, out, err, errlen);
}

/* ------------------------------------------------------------------ queries */
uint32_t qos_num_ops(const qos_model* m) { return m ? m->d.num_ops : 0; }

const char* qos_op_name(const qos_model* m, uint32_t op) {
  return (m && op < m->d.num_ops) ? qosm_str(&m->d, m->d.op_names[op]) : NULL;
}

int32_t qos_find_op(const qos_model* m, const char* name) {
  uint32_t i;
  if (!m || !name) return -1;
  for (i = 0; i < m->d.num_ops; i++)
    if (strcmp(qosm_str(&m->d, m->d.op_names[i]), name) == 0) return (int32_t)i;
  return -1;
}

int qos_select(qos_model* m, uint32_t op) {
  if (!m || op >= m->d.num_ops) return QOS_ERR_ARG;
  QOS_ATOMIC_STORE(&m->op, op);
  return QOS_OK;
}

uint32_t qos_selected(const qos_model* m) { return m ? QOS_ATOMIC_LOAD((qos_atomic_u32*)&m->op) : 0; }

uint32_t qos_num_inputs(const qos_model* m) { return m ? m->d.num_inputs : 0; }
uint32_t qos_num_outputs(const qos_model* m) { return m ? m->d.num_outputs : 0; }

static void io_info(const qosm_desc* d, const qosm_io* io, qos_tensor_info* info) {
  int k;
  memset(info, 0, sizeof *info);
  info->name = qosm_str(d, io->name);
  info->dtype = io->dtype;
  info->ndim = io->ndim;
  for (k = 0; k < QOSM_MAX_NDIM; k++) info->shape[k] = io->shape[k];
  info->nbytes = (size_t)io->nbytes;
  info->scale = io->scale;
  info->zero_point = io->zero_point;
}

int qos_input_info(const qos_model* m, uint32_t index, qos_tensor_info* info) {
  if (!m || !info || index >= m->d.num_inputs) return QOS_ERR_ARG;
  io_info(&m->d, &m->d.inputs[index], info);
  return QOS_OK;
}

int qos_output_info(const qos_model* m, uint32_t index, qos_tensor_info* info) {
  if (!m || !info || index >= m->d.num_outputs) return QOS_ERR_ARG;
  io_info(&m->d, &m->d.outputs[index], info);
  return QOS_OK;
}

const char* qos_last_error(const qos_model* m) { return m ? m->err : "no model"; }

const void* qos_metadata(const qos_model* m, size_t* len) {
  if (len) *len = m ? (size_t)m->d.metadata_size : 0;
  return m ? (const void*)m->d.metadata : NULL;
}

uint64_t qos_arena_bytes(const qos_model* m) { return m ? m->arena_size : 0; }
uint64_t qos_file_bytes(const qos_model* m) { return m ? (uint64_t)m->file_size : 0; }

/* ------------------------------------------------------------------ run */
static int run_locked(qos_model* m, const void* const* inputs, const size_t* in_bytes, void* const* outputs,
                      const size_t* out_bytes) {
  const qosm_desc* d = &m->d;
  uint32_t i, s, a, op;
  m->err[0] = 0;
  if (!m->have_kernels)
    return model_err(m, QOS_ERR_KERNEL_MISSING, "the model was opened without a kernel lookup");
  for (i = 0; i < d->num_inputs; i++) {
    if (!inputs[i]) return model_err(m, QOS_ERR_ARG, "input %u is NULL", i);
    if (in_bytes[i] != d->inputs[i].nbytes)
      return model_err(m, QOS_ERR_SIZE, "input %u ('%s'): got %llu bytes, the model needs %llu", i,
                       qosm_str(d, d->inputs[i].name), (ull)in_bytes[i], (ull)d->inputs[i].nbytes);
  }
  for (i = 0; i < d->num_outputs; i++) {
    if (!outputs[i]) return model_err(m, QOS_ERR_ARG, "output %u is NULL", i);
    if (out_bytes[i] != d->outputs[i].nbytes)
      return model_err(m, QOS_ERR_SIZE, "output %u ('%s'): got %llu bytes, the model produces %llu", i,
                       qosm_str(d, d->outputs[i].name), (ull)out_bytes[i], (ull)d->outputs[i].nbytes);
  }
  for (i = 0; i < d->num_inputs; i++) {
    if ((uintptr_t)inputs[i] % QOSM_ALIGN) {
      memcpy(m->in_stage[i], inputs[i], in_bytes[i]);
      m->inputs[i].data = m->in_stage[i];
    } else {
      m->inputs[i].data = (void*)(uintptr_t)inputs[i]; /* kernels must not write INPUT arguments */
    }
  }
  for (i = 0; i < d->num_outputs; i++)
    m->outputs[i].data = ((uintptr_t)outputs[i] % QOSM_ALIGN) ? (void*)m->out_stage[i] : outputs[i];

  /* THE one read of the OP index for this inference. */
  op = QOS_ATOMIC_LOAD(&m->op);
  if (op >= d->num_ops) return model_err(m, QOS_ERR_ARG, "selected operating point %u out of range", op);

  for (s = 0; s < d->num_steps; s++) {
    const qosm_step* st = &d->steps[s];
    const uint32_t* slot_row;
    qos_ffi_any ret;
    int32_t rc;
#ifdef QOS_TEST_REREAD_OP
    /* Deliberately broken variant for the race test's self-check: re-reads the OP per step. */
    op = QOS_ATOMIC_LOAD(&m->op);
#endif
    slot_row = d->slot_tensors + (uint64_t)op * d->num_slots;
    for (a = st->first_arg; a < st->first_arg + st->num_args; a++)
      if (m->arg_kind[a] == QOSM_ARG_SLOT) m->args[a].u.v_ptr = &m->tensors[slot_row[d->args[a].index]];
    memset(&ret, 0, sizeof ret);
    qos_backend_clear_error();
    if (m->step_ns) {
      struct timespec t0, t1;
      clock_gettime(CLOCK_MONOTONIC, &t0);
      rc = m->kernels[st->kernel](NULL, m->args + st->first_arg, (int32_t)st->num_args, &ret);
      clock_gettime(CLOCK_MONOTONIC, &t1);
      m->step_ns[s] += (uint64_t)((t1.tv_sec - t0.tv_sec) * 1000000000LL + (t1.tv_nsec - t0.tv_nsec));
    } else {
      rc = m->kernels[st->kernel](NULL, m->args + st->first_arg, (int32_t)st->num_args, &ret);
    }
    if (rc != 0) {
      const char* msg = qos_backend_last_error();
      return model_err(m, QOS_ERR_KERNEL, "step %u (kernel '%s') failed with %d: %s", s,
                       qosm_str(d, d->kernel_names[st->kernel]), (int)rc,
                       (msg && *msg) ? msg : "no message");
    }
  }
  for (i = 0; i < d->num_outputs; i++)
    if (m->outputs[i].data != outputs[i]) memcpy(outputs[i], m->out_stage[i], out_bytes[i]);
  return QOS_OK;
}

int qos_run_multi(qos_model* m, const void* const* inputs, const size_t* in_bytes, void* const* outputs,
                  const size_t* out_bytes) {
  int rc;
  if (!m) return QOS_ERR_ARG;
  if (!inputs || !in_bytes || !outputs || !out_bytes) return QOS_ERR_ARG;
  if (pthread_mutex_lock(&m->run_lock) != 0) return QOS_ERR_ARG;
  rc = run_locked(m, inputs, in_bytes, outputs, out_bytes);
  pthread_mutex_unlock(&m->run_lock);
  return rc;
}

int qos_run(qos_model* m, const void* input, size_t in_bytes, void* output, size_t out_bytes) {
  if (!m) return QOS_ERR_ARG;
  if (m->d.num_inputs != 1 || m->d.num_outputs != 1) {
    int rc;
    pthread_mutex_lock(&m->run_lock);
    rc = model_err(m, QOS_ERR_ARG, "qos_run needs a model with one input and one output (this one has %u and %u); "
                                   "use qos_run_multi", m->d.num_inputs, m->d.num_outputs);
    pthread_mutex_unlock(&m->run_lock);
    return rc;
  }
  return qos_run_multi(m, &input, &in_bytes, &output, &out_bytes);
}

uint32_t qos_num_steps(const qos_model* m) { return m ? m->d.num_steps : 0; }

const char* qos_step_kernel(const qos_model* m, uint32_t step) {
  if (!m || step >= m->d.num_steps) return NULL;
  return qosm_str(&m->d, m->d.kernel_names[m->d.steps[step].kernel]);
}

int qos_profile_steps(qos_model* m, uint64_t* step_ns) {
  if (!m) return QOS_ERR_ARG;
  if (pthread_mutex_lock(&m->run_lock) != 0) return QOS_ERR_ARG;
  m->step_ns = step_ns;
  pthread_mutex_unlock(&m->run_lock);
  return QOS_OK;
}
