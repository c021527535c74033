// ferry-bench-compress: record compression on a real program's heap (issue 14).
//
//   ferry-bench-compress [--runs N] [--mib N] [--rate BYTES_PER_SEC] [--cases LIST] [--scratch DIR]
//
// The workload is a CPython process holding a dict of about --mib MiB of
// strings (realistic records: names, e-mail addresses, JSON-ish fields, numbers,
// some random tokens), started once and migrated in every run (`seeder serve
// --then resume`, so it runs on between runs and every run sees the same heap).
// Each run is a whole `seeder serve` + `leecher pull --out` migration:
//
//   zstd@rate   through Tools/relay --rate (default 100 MB/s each way), --compress zstd on both sides
//   off@rate    the same with --compress off
//   auto@rate   the same with --compress auto (shows what auto picks on a slow link)
//   auto@lo     straight over loopback, --compress auto
//   off@lo      straight over loopback, --compress off
//   zstd@lo     straight over loopback, --compress zstd (what auto avoids on a fast link)
//
// Measured per run: total time (leecher spawn to exit, every page local and
// checked, the image written), the leecher's `complete.bytes` (page data),
// and for the relayed cases the bytes the relay carried (both directions:
// the bytes on the wire). Rounds interleave the cases (odd rounds in order,
// even rounds reversed, so a drifting load hits every case alike); medians are printed,
// then the compression ratio (off bytes / zstd bytes on the wire) and the
// loopback target: auto no more than 5 % slower than off (MET / MISSED).
//
// Exit status: 0 when every run completed, 1 when one failed, 2 on bad arguments.
import Foundation
import FerryTestSupport
import Glibc

struct BenchFailure: Error, CustomStringConvertible {
    let description: String
    init(_ d: String) { description = d }
}

enum Case: String, CaseIterable {
    case zstdRate = "zstd@rate", offRate = "off@rate", autoRate = "auto@rate", autoLo = "auto@lo", offLo = "off@lo", zstdLo = "zstd@lo"
    var compress: String { String(rawValue.split(separator: "@")[0]) }
    var relayed: Bool { rawValue.hasSuffix("@rate") }
}

struct Settings {
    var runs = 3
    var mib = 256
    var rate = 100_000_000
    var cases = Case.allCases
    var scratch = "/dev/shm"
}

func usage(_ problem: String?) -> Never {
    let text = """
        usage: ferry-bench-compress [--runs N] [--mib N] [--rate BYTES_PER_SEC] [--cases LIST] [--scratch DIR]
          --runs N       rounds; every case runs once per round (default 3)
          --mib N        size of the CPython dict of strings (default 256)
          --rate R       the relay's cap per direction, bytes/s (default 100000000)
          --cases LIST   comma-separated subset of: \(Case.allCases.map(\.rawValue).joined(separator: ","))
          --scratch DIR  where images are written and removed (default /dev/shm)
        """
    if let problem {
        FileHandle.standardError.write(Data("ferry-bench-compress: \(problem)\n\(text)\n".utf8))
        exit(2)
    }
    print(text)
    exit(0)
}

nonisolated(unsafe) var settings = Settings()
var arguments = CommandLine.arguments.dropFirst()
while let a = arguments.popFirst() {
    func value() -> String {
        guard let v = arguments.popFirst() else { usage("\(a) needs a value") }
        return v
    }
    switch a {
    case "--runs": guard let n = Int(value()), n > 0 else { usage("--runs takes a positive number") }; settings.runs = n
    case "--mib": guard let n = Int(value()), n > 0 else { usage("--mib takes a positive number") }; settings.mib = n
    case "--rate": guard let n = Int(value()), n >= 1024 else { usage("--rate takes bytes per second") }; settings.rate = n
    case "--cases":
        let names = value().split(separator: ",").map(String.init)
        settings.cases = try names.map { n in
            guard let c = Case(rawValue: n) else { usage("unknown case \(n)") }
            return c
        }
    case "--scratch": settings.scratch = value()
    case "-h", "--help": usage(nil)
    default: usage("unknown argument \(a)")
    }
}

// Children are always killed, even when the benchmark is interrupted (BenchChildren).
BenchChildren.killOnInterrupt()

func event(_ line: String) throws -> [String: Any] {
    guard let object = try? JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any] else {
        throw BenchFailure("not a JSON event: \(line)")
    }
    return object
}

func say(_ s: String) { print(s); fflush(nil) }

// MARK: - The workload

/// A CPython process holding `mib` MiB of strings in a dict; prints "ready".
let pythonWorkload = """
    import random, sys, os
    random.seed(14)
    target = int(sys.argv[1]) << 20
    first = ["Ada", "Grace", "Alan", "Edsger", "Barbara", "Donald", "Ken", "Dennis", "Margaret", "Linus", "Frances", "John"]
    last = ["Lovelace", "Hopper", "Turing", "Dijkstra", "Liskov", "Knuth", "Thompson", "Ritchie", "Hamilton", "Torvalds", "Allen", "Backus"]
    cities = ["Lisbon", "Oslo", "Nairobi", "Lima", "Osaka", "Perth", "Quebec", "Tbilisi", "Accra", "Hanoi"]
    status = ["active", "suspended", "pending", "closed"]
    d = {}
    size = 0
    i = 0
    while size < target:
        f, l = random.choice(first), random.choice(last)
        v = ('{"id": %d, "name": "%s %s", "email": "%s.%s%d@example.org", "city": "%s", "status": "%s", '
             '"balance": %d.%02d, "visits": %d, "token": "%s"}'
             % (i, f, l, f.lower(), l.lower(), random.randrange(100), random.choice(cities), random.choice(status),
                random.randrange(100000), random.randrange(100), random.randrange(5000), os.urandom(6).hex()))
        d["user:%08d" % i] = v
        size += len(v) + 60
        i += 1
    print("ready %d %d" % (os.getpid(), i), flush=True)
    sys.stdin.readline()
    """

// MARK: - One migration

struct Run {
    var seconds: Double
    var pageBytes: Double
    var wireBytes: Double?
    /// CPU time (user + system) of the seeder, the leecher and the relay.
    var cpuSeconds: Double
}

/// CPU seconds of every reaped child so far.
func childrenCPU() -> Double {
    var u = rusage()
    getrusage(RUSAGE_CHILDREN.rawValue, &u)
    return Double(u.ru_utime.tv_sec + u.ru_stime.tv_sec) + Double(u.ru_utime.tv_usec + u.ru_stime.tv_usec) / 1e6
}

nonisolated(unsafe) var compressorNote = ""

func migrate(_ c: Case, pid: Int32, secret: String) throws -> Run {
    let cpuBefore = childrenCPU()
    let image = "\(settings.scratch)/ferry-bench-compress-\(getpid())"
    try? FileManager.default.removeItem(atPath: image)
    defer { try? FileManager.default.removeItem(atPath: image) }
    let seeder = try BenchChildren.spawn(builtExecutable("seeder"), ["serve", "\(pid)", "--listen", "127.0.0.1:0", "--secret-file", secret, "--json",
                                                       "--then", "resume", "--compress", c.compress])
    var relay: ChildProcess? = nil
    var leecher: ChildProcess? = nil
    defer { BenchChildren.finish([leecher, relay, seeder]) }
    let listening = try seeder.expect("{\"event\":\"listening\"", timeout: 60)
    guard let r = listening.range(of: #"127\.0\.0\.1:\d+"#, options: .regularExpression) else { throw BenchFailure("no address in \(listening)") }
    var address = String(listening[r])
    if c.relayed {
        let rl = try BenchChildren.spawn(builtExecutable("relay"), ["--listen", "0", "--to", address, "--rate", "\(settings.rate)"])
        relay = rl
        let line = try rl.expect("relay listening", timeout: 10)
        address = "127.0.0.1:" + (line.split(separator: " ").last.map(String.init) ?? "")
    }
    let start = ChildProcess.now()
    let l = try BenchChildren.spawn(builtExecutable("leecher"), ["pull", address, "--secret-file", secret, "--out", image, "--json", "--compress", c.compress])
    leecher = l
    let complete = try event(try l.expect("{\"event\":\"complete\"", timeout: 600))
    guard l.waitForExit(timeout: 120) == 0 else { throw BenchFailure("the leecher did not exit with status 0") }
    let seconds = ChildProcess.now() - start
    // The seeder's last events: what its compressor did (when it reports it before exiting), then complete.
    var said = ""
    while let line = try? seeder.readLine(timeout: 30) {
        if line.hasPrefix("{\"event\":\"compression\"") { said = line }
        if line.hasPrefix("{\"event\":\"complete\"") { break }
    }
    guard seeder.waitForExit(timeout: 60) == 0 else { throw BenchFailure("the seeder did not exit with status 0") }
    if let e = try? event(said), let on = e["auto_on_windows"] as? Int, let off = e["auto_off_windows"] as? Int,
       let records = e["records"] as? Int, let compressed = e["compressed"] as? Int {
        let failed = e["auto_trials_failed"] as? Int ?? 0
        compressorNote = " (seeder: \(compressed)/\(records) records compressed"
            + (c.compress == "auto" ? ", auto on in \(on) of \(on + off) windows, \(failed) trials failed)" : ")")
    } else {
        compressorNote = ""
    }
    var wire: Double? = nil
    if let rl = relay {
        rl.send("bytes")
        let f = try rl.expect("bytes ", timeout: 10).split(separator: " ").compactMap { Double($0) }
        guard f.count == 2 else { throw BenchFailure("relay byte counts unreadable") }
        wire = f[0] + f[1]
    }
    BenchChildren.finish([relay])   // reaped, so its CPU time counts
    return Run(seconds: seconds, pageBytes: (complete["bytes"] as? NSNumber)?.doubleValue ?? 0, wireBytes: wire,
               cpuSeconds: childrenCPU() - cpuBefore)
}

func median(_ xs: [Double]) -> Double {
    let s = xs.sorted()
    return s.isEmpty ? .nan : (s.count % 2 == 1 ? s[s.count / 2] : (s[s.count / 2 - 1] + s[s.count / 2]) / 2)
}

func loadAverage() -> String {
    (try? String(contentsOfFile: "/proc/loadavg", encoding: .utf8))?.split(separator: " ").prefix(3).joined(separator: " ") ?? "?"
}

// MARK: - Main

say("# ferry-bench-compress: \(settings.runs) round(s), CPython dict of \(settings.mib) MiB of strings, relay at \(settings.rate / 1_000_000) MB/s; "
    + "cases \(settings.cases.map(\.rawValue).joined(separator: ",")); \(Date()); load average \(loadAverage())")
var failed = false
do {
    let secret = "/tmp/ferry-bench-compress-\(getpid())-secret"
    let generated = try BenchChildren.spawn(builtExecutable("seeder"), ["secret"])
    let text = try generated.readLine(timeout: 10)
    BenchChildren.finish([generated])
    guard FileManager.default.createFile(atPath: secret, contents: Data((text + "\n").utf8), attributes: [.posixPermissions: 0o600]) else {
        throw BenchFailure("cannot write \(secret)")
    }
    BenchChildren.removeOnInterrupt(secret)
    defer { try? FileManager.default.removeItem(atPath: secret) }

    let script = "/tmp/ferry-bench-compress-\(getpid()).py"
    try pythonWorkload.write(toFile: script, atomically: true, encoding: .utf8)
    defer { try? FileManager.default.removeItem(atPath: script) }
    let python = try BenchChildren.spawn(FileManager.default.isExecutableFile(atPath: "/usr/bin/python3") ? "/usr/bin/python3" : "/usr/bin/env", (FileManager.default.isExecutableFile(atPath: "/usr/bin/python3") ? [] : ["python3"]) + [script, "\(settings.mib)"])
    defer { BenchChildren.finish([python]) }
    let ready = try python.expect("ready", timeout: 600).split(separator: " ")
    guard ready.count == 3, let pid = Int32(ready[1]) else { throw BenchFailure("python said \(ready)") }
    say("# workload: python3 pid \(pid), \(ready[2]) entries")

    var results: [Case: [Run]] = [:]
    for round in 1...settings.runs {
        // A B C ... then ... C B A: a load that drifts during a round hits every case alike.
        for c in (round % 2 == 1 ? settings.cases : settings.cases.reversed()) {
            let r = try migrate(c, pid: pid, secret: secret)
            results[c, default: []].append(r)
            let wire = r.wireBytes.map { String(format: ", %.1f MB on the wire", $0 / 1e6) } ?? ""
            say(String(format: "round %d  %-10@ %7.2f s (CPU %.2f s), %.1f MB of pages%@%@", round, c.rawValue, r.seconds, r.cpuSeconds,
                       r.pageBytes / 1e6, wire, compressorNote))
        }
    }
    say("")
    say("| case | total time (median, min–max) | CPU, seeder + leecher + relay (median) | page data | bytes on the wire (median) |")
    say("| --- | --- | --- | --- | --- |")
    for c in settings.cases {
        let rs = results[c] ?? []
        let wire = rs.compactMap(\.wireBytes)
        let times = rs.map(\.seconds)
        say(String(format: "| %@ | %.2f s (%.2f–%.2f) | %.2f s | %.1f MB | %@ |", c.rawValue, median(times), times.min() ?? .nan, times.max() ?? .nan,
                   median(rs.map(\.cpuSeconds)), median(rs.map(\.pageBytes)) / 1e6,
                   wire.isEmpty ? "—" : String(format: "%.1f MB", median(wire) / 1e6)))
    }
    if let z = results[.zstdRate], let o = results[.offRate] {
        let ratio = median(o.compactMap(\.wireBytes)) / median(z.compactMap(\.wireBytes))
        let speedup = median(o.map(\.seconds)) / median(z.map(\.seconds))
        say(String(format: "compression at %d MB/s: ratio %.2fx on the wire (off / zstd), total time %.2fx faster",
                   settings.rate / 1_000_000, ratio, speedup))
    }
    if let a = results[.autoLo], let o = results[.offLo] {
        let slower = median(a.map(\.seconds)) / median(o.map(\.seconds)) - 1
        // Each round's auto/off pair ran back to back: the median of the ratios
        // cancels slow drifts in the host's load.
        let paired = median(zip(a, o).map { $0.seconds / $1.seconds }) - 1
        let cpu = median(a.map(\.cpuSeconds)) / median(o.map(\.cpuSeconds)) - 1
        say(String(format: "loopback: auto vs off: median time %+.1f %%, median of paired ratios %+.1f %%, CPU %+.1f %% (target: no more than 5 %% slower): %@",
                   slower * 100, paired * 100, cpu * 100, slower <= 0.05 ? "MET" : "MISSED"))
    }
    python.send("quit")
} catch {
    FileHandle.standardError.write(Data("ferry-bench-compress: \(error)\n".utf8))
    failed = true
}
exit(failed ? 1 : 0)
