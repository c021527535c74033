// A short scheduler slice for every thread of a process (post-copy under
// CPU contention: see docs/postcopy.md).
import Foundation
import Testing
import Glibc
@testable import FerrySystem

@Suite struct SchedulerSliceTests {
    /// The slice the kernel reports for `pid`'s main thread, nanoseconds (nil: not shown).
    func slice(of pid: Int32) -> UInt64? {
        guard let text = try? String(contentsOfFile: "/proc/\(pid)/sched", encoding: .utf8),
              let line = text.split(separator: "\n").first(where: { $0.hasPrefix("se.slice") }) else { return nil }
        return UInt64(line.split(separator: ":").last?.trimmingCharacters(in: .whitespaces) ?? "")
    }

    @Test func everyThreadTakesTheSliceAndTheDefaultComesBack() throws {
        let child = try TestChild(pages: 16)
        try child.process.call("spin 2")
        defer { _ = try? child.process.call("unspin") }
        let before = try #require(slice(of: child.pid), "this kernel does not show se.slice in /proc/PID/sched")
        let threads = try FileManager.default.contentsOfDirectory(atPath: "/proc/\(child.pid)/task").count
        #expect(setSchedulerSlice(.microseconds(250), threadsOf: child.pid) == threads)
        #expect(slice(of: child.pid) == 250_000)
        #expect(setSchedulerSlice(nil, threadsOf: child.pid) == threads)
        #expect(slice(of: child.pid) == before)
        #expect(setSchedulerSlice(.microseconds(250), threadsOf: 999_999_999) == 0, "no such process: nothing set")
    }
}
