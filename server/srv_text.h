/* srv_text.h — text helpers shared by the server: UTF-8 checks (logging,
 * metrics, responses) and the formatted one-line error messages of the
 * config loader and the health probe. */
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

/** Format a message into err (errlen bytes, always terminated when errlen > 0;
 *  err may be NULL or errlen 0: nothing is written).
 *  @return -1, so that callers can `return srv_errf(...)`. */
int srv_errf(char *err, size_t errlen, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

#ifdef __cplusplus
}
#endif
#endif /* SRV_TEXT_H */
