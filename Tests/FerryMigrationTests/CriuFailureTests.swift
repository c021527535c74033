// Whole-process migration that fails (issue 13): whatever goes wrong before
// the destination holds every page, the source runs on with its memory
// intact, and the error says what went wrong.
import Foundation
import Testing
import FerryTestSupport
@testable import FerryMigration

@Suite(.serialized, .enabled(if: CriuSupport.available, Comment(rawValue: CriuSupport.reason)))
struct CriuFailureTests {
    /// The source, after a failed migration: running, not stopped, and whole.
    private func expectSourceRunsOn(_ pid: Int32, log: String) throws {
        let deadline = ChildProcess.now() + 15
        while ChildProcess.now() < deadline && !CriuHosts.isRunning(pid) { usleep(50_000) }
        #expect(CriuHosts.isRunning(pid), "pid \(pid) is \(procState("/proc/\(pid)/stat").map { String($0) } ?? "gone")")
        let check = try CriuHosts.check(pid: pid, log: log)
        #expect(check.hasPrefix("check ok"), "\(check)")
    }

    @Test func leecherKilledBeforeTheFreeze() throws {
        let hosts = try CriuHosts()
        let (parent, source, log) = try hosts.startWorkload(mib: 32, rate: 10_000)
        defer { parent.stop() }
        let seeder = try hosts.seeder(pid: source, ["--grace", "1"])
        defer { seeder.stop() }
        // Killed as soon as pre-copy begins.
        let leecher = try hosts.leecher()
        _ = try leecher.expect("{\"event\":\"connected\"", timeout: 30)
        leecher.stop()
        #expect(seeder.waitForExit(timeout: 30) == 1)
        try expectSourceRunsOn(source, log: log)
    }

    @Test func leecherKilledAfterTheDumpBeforeTheRestore() throws {
        let hosts = try CriuHosts()
        let (parent, source, log) = try hosts.startWorkload(mib: 32, rate: 10_000)
        defer { parent.stop() }
        let seeder = try hosts.seeder(pid: source, ["--grace", "1"])
        defer { seeder.stop() }
        let leecher = try hosts.leecher(["--criu", try hosts.failingCriu(at: "restore", sleeping: true)])
        _ = try leecher.expect("{\"event\":\"dumped\"", timeout: 60)
        // CRIU holds the source frozen now; the leecher dies before restoring it.
        #expect(!CriuHosts.isRunning(source))
        leecher.stop()
        #expect(seeder.waitForExit(timeout: 30) == 1)
        try expectSourceRunsOn(source, log: log)
    }

    @Test func criuFailingAtTheDump() throws {
        let hosts = try CriuHosts()
        let (parent, source, log) = try hosts.startWorkload(mib: 32, rate: 10_000)
        defer { parent.stop() }
        let seeder = try hosts.seeder(pid: source, ["--grace", "1", "--criu", try hosts.failingCriu(at: "dump")])
        defer { seeder.stop() }
        let leecher = try hosts.leecher()
        defer { leecher.stop() }
        let error = try leecher.expect("{\"event\":\"error\"", timeout: 60)
        #expect(error.contains("criu dump failed"), "\(error)")
        #expect(leecher.waitForExit() == 1)
        #expect(seeder.waitForExit(timeout: 30) == 1)
        try expectSourceRunsOn(source, log: log)
    }

    @Test func criuFailingAtTheRestore() throws {
        let hosts = try CriuHosts()
        let (parent, source, log) = try hosts.startWorkload(mib: 32, rate: 10_000)
        defer { parent.stop() }
        let seeder = try hosts.seeder(pid: source, ["--grace", "1"])
        defer { seeder.stop() }
        let leecher = try hosts.leecher(["--criu", try hosts.failingCriu(at: "restore")])
        defer { leecher.stop() }
        let error = try leecher.expect("{\"event\":\"error\"", timeout: 60)
        #expect(error.contains("criu restore failed"), "\(error)")
        #expect(error.contains("thawed") || error.contains("runs on"), "\(error)")
        #expect(leecher.waitForExit() == 1)
        #expect(seeder.waitForExit(timeout: 30) == 1)
        try expectSourceRunsOn(source, log: log)
    }

    @Test func missingCriuIsNamed() throws {
        let hosts = try CriuHosts()
        let seeder = try hosts.inNamespace(hosts.source, [builtExecutable("seeder"), "serve", "\(getpid())", "--with-criu",
                                                          "--criu", "/nonexistent/criu", "--json"])
        let error = try seeder.expect("{\"event\":\"error\"", timeout: 30)
        #expect(error.contains("criu not found"), "\(error)")
        #expect(seeder.waitForExit() == 1)
    }
}
