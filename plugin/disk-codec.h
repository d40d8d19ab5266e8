/*
 * rdma-x: the disks channel's frame codec (pure: no I/O, no threads), so
 * the fuzzers can drive it. One encoder per direction of a disk connection
 * on the side that reads QEMU, one decoder on the side that writes to it.
 *
 * Frames (docs/wire-protocol.md, "Disk connections"): DISK_DATA raw or
 * (RDMAX_FF_ZSTD) one zstd frame, DISK_ZERO be32 n, DISK_EOF be64 bytes.
 */
#ifndef RDMAX_DISK_CODEC_H
#define RDMAX_DISK_CODEC_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define RDMAX_DISK_CHUNK (256u << 10) /* QEMU bytes per frame at most */

/* Where the encoder's frames go: 0, or <0 to stop (returned as is). */
typedef int (*rdmax_disk_frame_fn)(void *arg, uint8_t type, uint8_t flags, const void *b, size_t n);

struct rdmax_disk_enc;
struct rdmax_disk_dec;

struct rdmax_disk_enc *rdmax_disk_enc_create(void);
void rdmax_disk_enc_destroy(struct rdmax_disk_enc *e);

/*
 * n <= RDMAX_DISK_CHUNK bytes QEMU wrote, as frames: every run of whole
 * zero 4 KiB blocks as DISK_ZERO, the bytes between as DISK_DATA, zstd 1
 * when it saves 10% (after data that did not, an 8 KiB sample decides
 * first). 0 or frame's error.
 */
int rdmax_disk_enc_chunk(struct rdmax_disk_enc *e, const uint8_t *b, size_t n,
                         rdmax_disk_frame_fn frame, void *arg);

struct rdmax_disk_dec *rdmax_disk_dec_create(void);
void rdmax_disk_dec_destroy(struct rdmax_disk_dec *d);

/*
 * One frame from the peer (untrusted). DISK_DATA / DISK_ZERO: 0, with the
 * bytes for QEMU in *out (valid until the next call), *out_len <=
 * RDMAX_DISK_CHUNK. DISK_EOF: 1, with the peer's byte count in *eof_bytes.
 * Anything else, or a frame that breaks a bound: -EBADMSG with the reason
 * in err.
 */
int rdmax_disk_dec_frame(struct rdmax_disk_dec *d, uint8_t type, uint8_t flags,
                         const uint8_t *payload, size_t len, const uint8_t **out, size_t *out_len,
                         uint64_t *eof_bytes, char *err, size_t err_len);

#endif
