/* rdma-x --version: version, git revision, compiled-in features, SIMD found at run time. */
#ifndef RDMAX_VERSION_H
#define RDMAX_VERSION_H

#include <stdio.h>

/*
 * Print the version report to f. The first line is
 * "rdma-x VERSION (git REV, wire protocol vN)"; scripts read only that line.
 */
void rdmax_version_print(FILE *f);

#endif
