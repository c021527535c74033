// ferry-bench-postcopy: post-copy into live memory on loopback, next to
// baselines measured in the same run.
//
//   ferry-bench-postcopy [--mib N] [--touches N] [--in-flight N] [--pages-per-request N] [--window N] [--window-pages N]
//                        [--rounds N] [--in-process] [--cpu-hogs N] [--slice-us N]
//
// --cpu-hogs N runs N busy-looping processes during the whole run: other
// programs competing for the cores (not part of issue 5's target).
// --slice-us N gives the threads of this process (the leecher and the
// touching thread, which stands for the program) and of the seeder an N µs
// scheduler slice before the loaded phase (kernel 6.12+).
//
// Each of --rounds rounds (default 3) measures everything again, baselines
// included, and prints its figures; the ratios at the end are the medians
// of the rounds' ratios, so one round disturbed by other work on a shared
// host does not decide the result.
//
// The seeders are `seeder serve` processes, as in a real migration (build the
// package's products first); --in-process runs them inside this process
// instead, where they share its libuv loop and Swift threads with the leecher.
//
// Figures ("name value unit" lines, then ratios against their targets):
// - rpc_rtt: a 4 KiB ReadAt round trip, one in flight, over the encrypted
//   link to a seeder (a second workload process, so the migration measured
//   below is not disturbed): the small-RPC baseline.
// - link: ReadAt throughput, 16 x 1 MiB in flight, same link, nothing
//   installed: the encrypted link baseline for the background fill.
// - uffdio_copy: plain UFFDIO_COPY of 1 MiB batches into missing-mode memory.
// - touch_idle / touch_loaded: first touch of a remote page right after
//   Finalize (fault to data: the load instruction's wall time) with the
//   background fill paused, then running.
// - fill: background fill throughput after the hand-over.
// Targets (issue 5): median touch <= 3x rpc_rtt; fill >= 70 % of link.
import Foundation
import Glibc
import FerryMigration
import FerryWire
import FerryTestSupport
import FerrySystem
import FerrySystem

var mib = 256
var touches = 300
var inFlight = 16
var window = PostCopyOptions().requestsInFlight
var windowPages = PostCopyOptions().pagesPerRequest
var pagesPerRequest = 256
var inProcess = false
var rounds = 3
var cpuHogs = 0
var schedulerSlice: Duration? = nil
var arguments = CommandLine.arguments.dropFirst()
while let flag = arguments.popFirst() {
    switch flag {
    case "--mib": mib = Int(arguments.popFirst() ?? "") ?? mib
    case "--touches": touches = Int(arguments.popFirst() ?? "") ?? touches
    case "--window": window = Int(arguments.popFirst() ?? "") ?? window
    case "--window-pages": windowPages = Int(arguments.popFirst() ?? "") ?? windowPages
    case "--in-flight": inFlight = Int(arguments.popFirst() ?? "") ?? inFlight
    case "--pages-per-request": pagesPerRequest = Int(arguments.popFirst() ?? "") ?? pagesPerRequest
    case "--in-process": inProcess = true
    case "--rounds": rounds = max(1, Int(arguments.popFirst() ?? "") ?? rounds)
    case "--cpu-hogs": cpuHogs = max(0, Int(arguments.popFirst() ?? "") ?? cpuHogs)
    case "--slice-us": schedulerSlice = Int(arguments.popFirst() ?? "").map { .microseconds($0) }
    default:
        print("usage: ferry-bench-postcopy [--mib N] [--touches N] [--in-flight N] [--pages-per-request N] [--window N] [--window-pages N] [--rounds N] [--in-process] [--cpu-hogs N] [--slice-us N]")
        exit(flag == "--help" ? 0 : 2)
    }
}

func report(_ name: String, _ value: Double, _ unit: String) {
    print(name, String(format: "%.3f", value), unit)
}

/// A seeder of `pid` on an ephemeral loopback port with a pre-shared secret:
/// a `seeder serve` process, or a service inside this process.
final class Seeder {
    let connector: Leecher.Connector
    /// The seeder process (this process when in process).
    private(set) var pid: Int32 = Glibc.getpid()
    private let close: () -> Void

    init(pid: Int32, inProcess: Bool) async throws {
        let secret = try PreSharedSecret.generate()
        let endpoint: Endpoint
        if inProcess {
            let service = SeederService(source: try TrackedProcess.attach(pid: pid), options: SeederOptions(then: .stop, grace: .seconds(3)))
            let listener = try await Listener.bind(.tcp(host: "127.0.0.1", port: 0))
            let accept = Task {
                while let transport = try? await listener.accept() {
                    Task {
                        guard let channel = try? await SecureChannel.server(over: transport, credentials: .preSharedSecret(secret)) else {
                            transport.close()
                            return
                        }
                        await service.serve(channel)
                    }
                }
            }
            endpoint = listener.endpoint
            close = { listener.close(); accept.cancel() }
        } else {
            let file = "/tmp/ferry-bench-postcopy-\(getpid())-\(pid).secret"
            let fd = open(file, O_WRONLY | O_CREAT | O_TRUNC, 0o600)
            guard fd >= 0 else { throw TestFailure("cannot write \(file): \(String(cString: strerror(errno)))") }
            let text = secret.text + "\n"
            _ = text.withCString { write(fd, $0, strlen($0)) }
            Glibc.close(fd)
            let child = try ChildProcess(builtExecutable("seeder"),
                                         ["serve", "\(pid)", "--listen", "127.0.0.1:0", "--secret-file", file, "--grace", "3", "--json"])
            let line = try child.expect("{\"event\":\"listening\"")
            unlink(file)
            guard let range = line.range(of: "\"address\":\""),
                  let end = line[range.upperBound...].firstIndex(of: "\"") else {
                throw TestFailure("the seeder did not say where it listens: \(line)")
            }
            endpoint = try Endpoint(parsing: String(line[range.upperBound..<end]))
            close = { child.stop() }
            self.pid = child.pid
        }
        connector = {
            let transport = try await Transports.connect(to: endpoint)
            return try await SecureChannel.client(over: transport, credentials: .preSharedSecret(secret))
        }
    }

    func stop() { close() }
}

/// One round's ratios to its own baselines.
struct Ratios {
    var touchIdle: Double
    var touchLoaded: Double
    var fillToLink: Double
    var fillToCopy: Double
}

func run(mib: Int, touches: Int, inFlight: Int, pagesPerRequest: Int, window: Int, windowPages: Int, inProcess: Bool,
         slice: Duration?) async throws -> Ratios {
    // Baselines against a second workload process.
    let baseChild = try Memwriter(["--mib", "\(mib)", "--pattern", "--no-write"])
    defer { baseChild.stop() }
    let baseSeeder = try await Seeder(pid: baseChild.pid, inProcess: inProcess)
    let client = RPCClient(transport: try await baseSeeder.connector())
    let track = try TrackReply.decode(try await client.call(MigrationMethod.track.rawValue, TrackRequest().encode()))
    guard let big = track.layout.filter({ $0.kind == .migrate }).max(by: { $0.range.length < $1.range.length }) else {
        throw MigrationError.protocolViolation("the workload has no migratable region")
    }
    var rtts: [Double] = []
    for i in 0..<400 {
        let page = big.start + UInt64(i % Int(big.range.pageCount)) * 4096
        let payload = ReadRequest(ranges: [AddressRange(start: page, end: page + 4096)]).encode()
        let began = now()
        for try await _ in client.callStreaming(MigrationMethod.readAt.rawValue, payload) {}
        rtts.append(now() - began)
    }
    let rtt = median(rtts)
    report("rpc_rtt_median", rtt * 1e6, "us")
    // Link throughput: 16 x 256 pages in flight over the big region, `mib` MiB in all.
    let batches = max(16, mib * 4)
    let linkBegan = now()
    let received: Int = try await withThrowingTaskGroup(of: Int.self) { group in
        var issued = 0, total = 0
        func issue() {
            let offset = UInt64(issued % max(1, Int(big.range.pageCount) / 256)) * 256 * 4096
            let range = AddressRange(start: big.start + offset, end: min(big.end, big.start + offset + 256 * 4096))
            let payload = ReadRequest(ranges: [range]).encode()
            issued += 1
            group.addTask {
                var bytes = 0
                for try await part in client.callStreaming(MigrationMethod.readAt.rawValue, payload) { bytes += part.count }
                return bytes
            }
        }
        for _ in 0..<16 { issue() }
        while let bytes = try await group.next() {
            total += bytes
            if issued < batches { issue() }
        }
        return total
    }
    let link = Double(received) / (now() - linkBegan)
    report("link_encrypted_readat", link / 1e9, "GB/s")
    _ = try? await client.call(MigrationMethod.abort.rawValue, [])
    client.close()
    baseSeeder.stop()

    // Plain UFFDIO_COPY rate, 1 MiB batches.
    let copyRegion = AddressRange(start: 0x5f00_0000_0000, end: 0x5f00_0000_0000 + UInt64(mib) << 20)
    let copyMemory = try MigratedMemory.inOwnProcess(regions: [copyRegion])
    let source = UnsafeMutableRawBufferPointer.allocate(byteCount: 1 << 20, alignment: 4096)
    for i in 0..<source.count { source[i] = UInt8(truncatingIfNeeded: i &* 31) }
    let copyBegan = now()
    var start = copyRegion.start
    while start < copyRegion.end {
        try copyMemory.install(AddressRange(start: start, end: start + (1 << 20)), data: UnsafeRawBufferPointer(source))
        start += 1 << 20
    }
    let copyRate = Double(copyRegion.length) / (now() - copyBegan)
    report("uffdio_copy", copyRate / 1e9, "GB/s")
    copyMemory.unmap()
    source.deallocate()

    // The migration: pure post-copy, background fill paused at the hand-over.
    let child = try Memwriter(["--mib", "\(mib)", "--threads", "2", "--rate", "20000", "--pattern"])
    defer { child.stop() }
    let seeder = try await Seeder(pid: child.pid, inProcess: inProcess)
    defer { seeder.stop() }
    var options = LeecherOptions()
    options.policy = FinalizePolicy(cleanShare: 0, maxWaitSeconds: 10)
    options.requestsInFlight = inFlight
    options.pagesPerRequest = pagesPerRequest
    options.postCopy.requestsInFlight = window
    options.postCopy.pagesPerRequest = windowPages
    let sink = try LiveMemorySink()
    sink.pauseBackgroundFill(true)
    print("post-copy window: \(window) x \(windowPages) pages; seeders \(inProcess ? "in this process" : "in their own processes")")
    let leecher = Leecher(connect: seeder.connector, memory: sink, options: options)
    let migration = Task { try await leecher.run() }
    let memory = try await sink.migratedMemory()
    let count = touches
    let idle = await onThread { touchRemotePages(memory, count: count) }
    report("touch_idle_median", median(idle) * 1e6, "us")
    report("touch_idle_p99", percentile(idle, 0.99) * 1e6, "us")
    let pagesBefore = memory.installedPages
    let fillBegan = now()
    if let slice {
        // This process holds the leecher and the touching thread (the program).
        let here = setSchedulerSlice(slice, threadsOf: getpid()), there = setSchedulerSlice(slice, threadsOf: seeder.pid)
        print("scheduler slice \(slice) for \(here) threads here and \(there) of the seeder")
    }
    sink.pauseBackgroundFill(false)
    let loaded = await onThread { touchRemotePages(memory, count: count) }
    while !memory.isComplete { usleep(200) }
    let fillSeconds = now() - fillBegan
    let fill = Double(memory.installedPages - pagesBefore) * 4096 / fillSeconds
    let summary = try await migration.value
    report("touch_loaded_median", median(loaded) * 1e6, "us")
    report("touch_loaded_p99", percentile(loaded, 0.99) * 1e6, "us")
    report("touch_loaded_samples", Double(loaded.count), "touches")
    report("fill", fill / 1e9, "GB/s")
    report("migration_total", summary.seconds, "s")
    let ratios = Ratios(touchIdle: median(idle) / rtt, touchLoaded: median(loaded) / rtt,
                        fillToLink: fill / link, fillToCopy: fill / copyRate)
    print(String(format: "round ratios: touch idle %.2f, touch loaded %.2f, fill/link %.2f, fill/uffdio_copy %.2f",
                 ratios.touchIdle, ratios.touchLoaded, ratios.fillToLink, ratios.fillToCopy))
    let stats = memory.statistics
    print("installs: \(stats.pagesCopied) copied, \(stats.pagesZeroed) zero, \(stats.installCalls) ioctls, "
          + "\(stats.pagesAlreadyInstalled) offered twice and skipped, \(stats.faultCallbacks) touched pages fetched first")
    memory.unmap()
    return ratios
}

do {
    let hogs = try (0..<cpuHogs).map { _ in try ChildProcess("/bin/sh", ["-c", "while :; do :; done"]) }
    defer { hogs.forEach { $0.stop() } }
    if cpuHogs > 0 { print("# \(cpuHogs) busy-looping processes compete for the cores throughout") }
    var all: [Ratios] = []
    for round in 1...rounds {
        print("# round \(round) of \(rounds)")
        all.append(try await run(mib: mib, touches: touches, inFlight: inFlight, pagesPerRequest: pagesPerRequest,
                                 window: window, windowPages: windowPages, inProcess: inProcess, slice: schedulerSlice))
        print("")
    }
    func spread(_ values: [Double]) -> String {
        String(format: "%.2f (rounds %@)", median(values), values.map { String(format: "%.2f", $0) }.joined(separator: ", "))
    }
    print("# median over \(rounds) rounds")
    print("ratio touch_idle_median / rpc_rtt   = \(spread(all.map(\.touchIdle))) (target <= 3)")
    print("ratio touch_loaded_median / rpc_rtt = \(spread(all.map(\.touchLoaded))) (target <= 3)")
    print("ratio fill / link_encrypted_readat  = \(spread(all.map(\.fillToLink))) (target >= 0.70)")
    print("ratio fill / uffdio_copy            = \(spread(all.map(\.fillToCopy)))")
} catch {
    FileHandle.standardError.write("ferry-bench-postcopy: \(error)\n".data(using: .utf8)!)
    exit(1)
}
