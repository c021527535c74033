// `--max-bandwidth RATE` and `--max-bandwidth-file FILE`, shared by
// `seeder serve`, `hub serve` and `leecher pull` (issue 14). The cap is a
// FerryWire Pacer shared by every connection of the process. It can be
// changed while a migration runs by rewriting the file: it is polled once a
// second (modification time, size and inode), so an `echo 50M > FILE` or an
// atomic rename takes effect within about a second. A file is used rather
// than a signal because SIGHUP already ends the seeder and the leecher
// cleanly and SIGUSR1 finalizes a hub (`--finalize manual`).
import ArgumentParser
import Foundation
import FerryMigration

public struct BandwidthOptions: ParsableArguments {
    @Option(name: .long, help: ArgumentHelp(
        "Cap the transfer at RATE bytes per second: 50M, 200MB/s, 1G (decimal) or 100MiB, 1GiB (binary). Bulk pages wait; post-copy touches never do, though their bytes count (docs/user-guide.md, Bandwidth cap).",
        valueName: "RATE"))
    public var maxBandwidth: String?

    @Option(name: .long, help: ArgumentHelp(
        "A file holding the cap (a RATE, or 'none' for no cap), re-read within a second whenever it changes, so the cap can be changed while the migration runs; while the file exists it overrides --max-bandwidth.",
        valueName: "FILE"))
    public var maxBandwidthFile: String?

    public init() {}

    public func validate() throws {
        if let maxBandwidth {
            do {
                _ = try BandwidthRate(parsing: maxBandwidth)
            } catch {
                throw ValidationError("--max-bandwidth: \(error)")
            }
        }
        if let maxBandwidthFile, FileManager.default.fileExists(atPath: maxBandwidthFile) {
            do {
                _ = try BandwidthControl.read(maxBandwidthFile)
            } catch {
                throw ValidationError("--max-bandwidth-file: \(error)")
            }
        }
    }

    /// The pacer for this process, nil when neither option is given (no
    /// cap, and no cost); with a file, also the watcher to cancel at the end.
    /// Reports the cap in effect (`bandwidth` event), now and on each change.
    public func start(_ reporter: Reporter) throws -> (Pacer?, BandwidthControl?) {
        guard maxBandwidth != nil || maxBandwidthFile != nil else { return (nil, nil) }
        var rate = try maxBandwidth.map { try BandwidthRate(parsing: $0) }
        var origin = "--max-bandwidth"
        if let file = maxBandwidthFile, FileManager.default.fileExists(atPath: file),
           let setting = try BandwidthControl.read(file) {
            rate = setting.rate
            origin = file
        }
        let pacer = Pacer(rate: rate)
        BandwidthControl.report(rate, origin: origin, reporter)
        let control = maxBandwidthFile.map { BandwidthControl(path: $0, pacer: pacer, reporter: reporter) }
        return (pacer, control)
    }
}

/// Watches a bandwidth file and applies each new cap to a pacer.
public final class BandwidthControl: Sendable {
    /// How often the file is looked at: a changed cap applies within this.
    public static let pollInterval: Duration = .seconds(1)

    private let task: Task<Void, Never>

    init(path: String, pacer: Pacer, reporter: Reporter) {
        task = Task.detached {
            var seen = Self.stamp(path)
            while !Task.isCancelled {
                try? await Task.sleep(for: Self.pollInterval)
                let now = Self.stamp(path)
                guard now != seen, now != nil else { continue }
                do {
                    // Empty: caught between truncating and writing; look again next time.
                    guard let setting = try Self.read(path) else { continue }
                    seen = now
                    if setting.rate != pacer.rate {
                        pacer.setRate(setting.rate)
                        Self.report(setting.rate, origin: path, reporter)
                    }
                } catch {
                    seen = now
                    let message = "ignoring \(path): \(error); the cap stays at \(pacer.rate.map { "\($0)" } ?? "none")"
                    reporter.event("notice", ["message": .string(message)], text: "\(reporter.command): \(message)")
                }
            }
        }
    }

    public func cancel() { task.cancel() }

    /// What the file says: nil when it holds nothing yet.
    struct Setting { let rate: BandwidthRate? }

    /// Reads the first line that is neither blank nor a `#` comment: a RATE,
    /// or `none` (also `off`, `unlimited`) for no cap.
    static func read(_ path: String) throws -> Setting? {
        let text: String
        do {
            text = try String(contentsOfFile: path, encoding: .utf8)
        } catch {
            throw BandwidthFileError.unreadable(path, "\(error.localizedDescription)")
        }
        guard let line = text.split(whereSeparator: \.isNewline)
            .map({ $0.trimmingCharacters(in: .whitespaces) })
            .first(where: { !$0.isEmpty && !$0.hasPrefix("#") }) else { return nil }
        if ["none", "off", "unlimited"].contains(line.lowercased()) { return Setting(rate: nil) }
        return Setting(rate: try BandwidthRate(parsing: line))
    }

    static func report(_ rate: BandwidthRate?, origin: String, _ reporter: Reporter) {
        reporter.event("bandwidth", ["bytes_per_s": .int(Int64(rate?.bytesPerSecond ?? 0)),
                                     "cap": .string(rate.map { "\($0)" } ?? "none"),
                                     "from": .string(origin)],
                       text: "\(reporter.command): bandwidth cap \(rate.map { "\($0)" } ?? "none (unlimited)") (\(origin))")
    }

    /// Modification time, size and inode: what tells a rewritten file.
    private static func stamp(_ path: String) -> [Int]? {
        var info = stat()
        guard stat(path, &info) == 0 else { return nil }
        return [Int(info.st_mtim.tv_sec), Int(info.st_mtim.tv_nsec), Int(info.st_size), Int(info.st_ino)]
    }
}

enum BandwidthFileError: Error, CustomStringConvertible {
    case unreadable(String, String)

    var description: String {
        switch self {
        case .unreadable(let path, let reason): "cannot read the bandwidth file \(path): \(reason)"
        }
    }
}
