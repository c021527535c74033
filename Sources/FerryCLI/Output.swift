// How the commands talk to people and scripts: `--json` prints one JSON
// object per line on stdout (`{"event": "...", ...}`); otherwise short human
// lines on stdout and, on a terminal, a progress line on stderr. Errors go to
// stderr as `COMMAND: message` and, with --json, as an `error` event.
import ArgumentParser
import Foundation
import FerryMigration
import Synchronization

public struct OutputOptions: ParsableArguments {
    @Flag(name: .long, help: "Print one JSON event per line on stdout instead of text.")
    public var json = false

    public init() {}
}

/// A JSON value small enough to write by hand, so event fields keep their order.
public enum JSONField: Sendable {
    case string(String)
    case int(Int64)
    case uint(UInt64)
    case double(Double)
    case bool(Bool)

    public var encoded: String {
        switch self {
        case .string(let s): return Self.quote(s)
        case .int(let i): return String(i)
        case .uint(let u): return String(u)
        case .double(let d): return d.isFinite ? String(format: "%.3f", d) : "null"
        case .bool(let b): return b ? "true" : "false"
        }
    }

    public static func quote(_ s: String) -> String {
        var out = "\""
        for scalar in s.unicodeScalars {
            switch scalar {
            case "\"": out += "\\\""
            case "\\": out += "\\\\"
            case "\n": out += "\\n"
            case "\r": out += "\\r"
            case "\t": out += "\\t"
            case _ where scalar.value < 0x20: out += String(format: "\\u%04x", scalar.value)
            default: out.unicodeScalars.append(scalar)
            }
        }
        return out + "\""
    }
}

/// Prints events. Safe to call from any thread; lines never interleave.
public final class Reporter: Sendable {
    public let command: String
    public let json: Bool
    private let terminal = isatty(STDERR_FILENO) == 1
    /// Whether a progress bar is drawn on stderr; held while a line is written.
    private let progressShown = Mutex(false)

    /// Where events go: stdout, or stderr when stdout carries the protocol (`--stdio`).
    private let events: FileHandle

    public init(command: String, json: Bool, eventsToStandardError: Bool = false) {
        self.command = command
        self.json = json
        events = eventsToStandardError ? .standardError : .standardOutput
    }

    /// One event: a JSON line, or `text` for people (nothing if nil).
    public func event(_ name: String, _ fields: KeyValuePairs<String, JSONField> = [:], text: String?) {
        progressShown.withLock { shown in
            clearProgress(&shown)
            if json {
                var line = "{\"event\":\(JSONField.quote(name))"
                for (key, value) in fields { line += ",\(JSONField.quote(key)):\(value.encoded)" }
                line += "}\n"
                events.write(Data(line.utf8))
            } else if let text {
                events.write(Data((terminalSafe(text) + "\n").utf8))
            }
        }
    }

    /// A progress line: a JSON `progress` event, or a bar redrawn in place on a terminal.
    public func progress(_ fields: KeyValuePairs<String, JSONField>, bar: String) {
        if json {
            event("progress", fields, text: nil)
            return
        }
        guard terminal else { return }
        progressShown.withLock { shown in
            FileHandle.standardError.write(Data("\r\u{1b}[K\(bar)".utf8))
            shown = true
        }
    }

    private func clearProgress(_ shown: inout Bool) {
        if shown {
            FileHandle.standardError.write(Data("\r\u{1b}[K".utf8))
            shown = false
        }
    }

    /// Prints an error the way every command does.
    public func error(_ message: String) {
        progressShown.withLock { clearProgress(&$0) }
        if json { event("error", ["message": .string(message)], text: nil) }
        FileHandle.standardError.write(Data("\(command): \(terminalSafe(message))\n".utf8))
    }
}

/// `text` with every control character (C0, DEL, C1; ESC among them) shown
/// as `?`: lines for people carry text from peers (host and tracker names,
/// outcome and error messages), which must not drive the terminal. JSON
/// lines escape them instead.
public func terminalSafe(_ text: String) -> String {
    guard text.unicodeScalars.contains(where: isControl) else { return text }
    var out = String.UnicodeScalarView()
    for scalar in text.unicodeScalars { out.append(isControl(scalar) ? "?" : scalar) }
    return String(out)
}

private func isControl(_ scalar: Unicode.Scalar) -> Bool {
    scalar.value < 0x20 || (0x7f...0x9f).contains(scalar.value)
}

/// A text bar: `[#####-----] 52%`.
public func progressBar(_ fraction: Double, width: Int = 24) -> String {
    let clamped = max(0, min(1, fraction.isFinite ? fraction : 0))
    let filled = Int((clamped * Double(width)).rounded())
    return "[" + String(repeating: "#", count: filled) + String(repeating: "-", count: width - filled) + "] "
        + String(format: "%3.0f%%", clamped * 100)
}

/// Runs an async command body, turning errors into the house format and exit status 1.
public func runReporting(_ reporter: Reporter, _ body: () async throws -> Void) async throws {
    do {
        try await body()
    } catch let error as ExitCode {
        throw error
    } catch let error as ValidationError {
        throw error
    } catch {
        reporter.error("\(error)")
        throw ExitCode.failure
    }
}

/// Parses a duration in seconds ("5", "0.5").
public func parseSeconds(_ text: String, option: String) throws -> Duration {
    guard let value = Double(text), value >= 0, value.isFinite else {
        throw ValidationError("\(option) takes a number of seconds, like 5 or 0.5; got '\(text)'")
    }
    return .milliseconds(Int64(value * 1000))
}

/// Keeps glibc from handing every freed 1 MiB frame buffer back to the kernel
/// and faulting it in again for the next frame: that cost up to a third of
/// the encrypted throughput under load (docs/benchmarks-wire.md).
public func tuneAllocatorForBulkFrames() {
    FerrySystem.tuneAllocatorForBulkBuffers()
}
