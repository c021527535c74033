// Where a transport connects or listens, as users write it on the command
// line: "127.0.0.1:7070", "[::1]:7070", "seeder.example:7070",
// "unix:/run/ferry.sock".

/// A TCP host and port, or a Unix socket path.
public enum Endpoint: Sendable, Hashable, CustomStringConvertible {
    /// A host name or IP address (IPv6 without brackets) and a port. Port 0
    /// means "any free port" when listening.
    case tcp(host: String, port: UInt16)
    /// A Unix domain socket path.
    case unix(path: String)

    /// The longest Unix socket path: `sizeof(sun_path)` is 108 bytes on Linux,
    /// including the terminating NUL. libuv would silently truncate a longer one.
    public static let maxUnixPathBytes = 107

    /// Parses "host:port", "[v6-address]:port" or "unix:/path".
    public init(parsing text: String) throws(EndpointError) {
        let trimmed = text.trimmingWhitespace()
        if trimmed.isEmpty { throw EndpointError(text: text, reason: "it is empty") }
        if trimmed.hasPrefix("unix:") {
            let path = String(trimmed.dropFirst(5))
            try Self.validate(unixPath: path, text: text)
            self = .unix(path: path)
            return
        }
        if trimmed.hasPrefix("/") || trimmed.hasPrefix("./") {
            throw EndpointError(text: text, reason: "a Unix socket path needs the unix: prefix, as in unix:\(trimmed)")
        }
        let host: String
        let portText: Substring
        if trimmed.hasPrefix("[") {
            guard let close = trimmed.firstIndex(of: "]") else {
                throw EndpointError(text: text, reason: "the IPv6 address has no closing ']'")
            }
            host = String(trimmed[trimmed.index(after: trimmed.startIndex) ..< close])
            let rest = trimmed[trimmed.index(after: close)...]
            guard rest.hasPrefix(":") else {
                throw EndpointError(text: text, reason: "a port is missing after the address: write [\(host)]:PORT")
            }
            portText = rest.dropFirst()
            guard !host.isEmpty, host.allSatisfy({ $0.isHexDigit || $0 == ":" || $0 == "." || $0 == "%" || $0.isLetter || $0.isNumber }),
                  host.contains(":") else {
                throw EndpointError(text: text, reason: "\"\(host)\" is not an IPv6 address")
            }
        } else {
            guard let colon = trimmed.lastIndex(of: ":") else {
                throw EndpointError(text: text, reason: "the port is missing: write HOST:PORT, [IPv6]:PORT or unix:/path")
            }
            host = String(trimmed[..<colon])
            portText = trimmed[trimmed.index(after: colon)...]
            if host.contains(":") {
                throw EndpointError(text: text, reason: "an IPv6 address needs brackets: [\(host)]:\(portText)")
            }
            if host.isEmpty {
                throw EndpointError(text: text, reason: "the host is missing: write HOST:PORT (0.0.0.0:PORT to listen on every IPv4 address)")
            }
            let allowed = host.unicodeScalars.allSatisfy { c in
                (c >= "a" && c <= "z") || (c >= "A" && c <= "Z") || (c >= "0" && c <= "9") || c == "." || c == "-" || c == "_"
            }
            guard allowed, host.utf8.count <= 253 else {
                throw EndpointError(text: text, reason: "\"\(host)\" is not a valid host name or IPv4 address")
            }
        }
        if portText.isEmpty {
            throw EndpointError(text: text, reason: "the port is missing after ':'")
        }
        guard portText.allSatisfy({ $0.isASCII && $0.isNumber }), let port = Int(portText), port <= 65535 else {
            throw EndpointError(text: text, reason: "the port \"\(portText)\" is not a number from 0 to 65535")
        }
        self = .tcp(host: host, port: UInt16(port))
    }

    private static func validate(unixPath path: String, text: String) throws(EndpointError) {
        if path.isEmpty { throw EndpointError(text: text, reason: "the Unix socket path is empty: write unix:/path/to/socket") }
        if path.utf8.contains(0) { throw EndpointError(text: text, reason: "the Unix socket path contains a NUL byte") }
        if path.utf8.count > maxUnixPathBytes {
            throw EndpointError(text: text, reason: "the Unix socket path is \(path.utf8.count) bytes, the limit is \(maxUnixPathBytes); use a shorter path")
        }
    }

    /// The text `init(parsing:)` accepts: "127.0.0.1:7070", "[::1]:7070", "unix:/path".
    public var description: String {
        switch self {
        case .tcp(let host, let port):
            return host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)"
        case .unix(let path):
            return "unix:\(path)"
        }
    }
}

/// An endpoint string that could not be parsed.
public struct EndpointError: Error, CustomStringConvertible, Sendable, Equatable {
    /// The text as given.
    public let text: String
    /// What is wrong with it.
    public let reason: String
    public var description: String {
        "invalid endpoint \"\(text)\": \(reason) (examples: 127.0.0.1:7070, [::1]:7070, seeder.example:7070, unix:/run/ferry.sock)"
    }
}

extension String {
    fileprivate func trimmingWhitespace() -> String {
        var s = Substring(self)
        while let f = s.first, f.isWhitespace { s = s.dropFirst() }
        while let l = s.last, l.isWhitespace { s = s.dropLast() }
        return String(s)
    }
}
