// Standard input and output as a transport, so a seeder can be started over
// ssh (`ssh host seeder serve --stdio <pid>`) and speak the protocol on the
// ssh channel. Standard input may be a pipe, a socket (sshd and inetd-style
// launchers use socketpairs) or a terminal; each is opened with the libuv
// handle type that fits. A regular file cannot be polled, so it is refused
// with a clear error rather than read with blocking calls on the loop thread.

internal import CUV
import Glibc

enum StdioTransport {
    /// Takes fds 0 and 1 over (see `Transports.stdio()`).
    static func make(on loop: EventLoop) -> StreamTransport {
        let transport = StreamTransport(loop: loop, peer: "stdio")
        // Work on duplicates above 2: libuv never closes descriptors 0-2, and
        // the peer only sees end of stream once every copy is closed.
        let input = fcntl(0, F_DUPFD_CLOEXEC, 3)
        let inputErrno = errno
        let output = fcntl(1, F_DUPFD_CLOEXEC, 3)
        let outputErrno = errno
        if input < 0 || output < 0 {
            if input >= 0 { Glibc.close(input) }
            if output >= 0 { Glibc.close(output) }
            let error = input < 0 ? StdioError.notOpen(fd: 0, errno: inputErrno) : StdioError.notOpen(fd: 1, errno: outputErrno)
            loop.execute { transport.attachFailed(error) }
            return transport
        }
        // Point 0 and 1 at /dev/null: a stray print can no longer corrupt the
        // frame stream, and nothing else holds the channel open.
        let null = open("/dev/null", O_RDWR | O_CLOEXEC)
        if null >= 0 {
            dup2(null, 0)
            dup2(null, 1)
            Glibc.close(null)
        }
        attach(transport, input: input, output: output, names: (0, 1), on: loop)
        return transport
    }

    /// A transport over two descriptors it takes ownership of (closing the
    /// transport closes them). `input == output` for a socket.
    static func make(input: Int32, output: Int32, peer: String, on loop: EventLoop) -> StreamTransport {
        let transport = StreamTransport(loop: loop, peer: peer)
        attach(transport, input: input, output: output, names: (input, output), on: loop)
        return transport
    }

    private static func attach(_ transport: StreamTransport, input: Int32, output: Int32, names: (Int32, Int32), on loop: EventLoop) {
        loop.execute {
            let inputStream: UVStream
            do throws(StdioError) {
                inputStream = try UVStream.open(fd: input, readable: true, on: loop)
            } catch {
                if output != input { Glibc.close(output) }
                transport.attachFailed(error.renamed(names.0))
                return
            }
            if output == input {
                transport.attach(input: inputStream, output: inputStream)
                return
            }
            do throws(StdioError) {
                let outputStream = try UVStream.open(fd: output, readable: false, on: loop)
                transport.attach(input: inputStream, output: outputStream)
            } catch {
                inputStream.close()
                transport.attachFailed(error.renamed(names.1))
            }
        }
    }
}

extension StdioError {
    /// The same error naming the descriptor as the user knows it (0, 1).
    fileprivate func renamed(_ fd: Int32) -> StdioError {
        switch self {
        case .regularFile: return .regularFile(fd: fd)
        case .unsupported: return .unsupported(fd: fd)
        case .cannotOpen(_, let kind, let e): return .cannotOpen(fd: fd, kind: kind, e)
        case .notOpen(_, let errno): return .notOpen(fd: fd, errno: errno)
        }
    }
}
