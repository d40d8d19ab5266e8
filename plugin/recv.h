/*
 * The destination side as an object: create, run, destroy. No
 * process-wide state, so one process (a test, a service) may run several.
 */
#ifndef RDMAX_RECV_H
#define RDMAX_RECV_H

#include "session.h"

struct rdmax_recv;

/* Copies o (its strings must stay valid until destroy). 0 or -ENOMEM. */
int rdmax_recv_create(const struct rdmax_opts *o, struct rdmax_recv **out);
/*
 * Accept one migration on o->addr, write the stream to o->qemu_out, relay
 * the return path from o->qemu_in. Returns 0 once every byte reached
 * qemu_out (and qemu_in closed), or the session's -errno (reason:
 * rdmax_session_reason). Every thread it started has ended when it returns.
 */
int rdmax_recv_run(struct rdmax_recv *p);
/* The session (for rdmax_session_finish); valid until destroy. */
struct rdmax_session *rdmax_recv_session(struct rdmax_recv *p);
/* Accepts NULL; closes the connections. Not while run() runs. */
void rdmax_recv_destroy(struct rdmax_recv *p);

#endif
