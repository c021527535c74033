// ferry-bench-hub: what a star hub saves the source. One process under
// migration (memwriter, idle or slowly writing) is migrated
//   - directly, `seeder serve` to one `leecher pull` (the baseline, same run), and
//   - through one `hub serve` to 1, 4 and 16 `leecher pull`s started together,
// each with a fresh copy of the workload, every role its own process over
// loopback TCP with the secure channel, as deployed. For each run it prints
// the bytes the seeder read from the process (its `pages_sent` x 4 KiB),
// their ratio to the hub run with one leecher and to the direct run, the wall
// time from starting the leechers to the last one's `complete`, and the
// aggregate leecher throughput (data bytes received by all leechers / wall
// time). On one machine all roles share its cores, so aggregate throughput
// stops growing once they are busy.
//
//   Tools/bench-hub.sh [--mib N] [--rate W] [--leechers 1,4,16]
import Foundation
import FerryMigration
import FerryTestSupport

struct Settings {
    var mib = 64
    /// Writes per second of the workload's one writer thread; 0 = idle.
    var rate = 0
    var leechers = [1, 4, 16]
}

func parse() -> Settings {
    var settings = Settings()
    var arguments = CommandLine.arguments.dropFirst()
    while let flag = arguments.popFirst() {
        guard let value = arguments.popFirst() else { usage("\(flag) needs a value") }
        switch flag {
        case "--mib":
            guard let n = Int(value), n > 0 else { usage("--mib takes a number of MiB") }
            settings.mib = n
        case "--rate":
            guard let n = Int(value), n >= 0 else { usage("--rate takes writes per second") }
            settings.rate = n
        case "--leechers":
            let counts = value.split(separator: ",").compactMap { Int($0) }
            guard !counts.isEmpty, counts.allSatisfy({ $0 > 0 }) else { usage("--leechers takes a list like 1,4,16") }
            settings.leechers = counts
        default: usage("unknown argument \(flag)")
        }
    }
    return settings
}

func usage(_ problem: String) -> Never {
    FileHandle.standardError.write(Data("ferry-bench-hub: \(problem)\nusage: ferry-bench-hub [--mib N] [--rate W] [--leechers 1,4,16]\n".utf8))
    exit(2)
}

struct Figures {
    var label: String
    var leechers: Int
    var seederBytes: UInt64
    var leecherBytes: UInt64
    var seconds: Double
    /// CPU seconds the hub process used (user + system), nil for the direct run.
    var hubCPU: Double? = nil
    var hubPeakMiB: Double? = nil
    var aggregate: Double { Double(leecherBytes) / seconds }
}

/// User + system CPU seconds of a process so far, from /proc/PID/stat.
func cpuSeconds(_ pid: Int32) -> Double? {
    guard let text = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8),
          let close = text.lastIndex(of: ")") else { return nil }
    // Fields after the command name: state is field 3, utime 14, stime 15.
    let fields = text[text.index(after: close)...].split(separator: " ")
    guard fields.count > 13, let user = Double(fields[11]), let system = Double(fields[12]) else { return nil }
    return (user + system) / Double(sysconf(Int32(_SC_CLK_TCK)))
}

/// Peak resident memory of a process so far (VmHWM), MiB.
func peakResidentMiB(_ pid: Int32) -> Double? {
    guard let text = try? String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8),
          let line = text.split(separator: "\n").first(where: { $0.hasPrefix("VmHWM:") }),
          let kib = Double(line.split(separator: " ").dropFirst().first ?? "") else { return nil }
    return kib / 1024
}

func seconds(since start: ContinuousClock.Instant) -> Double {
    let d = ContinuousClock.now - start
    return Double(d.components.seconds) + Double(d.components.attoseconds) / 1e18
}

struct BenchFailure: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}

/// One JSON event line of a command, as a dictionary.
func event(_ line: String) throws -> [String: Any] {
    guard let object = try JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any] else {
        throw BenchFailure("not a JSON event: \(line)")
    }
    return object
}

func integer(_ line: String, _ key: String) throws -> UInt64 {
    guard let value = try event(line)[key] as? NSNumber else { throw BenchFailure("no \(key) in \(line)") }
    return value.uint64Value
}

func address(_ line: String) throws -> String {
    guard let value = try event(line)["address"] as? String else { throw BenchFailure("no address in \(line)") }
    return value
}

/// Everything a run starts, stopped and cleaned up however it ends.
final class Run {
    let secret: String
    var children: [ChildProcess] = []
    var directories: [String] = []
    init(secret: String) { self.secret = secret }

    func start(_ name: String, _ arguments: [String]) throws -> ChildProcess {
        let child = try ChildProcess(builtExecutable(name), arguments)
        children.append(child)
        return child
    }

    func seeder(pid: Int32) throws -> (ChildProcess, String) {
        let seeder = try start("seeder", ["serve", "\(pid)", "--listen", "127.0.0.1:0", "--secret-file", secret, "--json"])
        return (seeder, try address(try seeder.expect("{\"event\":\"listening\"")))
    }

    /// Starts `count` leechers at once and waits for all; the data bytes they received.
    func pull(_ count: Int, from address: String, tag: String) throws -> UInt64 {
        let leechers = try (0..<count).map { index -> ChildProcess in
            let out = "/tmp/ferry-bench-hub-\(getpid())-\(tag)-\(index)"
            try? FileManager.default.removeItem(atPath: out)
            directories.append(out)
            return try start("leecher", ["pull", address, "--secret-file", secret, "--out", out, "--json"])
        }
        var total: UInt64 = 0
        for leecher in leechers {
            let line = try leecher.expect("{\"event\":\"complete\"", timeout: 120)
            total += try integer(line, "bytes")
        }
        return total
    }

    deinit {
        for child in children { child.stop() }
        for directory in directories { try? FileManager.default.removeItem(atPath: directory) }
    }
}

func workload(_ settings: Settings) throws -> Memwriter {
    try Memwriter(["--mib", "\(settings.mib)", "--pattern"]
        + (settings.rate > 0 ? ["--threads", "1", "--rate", "\(settings.rate)"] : ["--no-write"]))
}

func direct(_ settings: Settings, secret: String) throws -> Figures {
    let child = try workload(settings)
    defer { child.stop() }
    let run = Run(secret: secret)
    let (seeder, at) = try run.seeder(pid: child.pid)
    let start = ContinuousClock.now
    let received = try run.pull(1, from: at, tag: "direct")
    let elapsed = seconds(since: start)
    let sent = try integer(try seeder.expect("{\"event\":\"complete\"", timeout: 30), "pages_sent")
    return Figures(label: "direct", leechers: 1, seederBytes: sent * 4096, leecherBytes: received, seconds: elapsed)
}

func throughHub(_ settings: Settings, leechers: Int, secret: String) throws -> Figures {
    let child = try workload(settings)
    defer { child.stop() }
    let run = Run(secret: secret)
    let (seeder, at) = try run.seeder(pid: child.pid)
    let hub = try run.start("hub", ["serve", "--upstream", at, "--listen", "127.0.0.1:0", "--secret-file", secret, "--json"])
    let hubAddress = try address(try hub.expect("{\"event\":\"listening\""))
    let start = ContinuousClock.now
    let received = try run.pull(leechers, from: hubAddress, tag: "hub\(leechers)")
    let elapsed = seconds(since: start)
    let cpu = cpuSeconds(hub.pid)
    let peak = peakResidentMiB(hub.pid)
    let sent = try integer(try seeder.expect("{\"event\":\"complete\"", timeout: 30), "pages_sent")
    return Figures(label: "hub", leechers: leechers, seederBytes: sent * 4096, leecherBytes: received, seconds: elapsed,
                   hubCPU: cpu, hubPeakMiB: peak)
}

let settings = parse()
print("ferry-bench-hub: \(settings.mib) MiB workload, \(settings.rate == 0 ? "idle" : "\(settings.rate) writes/s")," +
      " leechers \(settings.leechers.map(String.init).joined(separator: ", ")), \(ProcessInfo.processInfo.activeProcessorCount) cores")
do {
    let secret = "/tmp/ferry-bench-hub-\(getpid())-secret"
    guard FileManager.default.createFile(atPath: secret, contents: Data((try PreSharedSecret.generate().text + "\n").utf8),
                                         attributes: [.posixPermissions: 0o600]) else {
        throw BenchFailure("cannot write \(secret)")
    }
    defer { try? FileManager.default.removeItem(atPath: secret) }
    var runs = [try direct(settings, secret: secret)]
    for count in settings.leechers { runs.append(try throughHub(settings, leechers: count, secret: secret)) }
    let baseline = runs[0]
    let hubOne = runs.first { $0.label == "hub" && $0.leechers == 1 } ?? baseline
    print("")
    print("run     leechers  seeder MiB  x hub-1  x direct  wall s  aggregate MB/s  x direct  hub CPU s  hub peak MiB")
    for run in runs {
        print(run.label.padding(toLength: 7, withPad: " ", startingAt: 0)
            + String(format: " %8d  %10.1f  %7.3f  %8.3f  %6.2f  %14.0f  %8.2f",
                     run.leechers, Double(run.seederBytes) / 1_048_576,
                     Double(run.seederBytes) / Double(hubOne.seederBytes),
                     Double(run.seederBytes) / Double(baseline.seederBytes),
                     run.seconds, run.aggregate / 1e6, run.aggregate / baseline.aggregate)
            + (run.hubCPU.map { String(format: "  %9.2f", $0) } ?? "          -")
            + (run.hubPeakMiB.map { String(format: "  %12.0f", $0) } ?? "             -"))
    }
    if let most = runs.last, most.label == "hub" {
        let ratio = Double(most.seederBytes) / Double(hubOne.seederBytes)
        print("")
        print(String(format: "seeder bytes, %d leechers vs 1 through the hub: %.3fx (target <= 1.1x): ", most.leechers, ratio)
            + (ratio <= 1.1 ? "met" : "NOT met"))
    }
} catch {
    FileHandle.standardError.write(Data("ferry-bench-hub: \(error)\n".utf8))
    exit(1)
}
