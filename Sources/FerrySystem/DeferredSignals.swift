// Keeping Ctrl-C (and TERM, HUP, Ctrl-Z) from ending or stopping us while a
// thread of the target runs a system call for us.
//
// Why: during a remote system call (RemoteSyscall.swift) one thread of the
// target sits at a borrowed `syscall` instruction with our registers and
// every signal blocked, until we put its own back. Should we die or stop in
// that window, the kernel detaches the target and the thread resumes there:
// it runs our call, then goes on with the wrong registers and blocks signals
// for good. SIGINT, SIGTERM and SIGHUP end a process by default and SIGTSTP
// stops it, so around every frozen section that makes remote calls these
// four only mark themselves caught; when the section ends, their previous
// dispositions come back and each caught signal is sent to us again (so the
// CLI's handlers see it, or the default action happens, a few milliseconds
// late and harmless).
//
// What remains: SIGKILL and SIGSTOP cannot be caught. A SIGKILL in the window
// (about 100 µs per call) still leaves the thread as described; a SIGSTOP
// (or a debugger) leaves the target frozen until we continue.
// Kernel: any. Capability: none.
#if canImport(Glibc)
import Glibc
#endif
internal import CFerryLinux
import FerryToolkit
import Synchronization

enum DeferredSignals {
    /// How many sections are open; its lock also guards the calls into the
    /// shim, which are not reentrant.
    private static let depth = Mutex(0)

    /// Runs `body` with SIGINT, SIGTERM, SIGHUP and SIGTSTP deferred until
    /// it returns. Nests; safe from several threads at once (the outermost
    /// section installs and restores).
    static func during<T>(_ body: () throws -> T) throws -> T {
        try depth.withLock { depth in
            if depth == 0 && ferry_signals_defer() != 0 {
                throw SystemError(operation: "sigaction", target: "SIGINT, SIGTERM, SIGHUP and SIGTSTP of this process",
                                  errno: errno, hint: "needed to keep a signal from interrupting a remote system call")
            }
            depth += 1
        }
        defer {
            depth.withLock { depth in
                depth -= 1
                if depth == 0 { ferry_signals_release() }
            }
        }
        return try body()
    }
}
