// A leecher that dies during `--into` post-copy, however it dies, leaves the
// target's missing pages raising SIGBUS, never reading zeros (issue 11,
// finding 1): real seeder, leecher and target processes; the seeder is
// stopped right after the freeze so pages stay missing, then the leecher is
// killed (SIGKILL: the guardian poisons) or hung up (SIGHUP: it poisons in
// order). After a normal end no guardian, and no registration, remains.
import Foundation
import Testing
import FerryTestSupport
@testable import FerryMigration

@Suite(.serialized) final class GuardianTests {
    let secretPath = "/tmp/ferry-guardian-secret-\(getpid())-\(UInt64.random(in: 0...UInt64.max))"

    init() throws {
        let secret = try PreSharedSecret.generate()
        FileManager.default.createFile(atPath: secretPath, contents: Data((secret.text + "\n").utf8),
                                       attributes: [.posixPermissions: 0o600])
    }

    deinit { try? FileManager.default.removeItem(atPath: secretPath) }

    func startSeeder(pid: Int32) throws -> (ChildProcess, String) {
        let seeder = try ChildProcess(builtExecutable("seeder"),
                                      ["serve", "\(pid)", "--listen", "127.0.0.1:0", "--secret-file", secretPath,
                                       "--json", "--grace", "30"])
        let line = try seeder.expect("{\"event\":\"listening\"")
        guard let range = line.range(of: #"127\.0\.0\.1:\d+"#, options: .regularExpression) else {
            throw TestFailure("no address in \(line)")
        }
        return (seeder, String(line[range]))
    }

    /// Pulls a 64 MiB patterned source into a target by pure post-copy, stops
    /// the seeder right after the freeze, ends the leecher with `signal`, and
    /// has the target load a page that never arrived. Returns what the target
    /// said (nil: it said nothing) and how it ended.
    /// With `touchFirst` the target touches the page before the leecher goes
    /// (and blocks, the seeder being stopped).
    func loseTheLeecher(with signal: Int32, touchFirst: Bool = false) throws
        -> (answer: String?, targetExit: Int32?, leecherExit: Int32?, guardian: Int32?) {
        let source = try Memwriter(["--mib", "64", "--threads", "1", "--rate", "1000", "--pattern"])
        defer { source.stop() }
        let target = try Memwriter(["--mib", "1", "--no-write"])
        defer { target.stop() }
        let (seeder, address) = try startSeeder(pid: source.pid)
        defer {
            kill(seeder.pid, SIGCONT)
            seeder.stop()
        }
        let main = try #require(source.regions["main"])
        let leecher = try ChildProcess(builtExecutable("leecher"),
                                       ["pull", address, "--secret-file", secretPath, "--into", "\(target.pid)",
                                        "--finalize-at", "0%", "--json"])
        defer { leecher.stop() }
        _ = try leecher.expect("{\"event\":\"finalized\"", timeout: 60)
        kill(seeder.pid, SIGSTOP)
        // The region registered in the target: the hand-over is done.
        let whole = try #require(try ProcessMaps.read(pid: source.pid).first { $0.range.contains(main.start) }?.range)
        var placed: Int64? = nil
        let deadline = ChildProcess.now() + 10
        while placed == nil && ChildProcess.now() < deadline {
            placed = placement(of: main, whole: whole, in: target.pid, registered: true)
            if placed == nil { usleep(10_000) }
        }
        let registered = smaps(target.pid).filter { $0.flags.contains("um") }.map { "\($0.range) \($0.range.length)" }
        let diagnosis = "main \(main) in \(whole); registered \(registered)"
        let delta = try #require(placed, "the migrated region never appeared registered in the target: \(diagnosis)")
        let region = AddressRange(start: UInt64(bitPattern: Int64(bitPattern: main.start) + delta),
                                  end: UInt64(bitPattern: Int64(bitPattern: main.end) + delta))
        let guardian = children(of: leecher.pid, named: "ferry-guardian").first
        // A page that has not arrived (the fill runs from the start), whose source bytes are not zeros.
        var page: UInt64? = nil
        var candidate = region.end - 4096
        while candidate >= region.start && page == nil {
            if isPresent(target.pid, candidate) == false,
               let expected = bytes(source.pid, at: main.start + (candidate - region.start), length: 4096),
               expected.contains(where: { $0 != 0 }) {
                page = candidate
            }
            candidate -= 4096 * 97
        }
        let missing = try #require(page, "every page arrived before the seeder was stopped")
        let peek = "peek 0x" + String(missing, radix: 16)
        if touchFirst {
            target.send(peek)
            #expect((try? target.expect("peek", timeout: 0.3)) == nil, "the touch waits for its page")
        }
        let leecherExit: Int32?
        if signal == SIGKILL {
            leecher.stop()
            leecherExit = nil
        } else {
            kill(leecher.pid, signal)
            leecherExit = leecher.waitForExit(timeout: 30)
        }
        if !touchFirst { target.send(peek) }
        let answer = try? target.expect("peek", timeout: 10)
        let targetExit = answer == nil ? target.child.waitForExit(timeout: 10) : nil
        return (answer, targetExit, leecherExit, guardian)
    }

    @Test func aKilledLeecherLeavesMissingPagesRaisingSIGBUSNotZeros() throws {
        let outcome = try loseTheLeecher(with: SIGKILL)
        #expect(outcome.answer == nil, "the target read a page that never arrived: \(outcome.answer ?? "")")
        #expect(outcome.targetExit == 128 + SIGBUS, "the target's load of a missing page must raise SIGBUS")
        let guardian = try #require(outcome.guardian, "no guardian process beside the leecher")
        #expect(exits(guardian, within: 10), "the guardian exits once it has poisoned what was missing")
    }

    @Test func aTouchWaitingWhenTheLeecherIsKilledGetsSIGBUSNotZeros() throws {
        let outcome = try loseTheLeecher(with: SIGKILL, touchFirst: true)
        #expect(outcome.answer == nil, "the blocked toucher was woken onto zeros: \(outcome.answer ?? "")")
        #expect(outcome.targetExit == 128 + SIGBUS, "the blocked toucher must be woken into SIGBUS")
    }

    @Test func aHungUpLeecherFailsInOrderAndPoisons() throws {
        let outcome = try loseTheLeecher(with: SIGHUP)
        #expect(outcome.leecherExit == 1, "SIGHUP ends the leecher in order, as SIGTERM does")
        #expect(outcome.answer == nil, "the target read a page that never arrived: \(outcome.answer ?? "")")
        #expect(outcome.targetExit == 128 + SIGBUS, "the target's load of a missing page must raise SIGBUS")
        if let guardian = outcome.guardian { #expect(exits(guardian, within: 10)) }
    }

    @Test func afterACompleteMigrationNoGuardianAndNoRegistrationRemain() throws {
        let source = try Memwriter(["--mib", "16", "--threads", "1", "--rate", "1000", "--pattern"])
        defer { source.stop() }
        let target = try Memwriter(["--mib", "1", "--no-write"])
        defer { target.stop() }
        let (seeder, address) = try startSeeder(pid: source.pid)
        defer { seeder.stop() }
        let main = try #require(source.regions["main"])
        let leecher = try ChildProcess(builtExecutable("leecher"),
                                       ["pull", address, "--secret-file", secretPath, "--into", "\(target.pid)",
                                        "--finalize-at", "0%", "--json"])
        defer { leecher.stop() }
        _ = try leecher.expect("{\"event\":\"finalized\"", timeout: 60)
        var guardian: Int32? = nil
        let deadline = ChildProcess.now() + 10
        while guardian == nil && leecher.isAlive && ChildProcess.now() < deadline {
            guardian = children(of: leecher.pid, named: "ferry-guardian").first
            if guardian == nil { usleep(2_000) }
        }
        _ = try leecher.expect("{\"event\":\"placed\"", timeout: 60)
        #expect(leecher.waitForExit() == 0)
        if let guardian { #expect(exits(guardian, within: 1), "the leecher dismissed and reaped its guardian") }
        #expect(smaps(target.pid).allSatisfy { !$0.flags.contains("um") }, "no range of the target stays registered")
        // The migrated bytes are the target's now: a page loads, with the source's bytes.
        let whole = try #require(try ProcessMaps.read(pid: source.pid).first { $0.range.contains(main.start) }?.range)
        let delta = try #require(placement(of: main, whole: whole, in: target.pid, registered: false))
        target.send("peek 0x" + String(UInt64(bitPattern: Int64(bitPattern: main.end - 4096) + delta), radix: 16))
        #expect(try target.expect("peek").split(separator: " ").last != "0")
    }
}

/// Hugetlb memory (issue 15, class 2): the guardian poisons in whole huge
/// pages, the only unit the kernel takes there, so a huge page that never
/// arrived raises SIGBUS in the target anywhere in it.
extension GuardianTests {
    @Test func aKilledLeecherLeavesMissingHugePagesRaisingSIGBUSNotZeros() throws {
        let hugePage: UInt64 = 2 << 20
        // 8 huge pages for the source, 8 for the target, and room for reads of untouched pages.
        let pool = HugePagePool(pages: 24)
        defer { pool.restore() }
        if let reason = pool.unavailable {
            print("skipped: \(reason)")
            return
        }
        let source = try Hugemem(["--private", "8", "--pause-us", "1000"])
        defer { source.stop() }
        try #require(source.refused == nil, "\(source.refused ?? "")")
        let main = try #require(source.regions["private"])
        let target = try Memwriter(["--mib", "1", "--no-write"])
        defer { target.stop() }
        let (seeder, address) = try startSeeder(pid: source.pid)
        defer {
            kill(seeder.pid, SIGCONT)
            seeder.stop()
        }
        let leecher = try ChildProcess(builtExecutable("leecher"),
                                       ["pull", address, "--secret-file", secretPath, "--into", "\(target.pid)",
                                        "--finalize-at", "0%", "--json"])
        defer { leecher.stop() }
        _ = try leecher.expect("{\"event\":\"finalized\"", timeout: 60)
        kill(seeder.pid, SIGSTOP)
        var placed: Int64? = nil
        let deadline = ChildProcess.now() + 10
        while placed == nil && ChildProcess.now() < deadline {
            placed = placement(of: main, whole: main, in: target.pid, registered: true)
            if placed == nil { usleep(10_000) }
        }
        let delta = try #require(placed, "the hugetlb region never appeared registered in the target")
        let local = AddressRange(start: UInt64(bitPattern: Int64(bitPattern: main.start) + delta),
                                 end: UInt64(bitPattern: Int64(bitPattern: main.end) + delta))
        #expect(kernelPageKiB(pid: target.pid, start: local.start) == 2048, "the target's region is not in 2 MiB pages")
        let guardian = children(of: leecher.pid, named: "ferry-guardian").first
        // A huge page that has not arrived (the fill runs from the start): the last one still missing.
        var missing: UInt64? = nil
        var candidate = local.end - hugePage
        while candidate >= local.start && missing == nil {
            if isPresent(target.pid, candidate) == false { missing = candidate }
            candidate -= hugePage
        }
        let huge = try #require(missing, "every huge page arrived before the seeder was stopped")
        leecher.stop()
        // A load in the middle of it, not at its start: the whole huge page was poisoned.
        target.send("peek 0x" + String(huge + 300 * 4096 + 8, radix: 16))
        let answer = try? target.expect("peek", timeout: 10)
        #expect(answer == nil, "the target read a huge page that never arrived: \(answer ?? "")")
        #expect((answer == nil ? target.child.waitForExit(timeout: 10) : nil) == 128 + SIGBUS,
                "the target's load of a missing huge page must raise SIGBUS")
        let guardianPid = try #require(guardian, "no guardian process beside the leecher")
        #expect(exits(guardianPid, within: 10), "the guardian exits once it has poisoned what was missing")
    }
}
