/* libFuzzer target: the server's request parsing and validation
 * (srv_parse_translate, srv_parse_dialogue, error bodies, API-key
 * extraction and comparison).
 * Seeds: tests/fuzz/corpus/fuzz_srv_request. Body: fuzz_srv_request_one in
 * fuzz_server.h. */
#include "fuzz_server.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    fuzz_srv_request_one(data, size);
    return 0;
}
