/*
 * test_pb.h — a minimal protobuf writer for tests that build SentencePiece
 * models in memory (sentencepiece_model.proto), so they need no files.
 */
#ifndef TEST_PB_H
#define TEST_PB_H

#include "test_util.h"

#include <stdint.h>
#include <string.h>

typedef struct pb {
    uint8_t b[8192];
    size_t n;
} pb;

static inline void pb_varint(pb *p, uint64_t v) {
    do {
        assert_true(p->n < sizeof p->b);
        p->b[p->n++] = (uint8_t)((v & 0x7F) | (v > 0x7F ? 0x80 : 0));
        v >>= 7;
    } while (v);
}
static inline void pb_tag(pb *p, unsigned field, unsigned wire) { pb_varint(p, field << 3 | wire); }
static inline void pb_bytes(pb *p, unsigned field, const void *d, size_t n) {
    pb_tag(p, field, 2);
    pb_varint(p, n);
    assert_true(p->n + n <= sizeof p->b);
    memcpy(p->b + p->n, d, n);
    p->n += n;
}
static inline void pb_float(pb *p, unsigned field, float f) {
    pb_tag(p, field, 5);
    assert_true(p->n + 4 <= sizeof p->b);
    memcpy(p->b + p->n, &f, 4); /* little-endian host */
    p->n += 4;
}
static inline void pb_int(pb *p, unsigned field, int64_t v) {
    pb_tag(p, field, 0);
    pb_varint(p, (uint64_t)v);
}

#endif /* TEST_PB_H */
