// The HTTP endpoint of `--metrics HOST:PORT`: answers `GET /metrics` with
// the Prometheus text format and 404 otherwise. It runs on one thread of its
// own with plain non-blocking sockets and poll(2), away from the libuv loop
// and the cooperative pool, so a scrape never delays a page and a stuck
// migration still answers scrapes. A scraper is anyone who can reach the
// port, so every connection is bounded: a request head of at most
// `maxRequestBytes`, at most `maxConnections` at once (more wait in the
// kernel's backlog), and `timeout` to send the request and take the answer.
// What a hostile scraper can hold is therefore a few tens of KiB for a few
// seconds. No kernel facility beyond sockets; no capability needed (ports
// below 1024 need CAP_NET_BIND_SERVICE).
import Glibc
import Synchronization
import FerryToolkit

/// The bounds of the metrics endpoint.
public struct MetricsServerLimits: Sendable {
    /// The longest request head (request line and headers) read. A
    /// Prometheus scrape sends about 250 bytes; anything longer is answered
    /// 431 and closed, before it can grow.
    public var maxRequestBytes = 8 * 1024
    /// Connections served at once. Scrapers come every few seconds, one at a
    /// time; more connections wait in the listen backlog until one ends.
    public var maxConnections = 4
    /// From accept to the last byte of the answer. A client that dribbles its
    /// request or does not read the answer is dropped when it runs out.
    public var timeout: Duration = .seconds(5)
    /// Connections the kernel queues beyond `maxConnections`.
    public var backlog: Int32 = 16

    public init() {}
}

/// Why the metrics endpoint cannot start; each names the address.
public enum MetricsServerError: Error, CustomStringConvertible, Sendable, Equatable {
    /// The address is not HOST:PORT.
    case badAddress(text: String, reason: String)
    /// The host did not resolve.
    case cannotResolve(address: String, reason: String)
    /// socket, bind or listen failed.
    case cannotListen(address: String, errno: Int32)
    /// The server thread could not be started.
    case cannotStart(address: String, errno: Int32)

    public var description: String {
        switch self {
        case .badAddress(let text, let reason):
            return "--metrics takes HOST:PORT or [IPv6]:PORT; got \"\(text)\": \(reason) (example: --metrics 127.0.0.1:9464)"
        case .cannotResolve(let address, let reason):
            return "cannot serve metrics on \(address): the host does not resolve (\(reason)); use an IP address such as 127.0.0.1"
        case .cannotListen(let address, let code):
            let advice: String
            switch code {
            case EADDRINUSE: advice = "; another process listens there: pick another port, or stop it"
            case EACCES: advice = "; ports below 1024 need root or CAP_NET_BIND_SERVICE: pick a higher port"
            case EADDRNOTAVAIL: advice = "; no interface of this host has that address: use 127.0.0.1 or 0.0.0.0"
            default: advice = ""
            }
            return "cannot serve metrics on \(address): \(SystemError.text(code))\(advice)"
        case .cannotStart(let address, let code):
            return "cannot serve metrics on \(address): no thread for it (\(SystemError.text(code)))"
        }
    }
}

/// An HTTP/1.1 server for one page: `GET /metrics`. `render` is called on
/// the server's thread for each scrape; it must not block for long.
public final class MetricsServer: Sendable {
    /// Where it listens, with the port it got ("127.0.0.1:9464", "[::1]:9464").
    public let address: String
    private let listener: Int32
    /// Written to by `close` to wake the poll loop.
    private let wakeWrite: Int32
    private let thread: pthread_t
    private let closed = Atomic<Bool>(false)

    /// Binds `text` (HOST:PORT, [IPv6]:PORT; port 0 picks a free one) and
    /// starts serving. Throws `MetricsServerError`, which names the address.
    public init(listen text: String, limits: MetricsServerLimits = .init(),
                render: @escaping @Sendable () -> String) throws {
        let (host, port) = try Self.parse(text)
        let shown = host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)"
        let fd = try Self.bind(host: host, port: port, shown: shown, backlog: limits.backlog)
        var pipeFDs: [Int32] = [0, 0]
        guard pipe(&pipeFDs) == 0 else {
            let code = errno
            Glibc.close(fd)
            throw MetricsServerError.cannotStart(address: shown, errno: code)
        }
        for end in pipeFDs { _ = fcntl(end, F_SETFD, FD_CLOEXEC) }
        _ = fcntl(pipeFDs[1], F_SETFL, O_NONBLOCK)
        let bound = Self.boundPort(fd) ?? port
        address = host.contains(":") ? "[\(host)]:\(bound)" : "\(host):\(bound)"
        listener = fd
        wakeWrite = pipeFDs[1]
        // Handed to the server thread, the only one that uses it from then on.
        let loop = Loop(listener: fd, wake: pipeFDs[0], limits: limits, render: render)
        do {
            thread = try startThread(for: "the metrics server on \(shown)") { loop.run() }
        } catch {
            for fd in [fd, pipeFDs[0], pipeFDs[1]] { Glibc.close(fd) }
            throw MetricsServerError.cannotStart(address: shown, errno: (error as? SystemError)?.errno ?? EAGAIN)
        }
    }

    deinit { close() }

    /// Stops serving: wakes the thread, waits for it to close every
    /// connection, and closes the listening socket. Safe to call twice.
    public func close() {
        guard !closed.exchange(true, ordering: .acquiringAndReleasing) else { return }
        var byte: UInt8 = 1
        // The pipe is ours and non-blocking: a full pipe means the thread is waking already.
        _ = try? systemCall("write", on: "the metrics server's wake pipe") { write(wakeWrite, &byte, 1) }
        pthread_join(thread, nil)
        Glibc.close(wakeWrite)
        Glibc.close(listener)
    }

    static func parse(_ text: String) throws -> (String, UInt16) {
        let endpoint: Endpoint
        do {
            endpoint = try Endpoint(parsing: text)
        } catch {
            throw MetricsServerError.badAddress(text: text, reason: error.reason)
        }
        guard case .tcp(let host, let port) = endpoint else {
            throw MetricsServerError.badAddress(text: text, reason: "metrics are served over TCP, not a Unix socket")
        }
        return (host, port)
    }

    private static func bind(host: String, port: UInt16, shown: String, backlog: Int32) throws -> Int32 {
        var hints = addrinfo()
        hints.ai_family = AF_UNSPEC
        hints.ai_socktype = Socket.stream
        hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV
        var list: UnsafeMutablePointer<addrinfo>? = nil
        let rc = getaddrinfo(host, String(port), &hints, &list)
        guard rc == 0, let first = list else {
            throw MetricsServerError.cannotResolve(address: shown, reason: String(cString: gai_strerror(rc)))
        }
        defer { freeaddrinfo(list) }
        var lastError = EADDRNOTAVAIL
        var entry: UnsafeMutablePointer<addrinfo>? = first
        while let info = entry {
            entry = info.pointee.ai_next
            let fd = socket(info.pointee.ai_family, Socket.stream | Socket.closeOnExec | Socket.nonBlocking, 0)
            guard fd >= 0 else { lastError = errno; continue }
            var one: Int32 = 1
            _ = setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
            if Glibc.bind(fd, info.pointee.ai_addr, info.pointee.ai_addrlen) == 0 && listen(fd, backlog) == 0 {
                return fd
            }
            lastError = errno
            Glibc.close(fd)
        }
        throw MetricsServerError.cannotListen(address: shown, errno: lastError)
    }

    private static func boundPort(_ fd: Int32) -> UInt16? {
        var storage = sockaddr_storage()
        var length = socklen_t(MemoryLayout<sockaddr_storage>.size)
        // SAFETY: sockaddr_storage is large enough for any sockaddr; `length` says how much the kernel may write.
        let rc = withUnsafeMutablePointer(to: &storage) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &length) }
        }
        guard rc == 0 else { return nil }
        let family = Int32(storage.ss_family)
        // SAFETY: the family says which sockaddr the kernel wrote there.
        return withUnsafePointer(to: &storage) { pointer -> UInt16? in
            switch family {
            case AF_INET:
                return pointer.withMemoryRebound(to: sockaddr_in.self, capacity: 1) { UInt16(bigEndian: $0.pointee.sin_port) }
            case AF_INET6:
                return pointer.withMemoryRebound(to: sockaddr_in6.self, capacity: 1) { UInt16(bigEndian: $0.pointee.sin6_port) }
            default:
                return nil
            }
        }
    }
}

/// Socket type flags of Linux (the same on every architecture Ferry runs
/// on). Glibc's `__socket_type` enum is not visible from this module.
private enum Socket {
    static let stream: Int32 = 1
    static let nonBlocking: Int32 = 0o4000
    static let closeOnExec: Int32 = 0o2000000
}

/// The server thread's state: only that thread touches it after `run` starts
/// (not Sendable: the closure that starts the thread hands it over).
private final class Loop {
    let listener: Int32
    let wake: Int32
    let limits: MetricsServerLimits
    let render: @Sendable () -> String

    struct Client {
        var request: [UInt8] = []
        var answer: [UInt8] = []
        var written = 0
        var deadline: ContinuousClock.Instant
    }
    var clients: [Int32: Client] = [:]

    init(listener: Int32, wake: Int32, limits: MetricsServerLimits, render: @escaping @Sendable () -> String) {
        self.listener = listener
        self.wake = wake
        self.limits = limits
        self.render = render
    }

    func run() {
        defer {
            for fd in clients.keys { close(fd) }
            clients.removeAll()
            close(wake)
        }
        while true {
            var fds = [pollfd(fd: wake, events: Int16(POLLIN), revents: 0)]
            let accepting = clients.count < limits.maxConnections
            if accepting { fds.append(pollfd(fd: listener, events: Int16(POLLIN), revents: 0)) }
            let order = Array(clients.keys)
            for fd in order {
                let writing = !clients[fd]!.answer.isEmpty
                fds.append(pollfd(fd: fd, events: Int16(writing ? POLLOUT : POLLIN), revents: 0))
            }
            let now = ContinuousClock.now
            var wait: Int32 = -1
            if let next = clients.values.map(\.deadline).min() {
                let left = next - now
                wait = Int32(clamping: max(0, left.wholeMilliseconds + 1))
            }
            guard (try? checkedCall("poll", on: "the metrics server", { poll(&fds, nfds_t(fds.count), wait) })) != nil else { return }
            if fds[0].revents != 0 { return }
            var index = 1
            if accepting {
                if fds[1].revents != 0 { acceptAll() }
                index = 2
            }
            for fd in order {
                let events = fds[index].revents
                index += 1
                if events != 0 { service(fd, events: events) }
            }
            let later = ContinuousClock.now
            for (fd, client) in clients where client.deadline <= later { drop(fd) }
        }
    }

    private func acceptAll() {
        while clients.count < limits.maxConnections {
            // accept4 is a GNU extension this module cannot see: set the flags after.
            let fd = accept(listener, nil, nil)
            guard fd >= 0 else { return }
            _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
            _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK)
            clients[fd] = Client(deadline: .now + limits.timeout)
        }
    }

    private func drop(_ fd: Int32) {
        clients[fd] = nil
        close(fd)
    }

    private func service(_ fd: Int32, events: Int16) {
        guard var client = clients[fd] else { return }
        if client.answer.isEmpty {
            // Reading the request head; never more than the limit plus one read.
            var chunk = [UInt8](repeating: 0, count: 2048)
            let n: Int
            switch try? systemCall("recv", on: "a metrics client", { recv(fd, &chunk, chunk.count, 0) }) {
            case .done(let got)?: n = got
            case .wouldBlock?: return
            case nil: return drop(fd)
            }
            if n == 0 { return drop(fd) }
            client.request += chunk[..<n]
            if let head = Self.head(of: client.request) {
                client.answer = answer(to: head)
            } else if client.request.count > limits.maxRequestBytes {
                client.answer = Self.response(status: "431 Request Header Fields Too Large",
                                              body: "request head longer than \(limits.maxRequestBytes) bytes\n")
            } else {
                clients[fd] = client
                return
            }
            client.request = []
        } else if events & Int16(POLLOUT | POLLERR | POLLHUP) == 0 {
            return
        }
        // Writing the answer.
        // SAFETY: `written` < `answer.count` here, so the pointer and length stay inside the answer.
        let sent = try? systemCall("send", on: "a metrics client") {
            client.answer.withUnsafeBytes { bytes in
                send(fd, bytes.baseAddress! + client.written, bytes.count - client.written, Int32(MSG_NOSIGNAL))
            }
        }
        switch sent {
        case .done(let n)?: client.written += n
        case .wouldBlock?: break
        case nil: return drop(fd)
        }
        if client.written >= client.answer.count {
            shutdown(fd, Int32(SHUT_WR))
            return drop(fd)
        }
        clients[fd] = client
    }

    /// The request head (up to the blank line), once it is complete.
    static func head(of bytes: [UInt8]) -> [UInt8]? {
        guard bytes.count >= 2 else { return nil }
        for i in 1..<bytes.count where bytes[i] == 0x0A {
            if bytes[i - 1] == 0x0A { return Array(bytes[..<i]) }
            if i >= 3 && bytes[i - 1] == 0x0D && bytes[i - 2] == 0x0A { return Array(bytes[..<i]) }
        }
        return nil
    }

    private func answer(to head: [UInt8]) -> [UInt8] {
        let firstLine = head.split(separator: 0x0A, maxSplits: 1, omittingEmptySubsequences: false).first ?? []
        let words = String(decoding: firstLine, as: UTF8.self)
            .split(separator: " ", omittingEmptySubsequences: true).map { $0.trimmingSuffix("\r") }
        guard words.count == 3, words[2].hasPrefix("HTTP/1.") else {
            return Self.response(status: "400 Bad Request", body: "not an HTTP/1.x request\n")
        }
        let method = words[0]
        let path = words[1].split(separator: "?", maxSplits: 1, omittingEmptySubsequences: false).first.map(String.init) ?? ""
        guard method == "GET" || method == "HEAD" else {
            return Self.response(status: "405 Method Not Allowed", extra: "Allow: GET, HEAD\r\n",
                                 body: "only GET /metrics is served here\n")
        }
        guard path == "/metrics" else {
            return Self.response(status: "404 Not Found", body: "not found; Ferry's metrics are at /metrics\n")
        }
        return Self.response(status: "200 OK", contentType: "text/plain; version=0.0.4; charset=utf-8",
                             body: render(), headOnly: method == "HEAD")
    }

    static func response(status: String, contentType: String = "text/plain; charset=utf-8", extra: String = "",
                         body: String, headOnly: Bool = false) -> [UInt8] {
        let bodyBytes = Array(body.utf8)
        var text = "HTTP/1.1 \(status)\r\nContent-Type: \(contentType)\r\nContent-Length: \(bodyBytes.count)\r\n"
        text += extra + "Connection: close\r\n\r\n"
        return Array(text.utf8) + (headOnly ? [] : bodyBytes)
    }
}

extension Substring {
    fileprivate func trimmingSuffix(_ suffix: Character) -> String {
        last == suffix ? String(dropLast()) : String(self)
    }
}
