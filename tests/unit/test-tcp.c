/*
 * TCP transport: receiving by lending (rx_next / rx_release, and the wire's
 * rdmax_wire_recv_lend over them) on a real connection over 127.0.0.1.
 */
#define _GNU_SOURCE
#include <criterion/criterion.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "crypt.h"
#include "transport.h"
#include "wire.h"

struct tcp_pair {
    struct rdmax_listener *l;
    struct rdmax_conn *a; /* connecting side */
    struct rdmax_conn *b; /* accepted side */
};

static void tcp_pair_open(struct tcp_pair *p)
{
    struct rdmax_transport_opts o = {.connect_timeout_ms = 2000};
    char port[16];
    int r = -1;

    memset(p, 0, sizeof(*p));
    /* No way to ask the listener for an ephemeral port: try a few. */
    for (int i = 0; i < 50 && r < 0; i++) {
        snprintf(port, sizeof(port), "%d", 20000 + (getpid() * 7 + i * 131) % 40000);
        r = rdmax_tcp_ops.listen("127.0.0.1", port, &o, &p->l);
    }
    cr_assert_eq(r, 0, "no free port to listen on");
    cr_assert_eq(rdmax_tcp_ops.connect("127.0.0.1", port, &o, &p->a), 0);
    cr_assert_eq(rdmax_tcp_ops.accept(p->l, 2000, &p->b), 0);
}

static void fill(uint8_t *b, size_t n, unsigned seed)
{
    for (size_t i = 0; i < n; i++) {
        b[i] = (uint8_t)(i * 31 + seed * 17 + (i >> 9));
    }
}

/* Sizes around every boundary the receive buffer has: tiny, one frame, more than a read. */
static const size_t sizes[] = {0, 1, 12, 4096, 65536, 300000, 7, 1 << 20, 270000, 5, 2 << 20, 3};

Test(tcp, lent_frames_round_trip_in_order)
{
    struct tcp_pair p;
    struct rdmax_wire wa, wb;
    size_t n = sizeof(sizes) / sizeof(sizes[0]);
    uint8_t *src = malloc(2 << 20), *want = malloc(2 << 20);

    cr_assert(src && want);
    tcp_pair_open(&p);
    rdmax_wire_init(&wa, p.a);
    rdmax_wire_init(&wb, p.b);
    /* The sender runs ahead (frames queue in the socket), so reads take several at once. */
    pid_t pid = fork();
    cr_assert_geq(pid, 0);
    if (pid == 0) {
        for (size_t i = 0; i < n; i++) {
            fill(src, sizes[i], (unsigned)i);
            if (rdmax_wire_send(&wa, RDMAX_F_PAGES, 0, (uint16_t)(i % 3), src, sizes[i]) != 0) {
                _exit(1);
            }
        }
        _exit(0);
    }
    for (size_t i = 0; i < n; i++) {
        struct rdmax_frame_hdr h;
        uint8_t *pl = NULL;

        cr_assert_eq(rdmax_wire_recv_lend(&wb, &h, &pl, RDMAX_FRAME_MAX, 5000), 0, "frame %zu", i);
        cr_assert_eq(h.type, RDMAX_F_PAGES);
        cr_assert_eq(h.channel, i % 3);
        cr_assert_eq(h.len, sizes[i]);
        fill(want, sizes[i], (unsigned)i);
        cr_assert(sizes[i] == 0 || memcmp(pl, want, sizes[i]) == 0, "frame %zu differs", i);
        if (sizes[i]) {
            pl[sizes[i] - 1] ^= 0xff; /* the loan is the borrower's to modify (decrypt) */
        }
        rdmax_wire_recv_release(&wb);
    }
    int st;
    cr_assert_eq(waitpid(pid, &st, 0), pid);
    cr_assert(WIFEXITED(st) && WEXITSTATUS(st) == 0);
    rdmax_wire_destroy(&wa);
    rdmax_wire_destroy(&wb);
    rdmax_tcp_ops.listener_close(p.l);
    free(src);
    free(want);
}

Test(tcp, recv_after_a_loan_gets_the_bytes_read_ahead)
{
    struct tcp_pair p;
    struct rdmax_wire wa, wb;
    struct rdmax_frame_hdr h;
    uint8_t *pl, buf[64];

    tcp_pair_open(&p);
    rdmax_wire_init(&wa, p.a);
    rdmax_wire_init(&wb, p.b);
    cr_assert_eq(rdmax_wire_send(&wa, RDMAX_F_RP, 0, 0, "first", 5), 0);
    cr_assert_eq(rdmax_wire_send(&wa, RDMAX_F_RP, 0, 0, "second", 6), 0);
    cr_assert_eq(rdmax_wire_send(&wa, RDMAX_F_RP, 0, 0, "third", 5), 0);
    usleep(50000); /* all three in the socket: the first rx_next reads them all */
    cr_assert_eq(rdmax_wire_recv_lend(&wb, &h, &pl, 64, 1000), 0);
    cr_assert(h.len == 5 && memcmp(pl, "first", 5) == 0);
    rdmax_wire_recv_release(&wb);
    cr_assert_eq(rdmax_wire_recv(&wb, &h, buf, sizeof(buf), 1000), 0);
    cr_assert(h.len == 6 && memcmp(buf, "second", 6) == 0);
    cr_assert_eq(rdmax_wire_recv_lend(&wb, &h, &pl, 64, 1000), 0);
    cr_assert(h.len == 5 && memcmp(pl, "third", 5) == 0);
    rdmax_wire_recv_release(&wb);
    rdmax_wire_destroy(&wa);
    rdmax_wire_destroy(&wb);
    rdmax_tcp_ops.listener_close(p.l);
}

Test(tcp, encrypted_frames_are_opened_in_place)
{
    struct tcp_pair p;
    struct rdmax_wire wa, wb;
    struct rdmax_frame_hdr h;
    struct rdmax_crypt *tx, *rx;
    uint8_t k[RDMAX_KEY_LEN], *pl, big[100000];

    memset(k, 0x42, sizeof(k));
    fill(big, sizeof(big), 9);
    tcp_pair_open(&p);
    rdmax_wire_init(&wa, p.a);
    rdmax_wire_init(&wb, p.b);
    cr_assert_eq(rdmax_crypt_create(k, true, &tx), 0);
    cr_assert_eq(rdmax_crypt_create(k, false, &rx), 0);
    rdmax_wire_crypt_start(&wa, tx, NULL);
    rdmax_wire_crypt_start(&wb, NULL, rx);
    for (int i = 0; i < 3; i++) {
        cr_assert_eq(rdmax_wire_send(&wa, RDMAX_F_PAGES, 0, 1, big, sizeof(big)), 0);
        cr_assert_eq(rdmax_wire_recv_lend(&wb, &h, &pl, sizeof(big) + RDMAX_TAG_LEN, 2000), 0);
        cr_assert_eq(h.len, sizeof(big));
        cr_assert(memcmp(pl, big, sizeof(big)) == 0);
        rdmax_wire_recv_release(&wb);
    }
    rdmax_wire_destroy(&wa);
    rdmax_wire_destroy(&wb);
    rdmax_tcp_ops.listener_close(p.l);
}

Test(tcp, a_frame_larger_than_the_buffer_is_refused)
{
    struct tcp_pair p;
    struct rdmax_wire wa, wb;
    struct rdmax_frame_hdr h;
    uint8_t *pl, small[100];

    tcp_pair_open(&p);
    /* The transport lends at most RDMAX_RX_LEND_MAX, and reads nothing for more. */
    cr_assert_eq(rdmax_tcp_ops.rx_next(p.b, RDMAX_RX_LEND_MAX + 1, &pl, 100), -EMSGSIZE);
    /* The wire refuses a frame over the caller's cap at its header, before the payload. */
    rdmax_wire_init(&wa, p.a);
    rdmax_wire_init(&wb, p.b);
    memset(small, 1, sizeof(small));
    cr_assert_eq(rdmax_wire_send(&wa, RDMAX_F_PAGES, 0, 1, small, sizeof(small)), 0);
    cr_assert_eq(rdmax_wire_recv_lend(&wb, &h, &pl, sizeof(small) - 1, 1000), -EPROTO);
    rdmax_wire_destroy(&wa);
    rdmax_wire_destroy(&wb);
    rdmax_tcp_ops.listener_close(p.l);
}

Test(tcp, a_peer_closing_midway_gives_econnreset)
{
    struct tcp_pair p;
    struct rdmax_wire wb;
    struct rdmax_frame_hdr h = {.type = RDMAX_F_PAGES, .len = 1000};
    uint8_t hdr[RDMAX_FRAME_HDR], body[500], *pl;
    struct iovec v[2] = {{hdr, sizeof(hdr)}, {body, sizeof(body)}};

    tcp_pair_open(&p);
    rdmax_frame_hdr_encode(hdr, &h);
    memset(body, 7, sizeof(body));
    /* Half the payload, then the peer goes away. */
    cr_assert_eq(rdmax_tcp_ops.send(p.a, v, 2), 0);
    rdmax_tcp_ops.close(p.a);
    rdmax_wire_init(&wb, p.b);
    cr_assert_eq(rdmax_wire_recv_lend(&wb, &h, &pl, 4096, 1000), -ECONNRESET);
    rdmax_wire_destroy(&wb);
    rdmax_tcp_ops.listener_close(p.l);
}

Test(tcp, a_silent_peer_times_out_and_a_clean_close_resets)
{
    struct tcp_pair p;
    uint8_t *pl;

    tcp_pair_open(&p);
    cr_assert_eq(rdmax_tcp_ops.rx_next(p.b, 12, &pl, 50), -ETIMEDOUT);
    cr_assert_eq(rdmax_tcp_ops.send(p.a, &(struct iovec){"abc", 3}, 1), 0);
    cr_assert_eq(rdmax_tcp_ops.rx_next(p.b, 3, &pl, 1000), 0);
    cr_assert(memcmp(pl, "abc", 3) == 0);
    rdmax_tcp_ops.rx_release(p.b, 3);
    rdmax_tcp_ops.close(p.a);
    cr_assert_eq(rdmax_tcp_ops.rx_next(p.b, 1, &pl, 1000), -ECONNRESET);
    rdmax_tcp_ops.close(p.b);
    rdmax_tcp_ops.listener_close(p.l);
}
