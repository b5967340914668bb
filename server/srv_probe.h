/*
 * srv_probe.h — a minimal HTTP client for `nzserve --health-check`.
 *
 * One HTTP/1.0 GET over a plain POSIX socket (no libcurl, no TLS), with one
 * deadline for name resolution, connect, send and reading the status line,
 * so a container HEALTHCHECK needs nothing but the server binary. A server
 * listening on a wildcard address is probed on the loopback address of the
 * same family.
 */
#ifndef SRV_PROBE_H
#define SRV_PROBE_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

/** The address to probe for a server listening on host: "127.0.0.1" for "0.0.0.0" (and ""), "::1" for "::"
 *  (also written "[::]"), else host itself.
 *  @return a static string or host. */
const char *srv_probe_target(const char *host);

/** GET path from host:port (host: an address or a name; an IPv6 address with or without brackets) with
 *  HTTP/1.0 and "Connection: close", giving up after timeout_ms in total.
 *  @return the response's status code (100..999), or -1 with a one-line message in err ("connection
 *  refused", "no response within 2000 ms", "not an HTTP response: ..."). */
int srv_probe_get(const char *host, int port, const char *path, int timeout_ms, char *err, size_t errlen);

#ifdef __cplusplus
}
#endif
#endif /* SRV_PROBE_H */
