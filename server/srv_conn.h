/*
 * srv_conn.h — the read deadline of every connection: a request's headers
 * and body must arrive within read_timeout of the moment the connection is
 * ready to read it (accepted, or its previous response sent). libmicrohttpd's
 * own connection timeout is an idle timeout that every received byte resets,
 * so a client trickling a byte a second could hold a connection (and a slot
 * of max_connections) forever; this deadline does not move.
 *
 * Use: pass srv_conns_notify as MHD_OPTION_NOTIFY_CONNECTION (cls = the
 * tracker), call srv_conns_request_read when a request is read in full and
 * srv_conns_request_done when it completed, and srv_conns_sweep
 * periodically: it shuts down (shutdown(2), both directions) the sockets
 * past their deadline, and libmicrohttpd then closes them.
 */
#ifndef SRV_CONN_H
#define SRV_CONN_H

#include <microhttpd.h>
#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct srv_conns srv_conns;

/** @return a tracker whose deadline is read_timeout_s, or NULL when out of
 *  memory. */
srv_conns *srv_conns_create(double read_timeout_s);

/** Free the tracker (after the daemon stopped). Accepts NULL. */
void srv_conns_free(srv_conns *cs);

/** MHD_OPTION_NOTIFY_CONNECTION callback: cls is the tracker. */
void srv_conns_notify(void *cls, struct MHD_Connection *c, void **socket_context,
                      enum MHD_ConnectionNotificationCode code);

/** The request on c has been read in full: its connection has no read
 *  deadline until the response is sent. */
void srv_conns_request_read(srv_conns *cs, struct MHD_Connection *c);

/** The request on c completed: the clock starts again for the next one. */
void srv_conns_request_done(srv_conns *cs, struct MHD_Connection *c);

/** Shut down every connection whose read deadline passed at now
 *  (nz_now_s()). @return how many. */
size_t srv_conns_sweep(srv_conns *cs, double now);

/** @return open connections tracked now. */
size_t srv_conns_open(srv_conns *cs);

#ifdef __cplusplus
}
#endif
#endif /* SRV_CONN_H */
