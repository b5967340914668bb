/* srv_handlers — the served tasks' request handlers. A new task adds its handler (its own file, see
 * srv_handler in srv_internal.h) to this list; nothing else in the server names a task. */
#include "srv_internal.h"

extern const srv_handler SRV_TRANSLATE_HANDLER; /* srv_translate.c */
extern const srv_handler SRV_DIALOGUE_HANDLER;  /* srv_dialogue.c */

const srv_handler *const SRV_HANDLERS[] = {&SRV_TRANSLATE_HANDLER, &SRV_DIALOGUE_HANDLER};
const size_t SRV_N_HANDLERS = sizeof SRV_HANDLERS / sizeof SRV_HANDLERS[0];

const srv_handler *srv_handler_for(srv_route r) {
    return r >= SRV_ROUTE_TASK && (size_t)(r - SRV_ROUTE_TASK) < SRV_N_HANDLERS
               ? SRV_HANDLERS[r - SRV_ROUTE_TASK]
               : NULL;
}

const srv_handler *srv_handler_of_task(const nz_task *t) {
    for (size_t i = 0; i < SRV_N_HANDLERS; i++)
        if (SRV_HANDLERS[i]->task == t) return SRV_HANDLERS[i];
    return NULL;
}
