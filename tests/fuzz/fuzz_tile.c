/* libFuzzer target: the tile decoders (fp32, native, exponents; scalar and
 * AVX-512 rANS kernels) on one tile of a valid, input-chosen descriptor. The
 * input layout (parameter bytes, frequency pairs, tile) is documented at
 * fuzz_tile_parse in fuzz_common.h. Seeds: tests/fuzz/corpus/fuzz_tile. */
#include "fuzz_common.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    fuzz_tile_one(data, size);
    return 0;
}
