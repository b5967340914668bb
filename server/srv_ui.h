/*
 * srv_ui.h — the web playground's static files (server/ui/), embedded in the
 * binary at build time (server/ui/embed.sh writes them into a C table), so
 * the page works offline and needs nothing beside the executable.
 *
 * Paths: "/" serves index.html; "/ui/NAME" serves server/ui/NAME. Every
 * response carries SRV_UI_CSP: the page loads only its own files and talks
 * only to this server.
 */
#ifndef SRV_UI_H
#define SRV_UI_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

/** Content-Security-Policy of every playground response. */
#define SRV_UI_CSP                                                                                           \
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "    \
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"

/** One embedded file. */
typedef struct srv_ui_asset {
    const char *path;         /* "/ui/NAME" */
    const char *content_type; /* from the extension */
    const unsigned char *data;
    size_t len;
} srv_ui_asset;

/** @return the file served at path (a query string after '?' is ignored;
 *  "/" is index.html), or NULL when there is none. */
const srv_ui_asset *srv_ui_find(const char *path);

#ifdef __cplusplus
}
#endif
#endif /* SRV_UI_H */
