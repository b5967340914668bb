/*
 * srv_server.h — the nzserve HTTP server: libmicrohttpd daemon, routing,
 * API keys, the bounded request queue and its inference workers, model
 * loading and readiness, graceful drain.
 *
 * Threads: libmicrohttpd's polling threads (http_threads) run the request
 * callbacks, which only parse, validate and enqueue; an inference request's
 * connection is suspended while one of max_concurrent_requests worker
 * threads runs it (compute on a shared pool of worker_threads threads) and
 * resumed with the finished response. A reaper thread completes queued
 * requests whose deadline passed (504) or whose client went away
 * (cancelled, never run); a running request checks the same before every
 * decoder pass. Per-request state is created on the first callback of a
 * request and freed in one place, the completion callback.
 */
#ifndef SRV_SERVER_H
#define SRV_SERVER_H

#include "srv_config.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct srv_server srv_server;

/** Check every model file (it exists, its header and config parse) before
 *  anything is served. @return 0, or -1 with a message naming the model and
 *  file in err. */
int srv_server_check_models(const srv_config *cfg, char *err, size_t errlen);

/** Create the server for cfg (borrowed: must outlive the server), bind its
 *  listening socket, start the HTTP and worker threads and begin loading
 *  the models in the background (/ready answers 503 until they are loaded).
 *  @return 0 and *out, or -1 with err (port in use, out of memory...). */
int srv_server_start(const srv_config *cfg, srv_server **out, char *err, size_t errlen);

/** @return the bound TCP port (useful with port 0). */
int srv_server_port(const srv_server *s);

/** @return 1 when every model is loaded, 0 while loading, -1 when loading
 *  failed (message in err). */
int srv_server_load_state(srv_server *s, char *err, size_t errlen);

/** Graceful stop: stop accepting connections, answer new requests on open
 *  connections with 503, let queued and running requests finish for up to
 *  shutdown_grace_ms, then cancel what is left (503), and stop every
 *  thread. Safe to call once, before srv_server_free. */
void srv_server_shutdown(srv_server *s);

/** Free the server (calls srv_server_shutdown if needed). Accepts NULL. */
void srv_server_free(srv_server *s);

#ifdef __cplusplus
}
#endif
#endif /* SRV_SERVER_H */
