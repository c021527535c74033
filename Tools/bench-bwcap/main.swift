// ferry-bench-bwcap: the bandwidth cap (issue 14) on loopback, against the
// cap itself and against an uncapped round trip measured in the same run.
//
//   ferry-bench-bwcap [--caps 50M,200M] [--runs N] [--seconds S] [--sides seeder,leecher]
//                     [--touches N] [--no-rate] [--no-touch]
//
// Rate: for each cap and each side that holds it (`seeder serve
// --max-bandwidth CAP`, or `leecher pull --max-bandwidth CAP`), a real
// seeder and a real leecher migrate a memwriter workload (4 KiB pages of a
// pattern, 1,000 writes/s) sized to take --seconds (default 5.5) at the cap:
// 275 MiB at 50 MB/s, 1,049 MiB at 200 MB/s. The achieved rate is taken
// from the leecher's `--json` progress events, each stamped when it is read:
// bytes received between the first event that carries bytes and the last
// one whose bytes grew, over the time between them (both sampled together by the leecher, so the
// 250 ms spacing of the events costs no precision). Target: within ±5 % of
// the cap. The whole-run figure (bytes / seconds of the `complete` event,
// which also counts the connection, the freeze and the checksum wait) is
// printed beside it.
//
// Touches: a capped `seeder serve` (--max-bandwidth CAP) and, in this
// process, a leecher capped at the same rate placing the memory into live
// memory (LiveMemorySink) by pure post-copy, as Tools/bench-postcopy does.
// While the background fill runs at the cap, a thread touches remote pages
// one at a time (2 ms apart) and times each load, fault to data. Baseline:
// the median round trip of a 4 KiB ReadAt, one in flight, to an uncapped
// seeder of a second workload, measured in the same run. Target: median and
// p99 touch <= 3x that round trip.
//
// Each of --runs (default 3) measures everything again; the verdicts use
// the medians over the runs. Run as root, with the products built in
// release mode (Tools/bench-bwcap.sh does both).
import Foundation
import Glibc
import FerryMigration
import FerryWire
import FerryTestSupport

var caps = ["50M", "200M"]
var runs = 3
var targetSeconds = 5.5
var sides = ["seeder", "leecher"]
var touches = 300
var measureRate = true
var measureTouch = true
var arguments = CommandLine.arguments.dropFirst()
func usage() -> Never {
    print("usage: ferry-bench-bwcap [--caps 50M,200M] [--runs N] [--seconds S] [--sides seeder,leecher] [--touches N] [--no-rate] [--no-touch]")
    exit(2)
}
while let flag = arguments.popFirst() {
    switch flag {
    case "--caps": caps = (arguments.popFirst() ?? "").split(separator: ",").map(String.init)
    case "--runs": runs = max(1, Int(arguments.popFirst() ?? "") ?? runs)
    case "--seconds": targetSeconds = Double(arguments.popFirst() ?? "") ?? targetSeconds
    case "--sides": sides = (arguments.popFirst() ?? "").split(separator: ",").map(String.init)
    case "--touches": touches = Int(arguments.popFirst() ?? "") ?? touches
    case "--no-rate": measureRate = false
    case "--no-touch": measureTouch = false
    case "--help", "-h":
        print("usage: ferry-bench-bwcap [--caps 50M,200M] [--runs N] [--seconds S] [--sides seeder,leecher] [--touches N] [--no-rate] [--no-touch]")
        exit(0)
    default: usage()
    }
}

func verdict(_ met: Bool) -> String { met ? "MET" : "MISSED" }

/// A JSON number field of an event line.
func field(_ name: String, in line: String) -> Double? {
    guard let range = line.range(of: "\"\(name)\":") else { return nil }
    return Double(line[range.upperBound...].prefix { "0123456789.-".contains($0) })
}

/// The pre-shared secret every process of the run uses, in a 0600 file.
let secret = try PreSharedSecret.generate()
let secretFile = "/tmp/ferry-bench-bwcap-\(getpid()).secret"
do {
    let fd = open(secretFile, O_WRONLY | O_CREAT | O_TRUNC, 0o600)
    guard fd >= 0 else { throw TestFailure("cannot write \(secretFile): \(String(cString: strerror(errno)))") }
    let text = secret.text + "\n"
    _ = text.withCString { write(fd, $0, strlen($0)) }
    close(fd)
}
defer { unlink(secretFile) }

/// `seeder serve PID` on an ephemeral loopback port; its address.
func startSeeder(pid: Int32, _ extra: [String] = []) throws -> (ChildProcess, String) {
    let child = try ChildProcess(builtExecutable("seeder"),
                                 ["serve", "\(pid)", "--listen", "127.0.0.1:0", "--secret-file", secretFile,
                                  "--grace", "3", "--json"] + extra)
    let line = try child.expect("{\"event\":\"listening\"")
    guard let range = line.range(of: "\"address\":\""), let end = line[range.upperBound...].firstIndex(of: "\"") else {
        throw TestFailure("the seeder did not say where it listens: \(line)")
    }
    return (child, String(line[range.upperBound..<end]))
}

func connector(_ address: String) throws -> Leecher.Connector {
    let endpoint = try Endpoint(parsing: address)
    return {
        let transport = try await Transports.connect(to: endpoint)
        return try await SecureChannel.client(over: transport, credentials: .preSharedSecret(secret))
    }
}

/// MiB to migrate so that the transfer takes `targetSeconds` at `rate`.
func workloadMiB(_ rate: BandwidthRate, seconds: Double) -> Int {
    Int((rate.bytesPerSecond * seconds / 1048576).rounded(.up))
}

// MARK: - Achieved rate

struct RateResult {
    var rate: Double
    var whole: Double
    var bytes: Double
    var seconds: Double
}

func measureRate(cap: BandwidthRate, capText: String, side: String, seconds target: Double) throws -> RateResult {
    let mib = workloadMiB(cap, seconds: target)
    let workload = try Memwriter(["--mib", "\(mib)", "--threads", "1", "--rate", "1000", "--pattern"])
    defer { workload.stop() }
    let (seeder, address) = try startSeeder(pid: workload.pid, side == "seeder" ? ["--max-bandwidth", capText] : [])
    defer { seeder.stop() }
    let out = "/dev/shm/ferry-bench-bwcap-\(getpid())-image" // no disk sets the pace
    try? FileManager.default.removeItem(atPath: out)
    defer { try? FileManager.default.removeItem(atPath: out) }
    let leecher = try ChildProcess(builtExecutable("leecher"),
                                   ["pull", address, "--secret-file", secretFile, "--out", out, "--json"]
                                   + (side == "leecher" ? ["--max-bandwidth", capText] : []))
    defer { leecher.stop() }
    var samples: [(Double, Double)] = []
    var complete: String? = nil
    while complete == nil {
        let line = try leecher.readLine(timeout: 120)
        let at = now()
        if line.hasPrefix("{\"event\":\"progress\""), let bytes = field("bytes", in: line), bytes > 0 {
            samples.append((at, bytes))
        } else if line.hasPrefix("{\"event\":\"complete\"") {
            complete = line
        } else if line.hasPrefix("{\"event\":\"error\"") {
            throw TestFailure("the leecher failed: \(line)")
        }
    }
    guard leecher.waitForExit() == 0 else { throw TestFailure("the leecher exited non-zero") }
    // Events after the last byte (waiting for a dirty report, the checksums) measure no transfer.
    while samples.count > 1 && samples[samples.count - 2].1 == samples[samples.count - 1].1 { samples.removeLast() }
    guard let first = samples.first, let last = samples.last, last.0 - first.0 > 1 else {
        throw TestFailure("too few progress events to measure a rate (\(samples.count))")
    }
    let bytes = field("bytes", in: complete!) ?? 0
    let seconds = field("seconds", in: complete!) ?? .nan
    return RateResult(rate: (last.1 - first.1) / (last.0 - first.0), whole: bytes / seconds, bytes: bytes,
                      seconds: seconds)
}

// MARK: - Touches under the cap

struct TouchResult {
    var rtt: Double
    var median: Double
    var p99: Double
    var samples: Int
    var fill: Double
}

/// Median round trip of a 4 KiB ReadAt, one in flight, to an uncapped seeder.
func roundTrip() async throws -> Double {
    let workload = try Memwriter(["--mib", "16", "--pattern", "--no-write"])
    defer { workload.stop() }
    let (seeder, address) = try startSeeder(pid: workload.pid)
    defer { seeder.stop() }
    let client = RPCClient(transport: try await connector(address)())
    defer { client.close() }
    let track = try TrackReply.decode(try await client.call(MigrationMethod.track.rawValue, TrackRequest().encode()))
    guard let big = track.layout.filter({ $0.kind == .migrate }).max(by: { $0.range.length < $1.range.length }) else {
        throw TestFailure("the workload has no migratable region")
    }
    var rtts: [Double] = []
    for i in 0..<400 {
        let page = big.start + UInt64(i % Int(big.range.pageCount)) * 4096
        let payload = ReadRequest(ranges: [AddressRange(start: page, end: page + 4096)]).encode()
        let began = now()
        for try await _ in client.callStreaming(MigrationMethod.readAt.rawValue, payload) {}
        rtts.append(now() - began)
    }
    _ = try? await client.call(MigrationMethod.abort.rawValue, [])
    return median(rtts)
}

/// `cap` nil: the same migration uncapped, for comparison.
func measureTouches(cap: BandwidthRate?, capText: String, count: Int, mib: Int) async throws -> TouchResult {
    let rtt = try await roundTrip()
    let workload = try Memwriter(["--mib", "\(mib)", "--threads", "2", "--rate", "20000", "--pattern"])
    defer { workload.stop() }
    let (seeder, address) = try startSeeder(pid: workload.pid, cap == nil ? [] : ["--max-bandwidth", capText])
    defer { seeder.stop() }
    var options = LeecherOptions()
    options.policy = FinalizePolicy(cleanShare: 0, maxWaitSeconds: 10)
    options.pacer = cap.map { Pacer(rate: $0) }
    let sink = try LiveMemorySink(options: LiveMemoryOptions())
    let leecher = Leecher(connect: try connector(address), memory: sink, options: options)
    let migration = Task { try await leecher.run() }
    let memory = try await sink.migratedMemory()
    // Let the background fill reach its pace before touching.
    usleep(500_000)
    let pagesBefore = memory.installedPages
    let began = now()
    let latencies = await onThread { touchRemotePages(memory, count: count, gap: 0.002) }
    let fill = Double(memory.installedPages - pagesBefore) * 4096 / (now() - began)
    _ = try await migration.value
    memory.unmap()
    return TouchResult(rtt: rtt, median: median(latencies), p99: percentile(latencies, 0.99),
                       samples: latencies.count, fill: fill)
}

// MARK: - The runs

do {
    var rateResults: [String: [RateResult]] = [:]
    var touchResults: [String: [TouchResult]] = [:]
    for run in 1...runs {
        print("# run \(run) of \(runs)")
        for capText in caps {
            let cap = try BandwidthRate(parsing: capText)
            if measureRate {
                for side in sides {
                    let r = try measureRate(cap: cap, capText: capText, side: side, seconds: targetSeconds)
                    rateResults["\(capText) \(side)", default: []].append(r)
                    print(String(format: "rate cap %@ on the %@: %.2f MB/s (%.3f of the cap); whole run %.1f MB in %.2f s = %.2f MB/s",
                                 capText, side, r.rate / 1e6, r.rate / cap.bytesPerSecond, r.bytes / 1e6, r.seconds,
                                 r.whole / 1e6))
                }
            }
            if measureTouch {
                let t = try await measureTouches(cap: cap, capText: capText, count: touches,
                                                 mib: workloadMiB(cap, seconds: targetSeconds))
                touchResults[capText, default: []].append(t)
                print(String(format: "touch cap %@: rtt %.0f us; touch median %.0f us (%.2fx), p99 %.0f us (%.2fx), %d touches; fill meanwhile %.2f MB/s",
                             capText, t.rtt * 1e6, t.median * 1e6, t.median / t.rtt, t.p99 * 1e6, t.p99 / t.rtt,
                             t.samples, t.fill / 1e6))
            }
        }
        if measureTouch {
            // The same touches without a cap (the smallest workload): what the cap adds, if anything.
            let smallest = caps.compactMap { try? BandwidthRate(parsing: $0) }.min { $0.bytesPerSecond < $1.bytesPerSecond }
            let mib = smallest.map { workloadMiB($0, seconds: targetSeconds) } ?? 256
            let t = try await measureTouches(cap: nil, capText: "none", count: touches, mib: mib)
            touchResults["none", default: []].append(t)
            print(String(format: "touch no cap (%d MiB): rtt %.0f us; touch median %.0f us (%.2fx), p99 %.0f us (%.2fx), %d touches; fill meanwhile %.2f MB/s",
                         mib, t.rtt * 1e6, t.median * 1e6, t.median / t.rtt, t.p99 * 1e6, t.p99 / t.rtt,
                         t.samples, t.fill / 1e6))
        }
        print("")
    }
    print("# medians over \(runs) runs")
    for capText in caps + ["none"] {
        let cap = try (try? BandwidthRate(parsing: capText)) ?? BandwidthRate(bytesPerSecond: 1e15)
        for side in sides where capText != "none" {
            guard let all = rateResults["\(capText) \(side)"] else { continue }
            let rate = median(all.map(\.rate))
            let ratio = rate / cap.bytesPerSecond
            print(String(format: "rate   cap %@ on the %@: %.2f MB/s = %.3f x cap (runs %@); whole run %.2f MB/s; target within 5 %%: %@",
                         capText, side, rate / 1e6, ratio,
                         all.map { String(format: "%.3f", $0.rate / cap.bytesPerSecond) }.joined(separator: ", "),
                         median(all.map(\.whole)) / 1e6, verdict(abs(ratio - 1) <= 0.05)))
        }
        if let all = touchResults[capText] {
            let rtt = median(all.map(\.rtt))
            let med = median(all.map { $0.median / $0.rtt })
            let p99 = median(all.map { $0.p99 / $0.rtt })
            print(String(format: "touch  cap %@%@: rtt %.0f us; median %.2fx rtt (runs %@): %@; p99 %.2fx rtt (runs %@): %@; fill %.2f MB/s",
                         capText, capText == "none" ? " (reference, not a target)" : "", rtt * 1e6,
                         med, all.map { String(format: "%.2f", $0.median / $0.rtt) }.joined(separator: ", "), verdict(med <= 3),
                         p99, all.map { String(format: "%.2f", $0.p99 / $0.rtt) }.joined(separator: ", "), verdict(p99 <= 3),
                         median(all.map(\.fill)) / 1e6))
        }
    }
} catch {
    FileHandle.standardError.write("ferry-bench-bwcap: \(error)\n".data(using: .utf8)!)
    exit(1)
}
