/*
 * srv_probe.c — one HTTP/1.0 GET with a deadline over a non-blocking POSIX
 * socket; see srv_probe.h.
 */
#include "srv_probe.h"

#include "nz_common.h"
#include "srv_text.h"

#include <errno.h>
#include <netdb.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

#define HOST_LEN 256
#define HEAD_MAX 1024 /* bytes of the response kept; the status line is all that is read */

#define fail srv_errf

/* Wait until fd is ready for ev or the deadline passes.
 * @return 1 ready (or an error or hang-up is pending), 0 deadline passed, -1 poll failed. */
static int wait_fd(int fd, short ev, long long deadline) {
    for (;;) {
        long long left = deadline - (long long)(nz_now_ns() / 1000000u);
        if (left <= 0) return 0;
        struct pollfd p = {.fd = fd, .events = ev};
        int r = poll(&p, 1, (int)left);
        if (r > 0) return 1;
        if (r < 0 && errno != EINTR) return -1;
    }
}

/* Connect a non-blocking socket to ai by the deadline.
 * @return the socket, -1 with err set (refused, unreachable...), or -2 when the deadline passed. */
static int connect_one(const struct addrinfo *ai, long long deadline, char *err, size_t errlen) {
    int fd = socket(ai->ai_family, ai->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, ai->ai_protocol);
    if (fd < 0) return fail(err, errlen, "socket: %s", strerror(errno));
    if (connect(fd, ai->ai_addr, ai->ai_addrlen) == 0) return fd;
    if (errno != EINPROGRESS) {
        fail(err, errlen, "%s", strerror(errno));
        close(fd);
        return -1;
    }
    int w = wait_fd(fd, POLLOUT, deadline);
    if (w <= 0) {
        close(fd);
        return w == 0 ? -2 : fail(err, errlen, "poll: %s", strerror(errno));
    }
    int so = 0;
    socklen_t sl = sizeof so;
    if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &so, &sl) || so) {
        fail(err, errlen, "%s", strerror(so ? so : errno));
        close(fd);
        return -1;
    }
    return fd;
}

/* The first bytes of buf (n) for a message: printable ASCII, the rest as '?'. */
static void printable(const char *buf, size_t n, char *out, size_t outlen) {
    size_t j = 0;
    for (size_t i = 0; i < n && j + 1 < outlen; i++) {
        unsigned char ch = (unsigned char)buf[i];
        if (ch == '\r' || ch == '\n') break;
        out[j++] = ch >= 0x20 && ch < 0x7f ? (char)ch : '?';
    }
    out[j] = 0;
}

/* "HTTP/1.x NNN" (then a space or the end of the line) at the start of buf.
 * @return NNN, or -1. */
static int parse_status(const char *buf, size_t n) {
    if (n < 12 || memcmp(buf, "HTTP/1.", 7) || buf[7] < '0' || buf[7] > '9' || buf[8] != ' ') return -1;
    int code = 0;
    for (int i = 9; i < 12; i++) {
        if (buf[i] < '0' || buf[i] > '9') return -1;
        code = code * 10 + (buf[i] - '0');
    }
    if (n > 12 && buf[12] != ' ' && buf[12] != '\r' && buf[12] != '\n') return -1;
    return code >= 100 ? code : -1;
}

const char *srv_probe_target(const char *host) {
    if (!host || !*host || !strcmp(host, "0.0.0.0")) return "127.0.0.1";
    if (!strcmp(host, "::") || !strcmp(host, "[::]")) return "::1";
    return host;
}

int srv_probe_get(const char *host, int port, const char *path, int timeout_ms, char *err, size_t errlen) {
    if (err && errlen) err[0] = 0;
    long long deadline = (long long)(nz_now_ns() / 1000000u) + (timeout_ms > 0 ? timeout_ms : 0);
    if (port < 1 || port > 65535) return fail(err, errlen, "port %d is not a port to connect to", port);

    char h[HOST_LEN];
    size_t hl = strlen(host);
    if (hl >= 2 && host[0] == '[' && host[hl - 1] == ']') { /* [v6] */
        host++;
        hl -= 2;
    }
    if (hl == 0 || hl >= sizeof h) return fail(err, errlen, "bad host '%.80s'", host);
    memcpy(h, host, hl);
    h[hl] = 0;

    struct addrinfo hints = {0}, *ai = NULL;
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_NUMERICSERV;
    char ps[8];
    snprintf(ps, sizeof ps, "%d", port);
    int rc = getaddrinfo(h, ps, &hints, &ai);
    if (rc || !ai) return fail(err, errlen, "cannot resolve '%s': %s", h, gai_strerror(rc));

    int fd = -1, timed_out = 0;
    for (const struct addrinfo *a = ai; a && fd < 0; a = a->ai_next) {
        fd = connect_one(a, deadline, err, errlen);
        if (fd == -2) timed_out = 1;
    }
    freeaddrinfo(ai);
    if (fd < 0) {
        if (timed_out) fail(err, errlen, "no connection within %d ms", timeout_ms);
        return -1;
    }

    char req[2 * HOST_LEN + 256];
    int rl = snprintf(req, sizeof req,
                      "GET %s HTTP/1.0\r\nHost: %s%s%s:%d\r\nUser-Agent: nzserve-health-check\r\n"
                      "Connection: close\r\n\r\n",
                      path, strchr(h, ':') ? "[" : "", h, strchr(h, ':') ? "]" : "", port);
    if (rl < 0 || (size_t)rl >= sizeof req) {
        close(fd);
        return fail(err, errlen, "request too long");
    }
    for (size_t sent = 0; sent < (size_t)rl;) {
        ssize_t w = send(fd, req + sent, (size_t)rl - sent, MSG_NOSIGNAL);
        if (w > 0) {
            sent += (size_t)w;
            continue;
        }
        if (w < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
            fail(err, errlen, "send: %s", strerror(errno));
            close(fd);
            return -1;
        }
        if (wait_fd(fd, POLLOUT, deadline) <= 0) {
            close(fd);
            return fail(err, errlen, "could not send the request within %d ms", timeout_ms);
        }
    }

    /* Read to the end of the response (HTTP/1.0: the server closes), keeping
     * the first HEAD_MAX bytes; the deadline ends it too. */
    char buf[HEAD_MAX];
    size_t n = 0;
    int closed = 0, rerr = 0;
    while (!closed) {
        char tmp[4096];
        ssize_t r = recv(fd, tmp, sizeof tmp, 0);
        if (r > 0) {
            size_t take = (size_t)r < sizeof buf - n ? (size_t)r : sizeof buf - n;
            memcpy(buf + n, tmp, take);
            n += take;
            continue;
        }
        if (r == 0) {
            closed = 1;
        } else if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) {
            if (wait_fd(fd, POLLIN, deadline) <= 0) break;
        } else {
            rerr = errno;
            break;
        }
    }
    close(fd);
    const char *eol = memchr(buf, '\n', n);
    if (!eol && !closed && !rerr && n < sizeof buf) {
        if (n == 0) return fail(err, errlen, "no response within %d ms", timeout_ms);
        char shown[64];
        printable(buf, n, shown, sizeof shown);
        return fail(err, errlen, "incomplete response within %d ms: '%s'", timeout_ms, shown);
    }
    if (n == 0)
        return rerr ? fail(err, errlen, "recv: %s", strerror(rerr))
                    : fail(err, errlen, "connection closed without a response");
    int code = parse_status(buf, eol ? (size_t)(eol - buf) : n);
    if (code < 0) {
        char shown[64];
        printable(buf, n, shown, sizeof shown);
        return fail(err, errlen, "not an HTTP response: '%s'", shown);
    }
    return code;
}
