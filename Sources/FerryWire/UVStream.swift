// The types that own libuv memory: stream handles (TCP, pipe, TTY), timers and
// requests. Every unsafe pointer of the libuv transports lives here. The rules:
//
// - One `final class` per handle. `handle.data` holds an `Unmanaged` retain of
//   that object, taken when the handle is initialised and released only in the
//   `uv_close` callback, so the object (and the handle memory it frees in
//   `deinit`) outlives everything libuv may still do with the handle.
// - `close()` calls `uv_close` at most once.
// - Requests (`uv_write_t`, `uv_connect_t`, ...) are owned the same way by a
//   request object retained until its callback runs.
// - Everything here runs on the loop thread; callbacks never throw, print or
//   trap: they hand a status code to a Swift closure.

internal import CUV
import Glibc

/// A libuv error code with its name and message, for error texts.
public struct UVError: Error, Sendable, Hashable, CustomStringConvertible {
    /// The negative libuv status (`UV_ECONNREFUSED`, ...).
    public let code: Int32

    init(_ code: Int32) { self.code = code }
    init<T: BinaryInteger>(_ code: T) { self.code = Int32(truncatingIfNeeded: code) }

    /// The libuv error name, e.g. "ECONNREFUSED".
    public var name: String { String(cString: uv_err_name(code)) }
    /// The libuv message, e.g. "connection refused".
    public var message: String { String(cString: uv_strerror(code)) }
    public var description: String { "\(message) (\(name))" }

    /// The libuv code for a POSIX errno (libuv uses negated errno values on Unix).
    static func fromErrno(_ e: Int32) -> Int32 { -e }

    static let eof = Int32(UV_EOF.rawValue)
    static let canceled = Int32(UV_ECANCELED.rawValue)
    static let timedOut = Int32(UV_ETIMEDOUT.rawValue)
}

/// A socket address (IPv4, IPv6) as returned by the resolver or getsockname.
/// A plain value: the bytes of a sockaddr_storage.
struct SocketAddress: Sendable {
    var storage = sockaddr_storage()

    var family: Int32 { Int32(storage.ss_family) }

    init(_ address: UnsafePointer<sockaddr>, length: Int) {
        withUnsafeMutableBytes(of: &storage) { dst in
            dst.copyMemory(from: UnsafeRawBufferPointer(start: address, count: min(length, dst.count)))
        }
    }
    init() {}

    func withSockAddr<R>(_ body: (UnsafePointer<sockaddr>) throws -> R) rethrows -> R {
        try withUnsafeBytes(of: storage) { raw in
            try body(raw.baseAddress!.assumingMemoryBound(to: sockaddr.self))
        }
    }

    /// The IP address text, without port ("127.0.0.1", "::1").
    var host: String {
        var text = [CChar](repeating: 0, count: 64)
        let rc = withSockAddr { uv_ip_name($0, &text, text.count) }
        if rc != 0 { return "?" }
        return String(decoding: text.prefix(while: { $0 != 0 }).map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    var port: UInt16 {
        withSockAddr { sa -> UInt16 in
            switch Int32(sa.pointee.sa_family) {
            case AF_INET: return sa.withMemoryRebound(to: sockaddr_in.self, capacity: 1) { UInt16(bigEndian: $0.pointee.sin_port) }
            case AF_INET6: return sa.withMemoryRebound(to: sockaddr_in6.self, capacity: 1) { UInt16(bigEndian: $0.pointee.sin6_port) }
            default: return 0
            }
        }
    }

    var endpoint: Endpoint { .tcp(host: host, port: port) }
}

/// The handle types a `UVStream` can wrap.
enum UVStreamKind: Sendable {
    case tcp, pipe, tty
}

/// What a read delivers.
enum UVReadEvent {
    case bytes(UnsafeRawBufferPointer)
    /// `n` bytes landed in the region `readRegion` supplied.
    case direct(Int)
    case eof
    case error(UVError)
}

/// A libuv stream handle (`uv_tcp_t`, `uv_pipe_t` or `uv_tty_t`).
final class UVStream: @unchecked Sendable {
    // `@unchecked Sendable` invariant: members are used only on `loop`'s thread (asserted); others only pass it to `loop.execute` jobs.

    /// Bytes per read: large enough that a 1 MiB frame takes few reads, small
    /// enough to stay in the L2 cache while it is copied into the frame.
    static var readBufferSize: Int { EventLoop.readBufferSize }

    let loop: EventLoop
    let kind: UVStreamKind
    // SAFETY: `uv_handle_size(kind)` bytes allocated in init and freed in
    // deinit. deinit cannot run while libuv uses the handle: once initialised,
    // the handle's `data` holds a retain that only the close callback releases.
    private let raw: UnsafeMutableRawPointer
    private var initialised = false
    private(set) var isClosing = false

    /// Called for every read while reading is on.
    var onRead: ((UVReadEvent) -> Void)?
    /// Supplies, if it wants, the memory the next read should land in (the
    /// rest of a large frame body) instead of the handle's read buffer.
    var readRegion: (() -> UnsafeMutableRawBufferPointer?)?
    private var lastReadWasDirect = false
    /// Called for every incoming connection on a listening stream.
    var onConnection: ((Int32) -> Void)?
    /// Called once from the close callback.
    var onClose: (() -> Void)?

    var stream: UnsafeMutablePointer<uv_stream_t> { raw.assumingMemoryBound(to: uv_stream_t.self) }
    var handle: UnsafeMutablePointer<uv_handle_t> { raw.assumingMemoryBound(to: uv_handle_t.self) }
    private var tcp: UnsafeMutablePointer<uv_tcp_t> { raw.assumingMemoryBound(to: uv_tcp_t.self) }
    private var pipe: UnsafeMutablePointer<uv_pipe_t> { raw.assumingMemoryBound(to: uv_pipe_t.self) }

    private static func handleType(_ kind: UVStreamKind) -> uv_handle_type {
        switch kind {
        case .tcp: return UV_TCP
        case .pipe: return UV_NAMED_PIPE
        case .tty: return UV_TTY
        }
    }

    private init(loop: EventLoop, kind: UVStreamKind) {
        self.loop = loop
        self.kind = kind
        raw = .allocate(byteCount: uv_handle_size(Self.handleType(kind)), alignment: 16)
    }

    deinit {
        raw.deallocate()
    }

    /// Marks the handle initialised: from now on it must be closed with `close()`.
    private func adopt() {
        initialised = true
        handle.pointee.data = Unmanaged.passRetained(self).toOpaque()
    }

    /// A new TCP handle (not yet bound or connected).
    static func tcp(on loop: EventLoop) throws(UVError) -> UVStream {
        let s = UVStream(loop: loop, kind: .tcp)
        let rc = uv_tcp_init(loop.loop, s.tcp)
        if rc != 0 { throw UVError(rc) }
        s.adopt()
        return s
    }

    /// A new pipe handle (Unix socket or pipe; not yet bound, connected or opened).
    static func pipe(on loop: EventLoop) throws(UVError) -> UVStream {
        let s = UVStream(loop: loop, kind: .pipe)
        let rc = uv_pipe_init(loop.loop, s.pipe, 0)
        if rc != 0 { throw UVError(rc) }
        s.adopt()
        return s
    }

    /// Wraps an open descriptor, choosing the handle type libuv guesses for it.
    /// The handle owns `fd` from then on (closing the handle closes it), even
    /// if this throws.
    static func open(fd: Int32, readable: Bool, on loop: EventLoop) throws(StdioError) -> UVStream {
        let guess = uv_guess_handle(fd)
        let s: UVStream
        let rc: Int32
        switch guess {
        case UV_TCP:
            s = UVStream(loop: loop, kind: .tcp)
            let initRC = uv_tcp_init(loop.loop, s.tcp)
            if initRC != 0 { Glibc.close(fd); throw .cannotOpen(fd: fd, kind: "socket", UVError(initRC)) }
            s.adopt()
            rc = uv_tcp_open(s.tcp, fd)
        case UV_NAMED_PIPE:
            s = UVStream(loop: loop, kind: .pipe)
            let initRC = uv_pipe_init(loop.loop, s.pipe, 0)
            if initRC != 0 { Glibc.close(fd); throw .cannotOpen(fd: fd, kind: "pipe", UVError(initRC)) }
            s.adopt()
            rc = uv_pipe_open(s.pipe, fd)
        case UV_TTY:
            s = UVStream(loop: loop, kind: .tty)
            let initRC = uv_tty_init(loop.loop, s.raw.assumingMemoryBound(to: uv_tty_t.self), fd, readable ? 1 : 0)
            if initRC != 0 { Glibc.close(fd); throw .cannotOpen(fd: fd, kind: "terminal", UVError(initRC)) }
            s.adopt()
            // uv_tty_init may reopen the terminal (to get a non-blocking
            // descriptor of its own) and dup2 it over `fd`; then `fd` is ours
            // to close. Otherwise the handle uses `fd` itself.
            var used = uv_os_fd_t(-1)
            if uv_fileno(s.handle, &used) == 0, used != fd { Glibc.close(fd) }
            rc = 0
        case UV_FILE:
            Glibc.close(fd)
            throw .regularFile(fd: fd)
        default:
            Glibc.close(fd)
            throw .unsupported(fd: fd)
        }
        if rc != 0 {
            // The handle did not take the descriptor.
            Glibc.close(fd)
            s.close()
            throw .cannotOpen(fd: fd, kind: s.kind == .tcp ? "socket" : "pipe", UVError(rc))
        }
        return s
    }

    /// Closes the handle (once; later calls do nothing). Pending writes fail
    /// with UV_ECANCELED; `onClose` runs from the close callback.
    func close() {
        assertOnLoop()
        guard initialised, !isClosing else { return }
        isClosing = true
        onRead = nil
        readRegion = nil
        onConnection = nil
        uv_close(handle, uvStreamClosed)
    }

    fileprivate func didClose() {
        let callback = onClose
        onClose = nil
        callback?()
    }

    /// The descriptor, if it is a socket that another thread may write to
    /// directly (see StreamTransport's direct writes); nil for pipes and
    /// terminals, whose writes could raise SIGPIPE or block.
    var directWriteSocket: Int32? {
        guard kind != .tty, let fd = descriptor else { return nil }
        var type: Int32 = 0
        var length = socklen_t(MemoryLayout<Int32>.size)
        guard getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &length) == 0, type == Int32(SOCK_STREAM.rawValue) else { return nil }
        return fd
    }

    /// The descriptor libuv uses, while the handle is open.
    var descriptor: Int32? {
        guard initialised, !isClosing else { return nil }
        var fd = uv_os_fd_t(-1)
        return uv_fileno(handle, &fd) == 0 ? fd : nil
    }

    // MARK: TCP options and addresses

    /// Disables Nagle's algorithm: frames are whole messages, and a small RPC
    /// request must not wait for the previous one's ACK.
    func setNoDelay() {
        guard kind == .tcp else { return }
        _ = uv_tcp_nodelay(tcp, 1)
    }

    func localAddress() -> SocketAddress? {
        guard kind == .tcp else { return nil }
        var address = SocketAddress()
        var length = Int32(MemoryLayout<sockaddr_storage>.size)
        let rc = withUnsafeMutableBytes(of: &address.storage) { raw in
            uv_tcp_getsockname(tcp, raw.baseAddress!.assumingMemoryBound(to: sockaddr.self), &length)
        }
        return rc == 0 ? address : nil
    }

    func peerAddress() -> SocketAddress? {
        guard kind == .tcp else { return nil }
        var address = SocketAddress()
        var length = Int32(MemoryLayout<sockaddr_storage>.size)
        let rc = withUnsafeMutableBytes(of: &address.storage) { raw in
            uv_tcp_getpeername(tcp, raw.baseAddress!.assumingMemoryBound(to: sockaddr.self), &length)
        }
        return rc == 0 ? address : nil
    }

    // MARK: Reading

    func startReading() -> Int32 {
        assertOnLoop()
        return uv_read_start(stream, uvStreamAlloc, uvStreamRead)
    }

    /// Debug builds check the threading contract at the handle's entry points.
    private func assertOnLoop() {
        assert(loop.inLoopThread, "a libuv stream is used on its loop's thread only")
    }

    func stopReading() {
        guard !isClosing else { return }
        _ = uv_read_stop(stream)
    }

    fileprivate func allocate(_ buf: UnsafeMutablePointer<uv_buf_t>) {
        if let region = readRegion?(), let base = region.baseAddress, region.count > 0 {
            // SAFETY: the supplier keeps this memory valid and untouched until
            // the read callback reports into it (see FrameDecoder.bodyRegion).
            lastReadWasDirect = true
            buf.pointee = uv_buf_init(base.assumingMemoryBound(to: CChar.self), UInt32(min(region.count, 1 << 30)))
            return
        }
        lastReadWasDirect = false
        // One buffer per loop, not per connection (a hub holds many): every
        // read is consumed (decoded or copied) inside its read callback, and
        // the loop thread runs one callback at a time.
        let readBuffer = loop.readBuffer
        buf.pointee = uv_buf_init(readBuffer.assumingMemoryBound(to: CChar.self), UInt32(Self.readBufferSize))
    }

    fileprivate func didRead(_ n: Int, _ buf: UnsafePointer<uv_buf_t>?) {
        let direct = lastReadWasDirect
        lastReadWasDirect = false
        if n > 0 && direct {
            onRead?(.direct(n))
        } else if n > 0, let base = buf?.pointee.base {
            onRead?(.bytes(UnsafeRawBufferPointer(start: base, count: n)))
        } else if n == Int(UVError.eof) {
            onRead?(.eof)
        } else if n < 0 {
            onRead?(.error(UVError(n)))
        }
        // n == 0: EAGAIN, nothing to do.
    }

    // MARK: Writing

    /// Writes `frames` as length-prefixed frames with one gathered write (two
    /// buffers per frame, no copy). `completion` runs with the libuv status
    /// once the kernel has taken every byte or the write failed. Returns the
    /// immediate error, if any (then `completion` never runs).
    /// `skipFirst` bytes of the first frame (prefix included) were already
    /// written by someone else and are left out.
    func writeFrames(_ frames: [[UInt8]], skipFirst: Int = 0, completion: @escaping (Int32) -> Void) -> Int32 {
        assertOnLoop()
        let request = UVWriteRequest(frames: frames, completion: completion)
        let bufferCount = frames.count * 2
        let rc = withUnsafeTemporaryAllocation(of: uv_buf_t.self, capacity: bufferCount) { bufs -> Int32 in
            var n = 0
            for (i, frame) in frames.enumerated() {
                let skip = i == 0 ? skipFirst : 0
                if skip < 4 {
                    // SAFETY: the prefix storage lives in the request until its callback.
                    let prefix = request.prefixes.advanced(by: 4 * i + skip)
                    bufs[n] = uv_buf_init(prefix.assumingMemoryBound(to: CChar.self), UInt32(4 - skip))
                    n += 1
                }
                let payloadSkip = max(0, skip - 4)
                if frame.count > payloadSkip {
                    // SAFETY: `request.frames` keeps every array alive and
                    // unmutated until the write callback, so its heap storage
                    // (a non-empty native array always has one) neither moves
                    // nor is freed while libuv holds this pointer.
                    let base = frame.withUnsafeBytes { UnsafeMutableRawPointer(mutating: $0.baseAddress!) }
                    bufs[n] = uv_buf_init((base + payloadSkip).assumingMemoryBound(to: CChar.self), UInt32(frame.count - payloadSkip))
                    n += 1
                }
            }
            // libuv copies the uv_buf_t array itself; only the bytes must live on.
            return uv_write(request.req, stream, bufs.baseAddress, UInt32(n), uvStreamWritten)
        }
        if rc != 0 {
            request.abandon()
        }
        return rc
    }

    /// Waits for queued writes, then shuts the write side down (the peer reads
    /// end of stream). `completion` gets the status.
    func shutdown(completion: @escaping (Int32) -> Void) -> Int32 {
        let request = UVStatusRequest(type: UV_SHUTDOWN, completion: completion)
        let rc = uv_shutdown(request.raw.assumingMemoryBound(to: uv_shutdown_t.self), stream, uvShutdownDone)
        if rc != 0 { request.abandon() }
        return rc
    }

    // MARK: Connecting and listening

    /// Starts a TCP connect; `completion` gets the status.
    func connect(to address: SocketAddress, completion: @escaping (Int32) -> Void) -> Int32 {
        let request = UVStatusRequest(type: UV_CONNECT, completion: completion)
        let rc = address.withSockAddr { sa in
            uv_tcp_connect(request.raw.assumingMemoryBound(to: uv_connect_t.self), tcp, sa, uvConnectDone)
        }
        if rc != 0 { request.abandon() }
        return rc
    }

    /// Starts a Unix socket connect; `completion` gets the status.
    func connect(toPath path: String, completion: @escaping (Int32) -> Void) {
        let request = UVStatusRequest(type: UV_CONNECT, completion: completion)
        uv_pipe_connect(request.raw.assumingMemoryBound(to: uv_connect_t.self), pipe, path, uvConnectDone)
    }

    func bind(_ address: SocketAddress) -> Int32 {
        address.withSockAddr { uv_tcp_bind(tcp, $0, 0) }
    }

    func bind(path: String) -> Int32 {
        uv_pipe_bind(pipe, path)
    }

    func listen(backlog: Int32) -> Int32 {
        uv_listen(stream, backlog, uvStreamConnection)
    }

    fileprivate func didConnect(_ status: Int32) { onConnection?(status) }

    /// Accepts one pending connection into a new handle of the same kind.
    func accept() throws(UVError) -> UVStream {
        let client = kind == .tcp ? try UVStream.tcp(on: loop) : try UVStream.pipe(on: loop)
        let rc = uv_accept(stream, client.stream)
        if rc != 0 {
            client.close()
            throw UVError(rc)
        }
        return client
    }
}

// SAFETY (all callbacks below): `data` is the Unmanaged retain taken in
// `adopt()` or by the request's init; it stays valid until released in the
// close callback or the request callback, which run at most once.

private func owner(_ handle: UnsafeMutablePointer<uv_handle_t>?) -> UVStream? {
    guard let data = handle?.pointee.data else { return nil }
    return Unmanaged<UVStream>.fromOpaque(data).takeUnretainedValue()
}

private func uvStreamClosed(_ handle: UnsafeMutablePointer<uv_handle_t>?) {
    guard let handle, let data = handle.pointee.data else { return }
    handle.pointee.data = nil
    let stream = Unmanaged<UVStream>.fromOpaque(data).takeRetainedValue()
    stream.didClose()
}

private func uvStreamAlloc(_ handle: UnsafeMutablePointer<uv_handle_t>?, _ suggested: Int, _ buf: UnsafeMutablePointer<uv_buf_t>?) {
    guard let buf else { return }
    guard let stream = owner(handle) else { buf.pointee = uv_buf_init(nil, 0); return }
    stream.allocate(buf)
}

private func uvStreamRead(_ s: UnsafeMutablePointer<uv_stream_t>?, _ n: Int, _ buf: UnsafePointer<uv_buf_t>?) {
    owner(UnsafeMutableRawPointer(s)?.assumingMemoryBound(to: uv_handle_t.self))?.didRead(n, buf)
}

private func uvStreamConnection(_ s: UnsafeMutablePointer<uv_stream_t>?, _ status: Int32) {
    owner(UnsafeMutableRawPointer(s)?.assumingMemoryBound(to: uv_handle_t.self))?.didConnect(status)
}

/// Owns one `uv_write_t`, the frames it writes and their length prefixes.
final class UVWriteRequest {
    // SAFETY: allocated here, freed in deinit, which runs after the write
    // callback released the retain that `data` holds.
    let req: UnsafeMutablePointer<uv_write_t>
    let prefixes: UnsafeMutableRawPointer
    let frames: [[UInt8]]
    private var completion: ((Int32) -> Void)?

    init(frames: [[UInt8]], completion: @escaping (Int32) -> Void) {
        self.frames = frames
        self.completion = completion
        req = .allocate(capacity: 1)
        prefixes = .allocate(byteCount: max(4, 4 * frames.count), alignment: 4)
        for (i, frame) in frames.enumerated() {
            let h = FrameDecoder.header(forLength: frame.count)
            let p = prefixes.advanced(by: 4 * i).assumingMemoryBound(to: UInt8.self)
            p[0] = h.0; p[1] = h.1; p[2] = h.2; p[3] = h.3
        }
        req.pointee.data = Unmanaged.passRetained(self).toOpaque()
    }

    deinit {
        req.deallocate()
        prefixes.deallocate()
    }

    /// The write was refused up front: drop the retain libuv would have released.
    func abandon() {
        completion = nil
        Unmanaged<UVWriteRequest>.fromOpaque(req.pointee.data!).release()
    }

    fileprivate func finish(_ status: Int32) {
        let c = completion
        completion = nil
        c?(status)
    }
}

private func uvStreamWritten(_ req: UnsafeMutablePointer<uv_write_t>?, _ status: Int32) {
    guard let data = req?.pointee.data else { return }
    Unmanaged<UVWriteRequest>.fromOpaque(data).takeRetainedValue().finish(status)
}

/// Owns one connect or shutdown request.
final class UVStatusRequest {
    // SAFETY: `uv_req_size(type)` bytes allocated here, freed in deinit, which
    // runs after the request callback released the retain held in `data`.
    let raw: UnsafeMutableRawPointer
    private var completion: ((Int32) -> Void)?

    init(type: uv_req_type, completion: @escaping (Int32) -> Void) {
        raw = .allocate(byteCount: uv_req_size(type), alignment: 16)
        self.completion = completion
        raw.assumingMemoryBound(to: uv_req_t.self).pointee.data = Unmanaged.passRetained(self).toOpaque()
    }

    deinit { raw.deallocate() }

    func abandon() {
        completion = nil
        Unmanaged<UVStatusRequest>.fromOpaque(raw.assumingMemoryBound(to: uv_req_t.self).pointee.data!).release()
    }

    fileprivate func finish(_ status: Int32) {
        let c = completion
        completion = nil
        c?(status)
    }
}

private func uvConnectDone(_ req: UnsafeMutablePointer<uv_connect_t>?, _ status: Int32) {
    guard let data = req?.pointee.data else { return }
    Unmanaged<UVStatusRequest>.fromOpaque(data).takeRetainedValue().finish(status)
}

private func uvShutdownDone(_ req: UnsafeMutablePointer<uv_shutdown_t>?, _ status: Int32) {
    guard let data = req?.pointee.data else { return }
    Unmanaged<UVStatusRequest>.fromOpaque(data).takeRetainedValue().finish(status)
}

/// A one-shot libuv timer.
/// Not Sendable: created, started and closed on `loop`'s thread (asserted).
final class UVTimer {
    let loop: EventLoop
    // SAFETY: allocated in init, freed in deinit, which cannot run before the
    // close callback releases the retain held in `data`.
    private let timer: UnsafeMutablePointer<uv_timer_t>
    private var isClosing = false
    fileprivate var onFire: (() -> Void)?

    init(loop: EventLoop) {
        assert(loop.inLoopThread, "a libuv timer is made on its loop's thread")
        self.loop = loop
        timer = .allocate(capacity: 1)
        // uv_timer_init cannot fail on Unix (it only fills in the struct).
        uv_timer_init(loop.loop, timer)
        timer.pointee.data = Unmanaged.passRetained(self).toOpaque()
    }

    deinit { timer.deallocate() }

    /// Fires `body` once after `milliseconds`, unless closed first.
    func start(milliseconds: UInt64, _ body: @escaping () -> Void) {
        assert(loop.inLoopThread, "a libuv timer is used on its loop's thread")
        guard !isClosing else { return }
        onFire = body
        uv_timer_start(timer, uvTimerFired, milliseconds, 0)
    }

    /// Stops and closes the timer (once).
    func close() {
        assert(loop.inLoopThread, "a libuv timer is closed on its loop's thread")
        guard !isClosing else { return }
        isClosing = true
        onFire = nil
        uv_close(UnsafeMutableRawPointer(timer).assumingMemoryBound(to: uv_handle_t.self), uvTimerClosed)
    }
}

private func uvTimerFired(_ t: UnsafeMutablePointer<uv_timer_t>?) {
    guard let data = t?.pointee.data else { return }
    let timer = Unmanaged<UVTimer>.fromOpaque(data).takeUnretainedValue()
    let body = timer.onFire
    timer.onFire = nil
    body?()
}

private func uvTimerClosed(_ handle: UnsafeMutablePointer<uv_handle_t>?) {
    guard let handle, let data = handle.pointee.data else { return }
    handle.pointee.data = nil
    Unmanaged<UVTimer>.fromOpaque(data).release()
}
