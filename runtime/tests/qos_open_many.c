/* qos_open_many.c -- open every manifest of a pack file; print one result code per manifest.
 *
 *   qos_open_many PACK
 *
 * PACK is a sequence of (uint64 little-endian length, bytes). Each manifest is
 * opened from memory (exact-size heap copy, so ASan catches any read past its
 * end) with a lookup that resolves every name to a kernel touching the first
 * and last byte of every argument; opened models are also run once per OP
 * with zeroed inputs. Output: "<index> <open code> <run code> <message>".
 * Built with -fsanitize=address,undefined by the tests.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "qos_runtime.h"

qos_packed_fn qos_touch_lookup(const char* name, void* user);

int main(int argc, char** argv) {
  FILE* f;
  unsigned char hdr[8];
  long idx = 0;
  if (argc != 2 || !(f = fopen(argv[1], "rb"))) {
    fprintf(stderr, "usage: qos_open_many PACK\n");
    return 2;
  }
  while (fread(hdr, 1, 8, f) == 8) {
    uint64_t len = 0;
    int k, rc, run_rc = 0;
    unsigned char* buf;
    char err[QOS_ERROR_MAX];
    qos_model* m = NULL;
    for (k = 7; k >= 0; k--) len = (len << 8) | hdr[k];
    buf = (unsigned char*)malloc(len ? (size_t)len : 1);
    if (!buf || (len && fread(buf, 1, (size_t)len, f) != len)) return 3;
    rc = qos_open_memory(buf, (size_t)len, qos_touch_lookup, NULL, &m, err, sizeof err);
    free(buf); /* the model keeps its own copy */
    if (rc == QOS_OK) {
      qos_tensor_info info;
      uint64_t total = 0;
      uint32_t i, op;
      size_t mlen;
      const unsigned char* meta = (const unsigned char*)qos_metadata(m, &mlen);
      if (mlen) total += meta[0] + meta[mlen - 1];
      for (i = 0; i < qos_num_inputs(m); i++) qos_input_info(m, i, &info), total += info.nbytes;
      for (i = 0; i < qos_num_outputs(m); i++) qos_output_info(m, i, &info), total += info.nbytes;
      if (total < (1u << 24)) {
        uint32_t ni = qos_num_inputs(m), no = qos_num_outputs(m);
        const void** ins = (const void**)calloc(ni, sizeof(void*));
        void** outs = (void**)calloc(no, sizeof(void*));
        size_t *ib = (size_t*)calloc(ni, sizeof(size_t)), *ob = (size_t*)calloc(no, sizeof(size_t));
        for (i = 0; i < ni; i++) qos_input_info(m, i, &info), ib[i] = info.nbytes, ins[i] = calloc(1, info.nbytes);
        for (i = 0; i < no; i++) qos_output_info(m, i, &info), ob[i] = info.nbytes, outs[i] = calloc(1, info.nbytes);
        for (op = 0; op < qos_num_ops(m) && run_rc == 0; op++) {
          qos_select(m, op);
          (void)qos_op_name(m, op);
          run_rc = qos_run_multi(m, ins, ib, outs, ob);
        }
        for (i = 0; i < ni; i++) free((void*)ins[i]);
        for (i = 0; i < no; i++) free(outs[i]);
        free(ins), free(outs), free(ib), free(ob);
      }
      qos_close(m);
      printf("%ld %d %d ok\n", idx, rc, run_rc);
    } else {
      printf("%ld %d 0 %s\n", idx, rc, err);
    }
    idx++;
  }
  fclose(f);
  return 0;
}
