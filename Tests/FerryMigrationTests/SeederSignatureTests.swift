// Pinning the seeder's key through hubs: the seeder signs its checksums, hubs
// relay them untouched, and a pinned leecher refuses anything else. A hub
// that alters a page is caught by every verifying leecher; one that also
// forges the checksums is caught only by a pinned one.
import Foundation
import Testing
import FerryTestSupport
@testable import FerryMigration

@Suite(.serialized) struct SeederSignatureTests {
    static let layout = [Region(range: AddressRange(start: 0x10000, end: 0x20000), permissions: "rw-p", offset: 0,
                                device: "00:00", inode: 0, name: "main", kind: .migrate)]
    static let ranges = [AddressRange(start: 0x10000, end: 0x20000)]

    func signed(_ key: KeyPair, digests: [[UInt8]] = [[UInt8](repeating: 7, count: 32)]) throws -> ChecksumReply {
        var reply = ChecksumReply(digests: digests)
        try reply.sign(with: key, pid: 42, host: "source", session: [UInt8](repeating: 1, count: 16),
                       frozenAtMilliseconds: 1_700_000_000_000, layout: Self.layout, ranges: Self.ranges)
        return ChecksumReply(digests: reply.digests, signature: try ChecksumReply.decode(reply.encode()).signature)
    }

    @Test func aSignedChecksumVerifiesAndAnyChangeBreaksIt() throws {
        let key = try KeyPair.generate()
        let reply = try signed(key)
        try reply.verifySigned(by: key.publicKey, pid: 42, host: "source", layout: Self.layout, ranges: Self.ranges)

        var digest = reply
        digest.digests[0][0] ^= 1
        #expect(throws: SeederSignatureError.self) {
            try digest.verifySigned(by: key.publicKey, pid: 42, host: "source", layout: Self.layout, ranges: Self.ranges)
        }
        #expect(throws: SeederSignatureError.self) {
            try reply.verifySigned(by: key.publicKey, pid: 43, host: "source", layout: Self.layout, ranges: Self.ranges)
        }
        var grown = Self.layout
        grown[0].range.end += pageSize
        #expect(throws: SeederSignatureError.self) {
            try reply.verifySigned(by: key.publicKey, pid: 42, host: "source", layout: grown, ranges: Self.ranges)
        }
        let other = try KeyPair.generate()
        #expect {
            try reply.verifySigned(by: other.publicKey, pid: 42, host: "source", layout: Self.layout, ranges: Self.ranges)
        } throws: { "\($0)".contains("not by the pinned seeder key") }
        // A freeze older than the leecher accepts: a replay of an earlier migration.
        try reply.verifySigned(by: key.publicKey, pid: 42, host: "source", layout: Self.layout, ranges: Self.ranges,
                               notFrozenBefore: 1_700_000_000_000)
        #expect {
            try reply.verifySigned(by: key.publicKey, pid: 42, host: "source", layout: Self.layout, ranges: Self.ranges,
                                   notFrozenBefore: 1_700_000_600_001)
        } throws: { "\($0)".contains("2023-11-14 22:13:20 UTC, 600 s before the oldest") && "\($0)".contains("--max-freeze-age") }
        let unsigned = ChecksumReply(digests: reply.digests)
        #expect(try ChecksumReply.decode(unsigned.encode()) == unsigned)
        #expect {
            try unsigned.verifySigned(by: key.publicKey, pid: 42, host: "source", layout: Self.layout, ranges: Self.ranges)
        } throws: { "\($0)".contains("not signed") }
    }

    /// Runs one leecher per pinned key (nil: unpinned) through `hub`, all at once.
    func pull(through hub: LoopbackHub, name: String, pins: [PublicKey?],
              maxFreezeAge: Duration = LeecherOptions().maxFreezeAge) async -> [(String, Result<LeecherSummary, any Error>)] {
        await withTaskGroup(of: (Int, String, Result<LeecherSummary, any Error>).self) { group in
            for (index, pin) in pins.enumerated() {
                group.addTask {
                    let out = scratchDirectory("\(name)-\(index)")
                    var options = LeecherOptions()
                    options.policy = FinalizePolicy(cleanShare: 0.95, maxWaitSeconds: 10)
                    options.seederKey = pin
                    options.maxFreezeAge = maxFreezeAge
                    do {
                        let leecher = Leecher(connect: hub.connector(), sink: try ImageWriter(directory: out), options: options)
                        return (index, out, .success(try await leecher.run()))
                    } catch {
                        return (index, out, .failure(error))
                    }
                }
            }
            var results: [(Int, String, Result<LeecherSummary, any Error>)] = []
            for await result in group { results.append(result) }
            return results.sorted { $0.0 < $1.0 }.map { ($0.1, $0.2) }
        }
    }

    /// A hub serves late leechers from a freeze made before they came. A
    /// pinned leecher accepts that up to its --max-freeze-age, and refuses a
    /// freeze older than that, as it would an earlier migration replayed.
    @Test func aLateLeecherAcceptsAFreezeWithinItsMaxAgeOnly() async throws {
        let child = try Memwriter(["--mib", "8", "--threads", "1", "--rate", "2000", "--pattern"])
        defer { child.stop() }
        let key = try KeyPair.generate()
        let seeder = try await LoopbackSeeder(process: try TrackedProcess.attach(pid: child.pid), signingKey: key)
        defer { seeder.close() }
        var options = HubOptions()
        options.finalize = .first
        let hub = try await LoopbackHub(options: options, secret: seeder.secret)
        defer { hub.close() }
        let name = try await hub.hub.addUpstream(connect: seeder.connector())
        let first = await pull(through: hub, name: "age-first", pins: [key.publicKey])
        defer { for (out, _) in first { try? FileManager.default.removeItem(atPath: out) } }
        _ = try first[0].1.get()
        #expect(await hub.hub.waitUntilFilled(name))
        try await Task.sleep(for: .milliseconds(50)) // the late leechers start after the freeze
        let late = await pull(through: hub, name: "age-late", pins: [key.publicKey])
        let strict = await pull(through: hub, name: "age-strict", pins: [key.publicKey], maxFreezeAge: .zero)
        defer { for (out, _) in late + strict { try? FileManager.default.removeItem(atPath: out) } }
        _ = try late[0].1.get()
        #expect(try ImageVerifier.compare(directory: late[0].0, pid: child.pid).matches)
        #expect(throws: (any Error).self) { try strict[0].1.get() }
        if case .failure(let error) = strict[0].1 {
            #expect("\(error)".contains("replaying an earlier migration"), "\(error)")
        }
        #expect(!FileManager.default.fileExists(atPath: strict[0].0), "a refused image is not left behind")
    }

    @Test func aPinnedLeecherCompletesThroughTwoHonestHubsAndRefusesAnotherKey() async throws {
        let child = try Memwriter(["--mib", "8", "--threads", "1", "--rate", "2000", "--pattern"])
        defer { child.stop() }
        let key = try KeyPair.generate()
        let seeder = try await LoopbackSeeder(process: try TrackedProcess.attach(pid: child.pid), signingKey: key)
        defer { seeder.close() }
        let near = try await LoopbackHub(options: HubOptions(), secret: seeder.secret)
        defer { near.close() }
        try await near.hub.addUpstream(connect: seeder.connector())
        let far = try await LoopbackHub(options: HubOptions(), secret: seeder.secret)
        defer { far.close() }
        try await far.hub.addUpstream(connect: near.connector())
        let results = await pull(through: far, name: "pin-honest", pins: [key.publicKey, try KeyPair.generate().publicKey])
        defer { for (out, _) in results { try? FileManager.default.removeItem(atPath: out) } }
        let (out, pinned) = results[0]
        _ = try pinned.get()
        #expect(try ImageVerifier.compare(directory: out, pid: child.pid).matches)
        #expect(throws: (any Error).self) { try results[1].1.get() }
        if case .failure(let error) = results[1].1 {
            #expect("\(error)".contains("not by the pinned seeder key"), "\(error)")
        }
        #expect(!FileManager.default.fileExists(atPath: results[1].0))
    }

    @Test func aHubThatAltersAPageFailsEveryVerifyingLeecher() async throws {
        let child = try Memwriter(["--mib", "8", "--pattern", "--no-write"])
        defer { child.stop() }
        let key = try KeyPair.generate()
        let seeder = try await LoopbackSeeder(process: try TrackedProcess.attach(pid: child.pid), signingKey: key)
        defer { seeder.close() }
        let tamper = HubTamper(alterPage: try #require(child.regions["main"]).start + 5 * pageSize)
        let hub = try await LoopbackHub(options: HubOptions(), tamper: tamper, secret: seeder.secret)
        defer { hub.close() }
        try await hub.hub.addUpstream(connect: seeder.connector())
        let results = await pull(through: hub, name: "pin-altered", pins: [key.publicKey, nil])
        for (out, result) in results {
            guard case .failure(let error) = result else {
                Issue.record("a leecher accepted the altered page")
                continue
            }
            #expect("\(error)".contains("does not match the frozen source"), "\(error)")
            #expect(!FileManager.default.fileExists(atPath: out))
        }
    }

    @Test func aHubThatForgesTheChecksumsFoolsOnlyUnpinnedLeechers() async throws {
        let child = try Memwriter(["--mib", "8", "--pattern", "--no-write"])
        defer { child.stop() }
        let key = try KeyPair.generate()
        let seeder = try await LoopbackSeeder(process: try TrackedProcess.attach(pid: child.pid), signingKey: key)
        defer { seeder.close() }
        let altered = try #require(child.regions["main"]).start + 5 * pageSize
        let tamper = HubTamper(alterPage: altered, forgeChecksums: true)
        let hub = try await LoopbackHub(options: HubOptions(), tamper: tamper, secret: seeder.secret)
        defer { hub.close() }
        try await hub.hub.addUpstream(connect: seeder.connector())
        let results = await pull(through: hub, name: "pin-forged", pins: [key.publicKey, nil])
        defer { for (out, _) in results { try? FileManager.default.removeItem(atPath: out) } }
        if case .failure(let error) = results[0].1 {
            #expect("\(error)".contains("not signed"), "\(error)")
        } else {
            Issue.record("the pinned leecher accepted forged checksums")
        }
        // What checksums alone cannot catch: the unpinned leecher took the lie.
        _ = try results[1].1.get()
        let report = try ImageVerifier.compare(directory: results[1].0, pid: child.pid)
        #expect(report.problems.count == 1 && report.problems[0].contains(String(altered, radix: 16)), "\(report)")
    }
}
