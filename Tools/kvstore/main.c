// kvstore: a tiny key-value server whose whole state is one table in one
// anonymous region: the program the post-copy demonstration migrates
// (Tools/postcopy-demo.sh, docs/postcopy.md).
//
//   kvstore [--keys N] [--bits B] [--rate N]
//
// The table is 2^B slots of 64 bytes (open addressing, linear probing, the
// hash below), mapped at TABLE_ADDRESS when free. Keys 1..N hold value
// key*key at start; then the program keeps updating random keys' values
// (value = key*key + generation) at --rate updates per second, so the table
// is live while it is migrated. It prints one line with its pid and the
// table's address and size, then answers "get KEY" lines on stdin.
#define _GNU_SOURCE
#include <inttypes.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define TABLE_ADDRESS 0x600000000000ULL
#ifndef MAP_FIXED_NOREPLACE
#define MAP_FIXED_NOREPLACE 0x100000
#endif

struct entry {
    uint64_t key;        // 0: empty slot
    uint64_t value;
    uint64_t generation; // how often the value was updated
    char name[40];
};

static struct entry *table;
static unsigned bits = 20;

static uint64_t slot_of(uint64_t key) { return (key * 0x9E3779B97F4A7C15ULL) >> (64 - bits); }

static struct entry *find(uint64_t key, int insert) {
    uint64_t mask = (1ULL << bits) - 1;
    for (uint64_t i = slot_of(key);; i = (i + 1) & mask) {
        if (table[i].key == key) return &table[i];
        if (table[i].key == 0) {
            if (!insert) return NULL;
            table[i].key = key;
            return &table[i];
        }
    }
}

int main(int argc, char **argv) {
    uint64_t keys = 200000;
    long rate = 20000;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--keys") && i + 1 < argc) keys = strtoull(argv[++i], NULL, 0);
        else if (!strcmp(argv[i], "--bits") && i + 1 < argc) bits = (unsigned)atoi(argv[++i]);
        else if (!strcmp(argv[i], "--rate") && i + 1 < argc) rate = atol(argv[++i]);
        else {
            fprintf(stderr, "usage: kvstore [--keys N] [--bits B] [--rate N]\n");
            return 2;
        }
    }
    size_t size = sizeof(struct entry) << bits;
    table = mmap((void *)TABLE_ADDRESS, size, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
    if (table == MAP_FAILED) table = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (table == MAP_FAILED) { perror("mmap"); return 1; }
    for (uint64_t k = 1; k <= keys; k++) {
        struct entry *e = find(k, 1);
        e->value = k * k;
        snprintf(e->name, sizeof e->name, "key-%" PRIu64, k);
    }
    printf("kvstore pid %d table 0x%" PRIxPTR " bits %u keys %" PRIu64 "\n", getpid(), (uintptr_t)table, bits, keys);
    fflush(stdout);
    uint64_t x = 88172645463325252ULL;
    struct pollfd in = {.fd = 0, .events = POLLIN};
    for (;;) {
        // A millisecond's worth of updates, then stdin.
        for (long n = 0; n < rate / 1000 + 1; n++) {
            x ^= x << 13; x ^= x >> 7; x ^= x << 17;
            struct entry *e = find(1 + x % keys, 0);
            e->generation++;
            e->value = e->key * e->key + e->generation;
        }
        if (poll(&in, 1, 1) > 0) {
            char line[128];
            if (!fgets(line, sizeof line, stdin)) return 0;
            uint64_t key;
            if (sscanf(line, "get %" SCNu64, &key) == 1) {
                struct entry *e = find(key, 0);
                if (e) printf("%" PRIu64 " %" PRIu64 " %s\n", key, e->value, e->name);
                else printf("%" PRIu64 " missing\n", key);
                fflush(stdout);
            }
        }
    }
}
