/*
 * rdma-x: the unix-socket front end.
 *
 * QEMU's unix: migration channel is one bidirectional socket: the stream
 * one way, the return path the other, exactly what exec: carries over
 * stdin and stdout. So the front end only opens the socket and hands it
 * to the existing pipeline as both qemu_in and qemu_out (main.c dups it);
 * everything after that, including the failure rules, is the pipeline's.
 *
 * QEMU's first connection is its main channel; the listener stays open
 * for its further ones (multifd, postcopy preempt), which channels.c
 * carries each on a connection of its own. See docs/unix.md.
 */
#define _GNU_SOURCE
#include "front-unix.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

static int fill_addr(struct sockaddr_un *a, const char *path)
{
    memset(a, 0, sizeof(*a));
    a->sun_family = AF_UNIX;
    if (strlen(path) >= sizeof(a->sun_path)) {
        fprintf(stderr, "rdma-x: error: unix socket path too long (max %zu bytes): %s\n",
                sizeof(a->sun_path) - 1, path);
        return -1;
    }
    strcpy(a->sun_path, path);
    return 0;
}

int rdmax_unix_listen(const char *path)
{
    struct sockaddr_un a;
    struct stat st;
    int l;

    if (fill_addr(&a, path) < 0) {
        return -1;
    }
    if (lstat(path, &st) == 0) {
        if (!S_ISSOCK(st.st_mode)) {
            fprintf(stderr, "rdma-x: error: %s exists and is not a socket\n", path);
            return -1;
        }
        /* Live listener, or a stale file left by a dead one? */
        int t = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (t >= 0 && connect(t, (struct sockaddr *)&a, sizeof(a)) == 0) {
            close(t);
            fprintf(stderr, "rdma-x: error: %s is in use by a live listener\n", path);
            return -1;
        }
        if (t >= 0) {
            close(t);
        }
        unlink(path);
    }
    /*
     * The backlog holds QEMU's multifd channels, which it opens all at once
     * while we may still be connecting to the receiver.
     */
    l = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (l < 0 || bind(l, (struct sockaddr *)&a, sizeof(a)) < 0 || listen(l, 128) < 0) {
        fprintf(stderr, "rdma-x: error: listen on unix:%s: %s\n", path, strerror(errno));
        if (l >= 0) {
            close(l);
        }
        return -1;
    }
    /* Non-blocking, so no accept hangs when a connection goes away first. */
    fcntl(l, F_SETFL, fcntl(l, F_GETFL) | O_NONBLOCK);
    return l;
}

int rdmax_unix_accept(int l, const char *path)
{
    int c;

    for (;;) {
        struct pollfd p = {.fd = l, .events = POLLIN};
        if (poll(&p, 1, -1) < 0 && errno != EINTR) {
            c = -1;
            break;
        }
        /* The socket accepted blocks: the listener's O_NONBLOCK is not inherited. */
        c = accept4(l, NULL, NULL, SOCK_CLOEXEC);
        if (c >= 0 || (errno != EAGAIN && errno != EINTR && errno != ECONNABORTED)) {
            break;
        }
    }
    if (c < 0) {
        fprintf(stderr, "rdma-x: error: accept on unix:%s: %s\n", path, strerror(errno));
    }
    return c;
}

int rdmax_unix_dial(const char *path, int timeout_ms)
{
    struct sockaddr_un a;
    struct timespec t0, t;
    int err;

    memset(&a, 0, sizeof(a));
    a.sun_family = AF_UNIX;
    if (strlen(path) >= sizeof(a.sun_path)) {
        return -ENAMETOOLONG;
    }
    strcpy(a.sun_path, path);
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (;;) {
        int c = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (c < 0) {
            return -errno;
        }
        if (connect(c, (struct sockaddr *)&a, sizeof(a)) == 0) {
            return c;
        }
        err = errno;
        close(c);
        if (err != ENOENT && err != ECONNREFUSED && err != EINTR) {
            return -err;
        }
        clock_gettime(CLOCK_MONOTONIC, &t);
        long ms = (t.tv_sec - t0.tv_sec) * 1000 + (t.tv_nsec - t0.tv_nsec) / 1000000;
        if (ms >= timeout_ms) {
            return -err;
        }
        usleep(50 * 1000);
    }
}

int rdmax_unix_connect(const char *path, int timeout_ms)
{
    struct sockaddr_un a;
    int c;

    if (fill_addr(&a, path) < 0) {
        return -1;
    }
    c = rdmax_unix_dial(path, timeout_ms);
    if (c < 0) {
        fprintf(stderr, "rdma-x: error: connect to destination QEMU at unix:%s: %s\n", path,
                strerror(-c));
        return -1;
    }
    return c;
}
