// zstd from Debian's libzstd-dev (1.5.4): record compression (Protocols/wire.md § 5.4).
#include <zstd.h>
