/* fuzz_manifest.c -- libFuzzer target for the manifest loader and the executor.
 *
 * Build (see qos_compile/runtime/build.py: build_fuzzer):
 *   clang -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all \
 *         -DQOS_MAX_ARENA_BYTES='((uint64_t)64<<20)' -DFUZZING_BUILD_MODE_UNSAFE_FOR_PRODUCTION -I runtime \
 *         runtime/fuzz/fuzz_manifest.c runtime/tests/qos_touch_kernel.c \
 *         runtime/qos_manifest.c runtime/qos_runtime.c runtime/qos_backend.c -o fuzz_manifest
 * Seeds: python runtime/fuzz/make_corpus.py DIR (valid manifests from manifest.py).
 *
 * FUZZING_BUILD_MODE_UNSAFE_FOR_PRODUCTION (a fuzzing-only build) makes the loader skip the CRC
 * check, so every mutation reaches the parser. Each input is opened twice: as is (exercises the
 * header path), and with its file_size field and CRC-32 rewritten to match (so mutations,
 * including insertions and deletions, reach every structural check; also in a checking build).
 * The structure-aware campaign (runtime/fuzz/fuzz_recipes.c, qos_compile/runtime/fuzzing.py)
 * complements this byte-level fuzzer with field-level mutations of compiled manifests.
 * Every model that opens is inspected and run once per OP (inputs <= 1 MiB)
 * with a kernel that reads the first and last byte of every argument, so a
 * DLTensor pointing outside its memory is an ASan report.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "qos_manifest.h"
#include "qos_runtime.h"

qos_packed_fn qos_touch_lookup(const char* name, void* user);

static void exercise(qos_model* m) {
  qos_tensor_info info;
  uint32_t i, op, ni = qos_num_inputs(m), no = qos_num_outputs(m);
  uint64_t total = 0;
  size_t mlen;
  const unsigned char* meta = (const unsigned char*)qos_metadata(m, &mlen);
  volatile unsigned sink = 0;
  const void* ins[8];
  void* outs[8];
  size_t ib[8], ob[8];
  if (mlen) sink += meta[0] + meta[mlen - 1];
  for (op = 0; op < qos_num_ops(m); op++) sink += (unsigned)strlen(qos_op_name(m, op));
  if (qos_find_op(m, qos_op_name(m, 0)) != 0) abort(); /* names are unique */
  if (qos_select(m, qos_num_ops(m)) == QOS_OK) abort();
  if (ni > 8 || no > 8) return;
  for (i = 0; i < ni; i++) qos_input_info(m, i, &info), total += ib[i] = info.nbytes;
  for (i = 0; i < no; i++) qos_output_info(m, i, &info), total += ob[i] = info.nbytes;
  if (total > (1u << 20)) return;
  for (i = 0; i < ni; i++) ins[i] = calloc(1, ib[i]);
  for (i = 0; i < no; i++) outs[i] = calloc(1, ob[i]);
  for (op = 0; op < qos_num_ops(m) && op < 4; op++) {
    if (qos_select(m, op) != QOS_OK) abort();
    if (qos_run_multi(m, ins, ib, outs, ob) != QOS_OK) break;
  }
  if (ni == 1 && no == 1) (void)qos_run(m, ins[0], ib[0] + 1, outs[0], ob[0]); /* size mismatch path */
  for (i = 0; i < ni; i++) free((void*)ins[i]);
  for (i = 0; i < no; i++) free(outs[i]);
  (void)sink;
}

static void try_open(const uint8_t* data, size_t size) {
  char err[QOS_ERROR_MAX];
  qos_model* m = NULL;
  int rc = qos_open_memory(data, size, qos_touch_lookup, NULL, &m, err, sizeof err);
  if (rc == QOS_OK) {
    if (!m) abort();
    exercise(m);
    qos_close(m);
  } else {
    if (m || !err[0] || strlen(err) >= sizeof err) abort(); /* failures always leave a message */
  }
}

int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  uint8_t* copy;
  uint32_t crc;
  int i;
  try_open(data, size);
  if (size < QOSM_HEADER_SIZE) return 0;
  copy = (uint8_t*)malloc(size);
  if (!copy) return 0;
  memcpy(copy, data, size);
  for (i = 0; i < 8; i++) copy[QOSM_OFF_HEADER_FILE_SIZE + i] = (uint8_t)((uint64_t)size >> (8 * i));
  crc = qosm_checksum(copy, size);
  copy[QOSM_OFF_HEADER_CHECKSUM + 0] = (uint8_t)crc;
  copy[QOSM_OFF_HEADER_CHECKSUM + 1] = (uint8_t)(crc >> 8);
  copy[QOSM_OFF_HEADER_CHECKSUM + 2] = (uint8_t)(crc >> 16);
  copy[QOSM_OFF_HEADER_CHECKSUM + 3] = (uint8_t)(crc >> 24);
  try_open(copy, size);
  free(copy);
  return 0;
}
