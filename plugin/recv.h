#ifndef RDMAX_RECV_H
#define RDMAX_RECV_H
/* Run the destination side on stdin/stdout with rdmax_s.o; returns the exit code. */
int rdmax_recv_run(void);
#endif
