// The whole process moves (issue 13): memory by Ferry, everything else by
// CRIU, between two network namespaces, with real CRIU and real programs.
import Foundation
import Testing
import FerryTestSupport
@testable import FerryMigration

@Suite(.serialized, .enabled(if: CriuSupport.available, Comment(rawValue: CriuSupport.reason)))
struct CriuMigrationTests {
    /// 256 MiB under random writes, four writer threads, an open file and a
    /// listening socket: after the migration it runs on the destination, its
    /// ledger check proves no byte was lost, and the source is gone.
    @Test func multiThreadedProgramMovesAndKeepsRunning() throws {
        let hosts = try CriuHosts()
        let (parent, source, log) = try hosts.startWorkload(mib: 256, rate: 100_000)
        defer { parent.stop() }
        let seeder = try hosts.seeder(pid: source)
        defer { seeder.stop() }
        let leecher = try hosts.leecher()
        defer { leecher.stop() }
        _ = try leecher.expect("{\"event\":\"dumped\"", timeout: 120)
        let restoredLine = try leecher.expect("{\"event\":\"restored\"", timeout: 60)
        guard let restored = CriuHosts.field("pid", in: restoredLine).map({ Int32($0) }) else {
            throw TestFailure("no pid in \(restoredLine)")
        }
        defer { kill(restored, SIGKILL) }
        _ = try leecher.expect("{\"event\":\"complete\"", timeout: 120)
        let last = try leecher.expect("{\"event\":\"last_page\"", timeout: 120)
        #expect(leecher.waitForExit() == 0)
        #expect(seeder.waitForExit() == 0)
        // The source is gone: CRIU killed it once the destination held every page.
        #expect(parent.waitForExit(timeout: 10) != nil)
        #expect(kill(source, 0) != 0 || procState("/proc/\(source)/stat") == "Z")
        // The destination runs it, with every byte.
        #expect(CriuHosts.isRunning(restored))
        let check = try CriuHosts.check(pid: restored, log: log)
        print("criu test: \(check); \(last)")
        #expect(check.hasPrefix("check ok"), "\(check)")
        // And it keeps running: its writers and its clock tick on.
        usleep(1_200_000)
        let again = try CriuHosts.check(pid: restored, log: log)
        #expect(again.hasPrefix("check ok"), "\(again)")
        #expect((CriuHosts.value("writes", in: again) ?? 0) > (CriuHosts.value("writes", in: check) ?? 0))
    }

    /// A thread waiting with its stack pointer on a page boundary makes
    /// CRIU 4.2.1's lazy dump write every page into its images
    /// (CriuDump.leaveLazy): the seeder flags them lazy again, so the images
    /// stay small, and the process still arrives with every byte.
    @Test func pageAlignedStackPointerLeavesMemoryLazy() throws {
        let hosts = try CriuHosts()
        let (parent, source, log) = try hosts.startWorkload(mib: 128, rate: 10_000, environment: ["WORKLOAD_ALIGNED_SP=1"])
        defer { parent.stop() }
        let seeder = try hosts.seeder(pid: source)
        defer { seeder.stop() }
        let leecher = try hosts.leecher()
        defer { leecher.stop() }
        let dumped = try seeder.expect("{\"event\":\"dumped\"", timeout: 120)
        // Most of the 32768 pages were written by CRIU and are lazy again.
        let relazied = CriuHosts.field("relazied_pages", in: dumped) ?? 0
        #expect(relazied > 30_000, "\(dumped)")
        let restoredLine = try leecher.expect("{\"event\":\"restored\"", timeout: 60)
        guard let restored = CriuHosts.field("pid", in: restoredLine).map({ Int32($0) }) else {
            throw TestFailure("no pid in \(restoredLine)")
        }
        defer { kill(restored, SIGKILL) }
        _ = try leecher.expect("{\"event\":\"last_page\"", timeout: 120)
        #expect(leecher.waitForExit() == 0)
        #expect(seeder.waitForExit() == 0)
        let check = try CriuHosts.check(pid: restored, log: log)
        #expect(check.hasPrefix("check ok"), "\(check)")
    }
}
