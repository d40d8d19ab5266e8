/*
 * rdma-x --version. The git revision comes from version-git.h, which meson's
 * vcs_tag regenerates at build time ("unknown" when the source is not a git
 * checkout, e.g. a release tarball). Library versions are the ones loaded at
 * run time, with the compiled-against one when they differ; SIMD levels are
 * what this CPU offers and what the CRC-32C and delta codecs picked here
 * (RDMAX_NO_SIMD and RDMAX_DELTA_IMPL are honoured, as on the data path).
 */
#include "config.h"

#include "version.h"

#include <string.h>

#include <glib.h>
#include <openssl/crypto.h>
#include <openssl/opensslv.h>
#include <zstd.h>

#include "crc32c-impl.h"
#include "delta.h"
#include "transport.h"
#include "version-git.h"
#include "wire.h"

static void print_cpu(FILE *f)
{
#if defined(__x86_64__)
    int any = 0;

    __builtin_cpu_init();
    fputs("simd (this CPU):", f);
    /* __builtin_cpu_supports takes a string literal, hence a macro. */
#define SIMD_FLAG(name)                                                                            \
    if (__builtin_cpu_supports(name)) {                                                            \
        fputs(" " name, f);                                                                        \
        any = 1;                                                                                   \
    }
    SIMD_FLAG("sse2")
    SIMD_FLAG("sse4.2")
    SIMD_FLAG("pclmul")
    SIMD_FLAG("avx2")
    SIMD_FLAG("avx512f")
    SIMD_FLAG("avx512bw")
#undef SIMD_FLAG
    fputs(any ? "\n" : " none\n", f);
#else
    fputs("simd (this CPU): none used (not x86-64)\n", f);
#endif
}

void rdmax_version_print(FILE *f)
{
    const struct rdmax_delta_ops *delta = rdmax_delta_ops_get(RDMAX_DELTA_AUTO);
    const char *zstd_run = ZSTD_versionString();
    const char *ssl_run = OpenSSL_version(OPENSSL_VERSION);

    fprintf(f, "rdma-x %s (git %s, wire protocol v%u)\n", RDMAX_VERSION, RDMAX_GIT_REV,
            RDMAX_WIRE_VERSION);
    fprintf(f, "transports: %s\n", rdmax_transport_list());
#ifdef RDMAX_HAVE_RDMA
    fputs("rdma: compiled in (libibverbs, librdmacm)\n", f);
#else
    fputs("rdma: not compiled in (built without libibverbs/librdmacm)\n", f);
#endif
    fprintf(f, "crypto: %s (PSK authentication, AES-256-GCM)", ssl_run);
    if (strcmp(ssl_run, OPENSSL_VERSION_TEXT) != 0) {
        fprintf(f, ", built against %s", OPENSSL_VERSION_TEXT);
    }
    fprintf(f, "\nzstd: %s", zstd_run);
    if (strcmp(zstd_run, ZSTD_VERSION_STRING) != 0) {
        fprintf(f, ", built against %s", ZSTD_VERSION_STRING);
    }
    fprintf(f, "\nglib: %u.%u.%u\n", glib_major_version, glib_minor_version, glib_micro_version);
    print_cpu(f);
    fprintf(f, "crc32c: %s; delta: %s\n", rdmax_crc32c_impl_name(rdmax_crc32c_selected()),
            delta ? delta->name : "scalar");
}
