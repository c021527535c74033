// Finding and running CRIU (checkpoint-restore.org), the engine that moves a
// process's threads, registers, files and sockets while Ferry moves its
// memory (issue 13, Protocols/criu.md). Ferry needs CRIU 4.1 or later:
// Debian 12's 3.17 fails on kernels >= 6.13, and on recent kernels only 4.2
// dumps TCP sockets; `Tools/setup-criu.sh` provides one. CRIU runs as root.
import Foundation
import FerryToolkit
#if canImport(Glibc)
import Glibc
#endif

/// What went wrong with CRIU, said so a person knows what to do.
public enum CriuError: Error, CustomStringConvertible, Sendable {
    case notFound(tried: [String])
    case tooOld(path: String, version: String)
    case unusable(path: String, output: String)
    case failed(step: String, status: Int32, log: String, tail: String)
    case timedOut(step: String, seconds: Double, log: String)
    /// Restore's handoff of the process's memory, or its filling, went wrong.
    case protocolViolation(String)
    case badImages(String)

    public var description: String {
        switch self {
        case .notFound(let tried):
            return "criu not found (tried \(tried.joined(separator: ", "))): install CRIU 4.1 or later (Debian 13+: apt-get install criu; Debian 12: Tools/setup-criu.sh) and pass --criu PATH or set FERRY_CRIU"
        case .tooOld(let path, let version):
            return "\(path) is CRIU \(version); Ferry needs 4.1 or later (Tools/setup-criu.sh installs one)"
        case .unusable(let path, let output):
            return "\(path) check failed: \(output.isEmpty ? "no output" : output) (run it as root on a kernel with what CRIU needs)"
        case .failed(let step, let status, let log, let tail):
            return "criu \(step) failed with status \(status)\(tail.isEmpty ? "" : ": \(tail)") (log: \(log))"
        case .timedOut(let step, let seconds, let log):
            return "criu \(step) did not finish within \(seconds) s (log: \(log))"
        case .protocolViolation(let what):
            return "CRIU lazy pages: \(what)"
        case .badImages(let what):
            return "CRIU images: \(what)"
        }
    }
}

/// One usable criu binary.
public struct Criu: Sendable {
    public let path: String
    public let version: String

    /// The criu to use: `flag` (--criu), then $FERRY_CRIU, then criu on $PATH;
    /// checked to be 4.1 or later and to pass `criu check`.
    public static func locate(flag: String? = nil) throws -> Criu {
        var tried: [String] = []
        var candidates: [String] = []
        if let flag { candidates.append(flag) }
        else if let env = ProcessInfo.processInfo.environment["FERRY_CRIU"], !env.isEmpty { candidates.append(env) }
        else {
            for dir in (ProcessInfo.processInfo.environment["PATH"] ?? "/usr/sbin:/usr/bin:/sbin:/bin").split(separator: ":") {
                candidates.append("\(dir)/criu")
            }
        }
        for path in candidates {
            tried.append(path)
            guard access(path, X_OK) == 0 else { continue }
            let criu = try check(path: path)
            return criu
        }
        throw CriuError.notFound(tried: flag != nil ? [flag!] : (tried.count > 3 ? ["$FERRY_CRIU", "criu on PATH"] : tried))
    }

    /// Whether this criu reads the 24-byte page-server header of CRIU 4.1
    /// (PageServerWire.swift): any 4.1.x.
    public var hasNarrowPageServerHeader: Bool {
        let numbers = version.split(separator: ".").compactMap { Int($0.prefix(while: \.isNumber)) }
        return numbers.count >= 2 && (numbers[0], numbers[1]) < (4, 2)
    }

    /// Version and `criu check` of the binary at `path`.
    public static func check(path: String) throws -> Criu {
        let (status, output) = try run(path, ["--version"])
        guard status == 0, let line = output.split(separator: "\n").first(where: { $0.hasPrefix("Version:") }) else {
            throw CriuError.unusable(path: path, output: output.trimmingCharacters(in: .whitespacesAndNewlines))
        }
        let version = line.dropFirst("Version:".count).trimmingCharacters(in: .whitespaces)
        let numbers = version.split(separator: ".").compactMap { Int($0.prefix(while: \.isNumber)) }
        guard numbers.count >= 2, (numbers[0], numbers[1]) >= (4, 1) else {
            throw CriuError.tooOld(path: path, version: version)
        }
        let (checked, said) = try run(path, ["check"])
        guard checked == 0 else {
            throw CriuError.unusable(path: path, output: said.trimmingCharacters(in: .whitespacesAndNewlines))
        }
        return Criu(path: path, version: version)
    }

    /// Runs criu to the end; returns its status and what it printed.
    static func run(_ path: String, _ arguments: [String]) throws -> (Int32, String) {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: path)
        process.arguments = arguments
        let pipe = Pipe()
        process.standardOutput = pipe
        process.standardError = pipe
        process.standardInput = FileHandle.nullDevice
        try process.run()
        let data = pipe.fileHandleForReading.readDataToEndOfFile()
        process.waitUntilExit()
        return (process.terminationStatus, String(decoding: data, as: UTF8.self))
    }

    /// The last error lines of a CRIU log, for an error message.
    public static func logTail(_ path: String, lines: Int = 3) -> String {
        guard let text = try? String(contentsOfFile: path, encoding: .utf8) else { return "" }
        let errors = text.split(separator: "\n").filter { $0.contains("Error") && !$0.contains("RLIMIT_NOFILE") }
        return errors.suffix(lines).map { String($0.drop(while: { $0 != "E" })) }.joined(separator: "; ")
    }
}

/// A criu command running in the background.
public final class CriuRun: @unchecked Sendable {
    // @unchecked Sendable: every stored property is a constant set in init; Process is thread-safe for these calls.
    public let step: String
    public let log: String
    private let process: Process
    /// Criu's stdout: `--status-fd 1` writes one zero byte there when it is ready.
    private let status: FileHandle?

    /// CRIU's log level: $FERRY_CRIU_VERBOSITY (0-4), else 2 (errors and
    /// warnings). At 4 CRIU writes a line per page run and per parasite
    /// command, thousands for a GiB, one write(2) each, much of it while the
    /// process is frozen: 4 is for finding out why CRIU failed.
    public static var verbosity: Int {
        let text = ProcessInfo.processInfo.environment["FERRY_CRIU_VERBOSITY"] ?? ""
        return Int(text).map { min(max($0, 0), 4) } ?? 2
    }

    /// Starts `criu step arguments`, logging to `log` (-o, -v`verbosity`). With
    /// `statusFD`, criu's stdout is a pipe it signals readiness on.
    public init(_ criu: Criu, _ step: String, _ arguments: [String], directory: String, log: String,
                statusFD: Bool = false) throws {
        self.step = step
        self.log = log
        let process = Process()
        process.executableURL = URL(fileURLWithPath: criu.path)
        process.arguments = [step, "-D", directory, "-o", log, "-v\(Self.verbosity)"] + (statusFD ? ["--status-fd", "1"] : []) + arguments
        process.standardInput = FileHandle.nullDevice
        process.standardError = FileHandle.nullDevice
        if statusFD {
            let pipe = Pipe()
            process.standardOutput = pipe
            status = pipe.fileHandleForReading
        } else {
            process.standardOutput = FileHandle.nullDevice
            status = nil
        }
        self.process = process
        try process.run()
    }

    public var pid: Int32 { process.processIdentifier }
    public var isRunning: Bool { process.isRunning }

    /// Blocks until criu reports ready on its status fd, at most `timeout`:
    /// true, or false when it closed it, exited or the time passed first.
    public func waitReady(timeout: Duration) -> Bool {
        guard let status else { return true }
        var poller = pollfd(fd: status.fileDescriptor, events: Int16(POLLIN), revents: 0)
        guard poll(&poller, 1, Int32(clamping: timeout.wholeMilliseconds)) == 1 else { return false }
        var byte: UInt8 = 1
        return read(status.fileDescriptor, &byte, 1) == 1
    }

    /// Blocks until criu exits or `timeout` passes (then it is killed);
    /// throws unless it exited 0.
    public func wait(timeout: Duration) throws {
        let deadline = ContinuousClock.now + timeout
        while process.isRunning {
            if ContinuousClock.now >= deadline {
                kill(process.processIdentifier, SIGKILL)
                process.waitUntilExit()
                throw CriuError.timedOut(step: step, seconds: timeout.inSeconds, log: log)
            }
            usleep(5_000)
        }
        let code = process.terminationStatus
        guard code == 0 else {
            throw CriuError.failed(step: step, status: code, log: log, tail: Criu.logTail(log))
        }
    }

    /// Ends criu now (SIGKILL) if it still runs.
    public func terminate() {
        if process.isRunning { kill(process.processIdentifier, SIGKILL) }
        process.waitUntilExit()
    }
}
