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
    enum Role: String, Sendable { case seeder, leecher, link }
    enum Fault: String, Sendable {
        /// SIGKILL.
        case kill
        /// SIGSTOP for longer than the seeder's grace period, then SIGCONT.
        case stop
        /// Every connection through the relay cut at once.
        case cut
    }
    enum Phase: String, Sendable { case precopy = "pre-copy", postcopy = "post-copy" }
    enum Outcome: String, Sendable {
        /// The migration completes; the image equals the source, left stopped.
        case completes
        /// The migration fails with a clear error; the source runs on; no image.
        case failsSourceRunsOn = "fails, source runs on"
    }

    let role: Role
    let fault: Fault
    let phase: Phase
    let expected: Outcome

    var testDescription: String { "\(role.rawValue) \(fault.rawValue) in \(phase.rawValue) → \(expected.rawValue)" }

    static let all: [FaultCell] = [Phase.precopy, .postcopy].flatMap { phase in [
        FaultCell(role: .leecher, fault: .kill, phase: phase, expected: .failsSourceRunsOn),
        FaultCell(role: .leecher, fault: .stop, phase: phase, expected: .completes),
        FaultCell(role: .seeder, fault: .kill, phase: phase, expected: .failsSourceRunsOn),
        FaultCell(role: .seeder, fault: .stop, phase: phase, expected: .completes),
        FaultCell(role: .link, fault: .cut, phase: phase, expected: .completes),
    ] }
}

@Suite(.serialized) struct FaultMatrixTests {
    /// The seeder's grace period; a stopped process stays stopped longer.
    static let grace = 2

    @Test(arguments: FaultCell.all)
    func cell(_ cell: FaultCell) throws {
        let harness = try CLIHarness()
        // Pre-copy: writers keep pre-copy going (a 100 % share is never
        // reached, so it ends by the policy's other rules after some rounds).
        // Post-copy: everything moves after the freeze (0 %).
        let workload = cell.phase == .precopy
            ? ["--mib", "128", "--threads", "2", "--rate", "5000", "--pattern"]
            : ["--mib", "256", "--threads", "2", "--rate", "5000", "--pattern"]
        let child = try Memwriter(workload)
        defer { child.stop() }
        let (seeder, address) = try harness.startSeeder(pid: child.pid, ["--grace", "\(Self.grace)"])
        defer { seeder.stop() }
        let relay = try Relay(to: address)
        defer { relay.stop() }
        let out = scratchDirectory("fault-\(cell.role)-\(cell.fault)-\(cell.phase)")
        defer { try? FileManager.default.removeItem(atPath: out) }
        let policy = cell.phase == .precopy ? ["--finalize-at", "100%", "--max-downtime", "0", "--max-wait", "60"]
                                            : ["--finalize-at", "0%"]
        let leecher = try harness.startLeecher("127.0.0.1:\(relay.port)", out: out, policy)
        defer { leecher.stop() }

        // Wait for the phase, then strike.
        if cell.phase == .precopy {
            _ = try leecher.expect("{\"event\":\"progress\"", timeout: 30)
        } else {
            _ = try leecher.expect("{\"event\":\"finalized\"", timeout: 30)
        }
        let target: ChildProcess? = cell.role == .seeder ? seeder : cell.role == .leecher ? leecher : nil
        switch cell.fault {
        case .kill:
            target?.stop()
        case .stop:
            kill(target!.pid, SIGSTOP)
            sleep(UInt32(Self.grace + 1))
            kill(target!.pid, SIGCONT)
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
            if cell.role == .leecher {
                // The seeder waits out the grace period, then lets go (thaws a frozen source).
                let error = try seeder.expect("{\"event\":\"error\"", timeout: Double(Self.grace + 10))
                #expect(error.contains("grace period"), "\(error)")
                #expect(seeder.waitForExit() == 1)
            } else {
                let error = try leecher.expect("{\"event\":\"error\"", timeout: 60)
                #expect(error.contains("seeder"), "\(error)")
                #expect(leecher.waitForExit() == 1)
            }
            #expect(try harness.isRunning(child), "the source must run on")
            #expect(!FileManager.default.fileExists(atPath: out + "/manifest.json"), "an image was left behind")
        }
        print("fault-matrix: \(cell.testDescription): checked")
    }
}
