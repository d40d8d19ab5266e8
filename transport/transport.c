/* The transports this binary was built with, in order of preference. */
#include "config.h"
#include "transport.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>

static const struct rdmax_transport_ops *const transports[] = {
#ifdef RDMAX_HAVE_RDMA
    &rdmax_rdma_ops,
#endif
    &rdmax_tcp_ops,
};

const struct rdmax_transport_ops *rdmax_transport_find(const char *name)
{
    for (size_t i = 0; i < sizeof(transports) / sizeof(transports[0]); i++) {
        if (strcmp(transports[i]->name, name) == 0) {
            return transports[i];
        }
    }
    return NULL;
}

const char *rdmax_transport_list(void)
{
#ifdef RDMAX_HAVE_RDMA
    return "rdma,tcp";
#else
    return "tcp";
#endif
}

int rdmax_addr_split(const char *spec, char *host, size_t host_len, char *port, size_t port_len,
                     char *err, size_t err_len)
{
    const char *colon;
    const char *h = spec;
    size_t hl;

    if (spec[0] == '[') {
        const char *close = strchr(spec, ']');
        if (!close || close[1] != ':') {
            snprintf(err, err_len, "bad address '%s' (expected [IPv6]:PORT)", spec);
            return -EINVAL;
        }
        h = spec + 1;
        hl = (size_t)(close - h);
        colon = close + 1;
    } else {
        colon = strrchr(spec, ':');
        if (!colon) {
            snprintf(err, err_len, "bad address '%s' (expected HOST:PORT)", spec);
            return -EINVAL;
        }
        hl = (size_t)(colon - spec);
    }
    if (hl == 0 || hl >= host_len || strlen(colon + 1) == 0 || strlen(colon + 1) >= port_len) {
        snprintf(err, err_len, "bad address '%s' (expected HOST:PORT)", spec);
        return -EINVAL;
    }
    for (const char *p = colon + 1; *p; p++) {
        if (*p < '0' || *p > '9') {
            snprintf(err, err_len, "bad port in '%s'", spec);
            return -EINVAL;
        }
    }
    memcpy(host, h, hl);
    host[hl] = '\0';
    strcpy(port, colon + 1);
    return 0;
}
