// The source's side: `criu dump --lazy-pages` of a process Ferry has
// pre-copied (Protocols/criu.md § 2). The dump writes every image but the
// private anonymous memory, runs our post-dump hook with the process frozen,
// and, once the hook says 0, serves the lazy memory from a page server that
// takes exactly one connection. Ferry never asks it for a page: its only
// connection is ours, made at the end to send PS_IOV_CLOSE, after which CRIU
// kills the process (hook 0) or resumes it (hook non-zero).
import Foundation
import FerryToolkit
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

public final class CriuDump: Sendable {
    public let criu: Criu
    public let pid: Int32
    public let directory: String
    public let images: String
    public let grace: Duration
    private let hook: PostDumpHook
    private let port: UInt16
    /// The running dump, once started; whether `end` ran.
    private let state = Mutex<(run: CriuRun?, finished: Bool)>((nil, false))

    /// Images and logs go under `workDirectory` (created).
    public init(criu: Criu, pid: Int32, workDirectory: String, grace: Duration) throws {
        self.criu = criu
        self.pid = pid
        self.grace = grace
        directory = workDirectory
        images = workDirectory + "/images"
        try FileManager.default.createDirectory(atPath: images, withIntermediateDirectories: true)
        hook = try PostDumpHook(in: workDirectory, limit: grace + Self.maxHold)
        port = try freeLoopbackPort()
    }

    public var log: String { directory + "/dump.log" }

    /// How long CRIU may hold the process after the dump for the leecher to
    /// restore it and fetch its memory (post-copy), beyond the grace period.
    public static let maxHold: Duration = .seconds(1800)

    /// Runs the dump until the post-dump hook reports every image written,
    /// the process frozen; at most the grace period. On failure the process
    /// runs on (CRIU resumed it) and the error carries CRIU's reason.
    /// Blocking: call it off the cooperative pool.
    public func dumpUntilFrozen() throws -> Duration {
        let began = ContinuousClock.now
        let run = try CriuRun(criu, "dump", ["-t", "\(pid)", "--lazy-pages", "--address", "127.0.0.1", "--port", "\(port)",
                                             "--action-script", hook.script],
                              directory: images, log: log, statusFD: true)
        state.withLock { $0.run = run }
        let deadline = began + grace + .seconds(30)
        while ContinuousClock.now < deadline {
            if hook.waitDumped(timeout: .milliseconds(50)) { return ContinuousClock.now - began }
            if !run.isRunning {
                try run.wait(timeout: .seconds(1))
                throw CriuError.failed(step: "dump", status: 0, log: log, tail: "it ended before its post-dump hook ran")
            }
        }
        end(resume: true)
        throw CriuError.timedOut(step: "dump", seconds: (ContinuousClock.now - began).inSeconds, log: log)
    }

    /// The images CRIU wrote, packed for the leecher.
    public func packedImages() throws -> [UInt8] { try CriuImages.pack(directory: images) }

    /// Ends the dump: `resume` false lets CRIU kill the process (the
    /// destination holds it now), true makes CRIU resume it. Then closes
    /// CRIU's page server with PS_IOV_CLOSE and waits for CRIU to exit, each
    /// bounded by the grace period. Blocking; safe to call more than once.
    @discardableResult
    public func end(resume: Bool) -> (any Error)? {
        let (first, started) = state.withLock { s in defer { s.finished = true }; return (!s.finished, s.run) }
        guard first, let run = started else { return nil }
        hook.answer(resume: resume)
        do {
            // The page server listens once the hook has returned (--status-fd).
            if run.waitReady(timeout: grace) { try closePageServer() }
            try run.wait(timeout: grace)
            return nil
        } catch CriuError.failed(_, let status, _, _) where resume && status == 1 {
            return nil // the hook's 1: CRIU resumed the process, as asked
        } catch {
            run.terminate()
            return error
        }
    }

    private func closePageServer() throws {
        let socket = try connectLoopback(port: port)
        defer { close(socket) }
        let header = PageServerHeader(command: .close).encoded(narrow: criu.hasNarrowPageServerHeader)
        try sendAll(socket, header)
        var status: Int32 = -1
        _ = withUnsafeMutableBytes(of: &status) { recv(socket, $0.baseAddress, 4, Int32(MSG_WAITALL)) }
    }
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
func freeLoopbackPort() throws -> UInt16 {
    let fd = try checkedCall("socket", on: "127.0.0.1") { socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0) }
    defer { close(fd) }
    var address = loopback(port: 0)
    try checkedCall("bind", on: "127.0.0.1:0") {
        withUnsafePointer(to: &address) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }
    }
    var length = socklen_t(MemoryLayout<sockaddr_in>.size)
    try checkedCall("getsockname", on: "127.0.0.1") {
        withUnsafeMutablePointer(to: &address) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &length) } }
    }
    return UInt16(bigEndian: address.sin_port)
}

func loopback(port: UInt16) -> sockaddr_in {
    var address = sockaddr_in()
    address.sin_family = sa_family_t(AF_INET)
    address.sin_port = port.bigEndian
    address.sin_addr.s_addr = UInt32(0x7F00_0001).bigEndian
    return address
}

func connectLoopback(port: UInt16) throws -> Int32 {
    let fd = try checkedCall("socket", on: "127.0.0.1:\(port)") { socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0) }
    var address = loopback(port: port)
    do {
        try checkedCall("connect", on: "CRIU's page server at 127.0.0.1:\(port)") {
            withUnsafePointer(to: &address) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }
        }
    } catch {
        close(fd)
        throw error
    }
    return fd
}

func sendAll(_ fd: Int32, _ bytes: UnsafeRawBufferPointer) throws {
    var sent = 0
    while sent < bytes.count {
        let n = try checkedCall("send", on: "the CRIU page-server connection") {
            send(fd, bytes.baseAddress! + sent, bytes.count - sent, Int32(MSG_NOSIGNAL))
        }
        sent += n
    }
}

func sendAll(_ fd: Int32, _ bytes: [UInt8]) throws {
    try bytes.withUnsafeBytes { try sendAll(fd, $0) }
}
