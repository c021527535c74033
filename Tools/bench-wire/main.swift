// ferry-bench-wire: throughput and round trips of Ferry's wire, next to
// baselines measured in the same run (Tools/bench-wire.sh adds the C
// reference). Every figure is loopback TCP on this host.
//
//   ferry-bench-wire [--bytes N] [--frame N] [--cores N] [--requests N]
//                    [--only socket|transport|secure|pingpong|rpc] [--cipher aes|xchacha]
//
// Output: one "name value unit" line per figure, easy to grep from a script.

import FerryWire
import Glibc

struct Options {
    var bytes = 1 << 30
    var frame = 1 << 20
    var cores = Int(sysconf(Int32(_SC_NPROCESSORS_ONLN)))
    var requests = 200_000
    var only: Set<String> = []
    var allowAES = true
    var tuneMalloc = true

    init(_ args: [String]) {
        var i = 0
        func value() -> String {
            i += 1
            guard i < args.count else { fail("\(args[i - 1]) needs a value") }
            return args[i]
        }
        func number() -> Int {
            let v = value()
            guard let n = Options.parseSize(v), n > 0 else { fail("\(args[i - 1]): \"\(v)\" is not a positive size (e.g. 1048576, 1M, 1G)") }
            return n
        }
        while i < args.count {
            switch args[i] {
            case "--bytes": bytes = number()
            case "--frame": frame = number()
            case "--cores": cores = number()
            case "--requests": requests = number()
            case "--only": only.insert(value())
            case "--default-malloc": tuneMalloc = false
            case "--cipher":
                switch value() {
                case "aes": allowAES = true
                case "xchacha": allowAES = false
                case let c: fail("--cipher: unknown cipher \"\(c)\" (aes or xchacha)")
                }
            case "--help", "-h":
                print("usage: ferry-bench-wire [--bytes N] [--frame N] [--cores N] [--requests N] [--only socket|transport|secure|pingpong|rpc] [--cipher aes|xchacha] [--default-malloc]")
                exit(0)
            default: fail("unknown argument \(args[i]); see --help")
            }
            i += 1
        }
    }

    static func parseSize(_ s: String) -> Int? {
        let units: [Character: Int] = ["K": 1 << 10, "M": 1 << 20, "G": 1 << 30]
        if let u = s.last, let m = units[Character(u.uppercased())], let n = Int(s.dropLast()) { return n * m }
        return Int(s)
    }

    func wants(_ name: String) -> Bool { only.isEmpty || only.contains(name) }
}

// <malloc.h> is not part of Swift's Glibc module; mallopt(3) is stable C ABI.
@_silgen_name("mallopt") func mallopt(_ parameter: Int32, _ value: Int32) -> Int32

func fail(_ message: String) -> Never {
    var stderr = StandardError()
    print("ferry-bench-wire: \(message)", to: &stderr)
    exit(2)
}

struct StandardError: TextOutputStream {
    mutating func write(_ s: String) {
        var bytes = Array(s.utf8)
        _ = Glibc.write(2, &bytes, bytes.count)
    }
}

func now() -> ContinuousClock.Instant { .now }

func seconds(_ d: Duration) -> Double {
    Double(d.components.seconds) + Double(d.components.attoseconds) / 1e18
}

func report(_ name: String, bytes: Int, _ elapsed: Duration) -> Double {
    let gbps = Double(bytes) / seconds(elapsed) / 1e9
    print("\(name) \(String(format3(gbps))) GB/s (\(bytes >> 20) MiB in \(format3(seconds(elapsed))) s)")
    return gbps
}

func format3(_ x: Double) -> String {
    let scaled = (x * 1000).rounded() / 1000
    return "\(scaled)"
}

// MARK: Plain blocking sockets in Swift (baseline)

/// Runs `body` on a new thread; `join` waits for it.
final class Thread: @unchecked Sendable {
    // Invariant: `body` is read once by the new thread; `handle` only by join.
    private var handle = pthread_t()
    private let body: () -> Void
    init(_ body: @escaping () -> Void) {
        self.body = body
        let context = Unmanaged.passRetained(self).toOpaque()
        pthread_create(&handle, nil, { arg in
            let t = Unmanaged<Thread>.fromOpaque(arg!).takeRetainedValue()
            t.body()
            return nil
        }, context)
    }
    func join() { pthread_join(handle, nil) }
}

func loopbackPair() -> (Int32, Int32) {
    let ls = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    var a = sockaddr_in()
    a.sin_family = sa_family_t(AF_INET)
    a.sin_addr.s_addr = UInt32(0x7f00_0001).bigEndian
    var len = socklen_t(MemoryLayout<sockaddr_in>.size)
    withUnsafeMutablePointer(to: &a) { p in
        p.withMemoryRebound(to: sockaddr.self, capacity: 1) { sa in
            _ = bind(ls, sa, len)
            _ = listen(ls, 1)
            _ = getsockname(ls, sa, &len)
        }
    }
    let c = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    withUnsafePointer(to: &a) { p in
        p.withMemoryRebound(to: sockaddr.self, capacity: 1) { sa in _ = connect(c, sa, len) }
    }
    let s = accept(ls, nil, nil)
    close(ls)
    var one: Int32 = 1
    setsockopt(c, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(4))
    setsockopt(s, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(4))
    return (c, s)
}

func plainSockets(_ o: Options) -> Double {
    let (c, s) = loopbackPair()
    let frames = o.bytes / o.frame
    let frameBytes = o.frame
    let start = now()
    let sender = Thread {
        let buf = UnsafeMutableRawBufferPointer.allocate(byteCount: 4 + frameBytes, alignment: 64)
        defer { buf.deallocate() }
        buf.initializeMemory(as: UInt8.self, repeating: 0xA5)
        buf.storeBytes(of: UInt32(frameBytes).bigEndian, as: UInt32.self)
        for _ in 0 ..< frames {
            var off = 0
            while off < buf.count {
                let n = write(c, buf.baseAddress! + off, buf.count - off)
                if n <= 0 { fail("plain socket write failed") }
                off += n
            }
        }
    }
    let receiver = Thread {
        let buf = UnsafeMutableRawBufferPointer.allocate(byteCount: frameBytes, alignment: 64)
        defer { buf.deallocate() }
        var header = UInt32(0)
        for _ in 0 ..< frames {
            withUnsafeMutableBytes(of: &header) { h in readAll(s, h.baseAddress!, 4) }
            readAll(s, buf.baseAddress!, Int(UInt32(bigEndian: header)))
        }
    }
    sender.join()
    receiver.join()
    let elapsed = now() - start
    close(c)
    close(s)
    return report("plain-socket-swift", bytes: frames * o.frame, elapsed)
}

func readAll(_ fd: Int32, _ p: UnsafeMutableRawPointer, _ n: Int) {
    var off = 0
    while off < n {
        let r = read(fd, p + off, n - off)
        if r <= 0 { fail("plain socket read failed") }
        off += r
    }
}

// MARK: Ferry transports

func connectedPair() async throws -> (FrameTransport, FrameTransport, Listener) {
    let listener = try await Listener.bind(.tcp(host: "127.0.0.1", port: 0))
    async let server = listener.accept()
    let client = try await Transports.connect(to: listener.endpoint)
    return (client, try await server, listener)
}

/// Sends `frames` payloads from `senders` concurrent tasks, receives them on
/// one task; returns the time until the last one arrived.
func bulk(from a: FrameTransport, to b: FrameTransport, frames: Int, frame: Int, senders: Int) async throws -> Duration {
    let payload = [UInt8](repeating: 0xA5, count: frame)
    let start = now()
    async let received: Int = {
        var n = 0
        while n < frames, let f = try await b.receive() {
            if f.count != frame { fail("received a frame of \(f.count) bytes, expected \(frame)") }
            n += 1
        }
        return n
    }()
    try await withThrowingTaskGroup(of: Void.self) { group in
        for s in 0 ..< senders {
            let share = frames / senders + (s < frames % senders ? 1 : 0)
            group.addTask {
                for _ in 0 ..< share { try await a.send(payload) }
            }
        }
        try await group.waitForAll()
    }
    let n = try await received
    if n != frames { fail("received \(n) of \(frames) frames") }
    return now() - start
}

func transportPlain(_ o: Options) async throws -> Double {
    let (a, b, listener) = try await connectedPair()
    defer { a.close(); b.close(); listener.close() }
    b.setMaxIncomingFrameSize(o.frame)
    let frames = o.bytes / o.frame
    let elapsed = try await bulk(from: a, to: b, frames: frames, frame: o.frame, senders: 1)
    return report("ferry-transport-plain", bytes: frames * o.frame, elapsed)
}

func securePair(_ o: Options, openAhead: Int = 0) async throws -> (SecureChannel, SecureChannel, Listener) {
    let (a, b, listener) = try await connectedPair()
    let secret = try PreSharedSecret.generate()
    var options = SecureChannelOptions()
    options.allowAES = o.allowAES && CipherSuite.aesAvailable
    options.maxIncomingPayload = max(o.frame, options.maxIncomingPayload)
    // Opening in parallel on the receiving side (SecureChannel's open-ahead).
    options.openAhead = openAhead
    async let server = SecureChannel.server(over: b, credentials: .preSharedSecret(secret), options: options)
    let client = try await SecureChannel.client(over: a, credentials: .preSharedSecret(secret), options: options)
    return (client, try await server, listener)
}

func secureBulk(_ o: Options, cores: Int) async throws -> Double {
    // N cores: N sealing tasks, and N - 1 records opened ahead in parallel
    // (SecureChannel's advice for bulk connections).
    let (a, b, listener) = try await securePair(o, openAhead: cores > 1 ? cores - 1 : 0)
    defer { a.close(); b.close(); listener.close() }
    let frames = o.bytes / o.frame
    let elapsed = try await bulk(from: a, to: b, frames: frames, frame: o.frame, senders: cores)
    return report("ferry-secure-\(a.cipher)-cores\(cores)", bytes: frames * o.frame, elapsed)
}

// MARK: Round trips without crypto and RPC (what the transport itself costs)

func pingPong(_ o: Options) async throws -> Double {
    let (a, b, listener) = try await connectedPair()
    defer { a.close(); b.close(); listener.close() }
    let count = 20_000
    let echo = Task {
        while let f = try await b.receive() { try await b.send(f) }
    }
    let request = [UInt8](repeating: 3, count: 32)
    let start = now()
    for _ in 0 ..< count {
        try await a.send(request)
        _ = try await a.receive()
    }
    let elapsed = now() - start
    a.close()
    _ = try? await echo.value
    let rate = Double(count) / seconds(elapsed)
    print("ferry-transport-pingpong \(Int(rate)) round trips/s (\(format3(seconds(elapsed) / Double(count) * 1e6)) us each, 32 bytes, no crypto)")
    return rate
}

// MARK: RPC round trips

func rpc(_ o: Options, inFlight: Int) async throws -> Double {
    let (a, b, listener) = try await securePair(o)
    defer { listener.close() }
    let reply = [UInt8](repeating: 1, count: 64)
    let server = RPCServer(transport: b) { _, _, _ in reply }
    let serving = Task { try await server.run() }
    let client = RPCClient(transport: a)
    let request = [UInt8](repeating: 2, count: 32)
    let total = inFlight == 1 ? min(o.requests, 50_000) : o.requests
    let start = now()
    try await withThrowingTaskGroup(of: Void.self) { group in
        for w in 0 ..< inFlight {
            let share = total / inFlight + (w < total % inFlight ? 1 : 0)
            group.addTask {
                for _ in 0 ..< share { _ = try await client.call(0x0100, request) }
            }
        }
        try await group.waitForAll()
    }
    let elapsed = now() - start
    client.close()
    a.close()
    _ = try? await serving.value
    b.close()
    let rate = Double(total) / seconds(elapsed)
    print("ferry-rpc-inflight\(inFlight) \(Int(rate)) requests/s (\(total) in \(format3(seconds(elapsed))) s, 32-byte request, 64-byte reply)")
    return rate
}

// MARK: Main

let options = Options(Array(CommandLine.arguments.dropFirst()))
if options.tuneMalloc {
    // Every frame is a fresh [UInt8] of 1 MiB. By default glibc hands such
    // blocks back to the kernel (trim/madvise) and the next frame page-faults
    // them in again, zeroed: ~10 % of the CPU time in this benchmark. Keeping
    // freed memory in the heap is what the seeder and leecher should do too.
    _ = mallopt(-3 /* M_MMAP_THRESHOLD */, 32 << 20)
    _ = mallopt(-1 /* M_TRIM_THRESHOLD */, 256 << 20)
}
print("# ferry-bench-wire: \(options.bytes >> 20) MiB of \(options.frame >> 10) KiB frames over loopback TCP, \(options.cores) core(s), AES available: \(CipherSuite.aesAvailable), malloc tuned: \(options.tuneMalloc)")
if options.wants("socket") { _ = plainSockets(options) }
if options.wants("transport") { _ = try await transportPlain(options) }
if options.wants("secure") {
    var coreCounts = [1]
    if options.cores > 1 { coreCounts.append(options.cores) }
    for c in coreCounts { _ = try await secureBulk(options, cores: c) }
}
if options.wants("pingpong") { _ = try await pingPong(options) }
if options.wants("rpc") {
    _ = try await rpc(options, inFlight: 1)
    _ = try await rpc(options, inFlight: 256)
}
