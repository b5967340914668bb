/* srv_text.h — UTF-8 helpers shared by the server's logging, metrics and responses. */
#ifndef SRV_TEXT_H
#define SRV_TEXT_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

/** Length of the valid UTF-8 sequence at s (n >= 1 bytes left).
 *  @return 1..4, or 0 when invalid (bad lead or continuation byte,
 *          truncated, overlong, surrogate, or beyond U+10FFFF). */
size_t srv_utf8_seq(const unsigned char *s, size_t n);

#ifdef __cplusplus
}
#endif
#endif /* SRV_TEXT_H */
