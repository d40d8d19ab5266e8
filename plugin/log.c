/*
 * glib log messages (the transports' warnings) to stderr as
 * "rdma-x: warning: ...". glib has one default handler per process, so
 * this is the one process-wide switch: quiet while a session probes a
 * transport that may be absent.
 */
#include "session.h"

#include <glib.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static _Atomic bool log_quiet;

static void log_handler(const gchar *domain, GLogLevelFlags level, const gchar *msg, gpointer arg)
{
    bool debug = level & (G_LOG_LEVEL_INFO | G_LOG_LEVEL_DEBUG);
    const char *want = getenv("G_MESSAGES_DEBUG");

    if (atomic_load(&log_quiet) && !(level & (G_LOG_LEVEL_ERROR | G_LOG_LEVEL_CRITICAL))) {
        return;
    }
    if (debug && !(want && (strcmp(want, "all") == 0 || (domain && strstr(want, domain))))) {
        return;
    }
    fprintf(stderr, "rdma-x: %s: %s\n",
            level & (G_LOG_LEVEL_ERROR | G_LOG_LEVEL_CRITICAL | G_LOG_LEVEL_WARNING) ? "warning"
            : debug                                                                  ? "debug"
                                                                                     : "note",
            msg);
}

void rdmax_log_init(void)
{
    g_log_set_default_handler(log_handler, NULL);
}

void rdmax_log_quiet(bool quiet)
{
    atomic_store(&log_quiet, quiet);
}
