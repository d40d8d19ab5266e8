/*
 * rdma-x: the disks channel: storage migration's NBD connections (libvirt
 * --copy-storage-all --disks-uri unix://PATH, or QMP blockdev-mirror to an
 * nbd server) carried through the same rdma-x pair.
 *
 * The source QEMU's NBD client connects to `send --listen-disks-unix PATH`;
 * each connection travels on an rdma-x connection of its own (role DISK)
 * and `recv --connect-disks-unix PATH` connects it to the destination
 * QEMU's NBD server. Bytes go both ways, byte for byte, zero runs as a
 * count, the rest through zstd where it pays. A disk connection is
 * independent of the migrations: it opens before QEMU's `migrate` and
 * closes after it, and its failure is its own (QEMU's mirror job reports
 * it). See docs/unix.md.
 */
#ifndef RDMAX_DISKS_H
#define RDMAX_DISKS_H

#include <stdio.h>

#include "session.h"

struct rdmax_disks;

/*
 * Sender (o->sender): listen on o->disks_path and accept disk connections
 * in a thread of their own from now on. Receiver: be ready for
 * rdmax_disks_adopt. o is copied. 0, or -1 after one `rdma-x: error:` line.
 */
int rdmax_disks_start(const struct rdmax_opts *o, struct rdmax_disks **out);

/*
 * Receiver, from a handshake thread: carry the authenticated disk
 * connection w (malloc'd; d owns it and frees it in every case) to the
 * destination QEMU's NBD server. k: its number on the sender.
 */
void rdmax_disks_adopt(struct rdmax_disks *d, struct rdmax_wire *w, unsigned k);

/*
 * The migration failed and nothing else will end them: close every open
 * disk connection (QEMU's side and the peer's) without an error line of
 * their own. Any thread.
 */
void rdmax_disks_abort(struct rdmax_disks *d);

/*
 * The disk connections open now and how many ended (rdma-x status): one
 * JSON object, or text lines (no final newline).
 */
void rdmax_disks_report(struct rdmax_disks *d, FILE *f, bool json);

/*
 * Stop accepting, wait until every disk connection has ended, print what
 * each carried, free d. 0 when every one ended cleanly (both directions
 * closed with every byte delivered), -1 when one failed (its error line was
 * printed). Accepts NULL (0).
 */
int rdmax_disks_finish(struct rdmax_disks *d);

#endif
