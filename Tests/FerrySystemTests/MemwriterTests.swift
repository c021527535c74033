// The memwriter workload (Tools/memwriter) as tests and other suites use it:
// a real child process with pipes on stdin/stdout, spoken to line by line.
import Testing
import Glibc
@testable import FerrySystem

/// A running memwriter child. Killed and reaped in `stop()` or deinit.
/// Not Sendable: one test owns it.
final class Memwriter {
    let pid: Int32
    /// `region <name> 0x<start> 0x<end>` lines, by name.
    private(set) var regions: [String: AddressRange] = [:]
    private let input: Int32
    private let output: Int32
    private var pending: [UInt8] = []
    private var reaped = false

    /// The memwriter executable beside the test bundle (the build directory),
    /// or FERRY_MEMWRITER when set.
    static var executable: String {
        if let path = getenv("FERRY_MEMWRITER") { return String(cString: path) }
        var buffer = [CChar](repeating: 0, count: 4096)
        let n = readlink("/proc/self/exe", &buffer, buffer.count - 1)
        var directory = n > 0 ? String(decoding: buffer[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self) : "."
        // The test binary is <build>/<Package>PackageTests.xctest; on some
        // layouts it sits inside a bundle directory: walk up to find memwriter.
        for _ in 0..<4 {
            if let slash = directory.lastIndex(of: "/") { directory = String(directory[..<slash]) }
            if access(directory + "/memwriter", X_OK) == 0 { return directory + "/memwriter" }
        }
        return "memwriter"
    }

    static var patternKeyBase: UInt64 { 0x9E37_79B9_7F4A_7C15 }
    static func patternKey(seed: UInt64) -> UInt64 { patternKeyBase &* (seed &+ 1) }

    /// Starts memwriter with `arguments` and reads its start-up block up to `pid N ready`.
    init(_ arguments: [String]) throws {
        var toChild: [Int32] = [0, 0]
        var fromChild: [Int32] = [0, 0]
        guard pipe(&toChild) == 0, pipe(&fromChild) == 0 else { throw TestFailure("pipe: \(errno)") }
        for fd in toChild + fromChild { _ = fcntl(fd, F_SETFD, FD_CLOEXEC) }
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_adddup2(&actions, toChild[0], 0)
        posix_spawn_file_actions_adddup2(&actions, fromChild[1], 1)
        let path = Memwriter.executable
        let argv = ([path] + arguments).map { strdup($0) } + [nil]
        defer { argv.forEach { free($0) } }
        // Test threads may block signals; the child must start with none
        // blocked and default dispositions so SIGTERM and SIGKILL behave.
        var attributes = posix_spawnattr_t()
        posix_spawnattr_init(&attributes)
        defer { posix_spawnattr_destroy(&attributes) }
        var empty = sigset_t()
        sigemptyset(&empty)
        var defaults = sigset_t()
        sigemptyset(&defaults)
        for signal in [SIGTERM, SIGINT, SIGPIPE, SIGUSR1] { sigaddset(&defaults, signal) }
        posix_spawnattr_setsigmask(&attributes, &empty)
        posix_spawnattr_setsigdefault(&attributes, &defaults)
        posix_spawnattr_setflags(&attributes, Int16(POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF))
        var child: pid_t = 0
        let rc = posix_spawn(&child, path, &actions, &attributes, argv, environ)
        close(toChild[0])
        close(fromChild[1])
        guard rc == 0 else {
            close(toChild[1]); close(fromChild[0])
            throw TestFailure("cannot start \(path): \(String(cString: strerror(rc))) (build the memwriter product first)")
        }
        pid = child
        input = toChild[1]
        output = fromChild[0]
        while true {
            let line = try readLine()
            let fields = line.split(separator: " ")
            if fields.count == 4, fields[0] == "region",
               let start = UInt64(fields[2].dropFirst(2), radix: 16), let end = UInt64(fields[3].dropFirst(2), radix: 16) {
                regions[String(fields[1])] = AddressRange(start: start, end: end)
            } else if fields.count == 3, fields[0] == "pid", fields[2] == "ready" {
                guard Int32(fields[1]) == pid else { throw TestFailure("memwriter said \(line), expected pid \(pid)") }
                break
            } else {
                throw TestFailure("unexpected memwriter line: \(line)")
            }
        }
    }

    deinit { stop() }

    func send(_ command: String) {
        let text = command + "\n"
        _ = text.withCString { write(input, $0, strlen($0)) }
    }

    /// The next stdout line, waiting at most `timeout` seconds.
    func readLine(timeout: Double = 20) throws -> String {
        let deadline = Self.now() + timeout
        while true {
            if let newline = pending.firstIndex(of: UInt8(ascii: "\n")) {
                let line = String(decoding: pending[..<newline], as: UTF8.self)
                pending.removeSubrange(...newline)
                return line
            }
            let left = deadline - Self.now()
            guard left > 0 else { throw TestFailure("memwriter \(pid) said nothing for \(timeout) s") }
            var pfd = pollfd(fd: output, events: Int16(POLLIN), revents: 0)
            let ready = poll(&pfd, 1, Int32(left * 1000) + 1)
            if ready < 0 && errno == EINTR { continue }
            if ready <= 0 { continue }
            var chunk = [UInt8](repeating: 0, count: 4096)
            let n = read(output, &chunk, chunk.count)
            if n <= 0 { throw TestFailure("memwriter \(pid) closed its output") }
            pending.append(contentsOf: chunk[0..<n])
        }
    }

    /// Reads lines until one starts with `prefix` and returns it.
    func expect(_ prefix: String, timeout: Double = 20) throws -> String {
        while true {
            let line = try readLine(timeout: timeout)
            if line.hasPrefix(prefix) { return line }
        }
    }

    /// Sends SIGTERM and returns the wait status, or nil when the child
    /// did not exit within 5 s (it is then killed).
    func terminate() -> Int32? {
        guard !reaped else { return nil }
        kill(pid, SIGTERM)
        var status: Int32 = 0
        for _ in 0..<500 {
            if waitpid(pid, &status, WNOHANG) == pid {
                reaped = true
                close(input); close(output)
                return status
            }
            usleep(10_000)
        }
        stop()
        return nil
    }

    func stop() {
        guard !reaped else { return }
        kill(pid, SIGKILL)
        var status: Int32 = 0
        waitpid(pid, &status, 0)
        reaped = true
        close(input); close(output)
    }

    static func now() -> Double {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
    }
}

struct TestFailure: Error, CustomStringConvertible {
    var description: String
    init(_ description: String) { self.description = description }
}

/// An executable built beside memwriter (seeder, leecher, hub).
func builtExecutable(_ name: String) -> String {
    let memwriter = Memwriter.executable
    guard let slash = memwriter.lastIndex(of: "/") else { return name }
    return String(memwriter[..<slash]) + "/" + name
}

/// Runs memwriter to completion with `arguments`, returning (status, stdout, stderr).
func runMemwriter(_ arguments: [String]) throws -> (Int32, String, String) {
    try runTool(Memwriter.executable, arguments)
}

/// Runs `path` to completion with `arguments`, returning (exit status, stdout, stderr).
func runTool(_ path: String, _ arguments: [String]) throws -> (Int32, String, String) {
    let out = "/tmp/ferry-tool-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
    let command = ([path] + arguments).map { "'\($0)'" }.joined(separator: " ")
    let status = system("\(command) >\(out).1 2>\(out).2 </dev/null")
    defer { unlink(out + ".1"); unlink(out + ".2") }
    func slurp(_ path: String) -> String {
        guard let f = fopen(path, "r") else { return "" }
        defer { fclose(f) }
        var bytes: [UInt8] = []
        var c = fgetc(f)
        while c != EOF { bytes.append(UInt8(c)); c = fgetc(f) }
        return String(decoding: bytes, as: UTF8.self)
    }
    return ((status >> 8) & 0xff, slurp(out + ".1"), slurp(out + ".2"))
}

@Suite struct MemwriterTests {
    @Test func helpDescribesOptionsAndProtocol() throws {
        let (status, out, _) = try runMemwriter(["--help"])
        #expect(status == 0)
        for word in ["--mib", "--threads", "--rate", "--churn", "--heap-grow", "--zap", "--shared", "--memfd",
                     "--seed", "--pattern", "--stop-after", "--wait", "ready"] {
            #expect(out.contains(word), "help lacks \(word)")
        }
    }

    @Test func badOptionsFailWithAMessage() throws {
        let (status, _, err) = try runMemwriter(["--bogus"])
        #expect(status == 2)
        #expect(err.contains("unknown option '--bogus'"))
        let (status2, _, err2) = try runMemwriter(["--mib", "lots"])
        #expect(status2 == 2)
        #expect(err2.contains("--mib: 'lots' is not a non-negative number"))
    }

    @Test func announcesRegionsAndWritesCheckableValues() throws {
        let seed: UInt64 = 7
        let writer = try Memwriter(["--mib", "2", "--shared", "1", "--threads", "2", "--stop-after", "300",
                                    "--pattern", "--seed", "\(seed)", "--wait"])
        defer { writer.stop() }
        let main = try #require(writer.regions["main"])
        let shared = try #require(writer.regions["shared"])
        #expect(main.length == 2 << 20)
        #expect(shared.length == 1 << 20)
        writer.send("go")
        #expect(try writer.expect("done") == "done 600")

        let reader = try PageReader(pid: writer.pid)
        let ranges = [main, shared]
        let total = Int(main.length + shared.length)
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: total, alignment: 4096)
        defer { buffer.deallocate() }
        #expect(try reader.read(ranges, into: buffer) == total)

        let key = Memwriter.patternKey(seed: seed)
        var written = 0
        for page in 0..<(total / 4096) {
            // Offsets restart at 0 in each region for the pattern.
            let regionOffset = page < Int(main.pageCount) ? page * 4096 : (page - Int(main.pageCount)) * 4096
            let word1 = buffer.load(fromByteOffset: page * 4096 + 8, as: UInt64.self)
            var firstWord = 2
            if word1 == UInt64(page) | 1 << 63 {
                written += 1
                let word0 = buffer.load(fromByteOffset: page * 4096, as: UInt64.self)
                #expect(word0 >> 48 < 2, "thread id of page \(page)")
                #expect(word0 & 0xffff_ffff_ffff >= 1 && word0 & 0xffff_ffff_ffff <= 300)
            } else {
                firstWord = 0
            }
            for word in firstWord..<512 {
                let value = buffer.load(fromByteOffset: page * 4096 + word * 8, as: UInt64.self)
                if value != UInt64(regionOffset + word * 8) ^ key {
                    Issue.record("page \(page) word \(word) = \(value), not the pattern")
                    return
                }
            }
        }
        #expect(written > 0 && written <= 600)
    }

    @Test func sweepAndCountAnswer() throws {
        let writer = try Memwriter(["--mib", "1", "--no-write"])
        defer { writer.stop() }
        writer.send("sweep")
        let sweep = try writer.expect("sweep").split(separator: " ")
        #expect(sweep.count == 3 && sweep[1] == "256")
        #expect((UInt64(sweep[2]) ?? 0) > 0)
        writer.send("count")
        #expect(try writer.expect("count") == "count 0")
    }

    @Test func exitsCleanlyOnSIGTERM() throws {
        let writer = try Memwriter(["--mib", "1", "--threads", "2", "--churn", "--heap-grow", "--zap", "--rate", "1000"])
        usleep(50_000)
        let status = try #require(writer.terminate(), "memwriter ignored SIGTERM")
        #expect(status & 0x7f == 0, "killed by a signal")
        #expect((status >> 8) & 0xff == 0)
    }
}
