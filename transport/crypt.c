/*
 * PSK authentication and AES-256-GCM frames over OpenSSL's libcrypto.
 * See crypt.h for the scheme and docs/security.md for the threat model.
 */
#include "crypt.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/kdf.h>

struct rdmax_crypt {
    EVP_CIPHER_CTX *ctx;
    bool seal;
    uint64_t seq; /* frames done in this direction: the GCM nonce */
};

static bool is_hex(uint8_t c)
{
    return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F');
}

/*
 * Why key[0..n) does not look like the output of a random generator, or
 * NULL. Only catches the obvious (a passphrase, a repeated pattern); it
 * cannot prove randomness, but 32 random bytes or 64 random hex digits
 * pass it except with a vanishing probability (< 2^-43).
 */
static const char *psk_weak(const uint8_t *key, size_t n, size_t file_len)
{
    bool seen[256] = {false};
    unsigned distinct = 0, printable = 0;
    bool hex = n == RDMAX_PSK_HEX_LEN;

    if (file_len != RDMAX_PSK_LEN && n != RDMAX_PSK_HEX_LEN) {
        return "not 32 bytes, nor 64 hex digits";
    }
    for (size_t i = 0; i < n; i++) {
        uint8_t c = key[i];
        if (hex && !is_hex(c)) {
            return "64 characters, but not all hex digits";
        }
        if (c >= 'A' && c <= 'F') {
            c = (uint8_t)(c - 'A' + 'a');
        }
        distinct += !seen[c];
        seen[c] = true;
        printable += c >= 0x20 && c <= 0x7e;
    }
    if (!hex && printable == n) {
        return "32 printable characters: a passphrase, not random bytes";
    }
    /*
     * 64 random hex digits show fewer than 8 of the 16 values with a
     * probability < 2^-62, 32 random bytes fewer than 12 distinct ones
     * (20 collisions where ~2 are expected) with one < 2^-44.
     */
    if (distinct < (hex ? 8u : 12u) || memcmp(key, key + n / 2, n / 2) == 0) {
        return "a repeated pattern, not random";
    }
    return NULL;
}

int rdmax_psk_load(const char *path, uint8_t *psk, size_t cap, size_t *len, char *err,
                   size_t err_len)
{
    struct stat st;
    uint8_t buf[RDMAX_PSK_HEX_LEN + 2];
    size_t n = 0, file_len;
    const char *weak;
    int fd, r = 0;

    fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        r = -errno;
        snprintf(err, err_len, "cannot read the key file %s: %s", path, strerror(errno));
        return r;
    }
    if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode)) {
        snprintf(err, err_len, "key file %s is not a regular file", path);
        close(fd);
        return -EINVAL;
    }
    /* Like ssh with private keys: a key others can read is no secret. */
    if (st.st_mode & S_IROTH) {
        snprintf(err, err_len, "key file %s is readable by others (chmod o-r %s)", path, path);
        close(fd);
        return -EPERM;
    }
    /* One byte more than the longest key file: anything longer is no key. */
    while (n < sizeof(buf)) {
        ssize_t k = read(fd, buf + n, sizeof(buf) - n);
        if (k < 0 && errno == EINTR) {
            continue;
        }
        if (k < 0) {
            r = -errno;
            snprintf(err, err_len, "reading the key file %s: %s", path, strerror(errno));
            close(fd);
            OPENSSL_cleanse(buf, sizeof(buf));
            return r;
        }
        if (k == 0) {
            break;
        }
        n += (size_t)k;
    }
    close(fd);
    file_len = n;
    /* The key is the file less one trailing newline, as it always was (same proofs). */
    if (n && buf[n - 1] == '\n') {
        n--;
    }
    weak = file_len > RDMAX_PSK_HEX_LEN + 1 ? "longer than a key" : psk_weak(buf, n, file_len);
    if (!weak && n > cap) {
        weak = "too long for this build";
    }
    if (weak) {
        OPENSSL_cleanse(buf, sizeof(buf));
        snprintf(err, err_len,
                 "key in %s is not a high-entropy key (%s): a key is 32 random bytes or 64 hex "
                 "digits; make one with 'rdma-x keygen > %s' or 'head -c 32 /dev/urandom > %s', "
                 "then chmod 600 it",
                 path, weak, path, path);
        return -EINVAL;
    }
    memcpy(psk, buf, n);
    OPENSSL_cleanse(buf, sizeof(buf));
    *len = n;
    return 0;
}

int rdmax_auth_mac(const uint8_t *psk, size_t psk_len, const char *label, const uint8_t *a,
                   size_t a_len, const uint8_t *b, size_t b_len, uint8_t out[RDMAX_MAC_LEN])
{
    uint8_t msg[512];
    size_t l = strlen(label);
    unsigned int olen = 0;

    if (l + a_len + b_len > sizeof(msg) || psk_len > INT_MAX) {
        return -EINVAL;
    }
    memcpy(msg, label, l);
    memcpy(msg + l, a, a_len);
    memcpy(msg + l + a_len, b, b_len);
    if (!HMAC(EVP_sha256(), psk, (int)psk_len, msg, l + a_len + b_len, out, &olen) ||
        olen != RDMAX_MAC_LEN) {
        return -EIO;
    }
    return 0;
}

bool rdmax_auth_equal(const uint8_t a[RDMAX_MAC_LEN], const uint8_t b[RDMAX_MAC_LEN])
{
    return CRYPTO_memcmp(a, b, RDMAX_MAC_LEN) == 0;
}

int rdmax_crypt_derive(const uint8_t *psk, size_t psk_len, const uint8_t *salt, size_t salt_len,
                       const char *info, uint8_t key[RDMAX_KEY_LEN])
{
    EVP_PKEY_CTX *p = EVP_PKEY_CTX_new_id(EVP_PKEY_HKDF, NULL);
    size_t klen = RDMAX_KEY_LEN;
    int r = -EIO;

    if (!p) {
        return -ENOMEM;
    }
    if (EVP_PKEY_derive_init(p) > 0 && EVP_PKEY_CTX_set_hkdf_md(p, EVP_sha256()) > 0 &&
        EVP_PKEY_CTX_set1_hkdf_salt(p, salt, (int)salt_len) > 0 &&
        EVP_PKEY_CTX_set1_hkdf_key(p, psk, (int)psk_len) > 0 &&
        EVP_PKEY_CTX_add1_hkdf_info(p, (const unsigned char *)info, (int)strlen(info)) > 0 &&
        EVP_PKEY_derive(p, key, &klen) > 0 && klen == RDMAX_KEY_LEN) {
        r = 0;
    }
    EVP_PKEY_CTX_free(p);
    return r;
}

int rdmax_crypt_create(const uint8_t key[RDMAX_KEY_LEN], bool seal, struct rdmax_crypt **out)
{
    struct rdmax_crypt *c = calloc(1, sizeof(*c));
    int ok;

    if (!c) {
        return -ENOMEM;
    }
    c->seal = seal;
    c->ctx = EVP_CIPHER_CTX_new();
    if (!c->ctx) {
        free(c);
        return -ENOMEM;
    }
    /* Key now, IV per frame: the key schedule is computed once. */
    ok = seal ? EVP_EncryptInit_ex(c->ctx, EVP_aes_256_gcm(), NULL, key, NULL)
              : EVP_DecryptInit_ex(c->ctx, EVP_aes_256_gcm(), NULL, key, NULL);
    if (ok != 1) {
        rdmax_crypt_destroy(c);
        return -EIO;
    }
    *out = c;
    return 0;
}

void rdmax_crypt_destroy(struct rdmax_crypt *c)
{
    if (!c) {
        return;
    }
    EVP_CIPHER_CTX_free(c->ctx); /* cleanses the key schedule */
    free(c);
}

static void crypt_iv(uint64_t seq, uint8_t iv[12])
{
    memset(iv, 0, 4);
    for (int i = 0; i < 8; i++) {
        iv[4 + i] = (uint8_t)(seq >> (56 - 8 * i));
    }
}

int rdmax_crypt_seal(struct rdmax_crypt *c, const uint8_t *aad, size_t aad_len,
                     const struct iovec *iov, int iovcnt, uint8_t *out)
{
    uint8_t iv[12];
    size_t pos = 0;
    int n;

    crypt_iv(c->seq, iv);
    if (EVP_EncryptInit_ex(c->ctx, NULL, NULL, NULL, iv) != 1 ||
        EVP_EncryptUpdate(c->ctx, NULL, &n, aad, (int)aad_len) != 1) {
        return -EIO;
    }
    for (int i = 0; i < iovcnt; i++) {
        if (iov[i].iov_len == 0) {
            continue;
        }
        if (EVP_EncryptUpdate(c->ctx, out + pos, &n, iov[i].iov_base, (int)iov[i].iov_len) != 1) {
            return -EIO;
        }
        pos += (size_t)n;
    }
    if (EVP_EncryptFinal_ex(c->ctx, out + pos, &n) != 1) {
        return -EIO;
    }
    pos += (size_t)n;
    if (EVP_CIPHER_CTX_ctrl(c->ctx, EVP_CTRL_GCM_GET_TAG, RDMAX_TAG_LEN, out + pos) != 1) {
        return -EIO;
    }
    c->seq++;
    return 0;
}

int rdmax_crypt_open(struct rdmax_crypt *c, const uint8_t *aad, size_t aad_len, uint8_t *buf,
                     size_t len)
{
    uint8_t iv[12];
    size_t body;
    int n, m;

    if (len < RDMAX_TAG_LEN || len - RDMAX_TAG_LEN > INT_MAX) {
        return -EBADMSG;
    }
    body = len - RDMAX_TAG_LEN;
    crypt_iv(c->seq, iv);
    if (EVP_DecryptInit_ex(c->ctx, NULL, NULL, NULL, iv) != 1 ||
        EVP_DecryptUpdate(c->ctx, NULL, &n, aad, (int)aad_len) != 1) {
        return -EIO;
    }
    n = 0;
    if (body && EVP_DecryptUpdate(c->ctx, buf, &n, buf, (int)body) != 1) {
        return -EBADMSG;
    }
    if (EVP_CIPHER_CTX_ctrl(c->ctx, EVP_CTRL_GCM_SET_TAG, RDMAX_TAG_LEN, buf + body) != 1) {
        return -EIO;
    }
    if (EVP_DecryptFinal_ex(c->ctx, buf + n, &m) != 1) {
        return -EBADMSG;
    }
    /* Only a frame that verified advances the nonce: a bad one ends the connection. */
    c->seq++;
    return (int)body;
}
