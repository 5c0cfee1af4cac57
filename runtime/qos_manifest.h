/* qos_manifest.h -- the .qosm loader (internal to the runtime; also used by the fuzzer).
 *
 * qosm_parse() validates a whole manifest held in memory and decodes its tables
 * into host-order arrays; it never reads outside [buf, buf + len) and never
 * trusts a count, offset or index from the file (docs/manifest.md, "Validation").
 */
#ifndef QOS_MANIFEST_H
#define QOS_MANIFEST_H

#include <stddef.h>
#include <stdint.h>

#include "qos_manifest_format.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
  uint32_t name;     /* string offset */
  uint8_t dtype;
  uint8_t ndim;
  uint16_t role;     /* tensors only */
  uint64_t offset;   /* file offset (tensors) or arena offset (buffers) */
  uint64_t nbytes;
  int64_t shape[QOSM_MAX_NDIM];
} qosm_tensor;

typedef struct {
  uint32_t name;
  uint8_t dtype;
  uint8_t ndim;
  float scale;
  int32_t zero_point;
  uint64_t nbytes;
  int64_t shape[QOSM_MAX_NDIM];
} qosm_io;

typedef struct {
  uint32_t name, sha256, table;
  float power_mw;
} qosm_bank;

typedef struct {
  uint32_t kernel, first_arg, num_args;
} qosm_step;

typedef struct {
  uint32_t kind, index;
} qosm_arg;

typedef struct {
  const uint8_t* base; /* the validated bytes (not owned) */
  uint64_t size;
  uint16_t version_major, version_minor;
  uint64_t arena_size;
  const char* strings; /* points into base */
  uint64_t strings_size;
  uint64_t data_offset, data_size; /* the DATA section */
  const uint8_t* metadata;
  uint64_t metadata_size;

  uint32_t num_tensors, num_bank, num_kernels, num_ops, num_layers, num_slots, num_buffers, num_steps, num_args,
      num_inputs, num_outputs;
  qosm_tensor* tensors;
  qosm_bank* bank;
  uint32_t* kernel_names;
  uint32_t* op_names;
  uint32_t* layer_names;
  uint32_t* assign;       /* [num_ops * num_layers] */
  uint32_t* slot_names;
  uint32_t* slot_layers;
  uint32_t* slot_tensors; /* [num_ops * num_slots] */
  qosm_tensor* buffers;
  qosm_step* steps;
  qosm_arg* args;
  qosm_io* inputs;
  qosm_io* outputs;
} qosm_desc;

/* Validate buf[0, len) and fill *d (zeroed first). Returns QOS_OK (0) or a
 * negative QOS_ERR_* code with a message in err (if err && errlen). On error
 * *d holds nothing that needs freeing. */
int qosm_parse(const uint8_t* buf, size_t len, qosm_desc* d, char* err, size_t errlen);
void qosm_free(qosm_desc* d);

/* The string at a reference that qosm_parse validated. */
const char* qosm_str(const qosm_desc* d, uint32_t ref);

/* CRC-32 (zlib's): qosm_crc32(0, p, n) == zlib.crc32(p). */
uint32_t qosm_crc32(uint32_t crc, const uint8_t* p, size_t n);
/* The manifest checksum of buf[0, len) (len >= QOSM_HEADER_SIZE). */
uint32_t qosm_checksum(const uint8_t* buf, size_t len);

#ifdef __cplusplus
}
#endif
#endif /* QOS_MANIFEST_H */
