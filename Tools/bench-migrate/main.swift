// ferry-bench-migrate: whole migrations of a busy process (issue 10), each
// role its own process over loopback TCP with the secure channel, next to
// baselines measured in the same run.
//
//   ferry-bench-migrate [--runs N] [--quick] [--cases LIST] [--mib N] [--churn-mib N]
//                       [--rtt-ms N] [--scratch DIR] [--keep-going]
//
// Cases (--cases takes a comma-separated subset; every case runs once per
// round, the rounds interleave them so a disturbed moment hits all alike):
//   link         (b) Ferry's secure channel, --mib MiB over loopback TCP
//                (ferry-bench-wire --only secure, best of 1 and 2 cores)
//   stopcopy     (a) stop-and-copy of the idle --mib workload: `leecher pull
//                --finalize-at 0%` freezes at once and moves everything after
//                the freeze over the same channel
//   idle         --mib MiB, every page non-zero (--pattern), no writes
//   w10k, w100k  the same with 2 writer threads, 10,000 / 100,000 random
//                page writes per second in all
//   churn-idle   --churn-mib MiB + a 16 MiB shared region, no writes
//   churn        the same with 2 writers at 5,000 writes/s each, mmap churn,
//                heap growth, zapped pages (memwriter --churn --heap-grow --zap)
//   churn-stopcopy (a) for the churn workload
//   rtt          idle --mib MiB through a relay adding --rtt-ms / 2 each way
//
// Every migration runs `seeder serve PID --json` and `leecher pull --json
// --out DIR` with default settings (stopcopy: --finalize-at 0%), the image
// written under --scratch (default /dev/shm, so a disk does not set the pace).
// What is measured, from the leecher's JSON events as they arrive:
//   downtime     `finalized.downtime_ms`: the Finalize call, freeze included
//   stopped      freeze -> `complete` (the source stays frozen through
//                post-copy and verification); the freeze is taken to start
//                downtime_ms before the `finalized` event arrived
//   local        `complete.seconds`: the leecher's own clock from its start to
//                Complete, so every page is local and checked (BLAKE2b against
//                the frozen source) and the image written
//   bytes/size   `complete.bytes` (page data received) / layout size (the
//                `connected` event's pages x 4 KiB)
//   re-sent      the seeder's `pages_sent` - layout pages: approximate, since
//                regions created or dropped during the migration change the
//                layout after `connected`
//   check        `verified` - the last `progress`/`finalized` event before it:
//                image writing and verification, give or take the 250 ms
//                between progress events
// For stop-and-copy, the application is down from the freeze to the end, so
// its downtime is its stopped time (its Finalize call alone is printed too).
//
// Exit status: 0 when every run completed (targets may be missed: it is a
// benchmark), 1 when a run failed, 2 on bad arguments.
import Foundation
import FerryTestSupport
import Glibc

// MARK: - Settings

struct Settings {
    var runs = 3
    var mib = 1024
    var churnMib = 256
    var rttMs = 20
    var scratch = "/dev/shm"
    var cases = Case.allCases
    var keepGoing = false
}

enum Case: String, CaseIterable {
    case link, stopcopy, idle, w10k, w100k
    case churnIdle = "churn-idle", churn, churnStopcopy = "churn-stopcopy"
    case rtt
}

func usage(_ problem: String?) -> Never {
    let text = """
        usage: ferry-bench-migrate [--runs N] [--quick] [--cases LIST] [--mib N] [--churn-mib N] [--rtt-ms N] [--scratch DIR] [--keep-going]
          --runs N       rounds; every case runs once per round (default 3)
          --quick        1 round, 256 MiB and 64 MiB workloads (a smoke test; targets are for 1 GiB)
          --cases LIST   comma-separated subset of: \(Case.allCases.map(\.rawValue).joined(separator: ","))
          --mib N        size of the main workloads (default 1024)
          --churn-mib N  size of the churn workload's main region (default 256)
          --rtt-ms N     round trip the relay adds in the rtt case (default 20)
          --scratch DIR  where images are written and removed (default /dev/shm)
          --keep-going   report a failed run and go on instead of stopping
        """
    if let problem {
        FileHandle.standardError.write(Data("ferry-bench-migrate: \(problem)\n\(text)\n".utf8))
        exit(2)
    }
    say(text)
    exit(0)
}

func parse() -> Settings {
    var settings = Settings()
    var quick = false
    var explicit: (runs: Int?, mib: Int?, churn: Int?) = (nil, nil, nil)
    var arguments = CommandLine.arguments.dropFirst()
    func number(_ flag: String, minimum: Int = 1) -> Int {
        guard let text = arguments.popFirst(), let n = Int(text), n >= minimum else {
            usage("\(flag) takes a whole number of at least \(minimum)")
        }
        return n
    }
    while let flag = arguments.popFirst() {
        switch flag {
        case "--runs": explicit.runs = number(flag)
        case "--quick": quick = true
        case "--mib": explicit.mib = number(flag)
        case "--churn-mib": explicit.churn = number(flag)
        case "--rtt-ms": settings.rttMs = number(flag, minimum: 0)
        case "--keep-going": settings.keepGoing = true
        case "--scratch":
            guard let directory = arguments.popFirst() else { usage("--scratch takes a directory") }
            settings.scratch = directory
        case "--cases":
            guard let list = arguments.popFirst() else { usage("--cases takes a list") }
            settings.cases = []
            for name in list.split(separator: ",") {
                guard let c = Case(rawValue: String(name)) else { usage("unknown case \(name)") }
                settings.cases.append(c)
            }
        case "-h", "--help": usage(nil)
        default: usage("unknown argument \(flag)")
        }
    }
    if quick { (settings.runs, settings.mib, settings.churnMib) = (1, 256, 64) }
    settings.runs = explicit.runs ?? settings.runs
    settings.mib = explicit.mib ?? settings.mib
    settings.churnMib = explicit.churn ?? settings.churnMib
    return settings
}

// MARK: - Children: always killed, even when the benchmark is interrupted (BenchChildren)

/// Starts one of our built products as a child.
func spawn(_ name: String, _ arguments: [String]) throws -> ChildProcess {
    try BenchChildren.spawn(builtExecutable(name), arguments)
}

// MARK: - Figures

struct BenchFailure: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}

/// One migration's figures (see the header for the definitions).
struct Migration {
    var downtimeMs = 0.0
    var freezeMs = 0.0
    var stoppedS = 0.0
    var localS = 0.0
    var wallS = 0.0
    var bytes = 0.0
    var pages = 0.0
    var pagesSent = 0.0
    var dirtyAtFinalize = 0.0
    var remoteAtFinalize = 0.0
    var checkS = 0.0
    var reason = ""
    /// The round it ran in, to pair it with the same round's other cases.
    var round = 0
    var size: Double { pages * 4096 }
    var bytesPerSize: Double { bytes / size }
    var resent: Double { pagesSent - pages }
}

func median(_ values: [Double]) -> Double {
    let sorted = values.sorted()
    guard !sorted.isEmpty else { return .nan }
    let middle = sorted.count / 2
    return sorted.count % 2 == 1 ? sorted[middle] : (sorted[middle - 1] + sorted[middle]) / 2
}

/// Medians, metric by metric, of several runs.
func medians(_ runs: [Migration]) -> Migration {
    var m = Migration()
    m.downtimeMs = median(runs.map(\.downtimeMs))
    m.freezeMs = median(runs.map(\.freezeMs))
    m.stoppedS = median(runs.map(\.stoppedS))
    m.localS = median(runs.map(\.localS))
    m.wallS = median(runs.map(\.wallS))
    m.bytes = median(runs.map(\.bytes))
    m.pages = median(runs.map(\.pages))
    m.pagesSent = median(runs.map(\.pagesSent))
    m.dirtyAtFinalize = median(runs.map(\.dirtyAtFinalize))
    m.remoteAtFinalize = median(runs.map(\.remoteAtFinalize))
    m.checkS = median(runs.map(\.checkS))
    return m
}

func event(_ line: String) throws -> [String: Any] {
    guard let object = try? JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any] else {
        throw BenchFailure("not a JSON event: \(line)")
    }
    return object
}

func number(_ object: [String: Any], _ key: String) throws -> Double {
    guard let value = object[key] as? NSNumber else { throw BenchFailure("no \(key) in event \(object)") }
    return value.doubleValue
}

let now = ChildProcess.now

// MARK: - One migration

struct Workload {
    var label: String
    var memwriter: [String]
    /// Leecher arguments beyond the address, credentials, --out and --json.
    var leecher: [String] = []
    var relayDelayMs = 0
}

/// How long a whole migration may take before the benchmark gives up on it.
/// Generous: the 100k writes/s case on today's code takes far longer than idle.
func migrationTimeout(mib: Int) -> Double { 60 + Double(mib) / 4 }

func migrate(_ workload: Workload, mib: Int, settings: Settings, secret: String) throws -> Migration {
    var memwriter: Memwriter?, seeder: ChildProcess?, relay: ChildProcess?, leecher: ChildProcess?
    let image = "\(settings.scratch)/ferry-bench-migrate-\(getpid())-image"
    try? FileManager.default.removeItem(atPath: image)
    defer {
        // Leecher first, so nothing is mid-pull when its seeder goes; the workload last.
        BenchChildren.finish([leecher, seeder, relay, memwriter?.child])
        try? FileManager.default.removeItem(atPath: image)
    }
    let writer = try Memwriter(workload.memwriter)
    memwriter = writer
    BenchChildren.track(writer.pid)
    // Let the writer threads reach their pace before the migration starts.
    usleep(300_000)

    let serving = try spawn("seeder", ["serve", "\(writer.pid)", "--listen", "127.0.0.1:0", "--secret-file", secret, "--json"])
    seeder = serving
    let listening = try event(try serving.expect("{\"event\":\"listening\"", timeout: 30))
    guard var address = listening["address"] as? String else { throw BenchFailure("the seeder did not say where it listens") }
    if workload.relayDelayMs > 0 {
        let delayed = try spawn("relay", ["--listen", "0", "--to", address, "--delay-ms", "\(workload.relayDelayMs)"])
        relay = delayed
        let line = try delayed.expect("relay listening", timeout: 10)
        address = "127.0.0.1:" + (line.split(separator: " ").last.map(String.init) ?? "")
    }

    let started = now()
    let pulling = try spawn("leecher", ["pull", address, "--secret-file", secret, "--out", image, "--json"] + workload.leecher)
    leecher = pulling
    let deadline = started + migrationTimeout(mib: mib)
    var figures = Migration()
    var finalizedAt = 0.0, lastProgressAt = 0.0
    events: while true {
        let left = deadline - now()
        guard left > 0 else { throw BenchFailure("the migration took over \(Int(migrationTimeout(mib: mib))) s") }
        let line: String
        do {
            line = try pulling.readLine(timeout: left)
        } catch {
            let status = pulling.waitForExit(timeout: 5).map { "exit status \($0)" } ?? "still running"
            throw BenchFailure("the leecher stopped talking (\(status)); its stderr is above")
        }
        let at = now()
        let e = try event(line)
        switch e["event"] as? String {
        case "connected":
            figures.pages = try number(e, "pages")
        case "progress":
            lastProgressAt = at
        case "finalizing":
            figures.reason = e["reason"] as? String ?? ""
        case "finalized":
            finalizedAt = at
            figures.downtimeMs = try number(e, "downtime_ms")
            figures.freezeMs = try number(e, "freeze_ms")
            figures.dirtyAtFinalize = try number(e, "dirty_pages")
            figures.remoteAtFinalize = try number(e, "remote_pages")
        case "verified":
            figures.checkS = at - max(finalizedAt, lastProgressAt)
        case "complete":
            figures.bytes = try number(e, "bytes")
            figures.localS = try number(e, "seconds")
            figures.wallS = at - started
            guard finalizedAt > 0 else { throw BenchFailure("the leecher completed without a finalized event") }
            figures.stoppedS = at - (finalizedAt - figures.downtimeMs / 1000)
            break events
        case "error":
            throw BenchFailure("the leecher failed: \(e["message"] ?? line)")
        default:
            break
        }
    }
    let done = try event(try serving.expect("{\"event\":\"complete\"", timeout: 30))
    figures.pagesSent = try number(done, "pages_sent")
    guard pulling.waitForExit(timeout: 30) == 0 else { throw BenchFailure("the leecher did not exit with status 0") }
    return figures
}

// MARK: - Link baseline

/// Seconds Ferry's secure channel takes to move `mib` MiB over loopback TCP:
/// ferry-bench-wire's in-process secure bulk transfer, the better of its 1- and
/// 2-core runs (the channel at its best on this host). Returns bytes per second.
func linkRate(mib: Int) throws -> Double {
    let wire = try spawn("ferry-bench-wire", ["--only", "secure", "--bytes", "\(mib)M"])
    defer { BenchChildren.finish([wire]) }
    var best = 0.0
    while true {
        let line: String
        do { line = try wire.readLine(timeout: 120) } catch { break }
        // "ferry-secure-AES-256-GCM-cores2 0.674 GB/s (1024 MiB in 1.594 s)"
        guard line.hasPrefix("ferry-secure-"), let open = line.firstIndex(of: "(") else { continue }
        let words = line[open...].dropFirst().split(separator: " ")
        guard words.count >= 5, let sent = Double(words[0]), let seconds = Double(words[3]) else {
            throw BenchFailure("cannot read ferry-bench-wire's line: \(line)")
        }
        best = max(best, sent * 1_048_576 / seconds)
    }
    guard wire.waitForExit(timeout: 10) == 0, best > 0 else { throw BenchFailure("ferry-bench-wire failed; its stderr is above") }
    return best
}

// MARK: - Output

/// Writes a line to stdout unbuffered, so progress shows through a pipe (tee).
func say(_ text: String = "") {
    FileHandle.standardOutput.write(Data((text + "\n").utf8))
}

func f(_ value: Double, _ decimals: Int = 2) -> String {
    value.isFinite ? String(format: "%.\(decimals)f", value) : "-"
}

func ratio(_ value: Double, _ baseline: Double?) -> String {
    guard let baseline, baseline > 0, value.isFinite else { return "-" }
    // Three significant digits: a 3 ms downtime against a 1.6 s stop-and-copy is 0.00188x, not 0.00x.
    return String(format: "%.3g", value / baseline) + "x"
}

func pad(_ text: String, _ width: Int) -> String {
    text.count >= width ? text : String(repeating: " ", count: width - text.count) + text
}

func row(_ cells: [String], _ widths: [Int]) -> String {
    zip(cells, widths).map { pad($0, $1) }.joined(separator: " ")
}

let runWidths = [7, 12, 10, 10, 9, 8, 10, 10, 10, 10, 8]
let runHeader = row(["run", "downtime ms", "freeze ms", "stopped s", "local s", "wall s", "bytes/size", "re-sent pg",
                     "dirty@fin", "remote@fin", "check s"], runWidths)

func runRow(_ name: String, _ m: Migration) -> String {
    row([name, f(m.downtimeMs), f(m.freezeMs, 3), f(m.stoppedS, 3), f(m.localS, 3), f(m.wallS, 3), f(m.bytesPerSize, 3),
         f(m.resent, 0), f(m.dirtyAtFinalize, 0), f(m.remoteAtFinalize, 0), f(m.checkS)], runWidths)
}

// MARK: - Main

let settings = parse()
BenchChildren.killOnInterrupt()

let shared = 16
func workload(_ c: Case) -> (Workload, mib: Int)? {
    let big = ["--mib", "\(settings.mib)", "--pattern"]
    let churnBase = ["--mib", "\(settings.churnMib)", "--shared", "\(shared)", "--pattern"]
    switch c {
    case .link: return nil
    case .stopcopy:
        return (Workload(label: "stop-and-copy, \(settings.mib) MiB idle", memwriter: big + ["--no-write"],
                         leecher: ["--finalize-at", "0%"]), settings.mib)
    case .idle: return (Workload(label: "\(settings.mib) MiB, 0 writes/s", memwriter: big + ["--no-write"]), settings.mib)
    case .w10k:
        return (Workload(label: "\(settings.mib) MiB, 10k writes/s (2 threads x 5000)",
                         memwriter: big + ["--threads", "2", "--rate", "5000"]), settings.mib)
    case .w100k:
        return (Workload(label: "\(settings.mib) MiB, 100k writes/s (2 threads x 50000)",
                         memwriter: big + ["--threads", "2", "--rate", "50000"]), settings.mib)
    case .churnIdle:
        return (Workload(label: "churn workload idle: \(settings.churnMib) MiB + \(shared) MiB shared, no writes",
                         memwriter: churnBase + ["--no-write"]), settings.churnMib + shared)
    case .churn:
        return (Workload(label: "churn: \(settings.churnMib) MiB + \(shared) MiB shared, 2 x 5000 writes/s, --churn --heap-grow --zap",
                         memwriter: churnBase + ["--threads", "2", "--rate", "5000", "--churn", "--heap-grow", "--zap"]),
                settings.churnMib + shared)
    case .churnStopcopy:
        return (Workload(label: "stop-and-copy, churn workload idle", memwriter: churnBase + ["--no-write"],
                         leecher: ["--finalize-at", "0%"]), settings.churnMib + shared)
    case .rtt:
        return (Workload(label: "\(settings.mib) MiB, 0 writes/s, \(settings.rttMs) ms RTT relay",
                         memwriter: big + ["--no-write"], relayDelayMs: settings.rttMs / 2), settings.mib)
    }
}

var results: [Case: [Migration]] = [:]
var linkRates: [Double] = []
var linkRateByRound: [Int: Double] = [:]
var failures = 0
let cores = ProcessInfo.processInfo.activeProcessorCount
/// The 1-minute load average: other work on a shared host widens the spread between rounds.
func loadAverage() -> String {
    (try? String(contentsOfFile: "/proc/loadavg", encoding: .utf8))?.split(separator: " ").first.map(String.init) ?? "?"
}
say("# ferry-bench-migrate: \(settings.runs) round(s), cases \(settings.cases.map(\.rawValue).joined(separator: ",")); "
      + "\(cores) cores; images in \(settings.scratch); \(Date()); load average \(loadAverage())")

do {
    let secret = "/tmp/ferry-bench-migrate-\(getpid())-secret"
    let generated = try spawn("seeder", ["secret"])
    let text = try generated.readLine(timeout: 10)
    BenchChildren.finish([generated])
    guard FileManager.default.createFile(atPath: secret, contents: Data((text + "\n").utf8),
                                         attributes: [.posixPermissions: 0o600]) else {
        throw BenchFailure("cannot write \(secret)")
    }
    BenchChildren.removeOnInterrupt(secret)
    defer { try? FileManager.default.removeItem(atPath: secret) }

    for round in 1...settings.runs {
        for c in settings.cases {
            let began = now()
            do {
                if c == .link {
                    let rate = try linkRate(mib: settings.mib)
                    linkRates.append(rate)
                    linkRateByRound[round] = rate
                    say("round \(round) link: \(f(rate / 1e9, 3)) GB/s, \(settings.mib) MiB in \(f(Double(settings.mib) * 1_048_576 / rate, 3)) s")
                    continue
                }
                guard let (w, mib) = workload(c) else { continue }
                var m = try migrate(w, mib: mib, settings: settings, secret: secret)
                m.round = round
                results[c, default: []].append(m)
                say("round \(round) \(c.rawValue): downtime \(f(m.downtimeMs)) ms, stopped \(f(m.stoppedS, 3)) s, local \(f(m.localS, 3)) s, "
                      + "bytes/size \(f(m.bytesPerSize, 3)), re-sent \(f(m.resent, 0)) pages (\(m.reason)) [\(f(now() - began, 1)) s]")
            } catch {
                failures += 1
                FileHandle.standardError.write(Data("ferry-bench-migrate: round \(round) \(c.rawValue): \(error)\n".utf8))
                guard settings.keepGoing else { throw error }
            }
        }
    }
} catch {
    FileHandle.standardError.write(Data("ferry-bench-migrate: stopped: \(error)\n".utf8))
    exit(1)
}

let loadAfter = loadAverage()
say("# all rounds done; load average \(loadAfter)")
if let load = Double(loadAfter), load > Double(cores) {
    say("# WARNING: the host was busy (load average \(loadAfter) on \(cores) cores): other work shares the cores, "
        + "so times spread between rounds; compare the per-round ratios of the targets")
}

// Medians and baselines.
let linkRate: Double? = linkRates.isEmpty ? nil : median(linkRates)
func linkSeconds(_ bytes: Double) -> Double? { linkRate.map { bytes / $0 } }
let m = results.mapValues(medians)
func baseline(for c: Case) -> Case { [.churn, .churnIdle, .churnStopcopy].contains(c) ? .churnStopcopy : .stopcopy }

say("")
if let linkRate {
    say("(b) encrypted link: median \(f(linkRate / 1e9, 3)) GB/s over \(linkRates.count) run(s) "
          + "(\(linkRates.map { f($0 / 1e9, 3) }.joined(separator: ", "))); \(settings.mib) MiB in \(f(linkSeconds(Double(settings.mib) * 1_048_576)!, 3)) s")
}
for c in settings.cases where c != .link {
    guard let runs = results[c], let med = m[c], let (w, _) = workload(c) else { continue }
    say("")
    say("== \(c.rawValue): \(w.label)\(w.leecher.isEmpty ? "" : " [leecher \(w.leecher.joined(separator: " "))]")")
    say(runHeader)
    for (i, run) in runs.enumerated() { say(runRow("\(i + 1)", run)) }
    say(runRow("median", med))
    let a = m[baseline(for: c)]
    let isBaseline = c == baseline(for: c)
    // Stop-and-copy's application is down for the whole copy: its stopped time is its downtime.
    let aDowntimeMs = a.map { $0.stoppedS * 1000 }
    if isBaseline {
        say("  (a) baseline: downtime = stopped time = \(f(med.stoppedS * 1000, 0)) ms (its Finalize call alone: \(f(med.downtimeMs)) ms)")
    } else {
        say("  x (a) \(baseline(for: c).rawValue): downtime \(ratio(med.downtimeMs, aDowntimeMs)), stopped \(ratio(med.stoppedS, a?.stoppedS)), "
              + "local \(ratio(med.localS, a?.localS)), bytes/size \(ratio(med.bytesPerSize, a?.bytesPerSize)), "
              + "re-sent \(ratio(med.resent, (a?.resent ?? 0) > 0 ? a?.resent : nil))")
    }
    say("  x (b) link for the same bytes (\(linkSeconds(med.size).map { f($0, 3) + " s" } ?? "not run")): "
          + "local \(ratio(med.localS, linkSeconds(med.size))), stopped \(ratio(med.stoppedS, linkSeconds(med.size)))")
}

// Targets (issue 10). Each line: verdict, case, figure, limit.
say("")
say("# targets (issue 10; set for 1 GiB on loopback\(settings.mib == 1024 ? "" : "; this run used \(settings.mib) MiB, so only indicative"))")
func target(_ name: String, _ value: Double?, _ limit: Double?, _ unit: String, _ how: String) {
    guard let value, let limit, value.isFinite, limit.isFinite else {
        say("NOT RUN  \(name) (\(how))")
        return
    }
    let verdict = value <= limit ? "MET     " : "MISSED  "
    let parts = how.split(separator: ";", maxSplits: 1)
    say(verdict + "\(name): \(f(value, 3)) \(unit) <= \(parts[0]) = \(f(limit, 3)) \(unit)" + (parts.count > 1 ? " (medians;\(parts[1]))" : ""))
}
/// Per-round ratios of a case's `local` time to the same round's reference:
/// other work on a shared host moves whole rounds, which these show.
func roundRatios(_ runs: [Migration]?, over reference: (Migration) -> Double?) -> String {
    let ratios = (runs ?? []).compactMap { run in reference(run).map { run.localS / $0 } }
    return ratios.isEmpty ? "" : "; per round " + ratios.map { String(format: "%.2fx", $0) }.joined(separator: ", ")
}
func sameRound(_ references: [Migration]?) -> (Migration) -> Double? {
    { run in references?.first { $0.round == run.round }?.localS }
}
let idle = m[.idle]
target("0 writes/s, every page local", idle?.localS, idle.flatMap { linkSeconds($0.size) }.map { 1.3 * $0 }, "s",
       "1.3 x link time" + roundRatios(results[.idle]) { run in linkRateByRound[run.round].map { run.size / $0 } })
target("0 writes/s, downtime", idle?.downtimeMs, 5, "ms", "5 ms")
target("10k writes/s, downtime", m[.w10k]?.downtimeMs, 10, "ms", "10 ms")
target("10k writes/s, bytes / size", m[.w10k]?.bytesPerSize, 1.3, "x", "1.3")
target("10k writes/s, every page local", m[.w10k]?.localS, idle.map { 1.5 * $0.localS }, "s",
       "1.5 x idle" + roundRatios(results[.w10k], over: sameRound(results[.idle])))
target("100k writes/s, downtime", m[.w100k]?.downtimeMs, 10, "ms", "10 ms")
target("100k writes/s, bytes / size", m[.w100k]?.bytesPerSize, 1.5, "x", "1.5")
target("100k writes/s, every page local", m[.w100k]?.localS, idle.map { 2 * $0.localS }, "s",
       "2 x idle" + roundRatios(results[.w100k], over: sameRound(results[.idle])))
target("churn, every page local", m[.churn]?.localS, m[.churnIdle].map { 3 * $0.localS }, "s",
       "3 x churn-idle" + roundRatios(results[.churn], over: sameRound(results[.churnIdle])))
target("churn, bytes / size", m[.churn]?.bytesPerSize, 2, "x", "2")
target("\(settings.rttMs) ms RTT, every page local", m[.rtt]?.localS, idle.map { 1.3 * $0.localS }, "s",
       "1.3 x loopback idle" + roundRatios(results[.rtt], over: sameRound(results[.idle])))

// CRIU 4.2 on this kind of machine, 1 GiB over loopback (DESIGN.md), beside Ferry's medians.
say("")
say("# reference: CRIU 4.2, 1 GiB, loopback (DESIGN.md; not measured here) beside Ferry (this run, medians)")
say("mode                          writes/s           application stopped          every page local")
say("CRIU page server              0 / 10k / 100k     1.63 / 1.71 / 1.78 s         same")
say("CRIU lazy pages (uffd)        0 / 10k / 100k     117 / 86 / 115 ms            2.1 / 4.7 / 44.7 s")
func triple(_ value: (Migration) -> Double, _ decimals: Int) -> String {
    [Case.idle, .w10k, .w100k].map { m[$0].map { f(value($0), decimals) } ?? "-" }.joined(separator: " / ")
}
say("Ferry downtime (Finalize)     0 / 10k / 100k     " + triple(\.downtimeMs, 1).padding(toLength: 20, withPad: " ", startingAt: 0)
      + " ms     " + triple(\.localS, 2) + " s")
say("Ferry source stopped          0 / 10k / 100k     " + triple(\.stoppedS, 2).padding(toLength: 20, withPad: " ", startingAt: 0) + " s")
if let a = m[.stopcopy] {
    say("Ferry stop-and-copy (a)       0                  \(f(a.stoppedS, 2)) s                       \(f(a.localS, 2)) s")
}
exit(failures == 0 ? 0 : 1)
