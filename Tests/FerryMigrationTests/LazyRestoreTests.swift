// Ferry as CRIU's lazy-pages daemon, without CRIU: a real process
// (Tools/criu-workload/handoff.c) hands its userfaultfd over the socket the
// way `criu restore --lazy-pages` does, then forks, remaps, unmaps and
// empties its memory while Ferry fills it. Every page must end as the
// source had it (or zero where the program emptied it), in the parent and
// in the forked child; pages that cannot arrive raise SIGBUS, never zeros.
import Testing
import Foundation
import Glibc
import FerryCRIU
import FerrySystem
import FerryTestSupport
@testable import FerryMigration

/// The source's bytes: what handoff.c's `word` computes for each 8 bytes.
private func word(_ address: UInt64) -> UInt64 {
    var x = address &* 0x9E37_79B9_7F4A_7C15
    x ^= x >> 29
    x &*= 0xBF58_476D_1CE4_E5B9
    return x ^ (x >> 32)
}

/// Pages as the source held them, for the handoff process's BASE..+PAGES.
private final class PatternSupply: LazyPageSupply, Sendable {
    static let base: UInt64 = 0x5a00_0000_0000
    static let pages = 1024
    private struct State {
        var frozen = false
        /// Pages held only once wanted (on their way in post-copy).
        var onTheirWay: Range<Int>
        var never: Set<Int>
        var wanted = 0
    }
    private let state: ConditionLock<State>
    private let address: UInt

    init(frozen: Bool = false, onTheirWay: Range<Int> = 0..<0, never: Set<Int> = []) {
        state = ConditionLock(State(frozen: frozen, onTheirWay: onTheirWay, never: never))
        let bytes = UnsafeMutableRawPointer.allocate(byteCount: Self.pages * Int(pageSize), alignment: Int(pageSize))
        for i in 0..<Self.pages * Int(pageSize) / 8 {
            bytes.storeBytes(of: word(Self.base + UInt64(i * 8)), toByteOffset: i * 8, as: UInt64.self)
        }
        address = UInt(bitPattern: bytes)
    }

    deinit { UnsafeMutableRawPointer(bitPattern: address)!.deallocate() }

    func freeze() { state.withLock { $0.frozen = true } }
    var wanted: Int { state.withLock { $0.wanted } }

    func withHeldPages<T>(from image: UInt64, upTo pages: Int, _ body: (UnsafeRawPointer, Int) throws -> T) rethrows -> T? {
        try state.withLock { s -> T? in
            guard s.frozen, image >= Self.base else { return nil }
            let first = Int((image - Self.base) / pageSize)
            func held(_ page: Int) -> Bool { page < Self.pages && !s.onTheirWay.contains(page) && !s.never.contains(page) }
            var count = 0
            while count < pages, held(first + count) { count += 1 }
            guard count > 0 else { return nil }
            return try body(UnsafeRawPointer(bitPattern: address)! + first * Int(pageSize), count)
        }
    }

    func pagesNotHeld(from image: UInt64, upTo pages: Int) -> Int {
        state.withLock { s in
            guard s.frozen, image >= Self.base else { return pages }
            let first = Int((image - Self.base) / pageSize)
            var count = 0
            while count < pages, first + count < Self.pages,
                  s.onTheirWay.contains(first + count) || s.never.contains(first + count) { count += 1 }
            return count
        }
    }

    func want(_ image: UInt64) {
        // It "arrives" at once: the next look installs it.
        state.withLock { s in
            s.wanted += 1
            let page = Int((image - Self.base) / pageSize)
            if s.onTheirWay.contains(page) { s.onTheirWay = s.onTheirWay.lowerBound..<s.onTheirWay.lowerBound }
        }
    }
}

@Suite(.serialized)
struct LazyRestoreTests {
    static let available = getuid() == 0 && FileManager.default.isExecutableFile(atPath: "/usr/bin/gcc")

    /// handoff.c, built once per run.
    static let handoff: String = {
        let out = "/tmp/ferry-handoff-\(getpid())"
        let gcc = Process()
        gcc.executableURL = URL(fileURLWithPath: "/usr/bin/gcc")
        gcc.arguments = ["-O1", "-o", out, CriuSupport.root + "/Tools/criu-workload/handoff.c"]
        try? gcc.run()
        gcc.waitUntilExit()
        return out
    }()

    /// The lazy pages handoff.c's memory has: 64..899.
    static let lazy = [(start: PatternSupply.base + 64 * pageSize, pages: UInt64(836))]

    /// A handoff process in `mode`, and what it handed over.
    private func handOver(_ mode: String, directory: String) throws -> (ChildProcess, LazyPagesSocket, Int32) {
        let socket = try LazyPagesSocket(directory: directory)
        let child = try ChildProcess(Self.handoff, [socket.path, mode])
        let connection = try socket.accept(timeout: .seconds(10)) { false }
        if mode == "touch" { #expect(try connection.next() == .zombie(pid: 4242)) }
        guard case .memory(let pid, let uffd) = try connection.next() else { throw TestFailure("no memory handed over") }
        #expect(pid == child.pid)
        #expect(try connection.next() == .restoreFinished)
        #expect(try connection.next() == .closed)
        _ = try child.expect("handed")
        return (child, socket, uffd)
    }

    private func scratch() -> String {
        let directory = "/tmp/ferry-lazy-\(getpid())-\(Int.random(in: 0..<1_000_000))"
        try? FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        return directory
    }

    @Test(.enabled(if: available, "needs root and gcc"))
    func followsForkRemapRemoveAndUnmapWhileFilling() throws {
        let directory = scratch()
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let (child, socket, uffd) = try handOver("churn", directory: directory)
        defer { child.stop(); _ = socket }
        // Nothing is held until the process has changed its memory: every
        // event meets pages still missing. 800..899 arrive only when touched.
        let supply = PatternSupply(onTheirWay: 800..<900)
        let memory = try LazyRestoredMemory(adopting: uffd, owner: "handoff pid \(child.pid)", lazy: Self.lazy,
                                            supply: supply, faultTimeout: .seconds(20))
        try memory.start()
        memory.restoreFinished()
        _ = try child.expect("churned")
        supply.freeze()
        child.send("go")
        var lines: [String] = []
        while lines.count < 2 { lines.append(try child.readLine()) }
        let parent = try #require(lines.first { $0.hasPrefix("parent ") })
        let forked = try #require(lines.first { $0.hasPrefix("child ") })
        // 1024 pages less 20 unmapped; the child checks 400..899.
        #expect(parent.hasPrefix("parent ok=1004 bad=0 "), "\(parent)")
        #expect(forked == "child ok=500 bad=0")
        let deadline = ContinuousClock.now + .seconds(10)
        while !memory.isComplete && ContinuousClock.now < deadline { usleep(5_000) }
        #expect(memory.isComplete)
        #expect(memory.failure == nil)
        let stats = memory.statistics
        #expect(stats.forks == 1)
        // 50 emptied and 20 unmapped before anything was held; 40 moved, not dropped.
        #expect(stats.pagesDropped >= 70)
        #expect(stats.faultsWaited >= 1)
        #expect(supply.wanted >= 1)
        #expect(stats.pagesPoisoned == 0)
    }

    @Test(.enabled(if: available, "needs root and gcc"))
    func aFailedRestorePoisonsRatherThanZeroes() throws {
        let directory = scratch()
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let (child, socket, uffd) = try handOver("touch", directory: directory)
        defer { child.stop(); _ = socket }
        let memory = try LazyRestoredMemory(adopting: uffd, owner: "handoff pid \(child.pid)", lazy: Self.lazy,
                                            supply: PatternSupply(), faultTimeout: .seconds(20))
        try memory.start()
        memory.restoreFinished()
        memory.fail("the migration failed")
        child.send("go")
        #expect(try child.readLine() == "sigbus")
        #expect(memory.statistics.pagesPoisoned == 836)
        #expect(memory.failure == "the migration failed")
    }

    @Test(.enabled(if: available, "needs root and gcc"))
    func aTouchedPageThatNeverArrivesRaisesSIGBUS() throws {
        let directory = scratch()
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let (child, socket, uffd) = try handOver("touch", directory: directory)
        defer { child.stop(); _ = socket }
        let memory = try LazyRestoredMemory(adopting: uffd, owner: "handoff pid \(child.pid)", lazy: Self.lazy,
                                            supply: PatternSupply(frozen: true, never: [64]), faultTimeout: .milliseconds(300))
        try memory.start()
        memory.restoreFinished()
        defer { memory.fail("test over") }
        child.send("go")
        #expect(try child.readLine(timeout: 10) == "sigbus")
        #expect(memory.failure?.contains("did not arrive within 0.3 s") == true, "\(memory.failure ?? "no failure")")
        #expect(!memory.isComplete)
    }

    @Test(.enabled(if: available, "needs root and gcc"))
    func theSocketRefusesAPathTooLongForCRIU() throws {
        let long = "/tmp/" + String(repeating: "d", count: 120)
        #expect(throws: CriuError.self) { try LazyPagesSocket(directory: long) }
    }

    /// What restore says on the socket, cut short or missing its descriptor,
    /// or a restore that never connects: each a clear error, not a hang.
    @Test func aHandoffCutShortOrNeverMadeIsNamed() throws {
        let directory = scratch()
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let socket = try LazyPagesSocket(directory: directory)

        /// Connects as restore would, writes `bytes`, and closes.
        func restoreSays(_ bytes: [UInt8]) throws {
            let fd = Glibc.socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
            defer { close(fd) }
            var address = sockaddr_un()
            address.sun_family = sa_family_t(AF_UNIX)
            withUnsafeMutableBytes(of: &address.sun_path) { $0.copyBytes(from: Array(socket.path.utf8)) }
            let connected = withUnsafePointer(to: &address) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
            }
            guard connected == 0 else { throw TestFailure("connect: \(errno)") }
            #expect(bytes.withUnsafeBytes { send(fd, $0.baseAddress, $0.count, 0) } == bytes.count)
        }

        try restoreSays([1, 2])
        let short = try socket.accept(timeout: .seconds(5)) { false }
        do {
            _ = try short.next()
            Issue.record("two bytes were taken for a pid")
        } catch {
            #expect("\(error)".contains("restore sent 2 bytes where a pid belongs"), "\(error)")
        }
        #expect(try short.next() == .closed)

        try restoreSays(withUnsafeBytes(of: Int32(77)) { Array($0) })
        let noDescriptor = try socket.accept(timeout: .seconds(5)) { false }
        do {
            _ = try noDescriptor.next()
            Issue.record("a pid without its descriptor was accepted")
        } catch {
            #expect("\(error)".contains("receiving the userfaultfd of pid 77"), "\(error)")
        }

        do {
            _ = try socket.accept(timeout: .milliseconds(200)) { false }
            Issue.record("accept returned without restore connecting")
        } catch {
            #expect("\(error)".contains("never connected") && "\(error)".contains(directory + "/restore.log"), "\(error)")
        }
    }
}
