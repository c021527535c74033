// Making connections: resolve a host name with uv_getaddrinfo (libuv runs the
// blocking getaddrinfo on its thread pool), then try each address in turn
// until one accepts, all within one deadline. "localhost" may resolve to ::1
// and 127.0.0.1; trying both in order makes it work whichever one the
// listener is bound to.

internal import CUV
import Glibc
import FerryToolkit

/// Factories for the libuv transports.
public enum Transports {
    /// Connects to a TCP or Unix socket endpoint. Throws `SocketError` with the
    /// endpoint and the libuv error ("connection refused (ECONNREFUSED)") or
    /// `connectTimedOut` after `timeout`.
    public static func connect(to endpoint: Endpoint, timeout: Duration = .seconds(10)) async throws -> FrameTransport {
        try await connect(to: endpoint, timeout: timeout, on: .shared)
    }

    /// The process's standard input and output as one transport, for
    /// `ssh host seeder serve --stdio <pid>`.
    ///
    /// The transport takes descriptors 0 and 1 over: it works on duplicates of
    /// them and points 0 and 1 at /dev/null, so a stray `print` cannot corrupt
    /// the frame stream, and closing the transport really ends the stream for
    /// the peer. Call it once per process. Errors (standard input is a regular
    /// file, ...) are reported by the first `send` or `receive`.
    public static func stdio() -> FrameTransport {
        StdioTransport.make(on: .shared)
    }

    /// A transport over descriptors the caller already has: the two ends of
    /// pipes, or one socket (`input == output`), e.g. from socketpair(2) to a
    /// child process. The transport owns them from now on: closing it closes
    /// them. `stdio()` is this over duplicates of 0 and 1.
    public static func descriptors(input: Int32, output: Int32, peerDescription: String) -> FrameTransport {
        StdioTransport.make(input: input, output: output, peer: peerDescription, on: .shared)
    }

    static func connect(to endpoint: Endpoint, timeout: Duration, on loop: EventLoop) async throws -> StreamTransport {
        let clock = ContinuousClock()
        let deadline = clock.now.advanced(by: timeout)
        switch endpoint {
        case .unix(let path):
            let stream = try await attempt(on: loop, endpoint: endpoint, timeout: timeout) { stream, done in
                stream.connect(toPath: path, completion: done)
                return 0
            }
            return await makeTransport(stream, peer: endpoint.description, on: loop)
        case .tcp(let host, let port):
            let addresses = try await resolve(host: host, port: port, passive: false, on: loop)
            var lastError: (any Error)? = nil
            for address in addresses {
                let remaining = clock.now.duration(to: deadline)
                if remaining <= .zero { break }
                do {
                    let stream = try await attempt(on: loop, endpoint: endpoint, timeout: remaining) { stream, done in
                        stream.connect(to: address, completion: done)
                    }
                    let literal = address.host == host
                    let peer = literal ? endpoint.description : "\(endpoint) (\(address.endpoint))"
                    return await makeTransport(stream, peer: peer, on: loop)
                } catch let e as SocketError {
                    lastError = e
                    if case .connectTimedOut = e { break }
                }
            }
            // Report the overall timeout, not the share left for the last address.
            if let lastError, case SocketError.connectFailed = lastError { throw lastError }
            throw SocketError.connectTimedOut(endpoint: endpoint.description, timeout)
        }
    }

    /// One connect attempt, raced against a timer, run as a job on the loop thread.
    private static func attempt(
        on loop: EventLoop, endpoint: Endpoint, timeout: Duration,
        start: @escaping @Sendable (UVStream, @escaping (Int32) -> Void) -> Int32
    ) async throws -> UVStream {
        let attempt = LoopBound(ConnectAttempt(), on: loop)
        return try await withTaskCancellationHandler {
          try await withCheckedThrowingContinuation { (c: CheckedContinuation<UVStream, any Error>) in
            let accepted = loop.execute {
                if attempt.value.cancelled {
                    c.resume(throwing: CancellationError())
                    return
                }
                let stream: UVStream
                do throws(UVError) {
                    if case .unix = endpoint { stream = try UVStream.pipe(on: loop) } else { stream = try UVStream.tcp(on: loop) }
                } catch {
                    c.resume(throwing: SocketError.connectFailed(endpoint: endpoint.description, error))
                    return
                }
                let timer = UVTimer(loop: loop)
                var finished = false
                let finish: (Result<UVStream, any Error>) -> Void = { result in
                    if finished { return }
                    finished = true
                    timer.close()
                    if case .failure = result { stream.close() }
                    c.resume(with: result)
                }
                let rc = start(stream) { status in
                    if status == 0 {
                        finish(.success(stream))
                    } else if status == UVError.canceled {
                        finish(.failure(SocketError.connectTimedOut(endpoint: endpoint.description, timeout)))
                    } else {
                        finish(.failure(SocketError.connectFailed(endpoint: endpoint.description, UVError(status))))
                    }
                }
                if rc != 0 {
                    finish(.failure(SocketError.connectFailed(endpoint: endpoint.description, UVError(rc))))
                    return
                }
                timer.start(milliseconds: UInt64(max(1, timeout.wholeMilliseconds))) {
                    finish(.failure(SocketError.connectTimedOut(endpoint: endpoint.description, timeout)))
                }
                attempt.value.cancel = { finish(.failure(CancellationError())) }
            }
            if !accepted { c.resume(throwing: EventLoopError.shutDown(name: loop.name)) }
          }
        } onCancel: {
            loop.execute {
                attempt.value.cancelled = true
                attempt.value.cancel?()
                attempt.value.cancel = nil
            }
        }
    }

    /// Wraps a connected stream in a transport and starts reading (a job on the loop thread).
    ///
    /// Socket buffer sizes are deliberately left to Linux's autotuning
    /// (tcp_wmem/tcp_rmem, here up to 4 MiB / 32 MiB): setting SO_SNDBUF or
    /// SO_RCVBUF switches autotuning off for the socket and is capped by
    /// net.core.wmem_max/rmem_max, which is smaller than what autotuning
    /// reaches on a fast path. Our own queues (8 MiB each way) sit on top.
    static func makeTransport(_ stream: UVStream, peer: String, on loop: EventLoop) async -> StreamTransport {
        let transport = StreamTransport(loop: loop, peer: peer)
        loop.execute {
            stream.setNoDelay()
            transport.attach(input: stream, output: stream)
        }
        return transport
    }

    /// Resolves `host` to socket addresses (IP literals included), in the
    /// order getaddrinfo prefers.
    static func resolve(host: String, port: UInt16, passive: Bool, on loop: EventLoop) async throws -> [SocketAddress] {
        // An IP literal needs no resolver (and no thread-pool round trip).
        var literal = SocketAddress()
        // SAFETY: sockaddr_storage is large and aligned enough for either
        // sockaddr_in or sockaddr_in6; libuv fills in at most one of them.
        let ok = withUnsafeMutableBytes(of: &literal.storage) { raw -> Bool in
            if uv_ip4_addr(host, Int32(port), raw.baseAddress!.assumingMemoryBound(to: sockaddr_in.self)) == 0 { return true }
            if uv_ip6_addr(host, Int32(port), raw.baseAddress!.assumingMemoryBound(to: sockaddr_in6.self)) == 0 { return true }
            return false
        }
        if ok { return [literal] }
        return try await withCheckedThrowingContinuation { (c: CheckedContinuation<[SocketAddress], any Error>) in
            let accepted = loop.execute {
                let request = UVResolveRequest { status, addresses in
                    if status != 0 {
                        c.resume(throwing: SocketError.resolveFailed(host: host, UVError(status)))
                    } else if addresses.isEmpty {
                        c.resume(throwing: SocketError.resolveFailed(host: host, UVError(UV_EAI_NONAME.rawValue)))
                    } else {
                        c.resume(returning: addresses)
                    }
                }
                request.start(loop: loop, host: host, port: port, passive: passive)
            }
            if !accepted { c.resume(throwing: EventLoopError.shutDown(name: loop.name)) }
        }
    }
}

/// Lets a cancelled task stop its connect attempt. Loop-bound: the attempt
/// and the cancellation both run on the loop thread, as jobs.
private final class ConnectAttempt {
    var cancelled = false
    var cancel: (() -> Void)?
}

/// Owns one `uv_getaddrinfo_t`.
private final class UVResolveRequest {
    // SAFETY: allocated here, freed in deinit, which runs after the callback
    // released the retain held in `data`.
    let req: UnsafeMutablePointer<uv_getaddrinfo_t>
    private var completion: ((Int32, [SocketAddress]) -> Void)?

    init(completion: @escaping (Int32, [SocketAddress]) -> Void) {
        req = .allocate(capacity: 1)
        // `data` is set (and the retain taken) in start(), just before libuv sees it.
        self.completion = completion
    }

    deinit { req.deallocate() }

    func start(loop: EventLoop, host: String, port: UInt16, passive: Bool) {
        var hints = addrinfo()
        hints.ai_family = AF_UNSPEC
        hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
        hints.ai_protocol = Int32(IPPROTO_TCP)
        hints.ai_flags = passive ? AI_PASSIVE : 0
        req.pointee.data = Unmanaged.passRetained(self).toOpaque()
        let rc = uv_getaddrinfo(loop.loop, req, uvResolved, host, String(port), &hints)
        if rc != 0 {
            Unmanaged<UVResolveRequest>.fromOpaque(req.pointee.data!).release()
            finish(rc, [])
        }
    }

    fileprivate func finish(_ status: Int32, _ addresses: [SocketAddress]) {
        let c = completion
        completion = nil
        c?(status, addresses)
    }
}

private func uvResolved(_ req: UnsafeMutablePointer<uv_getaddrinfo_t>?, _ status: Int32, _ res: UnsafeMutablePointer<addrinfo>?) {
    // SAFETY: data is the retain taken in start(); released here, once.
    guard let data = req?.pointee.data else { uv_freeaddrinfo(res); return }
    let request = Unmanaged<UVResolveRequest>.fromOpaque(data).takeRetainedValue()
    var addresses: [SocketAddress] = []
    var seen = Set<String>()
    var node = res
    while let n = node {
        if let sa = n.pointee.ai_addr, n.pointee.ai_family == AF_INET || n.pointee.ai_family == AF_INET6 {
            let address = SocketAddress(sa, length: Int(n.pointee.ai_addrlen))
            // getaddrinfo repeats addresses per protocol on some systems.
            if seen.insert("\(address.host)|\(address.port)").inserted { addresses.append(address) }
        }
        node = n.pointee.ai_next
    }
    uv_freeaddrinfo(res)
    request.finish(status, addresses)
}
