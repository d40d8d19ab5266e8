/*
 * rdma-x: what a running rdma-x is doing, for operators (`--status-socket
 * PATH` on send and recv, read by `rdma-x status PATH`): the migration in
 * flight with its bytes, rates and tier mix, how many were done or failed,
 * the disk connections open. One snapshot per connection to PATH, text or
 * JSON; it reads the live counters and never blocks the data path.
 */
#ifndef RDMAX_STATUS_H
#define RDMAX_STATUS_H

#include <stdbool.h>

struct rdmax_session;
struct rdmax_disks;
struct rdmax_status;

/* Listen on path and answer from a thread of its own. 0, or -1 after one error line. */
int rdmax_status_start(const char *path, bool sender, struct rdmax_status **out);

/*
 * The migration now running in slot k (s), or none (end) before its
 * session is destroyed: status reads s only between the two calls. ok:
 * how it went. st may be NULL (no --status-socket). k < RDMAX_SLOTS_MAX.
 */
void rdmax_status_begin(struct rdmax_status *st, unsigned k, struct rdmax_session *s);
void rdmax_status_end(struct rdmax_status *st, unsigned k, bool ok);

/* How many slots the process serves (main.c), before the first begin. */
void rdmax_status_slots(struct rdmax_status *st, unsigned n);

/* The process's disk connections (disks.h), for the snapshot. */
void rdmax_status_disks(struct rdmax_status *st, struct rdmax_disks *d);

/* Stop answering, remove the socket, free st. Accepts NULL. */
void rdmax_status_stop(struct rdmax_status *st);

/* rdma-x status PATH [--json]: print one snapshot. Returns the exit status. */
int rdmax_status_cli(int argc, char **argv);

#endif
