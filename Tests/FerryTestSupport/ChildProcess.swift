// Real child processes for tests: started with posix_spawn, spoken to line
// by line over pipes, killed and reaped exactly once. The workload generator
// and the relay in Tools/ are both driven this way.
import FerrySystem
import Glibc

public struct TestFailure: Error, CustomStringConvertible {
    public let description: String
    public init(_ description: String) { self.description = description }
}

/// The directory holding the package's built executables: the one the test
/// binary sits in, or above it on bundle layouts.
public func builtExecutable(_ name: String) -> String {
    let variable = "FERRY_" + name.uppercased()
    if let path = getenv(variable) { return String(cString: path) }
    var buffer = [CChar](repeating: 0, count: 4096)
    let n = readlink("/proc/self/exe", &buffer, buffer.count - 1)
    var directory = n > 0 ? String(decoding: buffer[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self) : "."
    for _ in 0..<4 {
        if let slash = directory.lastIndex(of: "/") { directory = String(directory[..<slash]) }
        if access(directory + "/" + name, X_OK) == 0 { return directory + "/" + name }
    }
    return name
}

/// A running child with its stdin and stdout on pipes. Not Sendable except
/// for `send`, which only writes to a pipe; one test owns it.
public final class ChildProcess: @unchecked Sendable {
    // @unchecked: `pending` and `reaped` are touched only by the owning test's
    // thread; other threads call only `send`, a single write(2) to a pipe.
    public let pid: Int32
    private let input: Int32
    private let output: Int32
    private var pending: [UInt8] = []
    private var reaped = false

    public init(_ path: String, _ arguments: [String]) throws {
        var toChild: [Int32] = [0, 0]
        var fromChild: [Int32] = [0, 0]
        guard pipe(&toChild) == 0, pipe(&fromChild) == 0 else { throw TestFailure("pipe: \(errno)") }
        for fd in toChild + fromChild { _ = fcntl(fd, F_SETFD, FD_CLOEXEC) }
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_adddup2(&actions, toChild[0], 0)
        posix_spawn_file_actions_adddup2(&actions, fromChild[1], 1)
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
        sigfillset(&defaults)
        sigdelset(&defaults, SIGKILL)
        sigdelset(&defaults, SIGSTOP)
        posix_spawnattr_setsigmask(&attributes, &empty)
        posix_spawnattr_setsigdefault(&attributes, &defaults)
        posix_spawnattr_setflags(&attributes, Int16(POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF))
        var child: pid_t = 0
        let rc = posix_spawn(&child, path, &actions, &attributes, argv, environ)
        close(toChild[0])
        close(fromChild[1])
        guard rc == 0 else {
            close(toChild[1])
            close(fromChild[0])
            throw TestFailure("cannot start \(path): \(String(cString: strerror(rc))) (build the package's products first)")
        }
        pid = child
        input = toChild[1]
        output = fromChild[0]
    }

    deinit { stop() }

    public func send(_ command: String) {
        let text = command + "\n"
        _ = text.withCString { write(input, $0, strlen($0)) }
    }

    /// The next stdout line, waiting at most `timeout` seconds.
    public func readLine(timeout: Double = 20) throws -> String {
        let deadline = Self.now() + timeout
        while true {
            if let newline = pending.firstIndex(of: UInt8(ascii: "\n")) {
                let line = String(decoding: pending[..<newline], as: UTF8.self)
                pending.removeSubrange(...newline)
                return line
            }
            let left = deadline - Self.now()
            guard left > 0 else { throw TestFailure("pid \(pid) said nothing for \(timeout) s") }
            var pfd = pollfd(fd: output, events: Int16(POLLIN), revents: 0)
            let ready = poll(&pfd, 1, Int32(left * 1000) + 1)
            if ready <= 0 { continue }
            var chunk = [UInt8](repeating: 0, count: 4096)
            let n = read(output, &chunk, chunk.count)
            if n <= 0 { throw TestFailure("pid \(pid) closed its output") }
            pending.append(contentsOf: chunk[0..<n])
        }
    }

    /// Reads lines until one starts with `prefix` and returns it.
    public func expect(_ prefix: String, timeout: Double = 20) throws -> String {
        while true {
            let line = try readLine(timeout: timeout)
            if line.hasPrefix(prefix) { return line }
        }
    }

    /// The process state letter from /proc/PID/stat (R, S, T, t, Z...).
    public var state: Character? { procState("/proc/\(pid)/stat") }

    /// True while the child has not exited (it may be stopped).
    public var isAlive: Bool { !reaped && kill(pid, 0) == 0 && state != "Z" }

    /// Sends `signal`, waits, and returns the wait status.
    @discardableResult
    public func end(with signal: Int32) -> Int32 {
        guard !reaped else { return -1 }
        kill(pid, signal)
        var status: Int32 = 0
        waitpid(pid, &status, 0)
        reaped = true
        close(input)
        close(output)
        return status
    }

    public func stop() { end(with: SIGKILL) }

    /// Waits for the child to exit by itself; its exit code, or nil after `timeout`.
    public func waitForExit(timeout: Double = 30) -> Int32? {
        guard !reaped else { return nil }
        let deadline = Self.now() + timeout
        while Self.now() < deadline {
            var status: Int32 = 0
            if waitpid(pid, &status, WNOHANG) == pid {
                reaped = true
                close(input)
                close(output)
                return (status & 0x7f) == 0 ? (status >> 8) & 0xff : 128 + (status & 0x7f)
            }
            usleep(10_000)
        }
        return nil
    }

    /// Seconds on the monotonic clock.
    public static func now() -> Double { FerryTestSupport.now() }
}

extension ChildProcess {
    /// Reads the start-up block the workloads in Tools/ print: `region NAME
    /// 0xSTART 0xEND` lines, then `pid N ready`. A line `endsEarly` accepts
    /// (a workload that cannot run here says why) ends the block too and is
    /// returned; any other line is an error naming `program`.
    public func readStartupBlock(_ program: String, endsEarly: (String) -> Bool = { _ in false })
        throws -> (regions: [String: AddressRange], early: String?) {
        var regions: [String: AddressRange] = [:]
        while true {
            let line = try readLine()
            let fields = line.split(separator: " ")
            if fields.count == 4, fields[0] == "region",
               let start = UInt64(fields[2].dropFirst(2), radix: 16), let end = UInt64(fields[3].dropFirst(2), radix: 16) {
                regions[String(fields[1])] = AddressRange(start: start, end: end)
            } else if fields.count == 3, fields[0] == "pid", fields[2] == "ready" {
                guard Int32(fields[1]) == pid else { throw TestFailure("\(program) said \(line), expected pid \(pid)") }
                return (regions, nil)
            } else if endsEarly(line) {
                return (regions, line)
            } else {
                throw TestFailure("unexpected \(program) line: \(line)")
            }
        }
    }
}

/// The state letter (R, S, T, t, Z...) of a process or thread from its
/// `stat` file (`/proc/PID/stat`, `/proc/PID/task/TID/stat`); nil once gone.
public func procState(_ statPath: String) -> Character? {
    let fd = open(statPath, O_RDONLY | O_CLOEXEC)
    guard fd >= 0 else { return nil }
    defer { close(fd) }
    var buffer = [UInt8](repeating: 0, count: 1024)
    let n = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
    guard n > 0 else { return nil }
    let text = String(decoding: buffer[0..<n], as: UTF8.self)
    // The name in parentheses may itself hold ") ": the state follows the last one.
    guard let close = text.lastIndex(of: ")") else { return nil }
    return text[text.index(close, offsetBy: 2)]
}
