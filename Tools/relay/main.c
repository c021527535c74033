// relay: a TCP relay that can cut its connections on command, for testing
// that a migration survives a dropped link (Ferry's reconnect and resume),
// and can delay every byte, to measure a migration over a long link on one
// host (Tools/bench-migrate's 20 ms RTT case).
//
//   relay --listen PORT --to HOST:PORT [--delay-ms N] [--rate BYTES_PER_SEC]
//
// --delay-ms N holds every chunk it reads for N ms before writing it on, in
// each direction (so the round trip grows by 2N ms). It buffers rather than
// throttles: a propagation delay, not a bandwidth limit. A direction stops
// reading once DELAY_QUEUE_MAX bytes wait in it, so a slow reader still
// pushes back on its sender as TCP would.
//
// --rate R caps each direction at R bytes per second (Tools/bench-compress's
// 100 MB/s link): a chunk falls due when the link has serialized it, after
// the chunks before it, as at a bottleneck router. The queue is then bounded
// by RATE_QUEUE bytes plus what the delay holds, so a sender faster than the
// link sees its socket fill within milliseconds, as it would on a real link.
//
// Prints "relay listening <port>" when ready (port 0 picks one). Commands on
// stdin, one per line:
//   drop      close every relayed connection now (both sides see a reset)
//   refuse N  also refuse the next N incoming connections
//   count     print "connections <accepted> <open>"
//   hold down stop forwarding what the target sends (to the client), in
//             every connection, new ones included: the relay stops reading
//             that socket, so the target's send buffer fills as if the
//             client had stopped reading while keeping its connection
//   hold up   the same for what the client sends (to the target)
//   release   forward both directions again; prints "released"
//   bytes     print "bytes <client-to-target> <target-to-client>" (totals)
//   quit      exit
// Bytes are forwarded unchanged; the relay knows nothing of Ferry's frames,
// so a cut can land anywhere, mid-frame included.
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_PAIRS 64
#define BUFFER (256 * 1024)
// 20 ms of a 3 GB/s link is 60 MB: room for any delay the benchmarks use
// without the relay becoming the bottleneck, yet bounded.
#define DELAY_QUEUE_MAX (64L * 1024 * 1024)
// With --rate: a bottleneck buffer of 4 MiB (40 ms at 100 MB/s).
#define RATE_QUEUE (4L * 1024 * 1024)

// Bytes read from one side and not yet written to the other (delay mode).
struct chunk {
    struct chunk *next;
    uint64_t due_ns; // when it may be written on: read time + delay
    size_t length, sent;
    char data[];
};
struct queue {
    struct chunk *head, *tail;
    long bytes;
    int eof; // the reading side closed: cut the pair once this queue is empty
    uint64_t link_free_ns; // --rate: when the link has serialized every queued chunk
};

// a -> b travels through ab, b -> a through ba (both empty without a delay).
struct pair { int a, b; struct queue ab, ba; };
static struct pair pairs[MAX_PAIRS];
static int pair_count;
static long accepted;
static int refuse_next;
static char buffer[BUFFER];
static int pairs_a_hint = -1; // forward(): reading from this descriptor is client -> target
static uint64_t delay_ns;
// "hold up" / "hold down": the relay reads nothing from that side.
static int hold_up, hold_down;
static uint64_t rate; // bytes per second per direction, 0: unlimited
static long queue_max = DELAY_QUEUE_MAX;
static unsigned long long bytes_ab, bytes_ba; // forwarded, client->target and back

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static void clear(struct queue *q) {
    while (q->head) {
        struct chunk *next = q->head->next;
        free(q->head);
        q->head = next;
    }
    *q = (struct queue){0};
}

static void die(const char *what) {
    fprintf(stderr, "relay: %s: %s\n", what, strerror(errno));
    exit(1);
}

static int connect_upstream(const char *host, const char *port) {
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM}, *list;
    if (getaddrinfo(host, port, &hints, &list) != 0) return -1;
    int fd = -1;
    for (struct addrinfo *ai = list; ai; ai = ai->ai_next) {
        fd = socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC, 0);
        if (fd < 0) continue;
        if (connect(fd, ai->ai_addr, ai->ai_addrlen) == 0) break;
        close(fd);
        fd = -1;
    }
    freeaddrinfo(list);
    if (fd >= 0) {
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    }
    return fd;
}

static void cut(int i) {
    // SO_LINGER 0 makes close send a reset: the peers see the link die.
    struct linger hard = {.l_onoff = 1, .l_linger = 0};
    setsockopt(pairs[i].a, SOL_SOCKET, SO_LINGER, &hard, sizeof hard);
    setsockopt(pairs[i].b, SOL_SOCKET, SO_LINGER, &hard, sizeof hard);
    close(pairs[i].a);
    close(pairs[i].b);
    clear(&pairs[i].ab);
    clear(&pairs[i].ba);
    pairs[i] = pairs[--pair_count];
}

static int forward(int from, int to) {
    ssize_t n = read(from, buffer, sizeof buffer);
    if (n <= 0) return -1;
    if (from == pairs_a_hint) bytes_ab += (unsigned long long)n; else bytes_ba += (unsigned long long)n;
    for (ssize_t done = 0; done < n;) {
        ssize_t w = write(to, buffer + done, n - done);
        if (w < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        done += w;
    }
    return 0;
}

// Delay mode: reads what `from` has into a chunk due delay_ns from now.
static int enqueue(int from, struct queue *q) {
    ssize_t n = read(from, buffer, sizeof buffer);
    if (n < 0 && (errno == EAGAIN || errno == EINTR)) return 0;
    if (n <= 0) {
        q->eof = 1;
        return 0;
    }
    struct chunk *c = malloc(sizeof *c + (size_t)n);
    if (!c) return -1;
    uint64_t due = now_ns() + delay_ns;
    if (rate) {
        // Serialized after what the link already carries, at `rate`.
        if (q->link_free_ns > due) due = q->link_free_ns;
        due += (uint64_t)n * 1000000000ULL / rate;
        q->link_free_ns = due;
    }
    *c = (struct chunk){.due_ns = due, .length = (size_t)n};
    memcpy(c->data, buffer, (size_t)n);
    if (q->tail) q->tail->next = c;
    else q->head = c;
    q->tail = c;
    q->bytes += n;
    return 0;
}

// Delay mode: writes the chunks that are due to `to`, as much as it takes
// without blocking. -1 when `to` failed.
static int flush(struct queue *q, int to, uint64_t now) {
    while (q->head && q->head->due_ns <= now) {
        struct chunk *c = q->head;
        ssize_t w = write(to, c->data + c->sent, c->length - c->sent);
        if (w < 0) return errno == EAGAIN || errno == EINTR ? 0 : -1;
        c->sent += (size_t)w;
        q->bytes -= w;
        if (c->sent < c->length) return 0;
        q->head = c->next;
        if (!q->head) q->tail = NULL;
        free(c);
    }
    return 0;
}

// Delay mode: poll events for the socket that reads into `in` and writes out of `out`.
static short wanted(const struct queue *in, const struct queue *out, uint64_t now, int held) {
    short events = 0;
    if (!held && !in->eof && in->bytes < queue_max) events |= POLLIN;
    if (out->head && out->head->due_ns <= now) events |= POLLOUT;
    return events;
}

// Delay mode: milliseconds until the next queued chunk falls due (-1: none).
// Chunks already due wait for POLLOUT instead: counting them would spin.
static int next_due_ms(uint64_t now) {
    uint64_t soonest = UINT64_MAX;
    for (int i = 0; i < pair_count; i++) {
        const struct chunk *heads[2] = {pairs[i].ab.head, pairs[i].ba.head};
        for (int k = 0; k < 2; k++)
            if (heads[k] && heads[k]->due_ns > now && heads[k]->due_ns < soonest) soonest = heads[k]->due_ns;
    }
    if (soonest == UINT64_MAX) return -1;
    // Round up: waking early only spins.
    return (int)((soonest - now + 999999) / 1000000);
}

int main(int argc, char **argv) {
    const char *listen_port = NULL, *to = NULL;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--listen") && i + 1 < argc) listen_port = argv[++i];
        else if (!strcmp(argv[i], "--to") && i + 1 < argc) to = argv[++i];
        else if (!strcmp(argv[i], "--delay-ms") && i + 1 < argc) {
            char *end;
            long ms = strtol(argv[++i], &end, 10);
            if (*end || ms < 0 || ms > 10000) {
                fprintf(stderr, "relay: --delay-ms takes 0 to 10000 milliseconds, got %s\n", argv[i]);
                return 2;
            }
            delay_ns = (uint64_t)ms * 1000000ULL;
        } else if (!strcmp(argv[i], "--rate") && i + 1 < argc) {
            char *end;
            long long r = strtoll(argv[++i], &end, 10);
            if (*end || r < 1024 || r > 100000000000LL) {
                fprintf(stderr, "relay: --rate takes 1024 to 10^11 bytes per second, got %s\n", argv[i]);
                return 2;
            }
            rate = (uint64_t)r;
        } else if (!strcmp(argv[i], "--help")) {
            puts("usage: relay --listen PORT --to HOST:PORT [--delay-ms N] [--rate BYTES_PER_SEC]   (stdin: drop | refuse N | hold up|down | release | count | bytes | quit)");
            return 0;
        } else {
            fprintf(stderr, "relay: unknown argument %s (try --help)\n", argv[i]);
            return 2;
        }
    }
    if (!listen_port || !to) {
        fprintf(stderr, "relay: --listen PORT and --to HOST:PORT are required\n");
        return 2;
    }
    char host[256];
    const char *colon = strrchr(to, ':');
    if (!colon || colon == to || (size_t)(colon - to) >= sizeof host) {
        fprintf(stderr, "relay: --to takes HOST:PORT, got %s\n", to);
        return 2;
    }
    memcpy(host, to, colon - to);
    host[colon - to] = 0;
    const char *port = colon + 1;
    signal(SIGPIPE, SIG_IGN);
    if (rate) queue_max = RATE_QUEUE + (long)(rate * (delay_ns / 1000000ULL) / 1000);
    const int paced = delay_ns || rate; // chunks queue and fall due (delay and/or rate)

    int server = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (server < 0) die("socket");
    int one = 1;
    setsockopt(server, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in address = {.sin_family = AF_INET, .sin_port = htons(atoi(listen_port)),
                                  .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    if (bind(server, (struct sockaddr *)&address, sizeof address) < 0) die("bind");
    if (listen(server, 16) < 0) die("listen");
    socklen_t length = sizeof address;
    getsockname(server, (struct sockaddr *)&address, &length);
    printf("relay listening %d\n", ntohs(address.sin_port));
    fflush(stdout);

    char line[128];
    size_t line_length = 0;
    for (;;) {
        struct pollfd fds[2 + 2 * MAX_PAIRS];
        int n = 0;
        fds[n++] = (struct pollfd){.fd = 0, .events = POLLIN};
        fds[n++] = (struct pollfd){.fd = server, .events = POLLIN};
        uint64_t now = now_ns();
        for (int i = 0; i < pair_count; i++) {
            struct pair *p = &pairs[i];
            fds[n++] = (struct pollfd){.fd = p->a, .events = paced ? wanted(&p->ab, &p->ba, now, hold_up)
                                                                   : hold_up ? 0 : POLLIN};
            fds[n++] = (struct pollfd){.fd = p->b, .events = paced ? wanted(&p->ba, &p->ab, now, hold_down)
                                                                   : hold_down ? 0 : POLLIN};
        }
        if (poll(fds, n, paced ? next_due_ms(now) : -1) < 0) {
            if (errno == EINTR) continue;
            die("poll");
        }
        // The pairs this poll watched. A drop below closes them, and a
        // connection accepted next may get one of their descriptor numbers:
        // their poll results must then not be applied to it (a read of a
        // quiet socket would block the relay for good).
        int polled = pair_count;
        if (fds[0].revents) {
            ssize_t r = read(0, line + line_length, sizeof line - 1 - line_length);
            if (r <= 0) return 0;
            line_length += r;
            char *newline;
            while ((newline = memchr(line, '\n', line_length))) {
                *newline = 0;
                if (!strcmp(line, "drop")) {
                    while (pair_count) cut(0);
                    polled = 0;
                    puts("dropped");
                } else if (!strncmp(line, "refuse ", 7)) {
                    refuse_next = atoi(line + 7);
                    puts("refusing");
                } else if (!strcmp(line, "hold down")) {
                    hold_down = 1;
                    puts("holding down");
                } else if (!strcmp(line, "hold up")) {
                    hold_up = 1;
                    puts("holding up");
                } else if (!strcmp(line, "release")) {
                    hold_up = hold_down = 0;
                    puts("released");
                } else if (!strcmp(line, "count")) {
                    printf("connections %ld %d\n", accepted, pair_count);
                } else if (!strcmp(line, "bytes")) {
                    printf("bytes %llu %llu\n", bytes_ab, bytes_ba);
                } else if (!strcmp(line, "quit")) {
                    return 0;
                }
                fflush(stdout);
                size_t used = newline + 1 - line;
                memmove(line, newline + 1, line_length - used);
                line_length -= used;
            }
            if (line_length == sizeof line - 1) line_length = 0;
        }
        if (fds[1].revents & POLLIN) {
            int client = accept4(server, NULL, NULL, SOCK_CLOEXEC);
            if (client >= 0) {
                int upstream = -1;
                if (refuse_next > 0) {
                    refuse_next--;
                } else if (pair_count < MAX_PAIRS) {
                    upstream = connect_upstream(host, port);
                    // Said, so that a client closed at once (it sees a clean
                    // end of stream) can be told from one the target closed.
                    if (upstream < 0) fprintf(stderr, "relay: cannot connect to %s:%s (%s); closing the client\n", host, port, strerror(errno));
                } else {
                    fprintf(stderr, "relay: %d connections relayed already; closing the client\n", MAX_PAIRS);
                }
                if (upstream < 0) {
                    close(client);
                } else {
                    setsockopt(client, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                    if (paced) {
                        // Delayed chunks are written when due, never waiting on a full socket.
                        fcntl(client, F_SETFL, fcntl(client, F_GETFL) | O_NONBLOCK);
                        fcntl(upstream, F_SETFL, fcntl(upstream, F_GETFL) | O_NONBLOCK);
                    }
                    pairs[pair_count++] = (struct pair){.a = client, .b = upstream};
                    accepted++;
                }
            }
        }
        // Walk backwards: cut() moves the last pair into the freed slot.
        // A pair accepted in this round sits past `polled`: not watched yet.
        for (int i = (polled < pair_count ? polled : pair_count) - 1; i >= 0; i--) {
            struct pollfd *a = &fds[2 + 2 * i], *b = &fds[3 + 2 * i];
            if (a->fd != pairs[i].a) continue;
            // A held side is not read (events 0 still report an error or a
            // hang-up, and reading would forward held bytes): a side that
            // fails while held ends its pair, rather than wake poll forever.
            if ((hold_up && (a->revents & (POLLERR | POLLHUP))) || (hold_down && (b->revents & (POLLERR | POLLHUP)))) {
                cut(i);
                continue;
            }
            if (hold_up) a->revents &= POLLOUT;
            if (hold_down) b->revents &= POLLOUT;
            if (paced) {
                struct pair *p = &pairs[i];
                int failed = 0;
                long ab0 = p->ab.bytes, ba0 = p->ba.bytes;
                if ((a->revents & ~POLLOUT) && enqueue(p->a, &p->ab) < 0) failed = 1;
                if (!failed && (b->revents & ~POLLOUT) && enqueue(p->b, &p->ba) < 0) failed = 1;
                if (p->ab.bytes > ab0) bytes_ab += (unsigned long long)(p->ab.bytes - ab0);
                if (p->ba.bytes > ba0) bytes_ba += (unsigned long long)(p->ba.bytes - ba0);
                uint64_t after = now_ns();
                if (!failed && flush(&p->ab, p->b, after) < 0) failed = 1;
                if (!failed && flush(&p->ba, p->a, after) < 0) failed = 1;
                // A side that closed ends the pair once what it sent has been delivered.
                if (failed || (p->ab.eof && !p->ab.head) || (p->ba.eof && !p->ba.head)) cut(i);
                continue;
            }
            int failed = 0;
            pairs_a_hint = pairs[i].a;
            if (a->revents && forward(pairs[i].a, pairs[i].b) < 0) failed = 1;
            if (!failed && b->revents && forward(pairs[i].b, pairs[i].a) < 0) failed = 1;
            if (failed) cut(i);
        }
    }
}
