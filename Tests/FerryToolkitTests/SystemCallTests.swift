import Testing
import Glibc
import FerryToolkit

@Suite struct SystemCallTests {
    @Test func emptyNonBlockingPipeWouldBlock() throws {
        var fds: [Int32] = [0, 0]
        try checkedCall("pipe", on: "the test") { pipe(&fds) }
        defer { close(fds[0]); close(fds[1]) }
        _ = fcntl(fds[0], F_SETFL, O_NONBLOCK)
        var byte: UInt8 = 0
        let result = try systemCall("read", on: "the test pipe") { read(fds[0], &byte, 1) }
        guard case .wouldBlock = result else {
            Issue.record("expected .wouldBlock, got \(result)")
            return
        }
        // checkedCall treats EAGAIN as an error.
        #expect(throws: SystemError.self) { try checkedCall("read", on: "the test pipe") { read(fds[0], &byte, 1) } }
    }

    @Test func doneCarriesTheResult() throws {
        var fds: [Int32] = [0, 0]
        try checkedCall("pipe", on: "the test") { pipe(&fds) }
        defer { close(fds[0]); close(fds[1]) }
        var out: [UInt8] = [1, 2, 3]
        #expect(try checkedCall("write", on: "the test pipe") { write(fds[1], &out, 3) } == 3)
        var input = [UInt8](repeating: 0, count: 8)
        guard case .done(let n) = try systemCall("read", on: "the test pipe", { read(fds[0], &input, 8) }) else {
            Issue.record("expected .done")
            return
        }
        #expect(n == 3)
        #expect(Array(input.prefix(3)) == [1, 2, 3])
    }

    @Test func badDescriptorNamesOperationAndTarget() {
        var byte: UInt8 = 0
        do {
            try checkedCall("read", on: "descriptor 9999", hint: { $0 == EBADF ? "it was never opened" : nil }) {
                read(9999, &byte, 1)
            }
            Issue.record("reading descriptor 9999 succeeded")
        } catch let error as SystemError {
            #expect(error.errno == EBADF)
            #expect(error.description == "read on descriptor 9999 failed: \(SystemError.text(EBADF)) (it was never opened)")
            #expect(error.description.hasPrefix("read on descriptor 9999 failed: Bad file descriptor"))
        } catch {
            Issue.record("unexpected \(error)")
        }
    }

    @Test func interruptedCallsAreRetried() throws {
        var calls = 0
        let result = try checkedCall("fake", on: "the test") { () -> Int32 in
            calls += 1
            if calls < 3 { errno = EINTR; return -1 }
            return 7
        }
        #expect(result == 7)
        #expect(calls == 3)
    }
}
