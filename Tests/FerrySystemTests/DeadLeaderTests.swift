// A process whose main thread has exited while its other threads run on
// (issue 15, class 4): attach, freeze, remote system calls, maps and reads
// all go through a live thread of the group; the zombie leader is skipped.
import Testing
import FerryTestSupport
import Glibc
import Foundation
@testable import FerrySystem

@Suite(.serialized)
struct DeadLeaderTests {
    @Test func theWorkloadsLeaderIsAZombieWhileItsThreadsRun() throws {
        let child = try DeadLeader(mib: 1)
        defer { child.stop() }
        #expect(child.leaderState == "Z")
        #expect(child.liveThreads.count == 2)
        #expect(ThreadGroup.leaderHasExited(child.pid))
        #expect(ThreadGroup.liveThread(of: child.pid) == child.liveThreads.first)
        #expect(ThreadGroup.procDirectory(of: child.pid) == "/proc/\(child.pid)/task/\(child.liveThreads[0])")
    }

    @Test func mapsAndMemoryAreReadThroughALiveThread() throws {
        let child = try DeadLeader(mib: 1)
        defer { child.stop() }
        let maps = try ProcessMaps.read(pid: child.pid)
        for (name, range) in child.regions {
            #expect(maps.contains { $0.range.start <= range.start && range.end <= $0.range.end }, "\(name) \(range) in the maps")
        }
        let region = try #require(child.regions["writer1"])
        let reader = try PageReader(pid: child.pid)
        var buffer = [UInt8](repeating: 0, count: Int(region.length))
        try buffer.withUnsafeMutableBytes { _ = try reader.read([region], into: $0) }
        // Every word of the regions is non-zero (the fill sets bit 0, writes set bit 63).
        let zeros = buffer.withUnsafeBytes { $0.bindMemory(to: UInt64.self).filter { $0 == 0 }.count }
        #expect(zeros == 0)
    }

    @Test(arguments: [TrackerKind.async, .sync])
    func attachFreezeAndTrackWorkThroughALiveThread(kind: TrackerKind) throws {
        let child = try DeadLeader(mib: 2)
        defer { child.stop() }
        let process = try TrackedProcess.attach(pid: child.pid, tracker: kind)
        defer { try? process.detach() }
        #expect(process.trackerKind == kind)
        let writer1 = try #require(child.regions["writer1"])
        #expect(process.regions.contains { $0.range.start <= writer1.start && writer1.end <= $0.range.end })
        try process.startTracking()
        // (Sync mode cannot protect private file mappings such as .data, leader or not.)
        let writers = Ranges.merge(Array(child.regions.values))
        #expect(Ranges.intersect(process.unprotectable.map(\.range), writers).isEmpty, "\(process.unprotectable)")
        _ = try process.scanDirty()
        usleep(100_000)
        let dirty = try process.scanDirty()
        #expect(!Ranges.intersect(dirty, writers).isEmpty, "the writers' pages are seen written: \(dirty)")

        // Frozen: nothing writes, so two reads of the regions agree and a scan is empty there.
        try process.freeze()
        #expect(process.isFrozen)
        for tid in child.liveThreads { #expect(threadState(child.pid, tid) == "t", "thread \(tid) is stopped") }
        _ = try process.scanDirty()
        let size = Int(writers.reduce(0) { $0 + $1.length })
        var first = [UInt8](repeating: 0, count: size)
        var second = [UInt8](repeating: 1, count: size)
        try first.withUnsafeMutableBytes { _ = try process.read(writers, into: $0) }
        usleep(50_000)
        try second.withUnsafeMutableBytes { _ = try process.read(writers, into: $0) }
        #expect(first == second)
        #expect(Ranges.intersect(try process.scanDirty(), writers).isEmpty)
        try process.thaw()
        try process.detach()
        // Released: the writers run on, untraced, and the leader is still the zombie it was.
        usleep(50_000)
        for tid in child.liveThreads { #expect(threadState(child.pid, tid) != "t", "thread \(tid) runs again") }
        #expect(child.leaderState == "Z")
        #expect(!smapsFlags(child).contains("uw"), "no write-protected mapping remains")
    }

    /// The main thread exits while Ferry holds the process: tracking, reads,
    /// layout and freezing carry on through the threads that remain.
    @Test(arguments: [TrackerKind.async, .sync])
    func theLeaderExitingWhileAttachedChangesNothing(kind: TrackerKind) throws {
        let child = try DeadLeader(mib: 2, leaderWaits: true)
        defer { child.stop() }
        #expect(child.leaderState != "Z")
        let process = try TrackedProcess.attach(pid: child.pid, tracker: kind)
        defer { try? process.detach() }
        try process.startTracking()
        _ = try process.scanDirty()
        try child.exitLeader()
        usleep(100_000)
        let writers = Ranges.merge(Array(child.regions.values))
        #expect(!Ranges.intersect(try process.scanDirty(), writers).isEmpty)
        let change = try process.refreshLayout()
        #expect(Ranges.intersect(change.unmapped, writers).isEmpty, "\(change)")
        try process.freeze()
        _ = try process.scanDirty()
        let size = Int(writers.reduce(0) { $0 + $1.length })
        var first = [UInt8](repeating: 0, count: size)
        var second = [UInt8](repeating: 1, count: size)
        try first.withUnsafeMutableBytes { _ = try process.read(writers, into: $0) }
        usleep(50_000)
        try second.withUnsafeMutableBytes { _ = try process.read(writers, into: $0) }
        #expect(first == second)
        #expect(Ranges.intersect(try process.scanDirty(), writers).isEmpty)
        try process.thaw()
        try process.detach()
        for tid in child.liveThreads { #expect(threadState(child.pid, tid) != "t", "thread \(tid) runs again") }
    }

    /// The main thread exits *while* it is being frozen: seized but never
    /// reporting its stop, since a zombie leader with live threads is not
    /// waitable. The freeze must neither hang nor fail.
    @Test func theLeaderExitingDuringAFreezeNeitherHangsNorFails() throws {
        for round in 0..<120 {
            let child = try DeadLeader(mib: 1, rate: 1000, leaderWaits: true)
            defer { child.stop() }
            let process = try TrackedProcess.attach(pid: child.pid, tracker: .async)
            defer { try? process.detach() }
            child.send("exit")
            // Spread the freezes over the leader's exit.
            usleep(UInt32(round % 40) * 50)
            try process.freeze()
            try process.thaw()
            try child.exitLeaderAndWait()
            try process.freeze()
            try process.thaw()
            try process.detach()
            usleep(20_000)
            for tid in child.liveThreads { #expect(threadState(child.pid, tid) != "t", "round \(round): thread \(tid) runs again") }
        }
    }

    /// The leader's own status names no tracer once it has exited: the
    /// check reads a live thread's instead.
    @Test func aTracedProcessWhoseMainThreadExitedIsRefusedAsTraced() throws {
        let child = try DeadLeader(mib: 1)
        defer { child.stop() }
        let first = try TrackedProcess.attach(pid: child.pid)
        defer { try? first.detach() }
        try first.freeze()
        do {
            let second = try TrackedProcess.attach(pid: child.pid)
            try? second.detach()
            Issue.record("attached twice")
        } catch {
            #expect("\(error)".contains("already traced by pid \(getpid())"), "\(error)")
        }
        try first.thaw()
    }

    @Test func namingALiveThreadPointsToTheProcess() throws {
        let child = try DeadLeader(mib: 1)
        defer { child.stop() }
        let tid = try #require(child.liveThreads.first)
        do {
            let process = try TrackedProcess.attach(pid: tid)
            try? process.detach()
            Issue.record("attached to thread \(tid) of pid \(child.pid)")
        } catch {
            #expect("\(error)" == "cannot attach to pid \(tid): it is a thread of process \(child.pid), whose main thread has exited (attach to pid \(child.pid) instead: Ferry reaches its memory through the threads still running)")
        }
        #expect(throws: AttachError.self) { try TrackedProcess.checkAttachable(pid: tid) }
        // The process itself passes the checks the leecher's --into makes up front.
        try TrackedProcess.checkAttachable(pid: child.pid)
    }

    @Test func aProcessWhoseThreadsAllExitedIsGone() throws {
        let child = try DeadLeader(mib: 1)
        let process = try TrackedProcess.attach(pid: child.pid)
        defer { try? process.detach() }
        child.stop()
        #expect(ThreadGroup.liveThread(of: child.pid) == nil)
        do {
            _ = try process.scanDirty()
            try process.startTracking()
            Issue.record("tracked a process that exited")
        } catch {
            #expect("\(error)".contains("the process has exited"), "\(error)")
        }
    }

    private func threadState(_ pid: Int32, _ tid: Int32) -> Character? { procState("/proc/\(pid)/task/\(tid)/stat") }

    /// The VmFlags lines of a live thread's smaps ("uw" marks uffd-wp registration).
    private func smapsFlags(_ child: DeadLeader) -> [String] {
        guard let tid = child.liveThreads.first,
              let text = try? String(contentsOfFile: "/proc/\(child.pid)/task/\(tid)/smaps", encoding: .utf8) else { return [] }
        return text.split(separator: "\n").filter { $0.hasPrefix("VmFlags:") }.flatMap { $0.split(separator: " ").dropFirst().map(String.init) }
    }
}
