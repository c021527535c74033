import Glibc
import Synchronization
import Testing
@testable import FerryWire

/// Issue 11, finding 11: unauthenticated peers are bounded in number and in
/// the frame size they can make us allocate, from the first byte.
@Suite struct HandshakeGateTests {
    /// A blocking loopback TCP connection that speaks raw bytes.
    static func rawConnect(port: UInt16) throws -> Int32 {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        address.sin_port = port.bigEndian
        let rc = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        guard rc == 0 else { Glibc.close(fd); throw TestSetupError("cannot connect to 127.0.0.1:\(port): errno \(errno)") }
        return fd
    }

    static func port(of listener: Listener) throws -> UInt16 {
        guard case .tcp(_, let port) = listener.endpoint else { throw TestSetupError("not a TCP listener") }
        return port
    }

    @Test func anAcceptedStreamTakesOnlyHandshakeSizedFramesFromTheFirstByte() async throws {
        let listener = try await Listener.bind(.tcp(host: "127.0.0.1", port: 0))
        defer { listener.close() }
        let fd = try Self.rawConnect(port: try Self.port(of: listener))
        defer { Glibc.close(fd) }
        let server = try await listener.accept()
        defer { server.close() }
        // A first frame far over the handshake limit (yet under the old
        // default of 8 MiB), before anyone has set a limit on the stream.
        TransportTests.writeAll(fd, FrameDecoder.encode([UInt8](repeating: 1, count: 100_000)))
        do {
            let frame = try await server.receive()
            Issue.record("a \(frame?.count ?? 0)-byte frame was taken from an unauthenticated peer")
        } catch {
            #expect("\(error)".contains("100000 bytes, over the limit of \(WireLimits.handshakeMaxFrame) bytes"), "\(error)")
        }
    }

    @Test func handshakesBeyondTheCapAreRefusedAtOnce() async throws {
        let listener = try await Listener.bind(.tcp(host: "127.0.0.1", port: 0))
        let port = try Self.port(of: listener)
        let psk = try PreSharedSecret.generate()
        let log = Collected()
        // A small cap (the seeder's default is checked in CommandLineTests)
        // and long timeouts: in a test process whose other tests keep the
        // cooperative threads busy, neither side may give up before the
        // connections under test have been accepted.
        let cap = 4
        var options = SecureChannelOptions()
        options.handshakeTimeout = .seconds(120)
        let serverOptions = options
        let serving = Task {
            await listener.serveHandshakes(credentials: .preSharedSecret(psk), options: serverOptions, maxPending: cap, authenticated: { channel in
                log.add("authenticated")
                channel.close()
            }, refused: { _, error in
                log.add("\(error)")
            })
        }
        defer { listener.close(); serving.cancel() }
        // Peers that connect and say nothing hold every slot...
        var idle: [Int32] = []
        defer { idle.forEach { Glibc.close($0) } }
        for _ in 0..<cap { idle.append(try Self.rawConnect(port: port)) }
        // ...so the next is refused, and told why (had it waited for a slot
        // instead, it would have had its handshake once one freed).
        let refused = await Result {
            try await SecureChannel.client(over: try await Transports.connect(to: listener.endpoint), credentials: .preSharedSecret(psk),
                                           options: options)
        }
        guard case .failure(let error as HandshakeError) = refused else {
            Issue.record("the connection over the cap was not refused: \(refused)")
            return
        }
        #expect(error.failure == .busy && error.rejectedByPeer, "\(error)")
        #expect("\(error)".contains("too many connections are in their handshake there; retry in a few seconds"), "\(error)")
        #expect(log.items.contains { $0.contains("\(cap) connections are already in their handshake") })

        // Their slots come back when they go away.
        idle.forEach { Glibc.close($0) }
        idle = []
        for _ in 0..<3000 where log.items.count < cap + 1 {
            try await Task.sleep(for: .milliseconds(20))
        }
        let channel = try await SecureChannel.client(over: try await Transports.connect(to: listener.endpoint),
                                                     credentials: .preSharedSecret(psk), options: options)
        channel.close()
        for _ in 0..<3000 where !log.items.contains("authenticated") { try await Task.sleep(for: .milliseconds(20)) }
        #expect(log.items.contains("authenticated"))
    }
}

/// Lines collected from concurrent callbacks.
final class Collected: Sendable {
    private let lines = Mutex<[String]>([])
    func add(_ line: String) { lines.withLock { $0.append(line) } }
    var items: [String] { lines.withLock { $0 } }
}
