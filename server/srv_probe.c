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

/* host without the brackets of "[v6]" into h (HOST_LEN bytes). @return 0, or -1 with err set. */
static int copy_host(const char *host, char *h, char *err, size_t errlen) {
    size_t hl = strlen(host);
    if (hl >= 2 && host[0] == '[' && host[hl - 1] == ']') { /* [v6] */
        host++;
        hl -= 2;
    }
    if (hl == 0 || hl >= HOST_LEN) return fail(err, errlen, "bad host '%.80s'", host);
    memcpy(h, host, hl);
    h[hl] = 0;
    return 0;
}

/* Resolve h and connect to the first of its addresses that answers, by the deadline.
 * @return the socket, or -1 with err set. */
static int connect_host(const char *h, int port, long long deadline, int timeout_ms, char *err,
                        size_t errlen) {
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
    return fd;
}

/* Send "GET path" for host h:port on fd by the deadline. @return 0, or -1 with err set. */
static int send_request(int fd, const char *h, int port, const char *path, long long deadline, int timeout_ms,
                        char *err, size_t errlen) {
    char req[2 * HOST_LEN + 256];
    int rl = snprintf(req, sizeof req,
                      "GET %s HTTP/1.0\r\nHost: %s%s%s:%d\r\nUser-Agent: nzserve-health-check\r\n"
                      "Connection: close\r\n\r\n",
                      path, strchr(h, ':') ? "[" : "", h, strchr(h, ':') ? "]" : "", port);
    if (rl < 0 || (size_t)rl >= sizeof req) return fail(err, errlen, "request too long");
    for (size_t sent = 0; sent < (size_t)rl;) {
        ssize_t w = send(fd, req + sent, (size_t)rl - sent, MSG_NOSIGNAL);
        if (w > 0) {
            sent += (size_t)w;
            continue;
        }
        if (w < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)
            return fail(err, errlen, "send: %s", strerror(errno));
        if (wait_fd(fd, POLLOUT, deadline) <= 0)
            return fail(err, errlen, "could not send the request within %d ms", timeout_ms);
    }
    return 0;
}

/* The start of a response, and how reading it ended. */
typedef struct head {
    char buf[HEAD_MAX];
    size_t n;
    int closed; /* the server closed the connection */
    int rerr;   /* recv's errno when it failed, else 0 */
} head;

/* Read to the end of the response (HTTP/1.0: the server closes), keeping the
 * first HEAD_MAX bytes in *r; the deadline ends it too. */
static void read_head(int fd, long long deadline, head *r) {
    r->n = 0;
    r->closed = r->rerr = 0;
    while (!r->closed) {
        char tmp[4096];
        ssize_t got = recv(fd, tmp, sizeof tmp, 0);
        if (got > 0) {
            size_t take = (size_t)got < sizeof r->buf - r->n ? (size_t)got : sizeof r->buf - r->n;
            memcpy(r->buf + r->n, tmp, take);
            r->n += take;
            continue;
        }
        if (got == 0) {
            r->closed = 1;
        } else if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) {
            if (wait_fd(fd, POLLIN, deadline) <= 0) break;
        } else {
            r->rerr = errno;
            break;
        }
    }
}

/* The status code of the response r. @return it, or -1 with err set. */
static int head_status(const head *r, int timeout_ms, char *err, size_t errlen) {
    const char *eol = memchr(r->buf, '\n', r->n);
    if (!eol && !r->closed && !r->rerr && r->n < sizeof r->buf) {
        if (r->n == 0) return fail(err, errlen, "no response within %d ms", timeout_ms);
        char shown[64];
        printable(r->buf, r->n, shown, sizeof shown);
        return fail(err, errlen, "incomplete response within %d ms: '%s'", timeout_ms, shown);
    }
    if (r->n == 0)
        return r->rerr ? fail(err, errlen, "recv: %s", strerror(r->rerr))
                       : fail(err, errlen, "connection closed without a response");
    int code = parse_status(r->buf, eol ? (size_t)(eol - r->buf) : r->n);
    if (code < 0) {
        char shown[64];
        printable(r->buf, r->n, shown, sizeof shown);
        return fail(err, errlen, "not an HTTP response: '%s'", shown);
    }
    return code;
}

int srv_probe_get(const char *host, int port, const char *path, int timeout_ms, char *err, size_t errlen) {
    if (err && errlen) err[0] = 0;
    long long deadline = (long long)(nz_now_ns() / 1000000u) + (timeout_ms > 0 ? timeout_ms : 0);
    if (port < 1 || port > 65535) return fail(err, errlen, "port %d is not a port to connect to", port);
    char h[HOST_LEN];
    if (copy_host(host, h, err, errlen)) return -1;
    int fd = connect_host(h, port, deadline, timeout_ms, err, errlen);
    if (fd < 0) return -1;
    if (send_request(fd, h, port, path, deadline, timeout_ms, err, errlen)) {
        close(fd);
        return -1;
    }
    head r;
    read_head(fd, deadline, &r);
    close(fd);
    return head_status(&r, timeout_ms, err, errlen);
}
