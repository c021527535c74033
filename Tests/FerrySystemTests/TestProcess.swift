// Child processes for the system tests: started with posix_spawn (never
// Foundation.Process, whose SIGCHLD reaping would steal the ptrace stops of a
// child we trace), spoken to line by line over pipes, killed and reaped once.
//
// `TestProcess.child()` starts a small C program compiled on first use (the
// source is below), whose commands write memory in ways the tests can
// predict. `TestProcess(executable:arguments:)` starts anything else.
import Testing
import FerryTestSupport
import Glibc
@testable import FerrySystem

/// A test child misbehaved (named apart from MemwriterTests' TestFailure).
struct ChildFailure: Error, CustomStringConvertible {
    var description: String
    init(_ description: String) { self.description = description }
}

/// A running child speaking the test child's `ok ...` protocol.
/// Not Sendable: one test owns it.
final class TestProcess {
    let child: ChildProcess
    var pid: Int32 { child.pid }

    /// Starts `executable` with its stdin and stdout connected to us.
    init(executable: String, arguments: [String] = []) throws {
        child = try ChildProcess(executable, arguments)
    }

    /// Kills the child (SIGKILL) and reaps it, once.
    func kill() { child.stop() }

    func send(_ command: String) { child.send(command) }

    /// The next line from the child, waiting at most `timeout` seconds.
    func readLine(timeout: Double = 10) throws -> String { try child.readLine(timeout: timeout) }

    /// Sends `command` and returns the fields of its `ok ...` reply.
    @discardableResult
    func call(_ command: String, timeout: Double = 10) throws -> [Substring] {
        send(command)
        let line = try readLine(timeout: timeout)
        let fields = line.split(separator: " ")
        guard fields.first == "ok" else { throw ChildFailure("child \(pid) answered \"\(line)\" to \"\(command)\"") }
        return Array(fields.dropFirst())
    }

    /// The process state letter from /proc/PID/stat (R, S, T, t, Z...).
    var state: Character? { child.state }

    /// True while the child has not exited (it may be stopped).
    var isAlive: Bool { child.isAlive }
}

// MARK: - The C test child

/// The test child: its memory and what it was told to write.
final class TestChild {
    let process: TestProcess
    var pid: Int32 { process.pid }
    /// The test region: `pages` pages, the first half touched at start, the second never.
    let base: UInt64
    let pages: Int
    /// Address of the spinner counters (one UInt64 per thread, 64 max).
    let counters: UInt64

    /// `huge`: the region asks for transparent huge pages (MADV_HUGEPAGE) and is 2 MiB aligned.
    init(pages: Int = 1024, huge: Bool = false) throws {
        process = try TestProcess(executable: try TestChild.executable(), arguments: [String(pages)] + (huge ? ["huge"] : []))
        let fields = try process.readLine().split(separator: " ")
        guard fields.count == 5, fields[0] == "ready", Int32(fields[1]) == process.pid,
              let base = UInt64(fields[2], radix: 16), let counters = UInt64(fields[4], radix: 16) else {
            throw ChildFailure("unexpected start-up line from the test child: \(fields)")
        }
        self.base = base
        self.pages = Int(fields[3])!
        self.counters = counters
    }

    var region: AddressRange { AddressRange(start: base, end: base + UInt64(pages) * pageSize) }
    func page(_ index: Int) -> AddressRange {
        AddressRange(start: base + UInt64(index) * pageSize, end: base + UInt64(index + 1) * pageSize)
    }

    /// Writes `count` random pages of the region from `threads` threads; returns their indices.
    func writeRandom(seed: UInt64, count: Int, threads: Int) throws -> Set<Int> {
        let fields = try process.call("w \(seed) \(count) \(threads)")
        return Set(fields.compactMap { Int($0) })
    }

    /// Stores `value` in the first word of page `index`.
    func set(_ index: Int, _ value: UInt64) throws { try process.call("set \(index) \(value)") }

    /// The child's own view of page `index`'s first word.
    func get(_ index: Int) throws -> UInt64 { UInt64(try process.call("get \(index)")[0])! }

    /// The source, compiled once per test run into a private temporary
    /// directory, which is removed when the test process exits.
    private static let compiled: Result<String, ChildFailure> = {
        var template = Array("/tmp/ferry-testchild-XXXXXX".utf8CString)
        guard let dir = template.withUnsafeMutableBufferPointer({ mkdtemp($0.baseAddress!) }) else {
            return .failure(ChildFailure("mkdtemp failed"))
        }
        let directory = String(cString: dir)
        let source = directory + "/child.c"
        let binary = directory + "/child"
        testChildDirectory = strdup(directory)
        atexit {
            guard let directory = testChildDirectory else { return }
            let path = String(cString: directory)
            unlink(path + "/child.c")
            unlink(path + "/child")
            rmdir(path)
        }
        guard let file = fopen(source, "w") else { return .failure(ChildFailure("cannot write \(source)")) }
        fputs(childSource, file)
        fclose(file)
        let compiler = access("/usr/bin/cc", X_OK) == 0 ? "/usr/bin/cc" : "/opt/swift/usr/bin/clang"
        guard let cc = try? TestProcess(executable: compiler, arguments: ["-O1", "-pthread", "-o", binary, source]) else {
            return .failure(ChildFailure("cannot run \(compiler)"))
        }
        var status: Int32 = 0
        waitpid(cc.pid, &status, 0)
        guard access(binary, X_OK) == 0 else { return .failure(ChildFailure("compiling the test child failed (status \(status))")) }
        return .success(binary)
    }()

    static func executable() throws -> String { try compiled.get() }
}

/// The compiled test child's directory, for the exit handler (C string: set once, before any reader).
nonisolated(unsafe) private var testChildDirectory: UnsafeMutablePointer<CChar>? = nil

private let childSource = #"""
#define _GNU_SOURCE
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096UL
static uint8_t *base;
static unsigned long pages;
static _Atomic uint64_t counters[64];
static atomic_int spinning;
static pthread_t spinners[64];
static int spinner_count;

struct job { uint64_t seed; unsigned long count; unsigned long *out; };

static uint64_t next(uint64_t *s) { uint64_t x = *s; x ^= x << 13; x ^= x >> 7; x ^= x << 17; return *s = x; }

static void *writer(void *arg) {
    struct job *j = arg;
    uint64_t s = j->seed * 0x9E3779B97F4A7C15ULL + 1;
    for (unsigned long i = 0; i < j->count; i++) {
        unsigned long p = next(&s) % pages;
        unsigned long offset = (next(&s) % (PAGE / 8)) * 8;
        *(volatile uint64_t *)(base + p * PAGE + offset) = s;
        j->out[i] = p;
    }
    return NULL;
}

static atomic_ulong signals;
static void on_signal(int sig) { (void)sig; atomic_fetch_add(&signals, 1); }

static atomic_int churning;
static pthread_t churner;
static void *churn_one(void *arg) { (void)arg; atomic_fetch_add(&counters[63], 1); return NULL; }
static void *churn(void *arg) {
    (void)arg;
    while (atomic_load(&churning)) {
        pthread_t t;
        if (pthread_create(&t, NULL, churn_one, NULL) == 0) pthread_detach(t);
    }
    return NULL;
}

static void *spinner(void *arg) {
    long index = (long)arg;
    while (atomic_load(&spinning)) atomic_fetch_add_explicit(&counters[index], 1, memory_order_relaxed);
    return NULL;
}

int main(int argc, char **argv) {
    pages = argc > 1 ? strtoul(argv[1], NULL, 10) : 1024;
    int huge = argc > 2 && !strcmp(argv[2], "huge");
    size_t slack = huge ? (2UL << 20) : 0;
    base = mmap(NULL, pages * PAGE + slack, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base == MAP_FAILED) return 1;
    if (huge) base = (uint8_t *)(((uintptr_t)base + slack - 1) & ~(slack - 1));
    madvise(base, pages * PAGE, huge ? MADV_HUGEPAGE : MADV_NOHUGEPAGE);
    for (unsigned long p = 0; p < pages / 2; p++) base[p * PAGE] = 1;
    setvbuf(stdout, NULL, _IOLBF, 0);
    printf("ready %d %lx %lu %lx\n", getpid(), (unsigned long)base, pages, (unsigned long)counters);
    char line[256];
    while (fgets(line, sizeof line, stdin)) {
        char cmd[16] = {0};
        unsigned long a = 0, b = 0, c = 0;
        sscanf(line, "%15s %lu %lu %lu", cmd, &a, &b, &c);
        if (!strcmp(cmd, "w")) {
            unsigned long threads = c ? c : 1, per = b / threads;
            pthread_t t[64]; struct job jobs[64];
            unsigned long *out = calloc(per * threads + 1, sizeof *out);
            for (unsigned long i = 0; i < threads; i++) {
                jobs[i] = (struct job){ a * 64 + i, per, out + i * per };
                pthread_create(&t[i], NULL, writer, &jobs[i]);
            }
            for (unsigned long i = 0; i < threads; i++) pthread_join(t[i], NULL);
            printf("ok");
            for (unsigned long i = 0; i < per * threads; i++) printf(" %lu", out[i]);
            printf("\n");
            free(out);
        } else if (!strcmp(cmd, "set")) {
            *(volatile uint64_t *)(base + a * PAGE) = b;
            printf("ok\n");
        } else if (!strcmp(cmd, "get")) {
            printf("ok %lu\n", (unsigned long)*(volatile uint64_t *)(base + a * PAGE));
        } else if (!strcmp(cmd, "race")) {
            /* race PAGE N: write 1..N to the first word of PAGE, then answer */
            for (uint64_t v = 1; v <= b; v++) {
                *(volatile uint64_t *)(base + a * PAGE) = v;
                for (volatile int spin = 0; spin < 200; spin++) {}
            }
            printf("ok %lu\n", b);
        } else if (!strcmp(cmd, "spin")) {
            atomic_store(&spinning, 1);
            spinner_count = (int)a;
            for (long i = 0; i < spinner_count; i++) pthread_create(&spinners[i], NULL, spinner, (void *)i);
            printf("ok\n");
        } else if (!strcmp(cmd, "unspin")) {
            atomic_store(&spinning, 0);
            for (int i = 0; i < spinner_count; i++) pthread_join(spinners[i], NULL);
            spinner_count = 0;
            printf("ok\n");
        } else if (!strcmp(cmd, "mmap")) {
            /* mmap N [shared]: a new region of N pages, every page written */
            int shared = (int)b;
            uint8_t *m = mmap(NULL, a * PAGE, PROT_READ | PROT_WRITE, (shared ? MAP_SHARED : MAP_PRIVATE) | MAP_ANONYMOUS, -1, 0);
            for (unsigned long p = 0; p < a; p++) m[p * PAGE] = 7;
            printf("ok %lx\n", (unsigned long)m);
        } else if (!strcmp(cmd, "mmapat")) {
            /* mmapat ADDR N: a new private region of N pages at ADDR (never over another), every page written */
            uint8_t *m = mmap((void *)a, b * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | 0x100000 /* MAP_FIXED_NOREPLACE */, -1, 0);
            if (m == MAP_FAILED) { printf("err mmapat\n"); continue; }
            for (unsigned long p = 0; p < b; p++) m[p * PAGE] = 7;
            printf("ok %lx\n", (unsigned long)m);
        } else if (!strcmp(cmd, "wat")) {
            /* wat ADDR VALUE: store VALUE at ADDR */
            *(volatile uint64_t *)a = b;
            printf("ok\n");
        } else if (!strcmp(cmd, "munmap")) {
            munmap((void *)a, b * PAGE);
            printf("ok\n");
        } else if (!strcmp(cmd, "zap")) {
            /* zap PAGE N: MADV_DONTNEED pages PAGE..PAGE+N-1 */
            madvise(base + a * PAGE, b * PAGE, MADV_DONTNEED);
            printf("ok\n");
        } else if (!strcmp(cmd, "grow")) {
            /* grow N: the heap grows by N pages, every new page written */
            uint8_t *old = sbrk(0);
            if (sbrk(a * PAGE) == (void *)-1) { printf("err sbrk\n"); continue; }
            for (unsigned long p = 0; p < a; p++) old[p * PAGE] = 9;
            printf("ok %lx\n", (unsigned long)old);
        } else if (!strcmp(cmd, "fill")) {
            for (unsigned long p = 0; p < pages; p++) *(volatile uint64_t *)(base + p * PAGE) = p + 1;
            printf("ok\n");
        } else if (!strcmp(cmd, "time")) {
            /* time N: write the first word of pages 0..N-1 once; answer the nanoseconds taken */
            struct timespec t0, t1;
            clock_gettime(CLOCK_MONOTONIC, &t0);
            for (unsigned long p = 0; p < a && p < pages; p++) *(volatile uint64_t *)(base + p * PAGE) += 1;
            clock_gettime(CLOCK_MONOTONIC, &t1);
            printf("ok %ld\n", (long)((t1.tv_sec - t0.tv_sec) * 1000000000L + (t1.tv_nsec - t0.tv_nsec)));
        } else if (!strcmp(cmd, "sig")) {
            struct sigaction action = {0};
            action.sa_handler = on_signal;
            action.sa_flags = SA_RESTART;
            sigaction(SIGRTMIN, &action, NULL);
            printf("ok\n");
        } else if (!strcmp(cmd, "sigcount")) {
            printf("ok %lu\n", (unsigned long)atomic_load(&signals));
        } else if (!strcmp(cmd, "churn")) {
            atomic_store(&churning, 1);
            pthread_create(&churner, NULL, churn, NULL);
            printf("ok\n");
        } else if (!strcmp(cmd, "unchurn")) {
            atomic_store(&churning, 0);
            pthread_join(churner, NULL);
            printf("ok\n");
        } else if (!strcmp(cmd, "kread")) {
            /* kread PAGE: the kernel writes into PAGE (read(2) from /dev/urandom) */
            int fd = open("/dev/urandom", O_RDONLY);
            ssize_t n = read(fd, base + a * PAGE, 64);
            close(fd);
            printf(n == 64 ? "ok\n" : "err read\n");
        } else if (!strcmp(cmd, "exit")) {
            printf("ok\n");
            return 0;
        } else {
            printf("err unknown %s\n", cmd);
        }
    }
    return 0;
}
"""#
