// Accepting connections on a TCP or Unix socket.
//
// Connections are accepted lazily: libuv's connection callback only records
// that one is pending, and `uv_accept` runs when `accept()` asks. Until then
// libuv stops polling the listening socket, so unaccepted connections wait in
// the kernel's backlog rather than as handles in our memory.

internal import CUV
import Glibc

/// A bound, listening socket.
public final class Listener: Sendable {
    /// Connections the kernel queues before refusing more.
    static let backlog: Int32 = 128

    /// The bound address; for TCP with the real port when port 0 was asked for.
    public let endpoint: Endpoint
    let loop: EventLoop
    private let core: LoopBound<ListenerCore>

    private init(endpoint: Endpoint, loop: EventLoop, core: LoopBound<ListenerCore>) {
        self.endpoint = endpoint
        self.loop = loop
        self.core = core
    }

    deinit { close() }

    /// Binds and listens. Port 0 picks a free port (read it from `endpoint`).
    /// A Unix socket path left behind by a dead process is replaced; one that
    /// a live process listens on is not.
    public static func bind(_ endpoint: Endpoint) async throws -> Listener {
        try await bind(endpoint, on: .shared)
    }

    static func bind(_ endpoint: Endpoint, on loop: EventLoop) async throws -> Listener {
        var resolved: [SocketAddress] = []
        if case .tcp(let host, let port) = endpoint {
            resolved = try await Transports.resolve(host: host, port: port, passive: true, on: loop)
        }
        let addresses = resolved
        let (core, bound) = try await loop.submit { () throws -> (LoopBound<ListenerCore>, Endpoint) in
            let stream: UVStream
            let bound: Endpoint
            do {
                switch endpoint {
                case .tcp:
                    stream = try UVStream.tcp(on: loop)
                    // The first address the resolver prefers ("localhost" ->
                    // usually 127.0.0.1 or ::1).
                    var rc = stream.bind(addresses[0])
                    if rc == 0 { rc = stream.listen(backlog: backlog) }
                    if rc != 0 {
                        stream.close()
                        throw SocketError.bindFailed(endpoint: endpoint.description, UVError(rc))
                    }
                    bound = stream.localAddress()?.endpoint ?? endpoint
                case .unix(let path):
                    stream = try UVStream.pipe(on: loop)
                    var rc = stream.bind(path: path)
                    if rc == Int32(UV_EADDRINUSE.rawValue) && removeStaleSocket(path) {
                        stream.close()
                        return try bindUnixAgain(path: path, endpoint: endpoint, loop: loop)
                    }
                    if rc == 0 { rc = stream.listen(backlog: backlog) }
                    if rc != 0 {
                        stream.close()
                        throw SocketError.bindFailed(endpoint: endpoint.description, UVError(rc))
                    }
                    bound = endpoint
                }
            } catch let e as UVError {
                throw SocketError.bindFailed(endpoint: endpoint.description, e)
            }
            return (LoopBound(ListenerCore(stream: stream, endpoint: bound, unixPath: endpoint.unixPath), on: loop), bound)
        }
        return Listener(endpoint: bound, loop: loop, core: core)
    }

    private static func bindUnixAgain(path: String, endpoint: Endpoint, loop: EventLoop) throws -> (LoopBound<ListenerCore>, Endpoint) {
        let stream: UVStream
        do { stream = try UVStream.pipe(on: loop) } catch { throw SocketError.bindFailed(endpoint: endpoint.description, error) }
        var rc = stream.bind(path: path)
        if rc == 0 { rc = stream.listen(backlog: backlog) }
        if rc != 0 {
            stream.close()
            throw SocketError.bindFailed(endpoint: endpoint.description, UVError(rc))
        }
        return (LoopBound(ListenerCore(stream: stream, endpoint: endpoint, unixPath: path), on: loop), endpoint)
    }

    /// True if `path` is a Unix socket nobody listens on (then it is removed).
    private static func removeStaleSocket(_ path: String) -> Bool {
        var st = stat()
        guard lstat(path, &st) == 0, (st.st_mode & S_IFMT) == S_IFSOCK else { return false }
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { return false }
        defer { Glibc.close(fd) }
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        // SAFETY: at most sizeof(sun_path) - 1 bytes are copied, so the path
        // stays NUL-terminated; the sockaddr_un outlives the connect call.
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            let bytes = Array(path.utf8.prefix(raw.count - 1))
            raw.copyBytes(from: bytes)
        }
        let rc = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        // Someone answers: the socket is live, leave it.
        guard rc != 0, errno == ECONNREFUSED else { return false }
        return unlink(path) == 0
    }

    /// The next incoming connection. Throws `SocketError.listenerClosed` if the
    /// listener is (or gets) closed.
    public func accept() async throws -> FrameTransport {
        let (stream, peer) = try await ListenerCore.accept(core, loop: loop)
        return await Transports.makeTransport(stream, peer: peer, on: loop)
    }

    /// Stops listening; pending `accept` calls throw. Idempotent. A Unix socket
    /// file this listener created is removed.
    public func close() {
        let core = self.core
        loop.execute { core.value.close() }
    }
}

extension Endpoint {
    fileprivate var unixPath: String? {
        if case .unix(let path) = self { return path }
        return nil
    }
}

/// The loop-side state of a listener: loop-bound (the `Listener` reaches it
/// only through `loop.execute`).
private final class ListenerCore {
    let stream: UVStream
    let endpoint: Endpoint
    let unixPath: String?
    private var pending = 0
    private var closed = false
    private var waiters: [(id: UInt64, continuation: CheckedContinuation<(UVStream, String), any Error>)] = []
    private var nextID: UInt64 = 0

    init(stream: UVStream, endpoint: Endpoint, unixPath: String?) {
        self.stream = stream
        self.endpoint = endpoint
        self.unixPath = unixPath
        stream.onConnection = { [weak self] status in self?.incoming(status) }
    }

    /// Waits for the next connection of `core`; from any thread.
    static func accept(_ core: LoopBound<ListenerCore>, loop: EventLoop) async throws -> (UVStream, String) {
        let id = LoopBound(AcceptID(), on: loop)
        return try await withTaskCancellationHandler {
            try await withCheckedThrowingContinuation { c in
                let accepted = loop.execute {
                    let me = core.value
                    if me.closed {
                        c.resume(throwing: SocketError.listenerClosed(endpoint: me.endpoint.description))
                        return
                    }
                    if id.value.cancelled {
                        c.resume(throwing: CancellationError())
                        return
                    }
                    me.nextID += 1
                    id.value.value = me.nextID
                    me.waiters.append((me.nextID, c))
                    me.serve()
                }
                if !accepted { c.resume(throwing: EventLoopError.shutDown(name: loop.name)) }
            }
        } onCancel: {
            loop.execute {
                id.value.cancelled = true
                let me = core.value
                guard let i = me.waiters.firstIndex(where: { $0.id == id.value.value }) else { return }
                me.waiters.remove(at: i).continuation.resume(throwing: CancellationError())
            }
        }
    }

    private func incoming(_ status: Int32) {
        if status != 0 {
            // A failed accept (EMFILE, ...) goes to one waiter, if any;
            // libuv keeps listening.
            if !waiters.isEmpty {
                waiters.removeFirst().continuation.resume(throwing: SocketError.acceptFailed(endpoint: endpoint.description, UVError(status)))
            }
            return
        }
        pending += 1
        serve()
    }

    private func serve() {
        while pending > 0 && !waiters.isEmpty {
            pending -= 1
            let waiter = waiters.removeFirst().continuation
            do {
                let client = try stream.accept()
                let peer: String
                if let address = client.peerAddress() {
                    peer = address.endpoint.description
                } else {
                    peer = "\(endpoint) (peer)"
                }
                waiter.resume(returning: (client, peer))
            } catch {
                waiter.resume(throwing: SocketError.acceptFailed(endpoint: endpoint.description, error))
            }
        }
    }

    func close() {
        guard !closed else { return }
        closed = true
        stream.close()
        if let unixPath { unlink(unixPath) }
        let w = waiters
        waiters = []
        for c in w { c.continuation.resume(throwing: SocketError.listenerClosed(endpoint: endpoint.description)) }
    }
}

/// Identifies one pending accept for its cancellation handler (loop-bound).
private final class AcceptID {
    var value: UInt64 = 0
    var cancelled = false
}
