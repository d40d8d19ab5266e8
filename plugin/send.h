/*
 * The source side as an object: create, run, destroy. No process-wide
 * state, so one process (a test, a service) may run several.
 */
#ifndef RDMAX_SEND_H
#define RDMAX_SEND_H

#include "session.h"

struct rdmax_send;

/* Copies o (its strings must stay valid until destroy). 0 or -ENOMEM. */
int rdmax_send_create(const struct rdmax_opts *o, struct rdmax_send **out);
/*
 * Read the stream from o->qemu_in and carry it to the receiver at o->addr;
 * relay the return path to o->qemu_out. Returns 0 once the receiver
 * confirmed every byte, or the session's -errno (reason:
 * rdmax_session_reason). Every thread it started has ended when it returns.
 */
int rdmax_send_run(struct rdmax_send *p);
/* The session (for rdmax_session_finish); valid until destroy. */
struct rdmax_session *rdmax_send_session(struct rdmax_send *p);
/* Accepts NULL; closes the connections. Not while run() runs. */
void rdmax_send_destroy(struct rdmax_send *p);

#endif
