/* rdma-x: the unix-socket front end (send --listen-unix, recv --connect-unix). */
#ifndef RDMAX_FRONT_UNIX_H
#define RDMAX_FRONT_UNIX_H

/*
 * Source side: listen on PATH (a stale socket file is removed; a path a
 * live listener holds is refused). Returns the listening socket, or -1
 * after printing one 'rdma-x: error:' line.
 */
int rdmax_unix_listen(const char *path);

/* Accept QEMU's main channel on l: the socket, or -1 after one error line. */
int rdmax_unix_accept(int l, const char *path);

/*
 * Destination side: connect to the socket the destination QEMU listens on
 * (-incoming unix:PATH), retrying for timeout_ms while it is not there yet.
 * Returns the connected socket, or -1 after printing one error line.
 */
int rdmax_unix_connect(const char *path, int timeout_ms);

/* The same without the message: the socket or -errno. */
int rdmax_unix_dial(const char *path, int timeout_ms);

#endif
