// Where `criu restore --lazy-pages` hands over the restored process's memory
// (Protocols/criu.md § 4): the unix socket `lazy-pages.socket` in the images
// directory, which CRIU's lazy-pages daemon would listen on. Ferry listens
// there instead and is the daemon (LazyRestoredMemory in FerrySystem).
//
// The protocol (criu/uffd.c in CRIU 4.x): restore connects once, before it
// forks the tasks; then, for each task, in any order, an int pid (native
// byte order) and, unless the pid is negative (a zombie: no memory), the
// task's userfaultfd as SCM_RIGHTS with one dummy byte; once the restore
// finished, the u32 0x52535446 ("RSTF"), then it closes. The pid is the one
// in CRIU's images (pagemap-PID.img), not the one on this host.
#if canImport(Glibc)
import Glibc
#endif
internal import CFerryLinux
import FerryToolkit

public final class LazyPagesSocket: Sendable {
    /// What restore sent.
    public enum Handoff: Sendable, Equatable {
        /// A task's memory: its pid in the images and its userfaultfd (ours to close).
        case memory(pid: Int32, uffd: Int32)
        case zombie(pid: Int32)
        case restoreFinished
        /// Restore closed the connection.
        case closed
    }

    /// The socket's file name, fixed by CRIU (criu/uffd.c LAZY_PAGES_SOCK_NAME).
    public static let fileName = "lazy-pages.socket"
    static let restoreFinished: UInt32 = 0x5253_5446

    public let path: String
    /// Restore's log beside the socket, for errors (CriuRestore writes it there).
    private let restoreLog: String
    private let listener: Int32

    /// Listens at `directory`/lazy-pages.socket (replacing a stale one).
    public init(directory: String) throws {
        path = directory + "/" + Self.fileName
        restoreLog = directory + "/restore.log"
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        guard bytes.count < MemoryLayout.size(ofValue: address.sun_path) else {
            throw CriuError.badImages("the images directory's path is too long for CRIU's lazy-pages socket (\(bytes.count) bytes; at most \(MemoryLayout.size(ofValue: address.sun_path) - 1 - Self.fileName.count - 1) for the directory): pass a shorter --images")
        }
        withUnsafeMutableBytes(of: &address.sun_path) { $0.copyBytes(from: bytes) }
        let fd = try checkedCall("socket", on: path) { socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0) }
        do {
            unlink(path)
            try checkedCall("bind", on: path) {
                withUnsafePointer(to: &address) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) } }
            }
            try checkedCall("listen", on: path) { listen(fd, 1) }
        } catch {
            close(fd)
            throw error
        }
        listener = fd
    }

    deinit {
        close(listener)
        unlink(path)
    }

    /// Waits (at most `timeout`, and while `stopped` is false) for restore to connect.
    public func accept(timeout: Duration, stopped: () -> Bool) throws -> Connection {
        let deadline = ContinuousClock.now + timeout
        var poller = pollfd(fd: listener, events: Int16(POLLIN), revents: 0)
        while try checkedCall("poll", on: path, { poll(&poller, 1, 50) }) == 0 {
            if stopped() { throw CriuError.protocolViolation("stopped waiting for restore on \(path)") }
            if ContinuousClock.now >= deadline {
                throw CriuError.timedOut(step: "restore (it never connected to \(path))", seconds: timeout.inSeconds, log: restoreLog)
            }
        }
        let fd = try checkedCall("accept", on: path) { Glibc.accept(listener, nil, nil) }
        _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
        return Connection(fd: fd, path: path)
    }

    /// Restore's one connection.
    public final class Connection: Sendable {
        private let fd: Int32
        private let path: String
        init(fd: Int32, path: String) { (self.fd, self.path) = (fd, path) }
        deinit { close(fd) }

        /// Ends a blocked `next` (from another thread).
        public func shutDown() { shutdown(fd, Int32(SHUT_RDWR)) }

        /// The next thing restore says; blocks until it does.
        public func next() throws -> Handoff {
            var word: UInt32 = 0
            let got = try checkedCall("recv", on: path) { recv(fd, &word, 4, Int32(MSG_WAITALL)) }
            if got == 0 { return .closed }
            guard got == 4 else { throw CriuError.protocolViolation("restore sent \(got) bytes where a pid belongs on \(path)") }
            if word == LazyPagesSocket.restoreFinished { return .restoreFinished }
            let pid = Int32(bitPattern: word)
            if pid < 0 { return .zombie(pid: -pid) }
            let uffd = ferry_recv_fd(fd)
            guard uffd >= 0 else {
                throw SystemError(operation: "receiving the userfaultfd of pid \(pid) from CRIU's restore", target: path, errno: errno,
                                  hint: "restore sent the pid but not the descriptor; see restore.log beside it")
            }
            return .memory(pid: pid, uffd: uffd)
        }
    }
}
