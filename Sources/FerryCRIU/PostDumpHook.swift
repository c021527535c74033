// CRIU's action script, used as the post-dump hook (criu/action-scripts.c,
// criu/cr-dump.c: cr_dump_finish). CRIU runs it once every image is written,
// with the process still frozen, and acts on its exit status: 0 lets the dump
// finish (with --lazy-pages: its page server serves, then the process is
// killed), anything else resumes the process. CRIU closes every descriptor
// but 0-2 before running a script, so the script speaks to Ferry through two
// FIFOs in a private directory: it writes "dumped" to one and waits for a
// verdict line on the other. Ferry holds both FIFOs open read-write, so
// neither side blocks opening them; when Ferry is gone the script reads end
// of file and exits 1 (the process resumes), and `timeout` bounds the wait
// by `limit` in any case.
import Foundation
import FerryToolkit
#if canImport(Glibc)
import Glibc
#endif

public final class PostDumpHook: Sendable {
    public let directory: String
    public let script: String
    private let dumped: Int32
    private let verdict: Int32

    /// A hook whose script gives up (status 1, the process resumes) after
    /// `limit`: a bound on the whole migration after the dump, since the
    /// script waits for its end. Ferry gone ends it at once (end of file).
    public init(in parent: String, limit: Duration) throws {
        let directory = parent + "/hook"
        self.directory = directory
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true,
                                                attributes: [.posixPermissions: 0o700])
        for name in ["dumped", "verdict"] {
            let path = directory + "/" + name
            unlink(path)
            try checkedCall("mkfifo", on: path) { mkfifo(path, 0o600) }
        }
        dumped = try checkedCall("open", on: directory + "/dumped") { open(directory + "/dumped", O_RDWR | O_CLOEXEC) }
        verdict = try checkedCall("open", on: directory + "/verdict") { open(directory + "/verdict", O_RDWR | O_CLOEXEC) }
        script = directory + "/post-dump.sh"
        let seconds = max(1, Int(limit.inSeconds.rounded(.up)))
        let text = """
            #!/bin/sh
            # Ferry's post-dump hook (Protocols/criu.md): 0 lets CRIU finish the
            # dump, anything else makes it resume the process.
            [ "$CRTOOLS_SCRIPT_ACTION" = post-dump ] || exit 0
            exec timeout \(seconds) sh -c 'echo dumped > "$0/dumped"; read -r v < "$0/verdict" || exit 1; exit "${v:-1}"' '\(directory)'

            """
        try text.write(toFile: script, atomically: true, encoding: .utf8)
        chmod(script, 0o700)
    }

    /// Blocks (a dedicated thread's job) until the script says the dump is
    /// written, at most `timeout`; false when it did not.
    public func waitDumped(timeout: Duration) -> Bool {
        var poller = pollfd(fd: dumped, events: Int16(POLLIN), revents: 0)
        let ready = poll(&poller, 1, Int32(clamping: timeout.wholeMilliseconds))
        guard ready == 1 else { return false }
        var buffer = [UInt8](repeating: 0, count: 64)
        return buffer.withUnsafeMutableBytes { read(dumped, $0.baseAddress, $0.count) } > 0
    }

    /// Answers the script: `resume` false lets the dump finish (the process
    /// will be killed), true makes CRIU resume the process.
    public func answer(resume: Bool) {
        let line = resume ? "1\n" : "0\n"
        _ = line.withCString { write(verdict, $0, 2) }
    }

    deinit {
        close(dumped)
        close(verdict)
    }
}
