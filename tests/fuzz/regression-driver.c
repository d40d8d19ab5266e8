/*
 * Regression driver: without -Dfuzzing=true each fuzz target links against
 * this main() instead of libFuzzer's and replays its checked-in corpus as an
 * ordinary meson test, so the targets never go stale (zstd's practice).
 *
 * Usage: fuzz-<target> FILE|DIR...   Exit 0 when every input ran (a crash,
 * an abort on a broken invariant or a sanitizer report fails the test), 1
 * when there was no input at all (an empty corpus proves nothing).
 */
#include <dirent.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static int run_file(const char *path)
{
    FILE *f = fopen(path, "rb");
    uint8_t *buf;
    long n;

    if (!f) {
        perror(path);
        return -1;
    }
    fseek(f, 0, SEEK_END);
    n = ftell(f);
    rewind(f);
    /* Exactly sized (and never NULL): overreads hit the sanitizers. */
    buf = malloc(n > 0 ? (size_t)n : 1);
    if (!buf || fread(buf, 1, (size_t)n, f) != (size_t)n) {
        fprintf(stderr, "%s: read failed\n", path);
        fclose(f);
        free(buf);
        return -1;
    }
    fclose(f);
    LLVMFuzzerTestOneInput(buf, (size_t)n);
    free(buf);
    return 0;
}

static int cmp_names(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

int main(int argc, char **argv)
{
    unsigned ran = 0;

    for (int i = 1; i < argc; i++) {
        struct stat st;
        if (stat(argv[i], &st) < 0) {
            perror(argv[i]);
            return 1;
        }
        if (!S_ISDIR(st.st_mode)) {
            if (run_file(argv[i]) < 0) {
                return 1;
            }
            ran++;
            continue;
        }
        DIR *d = opendir(argv[i]);
        struct dirent *e;
        char **names = NULL;
        size_t n = 0;
        while (d && (e = readdir(d))) {
            if (e->d_name[0] == '.') {
                continue;
            }
            names = realloc(names, (n + 1) * sizeof(*names));
            names[n++] = strdup(e->d_name);
        }
        if (d) {
            closedir(d);
        }
        qsort(names, n, sizeof(*names), cmp_names);
        for (size_t k = 0; k < n; k++) {
            char path[4096];
            snprintf(path, sizeof(path), "%s/%s", argv[i], names[k]);
            if (run_file(path) < 0) {
                return 1;
            }
            ran++;
            free(names[k]);
        }
        free(names);
    }
    printf("%u inputs replayed\n", ran);
    return ran ? 0 : 1;
}
