// Making a frozen process execute one system call of our choosing.
//
// Why: a userfaultfd belongs to the memory of the process that creates it,
// so the descriptor that tracks a foreign process must be created *inside*
// that process. With every thread stopped, one thread's registers are saved,
// loaded with the call's number and arguments, its instruction pointer is
// pointed at a `syscall` instruction that already exists in its executable
// mappings (the vDSO or libc have several), and the thread is single-stepped
// over it. The result is read and the registers restored, so the thread
// continues exactly where it was, including the restart of a system call it
// was interrupted in. Nothing is written to the target's memory.
// Until the registers are restored the thread depends on us: callers run
// every frozen section that makes remote calls inside `DeferredSignals.during`,
// so Ctrl-C and the like cannot end us half-way. SIGKILL still can: the
// thread then resumes at the borrowed instruction with our registers and
// every signal blocked (docs/user-guide.md § Signals).
// Kernel: any with PTRACE_SINGLESTEP (x86_64; arm64 untested). Capability: as Ptrace.swift.
#if canImport(Glibc)
import Glibc
#endif
internal import CFerryLinux
import FerryToolkit

enum RemoteSyscallError: Error, CustomStringConvertible, Sendable {
    case noSyscallInstruction(pid: Int32)
    case processGone(pid: Int32)
    case unexpectedStop(pid: Int32, tid: Int32, detail: String)
    case system(SystemError)

    var description: String {
        switch self {
        case .noSyscallInstruction(let pid):
            return "cannot run a system call in pid \(pid): no syscall instruction found in its executable mappings"
        case .processGone(let pid):
            return "cannot run a system call in pid \(pid): the process exited"
        case .unexpectedStop(let pid, let tid, let detail):
            return "cannot run a system call in thread \(tid) of pid \(pid): \(detail)"
        case .system(let error):
            return "cannot run a system call in the target: \(error)"
        }
    }
}

/// Runs system calls inside a frozen process. Use only on the process's
/// `PtraceThread`, between `Freezer.freeze` and `Freezer.thaw`.
struct RemoteSyscall {
    let pid: Int32
    let tid: Int32
    /// Address of an existing syscall instruction in the target.
    let instruction: UInt64

    /// Picks the thread to borrow (one in a plain interrupt stop if any, the
    /// leader first) and finds a syscall instruction. A leader that has
    /// exited was never stopped (the freezer skips zombies), so another
    /// thread is borrowed then.
    init(frozen: FrozenProcess) throws {
        pid = frozen.pid
        let ordered = frozen.threads.keys.sorted { a, b in a == frozen.pid ? true : (b == frozen.pid ? false : a < b) }
        let plain = ordered.first { tid in
            if case .event(let signal) = frozen.threads[tid]!, signal == SIGTRAP { return true }
            return false
        }
        guard let chosen = plain ?? ordered.first else { throw RemoteSyscallError.processGone(pid: frozen.pid) }
        tid = chosen
        instruction = try Self.findInstruction(pid: frozen.pid)
    }

    /// Executes `number(arguments)` in the borrowed thread; returns the raw
    /// result (a negative errno on failure), with the thread's registers restored.
    func call(_ number: Int, _ arguments: UInt64...) throws -> Int {
        var args = arguments
        while args.count < 6 { args.append(0) }
        var saved = ferry_regs()
        try check("PTRACE_GETREGS") { ferry_regs_get(tid, &saved) }
        var regs = saved
        ferry_regs_prepare_syscall(&regs, instruction, number, args[0], args[1], args[2], args[3], args[4], args[5])
        try check("PTRACE_SETREGS") { ferry_regs_set(tid, &regs) }
        defer { _ = ferry_regs_set(tid, &saved) }
        // Block every signal for the step, so that no pending signal is taken
        // in its place (they stay queued and arrive after the thaw); the
        // step's own SIGTRAP is forced through regardless.
        var savedMask: UInt64 = 0
        try check("PTRACE_GETSIGMASK") { ferry_ptrace_getsigmask(tid, &savedMask) }
        var blockAll = ~UInt64(0)
        try check("PTRACE_SETSIGMASK") { ferry_ptrace_setsigmask(tid, &blockAll) }
        defer { _ = ferry_ptrace_setsigmask(tid, &savedMask) }

        var bytes: (UInt8, UInt8, UInt8, UInt8) = (0, 0, 0, 0)
        // SAFETY: the shim writes at most 4 bytes, the size of `bytes`.
        let length = withUnsafeMutableBytes(of: &bytes) {
            ferry_syscall_instruction($0.baseAddress!.assumingMemoryBound(to: UInt8.self))
        }
        // A step normally ends in a SIGTRAP stop. Should another signal be
        // reported first all the same (SIGKILL, SIGSTOP cannot be blocked), it
        // is sent again after the step so it is not lost; the step is retried.
        var deferred: [Int32] = []
        defer { for signal in deferred { _ = ferry_tgkill(pid, tid, signal) } }
        for _ in 0..<8 {
            try check("PTRACE_SINGLESTEP") { ferry_ptrace_singlestep(tid, 0) }
            switch try Ptrace.waitStop(tid, pid: pid) {
            case .gone:
                throw RemoteSyscallError.processGone(pid: pid)
            case .stopped(.signal(let signal, _)) where signal != SIGTRAP:
                deferred.append(signal)
                continue
            case .stopped:
                var after = ferry_regs()
                try check("PTRACE_GETREGS") { ferry_regs_get(tid, &after) }
                if ferry_regs_ip(&after) != instruction + UInt64(length) {
                    // The step was taken over by a signal stop before the instruction ran.
                    continue
                }
                return ferry_regs_syscall_result(&after)
            }
        }
        throw RemoteSyscallError.unexpectedStop(pid: pid, tid: tid, detail: "the single step did not complete")
    }

    private func check(_ operation: String, _ body: () -> Int) throws {
        if body() < 0 {
            let error = errno
            if error == ESRCH { throw RemoteSyscallError.processGone(pid: pid) }
            throw RemoteSyscallError.system(SystemError(operation: operation, target: "thread \(tid) of pid \(pid)", errno: error))
        }
    }

    /// Finds the bytes of a syscall instruction in an executable mapping:
    /// the vDSO first (small, always there), then the others.
    static func findInstruction(pid: Int32) throws -> UInt64 {
        var pattern: (UInt8, UInt8, UInt8, UInt8) = (0, 0, 0, 0)
        // SAFETY: the shim writes at most 4 bytes, the size of `pattern`.
        let length = withUnsafeMutableBytes(of: &pattern) {
            Int(ferry_syscall_instruction($0.baseAddress!.assumingMemoryBound(to: UInt8.self)))
        }
        let needle = withUnsafeBytes(of: pattern) { Array($0.prefix(length)) }
        let regions: [Region]
        do { regions = try ProcessMaps.read(pid: pid) } catch { throw RemoteSyscallError.processGone(pid: pid) }
        let executable = regions.filter { $0.permissions.contains("x") && $0.name != "[vsyscall]" }
        let ordered = executable.filter { $0.name == "[vdso]" } + executable.filter { $0.name != "[vdso]" }
        // Through a live thread when the leader has exited (ThreadGroup.swift).
        let (fd, path) = ThreadGroup.openProcFile("mem", of: pid, flags: O_RDONLY)
        guard fd >= 0 else {
            throw RemoteSyscallError.system(SystemError(operation: "open \(path)", target: "pid \(pid)", errno: errno))
        }
        defer { close(fd) }
        let chunk = 1 << 16
        var buffer = [UInt8](repeating: 0, count: chunk)
        for region in ordered {
            var address = region.start
            while address < region.end {
                let want = Int(min(UInt64(chunk), region.end - address))
                // SAFETY: `want` <= chunk, the buffer's size.
                let got = buffer.withUnsafeMutableBytes { pread(fd, $0.baseAddress, want, off_t(Int64(bitPattern: address))) }
                if got <= 0 { break }
                var index = 0
                // Instructions on arm64 are 4-byte aligned; x86 has no alignment.
                let step = length == 4 ? 4 : 1
                while index + length <= got {
                    var match = true
                    for k in 0..<length where buffer[index + k] != needle[k] { match = false; break }
                    if match { return address + UInt64(index) }
                    index += step
                }
                // Overlap chunks by length-1 bytes so a pattern across the seam is seen.
                address += UInt64(max(got - (length - 1), 1))
            }
        }
        throw RemoteSyscallError.noSyscallInstruction(pid: pid)
    }
}
