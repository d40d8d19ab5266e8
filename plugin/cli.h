#ifndef RDMAX_CLI_H
#define RDMAX_CLI_H

#include "session.h"

/*
 * Parse "send"/"recv" options (argv[0] is the subcommand) into o.
 * Returns 0 to run, 1 when help was printed (exit 0), -1 on bad usage
 * (message printed, exit 2).
 */
int rdmax_cli_parse(int argc, char **argv, struct rdmax_opts *o);
void rdmax_cli_usage(FILE *f);
/* rdma-x keygen: print a new --psk-file key. Returns the exit status. */
int rdmax_cli_keygen(int argc, char **argv);

#endif
