// Attaching to processes: every bad target gets its own clear error, and a
// good one runs on unaffected after detach.
import Testing
import Glibc
@testable import FerrySystem

@Suite(.serialized)
struct AttachTests {
    private func attachError(_ pid: Int32, tracker: TrackerKind? = nil) -> String? {
        do {
            let process = try TrackedProcess.attach(pid: pid, tracker: tracker)
            try? process.detach()
            return nil
        } catch {
            return "\(error)"
        }
    }

    @Test func ownPidIsRefused() {
        let text = attachError(getpid())
        #expect(text?.contains("this process itself") == true, "\(text ?? "attached")")
        #expect(text?.contains("\(getpid())") == true)
    }

    @Test func invalidPidIsRefused() {
        #expect(attachError(0)?.contains("not a valid process id") == true)
        #expect(attachError(-5)?.contains("pid -5") == true)
    }

    @Test func missingProcessIsRefused() {
        // pid_max is at most 4194304; this pid cannot exist.
        let text = attachError(4_194_305)
        #expect(text == "cannot attach to pid 4194305: no such process (check the pid; the process may have exited)")
    }

    @Test func kernelThreadIsRefused() {
        // pid 2 is kthreadd on every Linux with a normal pid namespace.
        let text = attachError(2)
        #expect(text?.contains("kernel thread") == true, "\(text ?? "attached")")
    }

    @Test func threadOfAnotherProcessIsRefused() throws {
        let child = try TestChild()
        try child.process.call("spin 1")
        let tids = Ptrace.threads(of: child.pid) ?? []
        let other = try #require(tids.first { $0 != child.pid })
        let text = attachError(other)
        // The leader runs: no word about an exited main thread (DeadLeaderTests covers that case).
        #expect(text == "cannot attach to pid \(other): it is a thread of process \(child.pid) (attach to pid \(child.pid) instead)")
        try child.process.call("unspin")
    }

    @Test func alreadyTracedProcessIsRefused() throws {
        let child = try TestChild()
        let first = try TrackedProcess.attach(pid: child.pid)
        try first.freeze()
        let text = attachError(child.pid)
        #expect(text?.contains("already traced by pid \(getpid())") == true, "\(text ?? "attached")")
        try first.detach()
        // Once released, a second attach works.
        #expect(attachError(child.pid) == nil)
    }

    @Test(.enabled(if: !SoftDirtyTracker.kernelSupportsSoftDirty(), "this kernel has CONFIG_MEM_SOFT_DIRTY"))
    func softDirtyOnKernelWithoutItSaysSo() throws {
        let child = try TestChild()
        let text = attachError(child.pid, tracker: .softDirty)
        #expect(text?.contains("built without CONFIG_MEM_SOFT_DIRTY") == true, "\(text ?? "attached")")
    }

    @Test func errorMessagesNameTheFixes() {
        #expect(AttachError.permissionDenied(pid: 42, operation: "PTRACE_SEIZE").description
            == "cannot trace pid 42: PTRACE_SEIZE: operation not permitted (run as root or grant CAP_SYS_PTRACE; check kernel.yama.ptrace_scope)")
        #expect(AttachError.noUserfaultfd.description.contains("CONFIG_USERFAULTFD"))
        #expect(AttachError.noWriteProtect.description.contains("write-protect"))
        #expect(AttachError.trackerUnavailable(.async, reason: "x").description.contains("--tracker"))
        #expect(AttachError.userfaultfdRefused(pid: 7, errno: EPERM).description.contains("vm.unprivileged_userfaultfd"))
    }

    @Test func bestTrackerOnThisKernelIsAsync() throws {
        let child = try TestChild()
        let process = try TrackedProcess.attach(pid: child.pid)
        defer { try? process.detach() }
        #expect(process.trackerKind == .async)
        #expect(process.regions.contains { $0.range == child.region })
    }

    @Test(arguments: [TrackerKind.async, .sync])
    func afterDetachTheProcessRunsOnAndItsMemoryMatches(kind: TrackerKind) throws {
        let child = try TestChild(pages: 64)
        let process = try TrackedProcess.attach(pid: child.pid, tracker: kind)
        try process.startTracking()
        for index in 0..<64 { try child.set(index, UInt64(index) &* 31 &+ 5) }
        _ = try process.scanDirty()
        try process.freeze()
        try process.thaw()
        try process.detach()
        // No tracer, no registration left: the child writes and reads freely.
        #expect(child.process.state != "t")
        for index in 0..<64 { try child.set(index, UInt64(index) &* 17 &+ 3) }
        let reader = try PageReader(pid: child.pid)
        var buffer = [UInt8](repeating: 0, count: 64 * Int(pageSize))
        try buffer.withUnsafeMutableBytes { _ = try reader.read([child.region], into: $0) }
        for index in 0..<64 {
            let word = buffer.withUnsafeBytes { $0.load(fromByteOffset: index * Int(pageSize), as: UInt64.self) }
            #expect(word == UInt64(index) &* 17 &+ 3)
            #expect(try child.get(index) == word)
        }
        #expect(!(try readStatus(child.pid)).contains("uw"), "no write-protected mapping remains")
    }

    /// The VmFlags lines of /proc/PID/smaps ("uw" marks uffd-wp registration).
    private func readStatus(_ pid: Int32) throws -> [String] {
        guard let file = fopen("/proc/\(pid)/smaps", "r") else { return [] }
        defer { fclose(file) }
        var flags: [String] = []
        var line = [CChar](repeating: 0, count: 4096)
        while fgets(&line, Int32(line.count), file) != nil {
            let text = line.withUnsafeBufferPointer { String(cString: $0.baseAddress!) }
            if text.hasPrefix("VmFlags:") { flags += text.split(separator: " ").map(String.init) }
        }
        return flags
    }
}
