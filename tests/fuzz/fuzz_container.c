/* libFuzzer target: the .nzp loader and everything reachable from a loaded
 * model (blobs, tile checksums, every tile decoder on intact and on damaged
 * tiles). The header checksum is recomputed for each input so mutations reach
 * the JSON validation. Seeds: tests/fuzz/corpus/fuzz_container (make_seeds.c).
 * Body: fuzz_container_one in fuzz_common.h. */
#include "fuzz_common.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    fuzz_container_one(data, size);
    return 0;
}
