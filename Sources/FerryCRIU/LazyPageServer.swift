// The destination's page server: what `criu lazy-pages --page-server`
// connects to (Protocols/criu.md § 4). CRIU's lazy-pages daemon asks with
// PS_IOV_GET for pages the restored process touched (first) and for the rest
// (in the background); each reply is the request's header with cmd
// PS_IOV_ADD_F | PE_PRESENT << 16, then the pages, in request order. Pages
// come from a provider (Ferry's store of the pre-copied memory), which waits
// for the first page of a request if it does not hold it yet and fetches it
// from the seeder first, answering with the pages it holds from there; only
// pages CRIU marked lazy are answered, and none is ever made up.
import Foundation
import FerryToolkit
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// Where the lazy pages come from.
public protocol LazyPageProvider: AnyObject, Sendable {
    /// These pages are wanted soon: fetch any not held first. Non-blocking.
    func want(address: UInt64, pages: Int)
    /// Blocks until the first page of the range is held, at most `timeout`,
    /// and copies into `buffer` the pages held from there on, in order up to
    /// the first one not held; returns how many (at least 1). Throws when
    /// the first page cannot be had.
    func copy(address: UInt64, pages: Int, into buffer: UnsafeMutableRawBufferPointer, timeout: Duration) throws -> Int
}

public final class LazyPageServer: Sendable {
    public let port: UInt16
    private let listener: Int32
    private let provider: any LazyPageProvider
    private let timeout: Duration
    private struct Counters {
        var served: UInt64 = 0
        var failure: String? = nil
        var closed = false
        var lastPage: ContinuousClock.Instant? = nil
        /// Lazy pages per process id of the dump (CriuImages.lazyRanges); set once the images are in.
        var lazy: [UInt64: [(start: UInt64, pages: UInt64)]] = [:]
        var lazyPages: UInt64 = 0
    }
    private let counters = Mutex(Counters())

    /// Largest request answered: CRIU asks for at most a VMA's worth, in
    /// chunks; 64 MiB bounds the buffer a peer can make us allocate.
    public static let maxPagesPerRequest: UInt64 = 16384

    /// A server listening on 127.0.0.1 (an ephemeral port); it answers
    /// pages once `setLazy` has said which ones CRIU left lazy.
    public init(provider: any LazyPageProvider, timeout: Duration) throws {
        self.provider = provider
        self.timeout = timeout
        let fd = try checkedCall("socket", on: "127.0.0.1") { socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0) }
        var address = loopback(port: 0)
        do {
            try checkedCall("bind", on: "127.0.0.1:0") {
                withUnsafePointer(to: &address) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }
            }
            try checkedCall("listen", on: "127.0.0.1") { Glibc.listen(fd, 1) }
            var length = socklen_t(MemoryLayout<sockaddr_in>.size)
            try checkedCall("getsockname", on: "127.0.0.1") {
                withUnsafeMutablePointer(to: &address) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &length) } }
            }
        } catch {
            close(fd)
            throw error
        }
        listener = fd
        port = UInt16(bigEndian: address.sin_port)
    }

    /// Serves one connection on a thread of its own.
    public func start() throws {
        _ = try startThread(for: "CRIU lazy pages") { [self] in
            let connection = accept(listener, nil, nil)
            close(listener)
            guard connection >= 0 else { fail("accept: errno \(errno)"); return }
            defer { close(connection) }
            do { try serve(connection) } catch { fail("\(error)") }
        }
    }

    /// The pages CRIU left lazy, from the dump's pagemap (CriuImages.lazyRanges).
    public func setLazy(_ lazy: [UInt64: [(start: UInt64, pages: UInt64)]]) {
        counters.withLock {
            $0.lazy = lazy.mapValues { $0.sorted { $0.start < $1.start } }
            $0.lazyPages = lazy.values.joined().reduce(0) { $0 + $1.pages }
        }
    }

    public var lazyPages: UInt64 { counters.withLock { $0.lazyPages } }
    public var pagesServed: UInt64 { counters.withLock { $0.served } }
    public var failure: String? { counters.withLock { $0.failure } }
    /// When the last lazy page was sent, once every one was.
    public var everyPageSent: ContinuousClock.Instant? { counters.withLock { $0.served >= $0.lazyPages ? $0.lastPage : nil } }
    public var closed: Bool { counters.withLock { $0.closed } }

    private func fail(_ reason: String) {
        counters.withLock { if $0.failure == nil { $0.failure = reason } }
    }

    private func isLazy(_ header: PageServerHeader) -> Bool {
        // A GET names the process by its pid alone (criu/pagemap.c:
        // request_remote_pages(pr->img_id, ...)), not (id << 8) | type.
        guard let ranges = counters.withLock({ $0.lazy[header.destination] }) else { return false }
        let end = header.address + header.pages * 4096
        return ranges.contains { $0.start <= header.address && end <= $0.start + $0.pages * 4096 }
    }

    private func serve(_ connection: Int32) throws {
        var one: Int32 = 1
        setsockopt(connection, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
        var pending: [UInt8] = []
        var queue: [PageServerHeader] = []
        var chunk = [UInt8](repeating: 0, count: 64 * PageServerHeader.size)
        var buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 1 << 20, alignment: 4096)
        defer { buffer.deallocate() }
        while true {
            // Take every header that has arrived (blocking only when none is
            // queued), and say at once which pages are wanted: the provider
            // fetches them while earlier replies are written.
            let flags = queue.isEmpty ? Int32(0) : Int32(MSG_DONTWAIT)
            let n = chunk.withUnsafeMutableBytes { recv(connection, $0.baseAddress, $0.count, flags) }
            if n == 0 && queue.isEmpty { return } // CRIU hung up
            if n > 0 {
                pending += chunk[..<n]
                while pending.count >= PageServerHeader.size {
                    let header = pending.withUnsafeBytes { PageServerHeader(decoding: $0) }
                    pending.removeFirst(PageServerHeader.size)
                    if header.known == .get {
                        guard header.pages > 0, header.pages <= Self.maxPagesPerRequest else {
                            throw CriuError.protocolViolation("PS_IOV_GET of \(header.pages) pages")
                        }
                        guard isLazy(header) else {
                            throw CriuError.protocolViolation(String(format: "PS_IOV_GET of %llu pages at 0x%llx (pid %llu) that CRIU did not mark lazy", header.pages, header.address, header.destination))
                        }
                        provider.want(address: header.address, pages: Int(header.pages))
                    }
                    queue.append(header)
                }
            } else if n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR {
                throw SystemError(operation: "recv", target: "the CRIU lazy-pages connection", errno: errno)
            }
            guard !queue.isEmpty else { continue }
            let header = queue.removeFirst()
            switch header.known {
            case .get:
                let bytes = Int(header.pages) * 4096
                if buffer.count < bytes {
                    buffer.deallocate()
                    buffer = .allocate(byteCount: bytes, alignment: 4096)
                }
                let view = UnsafeMutableRawBufferPointer(rebasing: buffer[..<bytes])
                // A short reply is CRIU's to take (criu/uffd.c, uffd_io_complete:
                // "the remote side may send less pages than we requested"): it
                // asks for the rest again later. So a request waits only for its
                // first page, never behind pages post-copy has not fetched yet.
                let held = try provider.copy(address: header.address, pages: Int(header.pages), into: view, timeout: timeout)
                var reply = header
                reply.pages = UInt64(held)
                reply.command = PageServerCommand.addFlagged.rawValue
                reply.flags = PagemapFlag.present
                try sendAll(connection, reply.encoded())
                try sendAll(connection, UnsafeRawBufferPointer(rebasing: view[..<(held * 4096)]))
                let now = ContinuousClock.now
                counters.withLock { $0.served += UInt64(held); $0.lastPage = now }
            case .close, .forceClose:
                var status: Int32 = 0
                try withUnsafeBytes(of: &status) { try sendAll(connection, $0) }
                counters.withLock { $0.closed = true }
                return
            default:
                throw CriuError.protocolViolation("unexpected command \(header.command) from the lazy-pages daemon")
            }
        }
    }
}
