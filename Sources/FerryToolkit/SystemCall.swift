// The one place Ferry turns a failed system call into an error: retry EINTR,
// hand EAGAIN back as a value, and name the operation and its target in
// anything thrown (modelled on swift-nio's System.swift). Every module above
// the C shims calls the kernel through these two functions.
#if canImport(Glibc)
import Glibc
#endif

/// A system call that failed, with what it was doing and to what.
public struct SystemError: Error, CustomStringConvertible, Sendable, Equatable {
    /// The operation as a person would say it: "process_vm_readv", "UFFDIO_REGISTER".
    public var operation: String
    /// What it acted on: "pid 4242", "pid 4242 at 0x7f00...".
    public var target: String
    public var errno: Int32
    /// What to do about it, when there is something to say.
    public var hint: String?

    public init(operation: String, target: String, errno: Int32, hint: String? = nil) {
        self.operation = operation
        self.target = target
        self.errno = errno
        self.hint = hint
    }

    public var description: String {
        var text = "\(operation) on \(target) failed: \(Self.text(errno))"
        if let hint { text += " (\(hint))" }
        return text
    }
}

extension SystemError {
    /// The C library's text for `errno` ("connection refused"): the one place
    /// Ferry turns an errno into words, for messages that are not a SystemError.
    public static func text(_ errno: Int32) -> String {
        String(cString: strerror(errno))
    }
}

/// The outcome of a call that may report "try again" without it being an error.
public enum CallResult<Value> {
    case done(Value)
    case wouldBlock
}

/// Runs `body` until it stops failing with EINTR. A negative result becomes a
/// `SystemError`; EAGAIN/EWOULDBLOCK comes back as `.wouldBlock`.
@discardableResult
public func systemCall<T: BinaryInteger>(
    _ operation: @autoclosure () -> String,
    on target: @autoclosure () -> String,
    hint: ((Int32) -> String?)? = nil,
    _ body: () -> T
) throws -> CallResult<T> {
    while true {
        let result = body()
        if result >= 0 { return .done(result) }
        let error = Glibc.errno
        if error == EINTR { continue }
        if error == EAGAIN || error == EWOULDBLOCK { return .wouldBlock }
        throw SystemError(operation: operation(), target: target(), errno: error, hint: hint?(error))
    }
}

/// Like `systemCall`, for calls where EAGAIN is an error too.
@discardableResult
public func checkedCall<T: BinaryInteger>(
    _ operation: @autoclosure () -> String,
    on target: @autoclosure () -> String,
    hint: ((Int32) -> String?)? = nil,
    _ body: () -> T
) throws -> T {
    while true {
        let result = body()
        if result >= 0 { return result }
        let error = Glibc.errno
        if error == EINTR { continue }
        throw SystemError(operation: operation(), target: target(), errno: error, hint: hint?(error))
    }
}

