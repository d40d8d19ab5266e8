#ifndef RDMAX_SEND_H
#define RDMAX_SEND_H
/* Run the source side on stdin/stdout with rdmax_s.o; returns the exit code. */
int rdmax_send_run(void);
#endif
