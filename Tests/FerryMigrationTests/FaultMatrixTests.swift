// The fault matrix (issue 11): real `seeder`, `leecher` and `relay`
// processes, a workload under write load, and one fault at one phase per
// cell. Each cell states what must happen and checks it: the source runs on
// (or stays stopped only where documented), no image that looks complete is
// left behind after a failure, a completed image equals the source, and the
// error names what happened. docs/fault-matrix.md lists the cells.
import Foundation
import Testing
import FerryTestSupport
@testable import FerryMigration

/// One cell: which process gets which fault, when.
struct FaultCell: CustomTestStringConvertible, Sendable {
    enum Role: String, Sendable { case seeder, leecher, hub, link }
    enum Fault: String, Sendable {
        /// SIGKILL.
        case kill
        /// SIGSTOP for longer than the seeder's grace period, then SIGCONT.
        case stop
        /// Every connection through the relay cut at once.
        case cut
    }
    enum Phase: String, Sendable {
        /// Before the leecher is connected.
        case handshake
        case precopy = "pre-copy"
        /// When the leecher decides to finalize: the freeze may or may not have happened.
        case finalize
        case postcopy = "post-copy"
    }
    enum Outcome: String, Sendable {
        /// The migration completes; the image equals the source, left stopped.
        case completes
        /// The migration fails with a clear error; the source runs on; no image.
        case failsSourceRunsOn = "fails, source runs on"
        /// Nothing happened to the source; a second leecher migrates it.
        case nextLeecherCompletes = "the next leecher completes"
    }

    let role: Role
    let fault: Fault
    let phase: Phase
    let expected: Outcome

    var testDescription: String { "\(role.rawValue) \(fault.rawValue) in \(phase.rawValue) → \(expected.rawValue)" }

    static let all: [FaultCell] = [
        FaultCell(role: .leecher, fault: .kill, phase: .handshake, expected: .nextLeecherCompletes),
    ] + [Phase.precopy, .postcopy].flatMap { phase in [
        FaultCell(role: .leecher, fault: .kill, phase: phase, expected: .failsSourceRunsOn),
        FaultCell(role: .leecher, fault: .stop, phase: phase, expected: .completes),
        FaultCell(role: .seeder, fault: .kill, phase: phase, expected: .failsSourceRunsOn),
        FaultCell(role: .seeder, fault: .stop, phase: phase, expected: .completes),
        FaultCell(role: .link, fault: .cut, phase: phase, expected: .completes),
        FaultCell(role: .hub, fault: .kill, phase: phase, expected: .failsSourceRunsOn),
        FaultCell(role: .hub, fault: .stop, phase: phase, expected: .completes),
    ] } + [
        FaultCell(role: .leecher, fault: .kill, phase: .finalize, expected: .failsSourceRunsOn),
        FaultCell(role: .seeder, fault: .kill, phase: .finalize, expected: .failsSourceRunsOn),
    ]
}

@Suite(.serialized) struct FaultMatrixTests {
    /// The seeder's grace period; a stopped process stays stopped longer.
    static let grace = 2
    /// What a seeder may hold for a peer that reads nothing: the ReadAt
    /// budget and the send queue (Protocols/migration.md § Limits).
    static let heldLimit = 64 << 20

    /// Resident memory of `pid` (VmRSS), bytes.
    func residentBytes(_ pid: Int32) -> Int {
        guard let status = try? String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8),
              let line = status.split(separator: "\n").first(where: { $0.hasPrefix("VmRSS:") }),
              let kib = Int(line.split(separator: " ", omittingEmptySubsequences: true).dropFirst().first ?? "")
        else { return 0 }
        return kib * 1024
    }

    @Test(arguments: FaultCell.all)
    func cell(_ cell: FaultCell) throws {
        let harness = try CLIHarness()
        // Pre-copy: writers keep pre-copy going (a 100 % share is never
        // reached, so it ends by the policy's other rules after some rounds).
        // Post-copy: everything moves after the freeze (0 %).
        let workload = cell.phase == .postcopy
            ? ["--mib", "256", "--threads", "2", "--rate", "5000", "--pattern"]
            : ["--mib", "128", "--threads", "2", "--rate", "5000", "--pattern"]
        let child = try Memwriter(workload)
        defer { child.stop() }
        let (seeder, seederAddress) = try harness.startSeeder(pid: child.pid, ["--grace", "\(Self.grace)"])
        defer { seeder.stop() }
        // With a hub: leecher -> relay -> hub -> seeder.
        var hub: ChildProcess? = nil
        var address = seederAddress
        if cell.role == .hub {
            let started = try ChildProcess(builtExecutable("hub"),
                                           ["serve", "--listen", "127.0.0.1:0", "--upstream", seederAddress,
                                            "--secret-file", harness.secretPath, "--grace", "\(Self.grace)", "--json"])
            address = try HubCommandLineTests.address(in: try started.expect("{\"event\":\"listening\""))
            hub = started
        }
        defer { hub?.stop() }
        let relay = try Relay(to: address)
        defer { relay.stop() }
        let out = scratchDirectory("fault-\(cell.role)-\(cell.fault)-\(cell.phase)")
        defer { try? FileManager.default.removeItem(atPath: out) }
        let policy = switch cell.phase {
        case .postcopy: ["--finalize-at", "0%"]
        // Finalized by the deadline, one second in.
        case .finalize: ["--finalize-at", "100%", "--max-downtime", "0", "--max-wait", "1"]
        case .handshake, .precopy: ["--finalize-at", "100%", "--max-downtime", "0", "--max-wait", "60"]
        }
        let leecher = try harness.startLeecher("127.0.0.1:\(relay.port)", out: out, policy)
        defer { leecher.stop() }

        // Wait for the phase, then strike.
        switch cell.phase {
        case .handshake: break
        case .precopy: _ = try leecher.expect("{\"event\":\"progress\"", timeout: 30)
        case .finalize: _ = try leecher.expect("{\"event\":\"finalizing\"", timeout: 30)
        case .postcopy: _ = try leecher.expect("{\"event\":\"finalized\"", timeout: 30)
        }
        let target: ChildProcess? = switch cell.role {
        case .seeder: seeder
        case .leecher: leecher
        case .hub: hub
        case .link: nil
        }
        switch cell.fault {
        case .kill:
            target?.stop()
        case .stop:
            // A stopped leecher reads nothing: what the seeder holds for it meanwhile is bounded.
            let before = residentBytes(seeder.pid)
            kill(target!.pid, SIGSTOP)
            sleep(UInt32(Self.grace + 1))
            let held = residentBytes(seeder.pid) - before
            kill(target!.pid, SIGCONT)
            if cell.role == .leecher {
                #expect(held <= Self.heldLimit, "the seeder grew by \(held >> 20) MiB while the leecher read nothing")
                print("fault-matrix: \(cell.testDescription): the seeder grew by \(max(0, held) >> 20) MiB while the leecher was stopped")
            }
        case .cut:
            relay.drop()
        }

        switch cell.expected {
        case .completes:
            _ = try leecher.expect("{\"event\":\"complete\"", timeout: 90)
            #expect(leecher.waitForExit() == 0)
            let report = try ImageVerifier.compare(directory: out, pid: child.pid)
            #expect(report.matches, "\(report)")
        case .failsSourceRunsOn:
            if cell.role == .leecher || cell.role == .hub {
                // The seeder waits out the grace period, then lets go (thaws a frozen source).
                let error = try seeder.expect("{\"event\":\"error\"", timeout: Double(Self.grace + 10))
                #expect(error.contains("grace period"), "\(error)")
                #expect(seeder.waitForExit() == 1)
            }
            if cell.role != .leecher {
                let error = try leecher.expect("{\"event\":\"error\"", timeout: 60)
                #expect(error.contains(cell.role == .hub ? "lost the connection" : "seeder"), "\(error)")
                #expect(leecher.waitForExit() == 1)
            }
            #expect(try harness.isRunning(child), "the source must run on")
            #expect(!FileManager.default.fileExists(atPath: out + "/manifest.json"), "an image was left behind")
        case .nextLeecherCompletes:
            #expect(try harness.isRunning(child), "the source must run on")
            let next = try harness.startLeecher(seederAddress, out: out + "-next", ["--finalize-at", "95%"])
            defer { next.stop(); try? FileManager.default.removeItem(atPath: out + "-next") }
            _ = try next.expect("{\"event\":\"complete\"", timeout: 90)
            #expect(next.waitForExit() == 0)
            #expect(try ImageVerifier.compare(directory: out + "-next", pid: child.pid).matches)
        }
        print("fault-matrix: \(cell.testDescription): checked")
    }
}
