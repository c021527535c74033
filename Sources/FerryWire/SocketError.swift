// Errors of the libuv transports. Each says what failed, on which endpoint or
// peer, the libuv error name, and what to do about it.

/// A failure of a socket, pipe or listener operation.
public enum SocketError: Error, CustomStringConvertible, Sendable {
    /// A host name did not resolve.
    case resolveFailed(host: String, UVError)
    /// Connecting failed on every address the endpoint resolved to.
    case connectFailed(endpoint: String, UVError)
    /// No connection within the timeout.
    case connectTimedOut(endpoint: String, Duration)
    /// Binding or listening failed.
    case bindFailed(endpoint: String, UVError)
    /// Accepting a connection failed.
    case acceptFailed(endpoint: String, UVError)
    /// `accept` was pending (or called) when the listener closed.
    case listenerClosed(endpoint: String)
    /// Reading from the connection failed.
    case readFailed(peer: String, UVError)
    /// Writing to the connection failed.
    case writeFailed(peer: String, UVError)
    /// The peer reset the connection.
    case connectionReset(peer: String)
    /// A frame longer than the 32-bit length prefix can express.
    case frameTooLargeToSend(peer: String, size: Int)

    public var description: String {
        switch self {
        case .resolveFailed(let host, let e):
            return "cannot resolve host \"\(host)\": \(e); check the name, or use an IP address"
        case .connectFailed(let endpoint, let e):
            return "cannot connect to \(endpoint): \(e)\(Self.advice(for: e))"
        case .connectTimedOut(let endpoint, let timeout):
            return "cannot connect to \(endpoint): no answer within \(timeout); check the address, that the host is up and that no firewall drops the connection"
        case .bindFailed(let endpoint, let e):
            return "cannot listen on \(endpoint): \(e)\(Self.bindAdvice(for: e))"
        case .acceptFailed(let endpoint, let e):
            return "cannot accept a connection on \(endpoint): \(e)"
        case .listenerClosed(let endpoint):
            return "the listener on \(endpoint) was closed; no more connections are accepted"
        case .readFailed(let peer, let e):
            return "reading from \(peer) failed: \(e); the connection is closed"
        case .writeFailed(let peer, let e):
            return "writing to \(peer) failed: \(e); the connection is closed"
        case .connectionReset(let peer):
            return "\(peer) reset the connection (ECONNRESET); the peer process likely exited or was killed"
        case .frameTooLargeToSend(let peer, let size):
            return "cannot send a frame of \(size) bytes to \(peer): the wire's length prefix is 32 bits; split the data into smaller frames"
        }
    }

    private static func advice(for e: UVError) -> String {
        switch e.name {
        case "ECONNREFUSED": return "; is the seeder running and listening there?"
        case "ENOENT": return "; no socket at that path: is the seeder running and listening there?"
        case "EACCES", "EPERM": return "; check the permissions of the socket (or run as its owner)"
        case "ENETUNREACH", "EHOSTUNREACH": return "; check the address and the network route to it"
        case "EADDRNOTAVAIL": return "; the address is not usable from this host (for IPv6, is it configured?)"
        default: return ""
        }
    }

    private static func bindAdvice(for e: UVError) -> String {
        switch e.name {
        case "EADDRINUSE": return "; another process is listening there: stop it or choose another port or path"
        case "EACCES": return "; ports below 1024 need root or CAP_NET_BIND_SERVICE, and socket paths a writable directory"
        case "EADDRNOTAVAIL": return "; that address is not configured on this host"
        default: return ""
        }
    }
}

/// The standard input/output transport could not use a descriptor.
public enum StdioError: Error, CustomStringConvertible, Sendable {
    /// The descriptor is a regular file: libuv streams need a pipe, socket or terminal.
    case regularFile(fd: Int32)
    /// The descriptor is of a kind libuv cannot stream (or is not open).
    case unsupported(fd: Int32)
    /// libuv refused the descriptor.
    case cannotOpen(fd: Int32, kind: String, UVError)
    /// Duplicating the descriptor failed.
    case notOpen(fd: Int32, errno: Int32)

    public var description: String {
        switch self {
        case .regularFile(let fd):
            return "\(Self.name(fd)) is a regular file; the stdio transport needs a pipe, socket or terminal (run it under ssh or with a pipe, not with < file)"
        case .unsupported(let fd):
            return "\(Self.name(fd)) is not a pipe, socket or terminal that libuv can stream; run the command with its standard input/output connected to ssh or a pipe"
        case .cannotOpen(let fd, let kind, let e):
            return "cannot use \(Self.name(fd)) (a \(kind)) as a transport: \(e)"
        case .notOpen(let fd, let errno):
            return "\(Self.name(fd)) is not open (\(SystemError.text(errno))); the stdio transport needs both standard input and output"
        }
    }

    private static func name(_ fd: Int32) -> String {
        switch fd {
        case 0: return "standard input"
        case 1: return "standard output"
        default: return "descriptor \(fd)"
        }
    }
}

#if canImport(Glibc)
import Glibc
#endif
import FerryToolkit
