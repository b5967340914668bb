/* srv_conn — see srv_conn.h. One list of open connections under one mutex; the
 * entry of a connection is its libmicrohttpd socket context. */
#include "srv_conn.h"

#include "nz_alloc.h"
#include "nz_common.h"

#include <pthread.h>
#include <sys/socket.h>

typedef struct conn {
    int fd;
    double since; /* the clock started (accept, previous response sent); < 0: a request is being served */
    int shut;     /* shut down by the sweep */
    struct conn *prev, *next;
} conn;

struct srv_conns {
    pthread_mutex_t mu;
    double timeout;
    conn *head;
    size_t n;
};

srv_conns *srv_conns_create(double read_timeout_s) {
    srv_conns *cs = nz_calloc(1, sizeof *cs, NZ_MEM_OTHER);
    if (!cs) return NULL;
    if (pthread_mutex_init(&cs->mu, NULL)) {
        nz_free(cs);
        return NULL;
    }
    cs->timeout = read_timeout_s;
    return cs;
}

void srv_conns_free(srv_conns *cs) {
    if (!cs) return;
    for (conn *c = cs->head, *nx; c; c = nx) {
        nx = c->next;
        nz_free(c);
    }
    pthread_mutex_destroy(&cs->mu);
    nz_free(cs);
}

void srv_conns_notify(void *cls, struct MHD_Connection *c, void **socket_context,
                      enum MHD_ConnectionNotificationCode code) {
    srv_conns *cs = cls;
    if (code == MHD_CONNECTION_NOTIFY_STARTED) {
        const union MHD_ConnectionInfo *ci = MHD_get_connection_info(c, MHD_CONNECTION_INFO_CONNECTION_FD);
        conn *e = nz_calloc(1, sizeof *e, NZ_MEM_OTHER);
        *socket_context = e;
        if (!e) return; /* out of memory: this connection goes without a read deadline */
        e->fd = ci ? ci->connect_fd : -1;
        e->since = nz_now_s();
        pthread_mutex_lock(&cs->mu);
        e->next = cs->head;
        if (cs->head) cs->head->prev = e;
        cs->head = e;
        cs->n++;
        pthread_mutex_unlock(&cs->mu);
    } else if (code == MHD_CONNECTION_NOTIFY_CLOSED) {
        conn *e = *socket_context;
        *socket_context = NULL;
        if (!e) return;
        /* called before libmicrohttpd closes the socket: once unlinked, the sweep cannot touch its fd */
        pthread_mutex_lock(&cs->mu);
        if (e->prev)
            e->prev->next = e->next;
        else
            cs->head = e->next;
        if (e->next) e->next->prev = e->prev;
        cs->n--;
        pthread_mutex_unlock(&cs->mu);
        nz_free(e);
    }
}

static void set_since(srv_conns *cs, struct MHD_Connection *c, double since) {
    const union MHD_ConnectionInfo *ci = MHD_get_connection_info(c, MHD_CONNECTION_INFO_SOCKET_CONTEXT);
    conn *e = ci ? ci->socket_context : NULL;
    if (!e) return;
    pthread_mutex_lock(&cs->mu);
    e->since = since;
    pthread_mutex_unlock(&cs->mu);
}

void srv_conns_request_read(srv_conns *cs, struct MHD_Connection *c) { set_since(cs, c, -1.0); }

void srv_conns_request_done(srv_conns *cs, struct MHD_Connection *c) { set_since(cs, c, nz_now_s()); }

size_t srv_conns_sweep(srv_conns *cs, double now) {
    size_t n = 0;
    pthread_mutex_lock(&cs->mu);
    for (conn *e = cs->head; e; e = e->next)
        if (!e->shut && e->since >= 0 && now - e->since > cs->timeout && e->fd >= 0) {
            shutdown(e->fd, SHUT_RDWR);
            e->shut = 1;
            n++;
        }
    pthread_mutex_unlock(&cs->mu);
    return n;
}

size_t srv_conns_open(srv_conns *cs) {
    pthread_mutex_lock(&cs->mu);
    size_t n = cs->n;
    pthread_mutex_unlock(&cs->mu);
    return n;
}
