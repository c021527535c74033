/*
 * C reference for the wire benchmark: the same transfer as Ferry's encrypted
 * bulk path and nothing else. One thread seals frames (libsodium AEAD, nonce =
 * record counter, AD = the 1-byte record type) and sends them length-prefixed
 * over loopback TCP; another thread receives and opens them. No event loop,
 * no copies beyond the cipher's, no allocation per frame.
 *
 *   cref [--bytes N] [--frame N] [--cipher aes|xchacha|none]
 *
 * Prints one line: "cref <cipher> <bytes> bytes <seconds> s <GB/s> GB/s".
 * Build: cc -O2 -o cref cref.c -lsodium -lpthread
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <sodium.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

enum cipher { C_AES, C_XCHACHA, C_NONE };
static enum cipher cipher = C_AES;
static size_t frame_bytes = 1 << 20;
static uint64_t total_bytes = 1ull << 30;
static unsigned char key[32];

static size_t abytes(void) {
    switch (cipher) {
    case C_AES: return crypto_aead_aes256gcm_abytes();
    case C_XCHACHA: return crypto_aead_xchacha20poly1305_ietf_abytes();
    default: return 0;
    }
}

static void nonce_for(uint64_t n, unsigned char *out, size_t len) {
    memset(out, 0, len);
    for (int i = 0; i < 8; i++) out[i] = (unsigned char)(n >> (8 * i));
}

static int seal(uint64_t n, const unsigned char *ad, const unsigned char *m, size_t mlen, unsigned char *c) {
    unsigned char nonce[24];
    unsigned long long clen;
    switch (cipher) {
    case C_AES:
        nonce_for(n, nonce, crypto_aead_aes256gcm_npubbytes());
        return crypto_aead_aes256gcm_encrypt(c, &clen, m, mlen, ad, 1, NULL, nonce, key);
    case C_XCHACHA:
        nonce_for(n, nonce, crypto_aead_xchacha20poly1305_ietf_npubbytes());
        return crypto_aead_xchacha20poly1305_ietf_encrypt(c, &clen, m, mlen, ad, 1, NULL, nonce, key);
    default:
        memcpy(c, m, mlen);
        return 0;
    }
}

static int open_(uint64_t n, const unsigned char *ad, const unsigned char *c, size_t clen, unsigned char *m) {
    unsigned char nonce[24];
    unsigned long long mlen;
    switch (cipher) {
    case C_AES:
        nonce_for(n, nonce, crypto_aead_aes256gcm_npubbytes());
        return crypto_aead_aes256gcm_decrypt(m, &mlen, NULL, c, clen, ad, 1, nonce, key);
    case C_XCHACHA:
        nonce_for(n, nonce, crypto_aead_xchacha20poly1305_ietf_npubbytes());
        return crypto_aead_xchacha20poly1305_ietf_decrypt(m, &mlen, NULL, c, clen, ad, 1, nonce, key);
    default:
        memcpy(m, c, clen);
        return 0;
    }
}

static int write_all(int fd, const unsigned char *p, size_t n) {
    while (n > 0) {
        ssize_t w = write(fd, p, n);
        if (w <= 0) return -1;
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

static int read_all(int fd, unsigned char *p, size_t n) {
    while (n > 0) {
        ssize_t r = read(fd, p, n);
        if (r <= 0) return -1;
        p += r;
        n -= (size_t)r;
    }
    return 0;
}

struct job { int fd; uint64_t frames; };

static void *sender(void *arg) {
    struct job *j = arg;
    unsigned char *plain = malloc(frame_bytes);
    size_t rec = 1 + frame_bytes + abytes();
    unsigned char *out = malloc(4 + rec);
    memset(plain, 0xA5, frame_bytes);
    for (uint64_t n = 0; n < j->frames; n++) {
        out[0] = (unsigned char)(rec >> 24); out[1] = (unsigned char)(rec >> 16);
        out[2] = (unsigned char)(rec >> 8); out[3] = (unsigned char)rec;
        out[4] = 0x10; /* record type "data", also the AD */
        if (seal(n, out + 4, plain, frame_bytes, out + 5) != 0) { fprintf(stderr, "cref: seal failed\n"); exit(1); }
        if (write_all(j->fd, out, 4 + rec) != 0) { perror("cref: write"); exit(1); }
    }
    free(plain);
    free(out);
    return NULL;
}

static void *receiver(void *arg) {
    struct job *j = arg;
    size_t rec = 1 + frame_bytes + abytes();
    unsigned char *in = malloc(rec);
    unsigned char *plain = malloc(frame_bytes);
    unsigned char hdr[4];
    for (uint64_t n = 0; n < j->frames; n++) {
        if (read_all(j->fd, hdr, 4) != 0) { fprintf(stderr, "cref: short read\n"); exit(1); }
        size_t len = ((size_t)hdr[0] << 24) | ((size_t)hdr[1] << 16) | ((size_t)hdr[2] << 8) | hdr[3];
        if (len != rec) { fprintf(stderr, "cref: bad frame length %zu\n", len); exit(1); }
        if (read_all(j->fd, in, len) != 0) { fprintf(stderr, "cref: short read\n"); exit(1); }
        if (open_(n, in, in + 1, len - 1, plain) != 0) { fprintf(stderr, "cref: open failed\n"); exit(1); }
    }
    free(in);
    free(plain);
    return NULL;
}

int main(int argc, char **argv) {
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--bytes") && i + 1 < argc) total_bytes = strtoull(argv[++i], NULL, 0);
        else if (!strcmp(argv[i], "--frame") && i + 1 < argc) frame_bytes = strtoull(argv[++i], NULL, 0);
        else if (!strcmp(argv[i], "--cipher") && i + 1 < argc) {
            const char *c = argv[++i];
            cipher = !strcmp(c, "aes") ? C_AES : !strcmp(c, "xchacha") ? C_XCHACHA : C_NONE;
        } else { fprintf(stderr, "usage: cref [--bytes N] [--frame N] [--cipher aes|xchacha|none]\n"); return 2; }
    }
    if (sodium_init() < 0) { fprintf(stderr, "cref: sodium_init failed\n"); return 1; }
    if (cipher == C_AES && !crypto_aead_aes256gcm_is_available()) {
        fprintf(stderr, "cref: AES-256-GCM not available on this CPU; use --cipher xchacha\n");
        return 1;
    }
    randombytes_buf(key, sizeof key);

    int ls = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
    socklen_t alen = sizeof a;
    if (bind(ls, (struct sockaddr *)&a, sizeof a) || listen(ls, 1) || getsockname(ls, (struct sockaddr *)&a, &alen)) {
        perror("cref: listen"); return 1;
    }
    int c = socket(AF_INET, SOCK_STREAM, 0);
    if (connect(c, (struct sockaddr *)&a, sizeof a)) { perror("cref: connect"); return 1; }
    int s = accept(ls, NULL, NULL);
    int one = 1;
    setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    setsockopt(s, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);

    uint64_t frames = total_bytes / frame_bytes;
    struct job sj = { c, frames }, rj = { s, frames };
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    pthread_t st, rt;
    pthread_create(&rt, NULL, receiver, &rj);
    pthread_create(&st, NULL, sender, &sj);
    pthread_join(st, NULL);
    pthread_join(rt, NULL);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    double secs = (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) / 1e9;
    double bytes = (double)frames * (double)frame_bytes;
    const char *name = cipher == C_AES ? "aes256gcm" : cipher == C_XCHACHA ? "xchacha20poly1305" : "none";
    printf("cref %s %.0f bytes %.3f s %.3f GB/s\n", name, bytes, secs, bytes / secs / 1e9);
    return 0;
}
