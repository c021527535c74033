// A pipe that ends a handler thread's poll(2): the thread polls `read`
// beside its userfaultfd, and `stop(joining:)` writes one byte and waits for
// the thread to return. The sync tracker and post-copy memory use one each.
// Kernel: any. Capability: none.
#if canImport(Glibc)
import Glibc
#endif
import FerryToolkit

struct StopPipe: Sendable {
    /// Polled by the handler thread: readable once `stop` was called.
    let read: Int32
    private let write: Int32
    /// Names the owner in errors: "the sync tracker of pid 4242".
    private let owner: String

    init(for owner: String) throws {
        var fds: [Int32] = [0, 0]
        try checkedCall("pipe", on: owner) { pipe(&fds) }
        for fd in fds { _ = fcntl(fd, F_SETFD, FD_CLOEXEC) }
        (read, write, self.owner) = (fds[0], fds[1], owner)
    }

    /// Wakes the handler `thread`, waits for it to return, and takes the
    /// byte back, so the pipe can stop a later handler too.
    func stop(joining thread: pthread_t) {
        // The pipe is ours and empty: one byte in, one byte out, neither can fail or block.
        var byte: UInt8 = 1
        _ = try? checkedCall("write", on: "the stop pipe of \(owner)") { Glibc.write(write, &byte, 1) }
        pthread_join(thread, nil)
        _ = try? checkedCall("read", on: "the stop pipe of \(owner)") { Glibc.read(read, &byte, 1) }
    }

    /// Closes both ends; once, by the owner, after the last `stop`.
    func close() {
        Glibc.close(read)
        Glibc.close(write)
    }
}
