/*
 * rdma-x: QEMU's further migration channels through the unix front end.
 *
 * Besides its main channel QEMU opens one connection per multifd channel
 * and, for postcopy-preempt, one more, all to the same socket path. Each
 * is carried on an rdma-x connection of its own (role CHANNEL), opaque and
 * byte-exact, compressed per frame when that pays, and connected to the
 * destination QEMU in the order the source QEMU opened them (QEMU tells
 * its channels apart by that order and their first bytes).
 */
#ifndef RDMAX_CHANNELS_H
#define RDMAX_CHANNELS_H

#include "session.h"

struct rdmax_channels;

/*
 * Sender: QEMU's further channels come to listen_fd (the listener its main
 * channel came from, rdmax_unix_listen; the caller's, open until destroy).
 * NULL when out of memory.
 */
struct rdmax_channels *rdmax_channels_send_create(struct rdmax_session *s, int listen_fd,
                                                  const char *path);
/* Once the session is connected: accept QEMU's further channels. 0 or the session's error. */
int rdmax_channels_send_start(struct rdmax_channels *ch);
/*
 * The main stream ended: stop accepting (connections QEMU already made
 * are still taken). Returns how many channels QEMU opened in all; each
 * goes on until QEMU closes it.
 */
unsigned rdmax_channels_send_close(struct rdmax_channels *ch);

/*
 * Receiver: channels are connected to the destination QEMU at path as
 * their connections arrive (s->on_channel). NULL when out of memory.
 */
struct rdmax_channels *rdmax_channels_recv_create(struct rdmax_session *s, const char *path);
/*
 * Wait until the n channels the sender announced were all delivered to
 * their end, then accept no more. An error (none arriving, or silence,
 * for --timeout) is the session's.
 */
int rdmax_channels_recv_wait(struct rdmax_channels *ch, unsigned n);

/* Join every channel thread (the session stopped or they all ended). */
void rdmax_channels_join(struct rdmax_channels *ch);
/* Join, then free ch; the stats of its channels (s->chan_stats) go with it. */
void rdmax_channels_destroy(struct rdmax_channels *ch);

#endif
