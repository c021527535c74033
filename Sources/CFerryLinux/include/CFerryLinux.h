// The only C shim of Ferry: syscall wrappers glibc lacks, ptrace register
// access, and the userfaultfd / pagemap structures that Debian 12's kernel
// headers predate. Every symbol is prefixed `ferry_`; macros become functions.
#ifndef CFERRYLINUX_H
#define CFERRYLINUX_H

#include <stdint.h>
#include <sys/types.h>

int ferry_page_size(void);

#endif
