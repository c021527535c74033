#include "CFerryLinux.h"
#include <unistd.h>

int ferry_page_size(void) { return (int)sysconf(_SC_PAGESIZE); }
