/*
 * Pre-shared-key authentication and frame encryption (docs/security.md).
 *
 * Authentication: both HELLOs carry a fresh 32-byte random nonce; each side
 * proves it holds the PSK with HMAC-SHA256(psk, label || transcript), where
 * the transcript is the client's and the server's HELLO (proof fields
 * zeroed), so a proof is bound to both nonces and to every negotiated
 * parameter. Proofs are compared in constant time (CRYPTO_memcmp).
 *
 * Encryption (--encrypt): AES-256-GCM on every frame after the handshake.
 * One key per direction per connection, derived with HKDF-SHA256 from the
 * PSK, salted with both nonces; the 96-bit GCM nonce is a per-direction
 * frame counter, so a nonce never repeats under one key. The frame header
 * (type, flags, channel, len) is the associated data.
 *
 * libcrypto's errors are mapped to -errno here (STYLE 14).
 */
#ifndef RDMAX_CRYPT_H
#define RDMAX_CRYPT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>

#define RDMAX_PSK_LEN 32u     /* a binary key file: 32 random bytes */
#define RDMAX_PSK_HEX_LEN 64u /* a text key file: 64 hex digits (+ newline) */
#define RDMAX_PSK_MAX 4096u   /* bytes, the size of a key buffer */
#define RDMAX_NONCE_LEN 32u
#define RDMAX_MAC_LEN 32u
#define RDMAX_KEY_LEN 32u
#define RDMAX_TAG_LEN 16u

/*
 * Read a key file. It must hold a high-entropy key: exactly 32 bytes
 * (binary, e.g. head -c 32 /dev/urandom), or 64 hex digits with an optional
 * newline (rdma-x keygen, openssl rand -hex 32); passphrases, short keys and
 * repeated patterns are refused with a reason saying how to make a key.
 * The key is the file's bytes less one trailing newline (as in earlier
 * versions, so the same file gives the same proofs). Refuses files
 * readable by others. Returns 0 or -errno with the reason in err.
 */
int rdmax_psk_load(const char *path, uint8_t *psk, size_t cap, size_t *len, char *err,
                   size_t err_len);

/* HMAC-SHA256(psk, label || a || b) into out. 0 or -EIO. */
int rdmax_auth_mac(const uint8_t *psk, size_t psk_len, const char *label, const uint8_t *a,
                   size_t a_len, const uint8_t *b, size_t b_len, uint8_t out[RDMAX_MAC_LEN]);

/* Constant-time equality of two MACs. */
bool rdmax_auth_equal(const uint8_t a[RDMAX_MAC_LEN], const uint8_t b[RDMAX_MAC_LEN]);

/* HKDF-SHA256(ikm = psk, salt, info) -> 32-byte key. 0 or -EIO. */
int rdmax_crypt_derive(const uint8_t *psk, size_t psk_len, const uint8_t *salt, size_t salt_len,
                       const char *info, uint8_t key[RDMAX_KEY_LEN]);

/* One direction of one connection. Not thread-safe: its owner serialises. */
struct rdmax_crypt;

int rdmax_crypt_create(const uint8_t key[RDMAX_KEY_LEN], bool seal, struct rdmax_crypt **out);
/* Accepts NULL; wipes the key schedule. */
void rdmax_crypt_destroy(struct rdmax_crypt *c);

/*
 * Encrypt the bytes of iov into out (their total length, then a 16-byte
 * tag appended), authenticating aad too, with the next nonce.
 * out must hold the total plus RDMAX_TAG_LEN. 0 or -EIO.
 */
int rdmax_crypt_seal(struct rdmax_crypt *c, const uint8_t *aad, size_t aad_len,
                     const struct iovec *iov, int iovcnt, uint8_t *out);

/*
 * Decrypt buf[0..len) in place (ciphertext then tag), with the next nonce.
 * Returns the plaintext length, or -EBADMSG when the tag does not verify
 * (forged, replayed, reordered or corrupted frame; buf is then garbage).
 */
int rdmax_crypt_open(struct rdmax_crypt *c, const uint8_t *aad, size_t aad_len, uint8_t *buf,
                     size_t len);

#endif
