/* srv_ui — see srv_ui.h. The table comes from server/ui/embed.sh. */
#include "srv_ui.h"

#include <string.h>

extern const srv_ui_asset SRV_UI_ASSETS[];
extern const size_t SRV_UI_N_ASSETS;

const srv_ui_asset *srv_ui_find(const char *path) {
    if (!path) return NULL;
    size_t n = strcspn(path, "?");
    if (n == 1 && path[0] == '/') {
        path = "/ui/index.html";
        n = strlen(path);
    }
    for (size_t i = 0; i < SRV_UI_N_ASSETS; i++)
        if (strlen(SRV_UI_ASSETS[i].path) == n && !memcmp(SRV_UI_ASSETS[i].path, path, n))
            return &SRV_UI_ASSETS[i];
    return NULL;
}
