// The fault matrix (issue 11): real `seeder`, `leecher`, `hub` and `relay`
// processes, a workload under write load, and one fault at one phase per
// cell. Each cell states what must happen and checks it: the source runs on
// (or stays stopped only where documented), no image that looks complete is
// left behind after a failure, a completed image (or a live target) equals
// the source, a live target never reads zeros where the source had data,
// the error names what happened, and a peer that is stopped or stops
// reading makes the survivors hold at most their budget. Each cell prints a
// row "fault-matrix | ..." of the table; docs/fault-matrix.md lists them.
import Foundation
import Synchronization
import Testing
import FerryTestSupport
@testable import FerryMigration

/// One cell: which process gets which fault, when, through what.
struct FaultCell: CustomTestStringConvertible, Sendable {
    enum Role: String, Sendable { case seeder, leecher, hub, link }
    enum Fault: String, Sendable {
        /// SIGKILL.
        case kill
        /// SIGSTOP for longer than the seeder's grace period, then SIGCONT.
        case stop
        /// Every connection through the relay cut at once.
        case cut
        /// The role keeps its connection but stops reading it (the relay
        /// holds what is sent to it) for longer than the grace period; the
        /// other side goes on sending until its socket fills.
        case stall = "stops reading"
    }
    enum Phase: String, Sendable {
        /// The leecher's connection is accepted by the relay, its handshake
        /// and Track still on the way (the relay delays every byte).
        case handshake
        case precopy = "pre-copy"
        /// When the leecher decides to finalize: the freeze may or may not have happened.
        case finalize
        case postcopy = "post-copy"
        /// Every page held; the image (or target) is hashed and compared
        /// with the frozen source's checksums (the `verifying` event).
        case checksum
        /// The checksums matched (`verified`) and Complete is on its way;
        /// the relay delays every byte so the round trip can be hit.
        case complete = "Complete"
    }
    /// Where the leecher's pages go.
    enum Destination: String, Sendable {
        case out = "--out"
        /// Post-copy into a live target process.
        case into = "--into"
    }
    /// How the leecher reaches the seeder.
    enum Chain: String, Sendable {
        case direct
        /// leecher → relay → `hub serve --upstream` → seeder.
        case upstream = "hub --upstream"
        /// leecher → relay → `hub serve` ← `seeder serve --via` (the seeder dials out).
        case via = "hub --via"
    }
    enum Outcome: String, Sendable {
        /// The migration completes; the image (or target) equals the source, left stopped.
        case completes
        /// The migration fails with a clear error; the source runs on; no
        /// image; a live target reads the source's bytes or SIGBUS, never zeros.
        case failsSourceRunsOn = "fails, source runs on"
        /// Nothing happened to the source; a second leecher migrates it.
        case nextLeecherCompletes = "the next leecher completes"
        /// Complete reached the seeder but the leecher is gone: the source
        /// is left as `--then stop` says (stopped, never destroyed), no image.
        case sourceLeftStopped = "fails, source left stopped (Complete applied)"
        /// The same with `--then kill`: the source is gone, and so is the
        /// memory (the documented cost of `kill`).
        case sourceKilled = "fails, source killed (Complete applied, --then kill)"
    }

    let role: Role
    let fault: Fault
    let phase: Phase
    let expected: Outcome
    var destination = Destination.out
    var chain = Chain.direct
    /// The seeder's `--then`.
    var then = ThenAction.stop

    var testDescription: String {
        let through = chain == .direct ? "" : " via \(chain.rawValue)"
        let after = then == .stop ? "" : " --then \(then.rawValue)"
        return "\(role.rawValue) \(fault.rawValue) in \(phase.rawValue) \(destination.rawValue)\(through)\(after) → \(expected.rawValue)"
    }

    static let all: [FaultCell] = handshake + middle + fixed + late + stalls + intoLate

    static let handshake: [FaultCell] = [
        FaultCell(role: .leecher, fault: .kill, phase: .handshake, expected: .nextLeecherCompletes),
        // The first connection is not resumed (there is no session yet): the
        // leecher fails and names the seeder; the source was never frozen.
        FaultCell(role: .seeder, fault: .kill, phase: .handshake, expected: .failsSourceRunsOn),
        FaultCell(role: .link, fault: .cut, phase: .handshake, expected: .failsSourceRunsOn),
        // Stopped past the grace mid-handshake: within the handshake timeout (10 s).
        FaultCell(role: .seeder, fault: .stop, phase: .handshake, expected: .completes),
        FaultCell(role: .hub, fault: .stop, phase: .handshake, expected: .completes, chain: .upstream),
        FaultCell(role: .leecher, fault: .stop, phase: .handshake, expected: .completes),
    ]

    static let middle: [FaultCell] = [Phase.precopy, .postcopy].flatMap { phase in [
        FaultCell(role: .leecher, fault: .kill, phase: phase, expected: .failsSourceRunsOn),
        FaultCell(role: .leecher, fault: .stop, phase: phase, expected: .completes),
        FaultCell(role: .leecher, fault: .stall, phase: phase, expected: .completes),
        FaultCell(role: .seeder, fault: .kill, phase: phase, expected: .failsSourceRunsOn),
        FaultCell(role: .seeder, fault: .stop, phase: phase, expected: .completes),
        FaultCell(role: .link, fault: .cut, phase: phase, expected: .completes),
        FaultCell(role: .hub, fault: .kill, phase: phase, expected: .failsSourceRunsOn, chain: .upstream),
        FaultCell(role: .hub, fault: .stop, phase: phase, expected: .completes, chain: .upstream),
        FaultCell(role: .hub, fault: .kill, phase: phase, expected: .failsSourceRunsOn, chain: .via),
        // The hub sends to a leecher that stops reading: what the hub holds.
        FaultCell(role: .leecher, fault: .stall, phase: phase, expected: .completes, chain: .upstream),
        FaultCell(role: .leecher, fault: .stall, phase: phase, expected: .completes, chain: .via),
        // Into a live target.
        FaultCell(role: .leecher, fault: .kill, phase: phase, expected: .failsSourceRunsOn, destination: .into),
        FaultCell(role: .leecher, fault: .stop, phase: phase, expected: .completes, destination: .into),
    ] }

    static let fixed: [FaultCell] = [
        FaultCell(role: .seeder, fault: .stall, phase: .precopy, expected: .completes),
        FaultCell(role: .seeder, fault: .stall, phase: .postcopy, expected: .completes),
        FaultCell(role: .hub, fault: .stop, phase: .precopy, expected: .completes, chain: .via),
        FaultCell(role: .hub, fault: .stop, phase: .postcopy, expected: .completes, chain: .via),
        FaultCell(role: .leecher, fault: .stop, phase: .finalize, expected: .completes),
        FaultCell(role: .link, fault: .cut, phase: .finalize, expected: .completes),
        FaultCell(role: .leecher, fault: .kill, phase: .finalize, expected: .failsSourceRunsOn),
        FaultCell(role: .seeder, fault: .kill, phase: .finalize, expected: .failsSourceRunsOn),
        FaultCell(role: .leecher, fault: .kill, phase: .finalize, expected: .failsSourceRunsOn, destination: .into),
        FaultCell(role: .seeder, fault: .kill, phase: .postcopy, expected: .failsSourceRunsOn, destination: .into),
        // Checksum: the fault lands before the seeder can see Complete.
        FaultCell(role: .leecher, fault: .kill, phase: .checksum, expected: .failsSourceRunsOn),
        FaultCell(role: .seeder, fault: .kill, phase: .checksum, expected: .failsSourceRunsOn),
        FaultCell(role: .link, fault: .cut, phase: .checksum, expected: .completes),
        FaultCell(role: .leecher, fault: .stop, phase: .checksum, expected: .completes),
        // Complete: the seeder killed before Complete reaches it; the link
        // cut and the leecher killed after the seeder applied it, while its
        // reply is still on the way.
        FaultCell(role: .seeder, fault: .kill, phase: .complete, expected: .failsSourceRunsOn),
        FaultCell(role: .link, fault: .cut, phase: .complete, expected: .completes),
        FaultCell(role: .leecher, fault: .kill, phase: .complete, expected: .sourceLeftStopped),
        // Stopped past the grace with the reply in its socket: it reads it on waking.
        FaultCell(role: .leecher, fault: .stop, phase: .complete, expected: .completes),
        // With --then kill, the same leecher death loses the source.
        FaultCell(role: .leecher, fault: .kill, phase: .complete, expected: .sourceKilled, then: .kill),
    ]

    static let late: [FaultCell] = [Phase.finalize, .checksum, .complete].flatMap { phase in [
        // A stopped seeder or hub keeps its connections: the leecher waits.
        FaultCell(role: .seeder, fault: .stop, phase: phase, expected: .completes),
        FaultCell(role: .hub, fault: .stop, phase: phase, expected: .completes, chain: .upstream),
        // A killed hub: in Complete, struck before Complete reaches it.
        FaultCell(role: .hub, fault: .kill, phase: phase, expected: .failsSourceRunsOn, chain: .upstream),
    ] }

    static let stalls: [FaultCell] = [Phase.finalize, .checksum].flatMap { phase in [
        FaultCell(role: .seeder, fault: .stall, phase: phase, expected: .completes),
        FaultCell(role: .hub, fault: .stall, phase: phase, expected: .completes, chain: .upstream),
    ] }

    static let intoLate: [FaultCell] = [Phase.checksum, .complete].flatMap { phase in [
        // Into a live target once every page is placed: the target never
        // reads zeros, and holds the source only when the migration completes.
        FaultCell(role: .leecher, fault: .kill, phase: phase,
                  expected: phase == .complete ? .sourceLeftStopped : .failsSourceRunsOn, destination: .into),
        FaultCell(role: .seeder, fault: .kill, phase: phase, expected: .failsSourceRunsOn, destination: .into),
        FaultCell(role: .link, fault: .cut, phase: phase, expected: .completes, destination: .into),
    ] }
}

/// The largest growth of a surviving seeder or hub while its peer was
/// stopped or stopped reading, over the cells run: for docs/fault-matrix.md.
let largestHeld = Mutex<(bytes: Int, cell: String)>((0, ""))

@Suite(.serialized) struct FaultMatrixTests {
    /// The seeder's grace period; a stopped process stays stopped longer.
    static let grace = 2
    /// In the Complete cells, the default grace: a reconnection over the
    /// relay's 300 ms round trip (handshake and Track) on a loaded machine
    /// took longer than 2 s, and the leecher rightly gave up.
    static let completeGrace = 5
    /// What a seeder may hold for a peer that reads nothing: the ReadAt
    /// budget and the send queue (Protocols/migration.md § Limits).
    static let heldLimit = 64 << 20
    /// The hub keeps a copy of the source's memory by design (after the
    /// freeze it fills it whole): its cache is capped here, the rest spills
    /// to disk, so what it holds for a peer is measured beyond this.
    static let hubCacheMiB = 16
    /// The relay's delay in each direction in the checksum and Complete
    /// cells: a round trip of 300 ms, so Complete spends 150 ms in the relay
    /// each way, while a reconnection (handshake and Track, about three
    /// round trips) still fits in the grace period.
    static let delayMilliseconds = 150

    /// Resident memory of `pid` (VmRSS), bytes.
    func residentBytes(_ pid: Int32) -> Int {
        guard let status = try? String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8),
              let line = status.split(separator: "\n").first(where: { $0.hasPrefix("VmRSS:") }),
              let kib = Int(line.split(separator: " ", omittingEmptySubsequences: true).dropFirst().first ?? "")
        else { return 0 }
        return kib * 1024
    }

    /// The pid tracing `pid` (TracerPid), 0 when none.
    func tracer(of pid: Int32) -> Int32 {
        let status = procText("/proc/\(pid)/status") ?? ""
        let line = status.split(separator: "\n").first { $0.hasPrefix("TracerPid:") } ?? ""
        return Int32(line.split(separator: "\t").last ?? "") ?? 0
    }

    /// FERRY_FAULT_CELLS="kill in post-copy;Complete" runs only the cells
    /// whose description contains one of those parts (to rerun a few by hand).
    static var selected: [FaultCell] {
        guard let only = ProcessInfo.processInfo.environment["FERRY_FAULT_CELLS"], !only.isEmpty else { return FaultCell.all }
        let parts = only.split(separator: ";").map(String.init)
        return FaultCell.all.filter { cell in parts.contains { cell.testDescription.contains($0) } }
    }

    @Test(arguments: Self.selected)
    func cell(_ cell: FaultCell) throws {
        let began = ChildProcess.now()
        let grace = cell.phase == .complete ? Self.completeGrace : Self.grace
        let harness = try CLIHarness()
        // Pre-copy: writers keep pre-copy going (a 100 % share is never
        // reached, so it ends by the policy's other rules after some rounds).
        // Post-copy: everything moves after the freeze (0 %). Into a target
        // in post-copy, and in the Complete cells, less: what matters there
        // is where the fault lands, not how much moves.
        let mib = switch (cell.phase, cell.destination) {
        // Post-copy into a target moves 1 MiB a round trip (4 requests of
        // 64 pages): over the relay's 300 ms, 64 MiB took 20 s.
        case (.complete, .into): 8
        case (.postcopy, .into), (.complete, _), (.handshake, _): 64
        // The seeder hashes the frozen source at about 1 s a GiB: 256 MiB
        // keep its checksum reply a quarter of a second away.
        case (.postcopy, _), (.checksum, _): 256
        // Pre-copy must outlast the first progress event (250 ms): 64 MiB
        // could be pulled, finalized and placed before it.
        default: 128
        }
        let child = try Memwriter(["--mib", "\(mib)", "--threads", "2", "--rate", "5000", "--pattern"])
        defer { child.stop() }
        let target = cell.destination == .into ? try Memwriter(["--mib", "1", "--no-write"]) : nil
        defer { target?.stop() }
        // The target's own mappings: what the migration adds is what differs.
        let targetMaps = target.map { smaps($0.pid).map(\.range) } ?? []

        // The seeder, and the hub in front of it when the chain has one.
        let seederOptions = ["--grace", "\(grace)", "--then", cell.then.rawValue]
        var hub: ChildProcess? = nil
        defer { hub?.stop() }
        let seeder: ChildProcess
        let address: String
        var migration: [String] = []
        switch cell.chain {
        case .direct:
            (seeder, address) = try harness.startSeeder(pid: child.pid, seederOptions)
        case .upstream:
            let seederAddress: String
            (seeder, seederAddress) = try harness.startSeeder(pid: child.pid, seederOptions)
            let started = try ChildProcess(builtExecutable("hub"),
                                           ["serve", "--listen", "127.0.0.1:0", "--upstream", seederAddress,
                                            "--secret-file", harness.secretPath, "--grace", "\(grace)", "--json",
                                            "--memory-limit", "\(Self.hubCacheMiB)"])
            hub = started
            address = try HubCommandLineTests.address(in: try started.expect("{\"event\":\"listening\""))
        case .via:
            let started = try ChildProcess(builtExecutable("hub"),
                                           ["serve", "--listen", "127.0.0.1:0", "--seeders-listen", "127.0.0.1:0",
                                            "--secret-file", harness.secretPath, "--grace", "\(grace)", "--json",
                                            "--memory-limit", "\(Self.hubCacheMiB)"])
            hub = started
            let seedersAddress = try HubCommandLineTests.address(in: try started.expect("{\"event\":\"listening\""))
            address = try HubCommandLineTests.address(in: try started.expect("{\"event\":\"listening\""))
            seeder = try ChildProcess(builtExecutable("seeder"),
                                      ["serve", "\(child.pid)", "--via", seedersAddress, "--name", "m",
                                       "--secret-file", harness.secretPath, "--json"] + seederOptions)
            _ = try started.expect("{\"event\":\"upstream\"")
            migration = ["--migration", "m"]
        }
        defer { seeder.stop() }
        // The handshake cells too: the delay keeps the handshake and Track
        // (two round trips) on the way long enough to strike in them.
        let delayed = cell.phase == .complete || cell.phase == .handshake
        let relay = try Relay(to: address, delayMilliseconds: delayed ? Self.delayMilliseconds : 0)
        defer { relay.stop() }
        let out = scratchDirectory("fault-\(cell.role)-\(cell.fault)-\(cell.phase)-\(cell.chain)")
        defer { try? FileManager.default.removeItem(atPath: out) }
        let policy = switch cell.phase {
        case .postcopy, .complete, .handshake: ["--finalize-at", "0%"]
        // Pre-copy moves (nearly) everything, so post-copy is a few dirty
        // pages and ends before the seeder has hashed the frozen source:
        // at `verifying` the leecher waits for the checksums.
        case .checksum: ["--finalize-at", "100%", "--max-downtime", "0", "--max-wait", "2"]
        // Finalized by the deadline, one second in.
        case .finalize: ["--finalize-at", "100%", "--max-downtime", "0", "--max-wait", "1"]
        case .precopy: ["--finalize-at", "100%", "--max-downtime", "0", "--max-wait", "60"]
        }
        let leecher: ChildProcess
        if let target {
            leecher = try ChildProcess(builtExecutable("leecher"),
                                       ["pull", "127.0.0.1:\(relay.port)", "--secret-file", harness.secretPath,
                                        "--into", "\(target.pid)", "--json"] + policy + migration)
        } else {
            leecher = try harness.startLeecher("127.0.0.1:\(relay.port)", out: out, policy + migration)
        }
        defer { leecher.stop() }

        print("fault-matrix: \(cell.testDescription): source \(child.pid), seeder \(seeder.pid), hub \(hub?.pid ?? 0), relay \(relay.child.pid), leecher \(leecher.pid), target \(target?.pid ?? 0)")
        // The source as it was frozen, for a live target to be compared with
        // (after the freeze and before a fault that can thaw it).
        let main = try #require(child.regions["main"])
        var frozen: [UInt8]? = nil
        // Wait for the phase.
        switch cell.phase {
        case .handshake:
            // Struck once the relay has accepted the leecher's connection.
            let deadline = ChildProcess.now() + 30
            while relay.accepted() == 0 && ChildProcess.now() < deadline { usleep(2_000) }
        case .precopy:
            _ = try leecher.expect("{\"event\":\"progress\"", timeout: 30)
            // Still in pre-copy: nothing said of finalizing yet.
            while let line = try? leecher.readLine(timeout: 0.001) {
                #expect(!line.hasPrefix("{\"event\":\"finalizing\""), "pre-copy ended before the fault: \(line)")
            }
        case .finalize: _ = try leecher.expect("{\"event\":\"finalizing\"", timeout: 30)
        case .postcopy, .checksum, .complete:
            _ = try leecher.expect("{\"event\":\"finalized\"", timeout: 60)
            if target != nil { frozen = bytes(child.pid, at: main.start, length: Int(main.length)) }
            if cell.phase == .checksum { _ = try leecher.expect("{\"event\":\"verifying\"", timeout: 60) }
            guard cell.phase == .complete else { break }
            _ = try leecher.expect("{\"event\":\"verified\"", timeout: 60)
            if cell.role == .leecher || cell.role == .link {
                // Strike once the seeder has applied Complete (it lets go of
                // the source: no tracer), while the reply is still in the relay.
                let deadline = ChildProcess.now() + Double(Self.delayMilliseconds) / 1000 * 2
                while tracer(of: child.pid) != 0 && ChildProcess.now() < deadline { usleep(1_000) }
                #expect(tracer(of: child.pid) == 0, "the seeder had not applied Complete within one round trip")
            }
        }

        let struck: ChildProcess? = switch cell.role {
        case .seeder: seeder
        case .leecher: leecher
        case .hub: hub
        case .link: nil
        }
        // Who goes on sending while a peer is stopped or reads nothing: the
        // hub or seeder the leecher pulls from; the seeder behind a stopped hub.
        let sender: ChildProcess? = switch cell.role {
        case .leecher: hub ?? seeder
        case .hub: cell.fault == .stall ? nil : seeder
        case .seeder, .link: nil
        }
        // The checksum phase: whether the fault landed before `verified`
        // (the checksum call in flight, or the leecher comparing) is recorded.
        // The handshake phase: whether it landed before `connected` (the
        // handshake and Track done), likewise.
        var verifiedBeforeFault = false, connectedBeforeFault = false
        if cell.phase == .checksum || cell.phase == .handshake {
            while let line = try? leecher.readLine(timeout: 0.001) {
                if line.hasPrefix("{\"event\":\"verified\"") { verifiedBeforeFault = true }
                if line.hasPrefix("{\"event\":\"connected\"") { connectedBeforeFault = true }
            }
        }
        var held: Int? = nil
        switch cell.fault {
        case .kill:
            struck?.stop()
        case .stop, .stall:
            let before = sender.map { residentBytes($0.pid) } ?? 0
            if cell.fault == .stop {
                kill(struck!.pid, SIGSTOP)
            } else {
                // The leecher stops reading: nothing from upstream reaches it.
                // The seeder stops reading: nothing from the leecher reaches it.
                relay.hold(cell.role == .leecher ? .down : .up)
            }
            // Sampled while it lasts: the peak, not just the end.
            var peak = 0
            let until = ChildProcess.now() + Double(grace + 1)
            while ChildProcess.now() < until {
                if let sender { peak = max(peak, residentBytes(sender.pid) - before) }
                usleep(100_000)
            }
            if cell.fault == .stop { kill(struck!.pid, SIGCONT) } else { relay.release() }
            if sender != nil {
                held = max(0, peak)
                let limit = Self.heldLimit + (sender === hub ? Self.hubCacheMiB << 20 : 0)
                #expect(peak <= limit, "the \(sender === hub ? "hub" : "seeder") grew by \(peak >> 20) MiB while its peer read nothing")
                largestHeld.withLock { if peak > $0.bytes { $0 = (peak, cell.testDescription) } }
            }
        case .cut:
            relay.drop()
        }
        // A live target after a failure: read once the leecher has let go (its
        // guardian poisons what never arrived), before the source thaws.
        if target != nil && cell.phase == .finalize { frozen = bytes(child.pid, at: main.start, length: Int(main.length)) }

        var result = ""
        var resumedCompleted = false
        switch cell.expected {
        case .completes:
            while true {
                let line = try leecher.readLine(timeout: 90)
                if line.hasPrefix("{\"event\":\"resumed\""), line.contains("completed") { resumedCompleted = true }
                if line.hasPrefix("{\"event\":\"complete\"") { break }
            }
            #expect(leecher.waitForExit() == 0)
            if let target {
                try expectPlaced(main: main, source: child, target: target, before: targetMaps)
            } else {
                let report = try ImageVerifier.compare(directory: out, pid: child.pid)
                #expect(report.matches, "\(report)")
            }
            result = "completed"
        case .failsSourceRunsOn:
            if cell.role == .leecher || cell.role == .hub {
                // The seeder waits out the grace period, then lets go (thaws a frozen source).
                let error = try seeder.expect("{\"event\":\"error\"", timeout: Double(grace + 10))
                #expect(error.contains("grace period"), "\(error)")
                #expect(seeder.waitForExit() == 1)
            }
            if cell.role != .leecher {
                let error = try leecher.expect("{\"event\":\"error\"", timeout: 60)
                let named = switch (cell.role, cell.phase) {
                case (.hub, _): "lost the connection"
                case (_, .complete): "did not confirm Complete"
                default: "seeder"
                }
                #expect(error.contains(named), "\(error)")
                if error.contains("did not confirm Complete") { verifiedBeforeFault = true }
                #expect(leecher.waitForExit() == 1)
            }
            #expect(try harness.isRunning(child), "the source must run on")
            #expect(!FileManager.default.fileExists(atPath: out + "/manifest.json"), "an image was left behind")
            if let target {
                result = try expectNoZeros(main: main, source: child, frozen: frozen, target: target, before: targetMaps,
                                           leecher: leecher)
            } else {
                result = "failed as stated"
            }
        case .sourceLeftStopped, .sourceKilled:
            // The seeder applied Complete; it waits its grace period for the
            // leecher to resume, then ends as completed.
            let said = try seeder.expect("{\"event\":\"complete\"", timeout: Double(grace + 10))
            #expect(said.contains(cell.then == .kill ? "was killed" : "stopped"), "\(said)")
            #expect(seeder.waitForExit() == 0)
            if cell.then == .kill {
                #expect(exits(child.pid, within: 5), "--then kill: the source must be gone")
            } else {
                #expect(child.child.state == "T", "the source must be left stopped, not running nor gone")
            }
            #expect(!FileManager.default.fileExists(atPath: out + "/manifest.json"), "an image was left behind")
            if let target {
                // Every page was placed before Complete: the target holds the frozen source.
                result = try expectNoZeros(main: main, source: child, frozen: frozen, target: target, before: targetMaps,
                                           leecher: leecher) + ", source left stopped"
            } else {
                result = "source \(cell.then == .kill ? "killed" : "left stopped"), no image"
            }
        case .nextLeecherCompletes:
            #expect(try harness.isRunning(child), "the source must run on")
            let next = try harness.startLeecher(address, out: out + "-next", ["--finalize-at", "95%"] + migration)
            defer { next.stop(); try? FileManager.default.removeItem(atPath: out + "-next") }
            _ = try next.expect("{\"event\":\"complete\"", timeout: 90)
            #expect(next.waitForExit() == 0)
            #expect(try ImageVerifier.compare(directory: out + "-next", pid: child.pid).matches)
            result = "next leecher completed"
        }
        if cell.phase == .checksum {
            // Recorded, not required: on a loaded machine post-copy can
            // outlast the seeder's hashing (seen once at a load of 15).
            result += verifiedBeforeFault ? " (landed after `verified`: Complete window)" : " (landed before `verified`)"
        }
        if cell.phase == .handshake && cell.role != .leecher {
            result += connectedBeforeFault ? " (landed after `connected`)" : " (landed before `connected`)"
        }
        if cell.phase == .complete && cell.role == .link {
            // The cut must have hit the reply: the leecher resumed a completed session.
            #expect(resumedCompleted, "the cut missed the Complete reply (the leecher never resumed a completed session)")
        }
        let heldText = held.map { "\($0 >> 20) MiB" } ?? ""
        let seconds = String(format: "%.1f s", ChildProcess.now() - began)
        print("fault-matrix | \(cell.role.rawValue) | \(cell.fault.rawValue) | \(cell.phase.rawValue) | \(cell.destination.rawValue) | \(cell.chain.rawValue) | \(cell.expected.rawValue) | \(result) | held \(heldText) | \(seconds)")
        let largest = largestHeld.withLock { $0 }
        print("fault-matrix: largest growth of a surviving seeder or hub so far: \(largest.bytes >> 20) MiB (\(largest.cell))")
    }

    /// Where the source's region `main` lies in `target`, and its whole mapping.
    func placed(main: AddressRange, source: Memwriter, target: Memwriter, before: [AddressRange]) throws -> AddressRange? {
        let whole = try #require(try ProcessMaps.read(pid: source.pid).first { $0.range.contains(main.start) }?.range)
        guard let delta = placement(of: main, whole: whole, in: target.pid, registered: false, before: before) else {
            return nil
        }
        return AddressRange(start: UInt64(bitPattern: Int64(bitPattern: main.start) + delta),
                            end: UInt64(bitPattern: Int64(bitPattern: main.end) + delta))
    }

    /// A completed `--into`: the target holds the source's bytes (the source
    /// is left stopped), every one of them, and no range stays registered.
    func expectPlaced(main: AddressRange, source: Memwriter, target: Memwriter, before: [AddressRange]) throws {
        let region = try #require(try placed(main: main, source: source, target: target, before: before),
                                  "the migrated region is not in the target")
        let expected = try #require(bytes(source.pid, at: main.start, length: Int(main.length)))
        let got = try #require(bytes(target.pid, at: region.start, length: Int(region.length)))
        #expect(got == expected, "the target's copy differs from the source")
        #expect(expected.contains { $0 != 0 }, "a patterned source has data")
        #expect(smaps(target.pid).allSatisfy { !$0.flags.contains("um") }, "no range of the target stays registered")
    }

    /// A failed `--into`: every page of the target's copy either holds the
    /// frozen source's bytes or is poisoned (a load raises SIGBUS, and a read
    /// through /proc fails): none reads zeros. When nothing was placed (the
    /// fault came before the hand-over) the target is left as it was.
    /// Returns what it found.
    func expectNoZeros(main: AddressRange, source: Memwriter, frozen: [UInt8]?, target: Memwriter,
                       before: [AddressRange], leecher: ChildProcess) throws -> String {
        // A failing leecher poisons what never arrived before it exits; a
        // killed one leaves that to its guardian.
        _ = leecher.waitForExit(timeout: 10)
        guard let region = try placed(main: main, source: source, target: target, before: before) else {
            target.send("count")
            #expect((try? target.expect("count", timeout: 5)) != nil, "the target must run on untouched")
            return "nothing placed in the target"
        }
        let added = smaps(target.pid).filter { !before.contains($0.range) }.map { "\($0.range) \($0.range.length) \($0.flags)" }
        let frozen = try #require(frozen, "the target holds the region \(region) (main \(main)), yet the source was not read while frozen; added: \(added)")
        var arrived = 0, poisoned = 0, zeros = 0, differ = 0
        var firstPoisoned: UInt64? = nil
        // One descriptor and memcmp: a page at a time through `bytes` and
        // `elementsEqual` took half a minute for 256 MiB in a debug build.
        let memory = open("/proc/\(target.pid)/mem", O_RDONLY)
        try #require(memory >= 0, "cannot open /proc/\(target.pid)/mem")
        defer { close(memory) }
        var got = [UInt8](repeating: 0, count: 4096)
        for offset in stride(from: 0, to: Int(region.length), by: 4096) {
            let address = region.start + UInt64(offset)
            guard got.withUnsafeMutableBytes({ pread(memory, $0.baseAddress, 4096, off_t(address)) }) == 4096 else {
                poisoned += 1
                if firstPoisoned == nil { firstPoisoned = address }
                continue
            }
            let same = got.withUnsafeBytes { page in
                frozen.withUnsafeBytes { memcmp(page.baseAddress!, $0.baseAddress! + offset, 4096) == 0 }
            }
            if same {
                arrived += 1
            } else if got.allSatisfy({ $0 == 0 }) {
                zeros += 1
            } else {
                differ += 1
            }
        }
        #expect(zeros == 0, "the target reads zeros in \(zeros) pages where the frozen source had data")
        #expect(differ == 0, "\(differ) pages of the target differ from the frozen source")
        if let firstPoisoned {
            // A load of a page that never arrived raises SIGBUS in the target.
            target.send("peek 0x" + String(firstPoisoned, radix: 16))
            let answer = try? target.expect("peek", timeout: 10)
            #expect(answer == nil, "the target read a page that never arrived: \(answer ?? "")")
            #expect(target.child.waitForExit(timeout: 10) == 128 + SIGBUS, "a load of a missing page must raise SIGBUS")
        }
        return "\(arrived) pages arrived, \(poisoned) poisoned (SIGBUS), 0 zeros"
    }
}
