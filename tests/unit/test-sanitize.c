/* Peer text before it is logged (transport/sanitize.c): printable only, capped. */
#include <criterion/criterion.h>
#include <stdint.h>
#include <string.h>

#include "sanitize.h"

Test(peer_text, printable_ascii_passes_unchanged)
{
    char out[RDMAX_PEER_TEXT_BUF];
    const char *s = "authentication failed: wrong key (see docs/security.md) ~!";

    cr_assert_str_eq(rdmax_peer_text(out, sizeof(out), s, strlen(s)), s);
    cr_assert_str_eq(rdmax_peer_text(out, sizeof(out), "", 0), "");
}

Test(peer_text, control_and_high_bytes_become_question_marks)
{
    char out[RDMAX_PEER_TEXT_BUF];
    /* A forged log line, a terminal escape, NUL, DEL, UTF-8, tab. */
    const uint8_t in[] = "ok\nrdma-x: note: fake\r\x1b[2J\0x\x7f\xc3\xa9\t";

    rdmax_peer_text(out, sizeof(out), in, sizeof(in) - 1);
    cr_assert_str_eq(out, "ok?rdma-x: note: fake??[2J?x????");
    for (const char *p = out; *p; p++) {
        cr_assert(*p >= 0x20 && *p <= 0x7e);
    }
}

Test(peer_text, every_byte_value_is_safe)
{
    char out[RDMAX_PEER_TEXT_BUF];
    uint8_t in[256];

    for (int i = 0; i < 256; i++) {
        in[i] = (uint8_t)i;
    }
    rdmax_peer_text(out, sizeof(out), in, 128);
    cr_assert_eq(strlen(out), 128);
    for (int i = 0; i < 128; i++) {
        cr_assert_eq(out[i], i >= 0x20 && i < 0x7f ? i : '?', "byte %d", i);
    }
}

Test(peer_text, long_text_is_capped_and_marked)
{
    char out[RDMAX_PEER_TEXT_BUF];
    static char in[1 << 20];

    memset(in, 'A', sizeof(in));
    rdmax_peer_text(out, sizeof(out), in, sizeof(in));
    cr_assert_eq(strlen(out), RDMAX_PEER_TEXT_MAX + 3);
    cr_assert_str_eq(out + RDMAX_PEER_TEXT_MAX, "...");
    /* Exactly the cap: kept whole, no marker. */
    rdmax_peer_text(out, sizeof(out), in, RDMAX_PEER_TEXT_MAX);
    cr_assert_eq(strlen(out), RDMAX_PEER_TEXT_MAX);
}

Test(peer_text, never_writes_past_a_small_buffer)
{
    char out[16];

    memset(out, 'x', sizeof(out));
    rdmax_peer_text(out, 8, "0123456789abcdef", 16);
    cr_assert_str_eq(out, "0123...");
    cr_assert_eq(out[8], 'x');
    rdmax_peer_text(out, 3, "0123456789", 10);
    cr_assert_str_eq(out, "");
    rdmax_peer_text(out, 5, "0123", 4);
    cr_assert_str_eq(out, "0123");
    rdmax_peer_text(out, 4, "0123", 4);
    cr_assert_str_eq(out, "...");
}
