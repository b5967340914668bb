/* libFuzzer target: the safetensors reader (nz_st_parse) on arbitrary bytes;
 * the checks live in fuzz_common.h (fuzz_safetensors_one). */
#include "fuzz_common.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    fuzz_safetensors_one(data, size);
    return 0;
}
