// Real `seeder` and `leecher` processes for the tests that drive the
// commands: one secret file, the seeder on an ephemeral port, and the checks
// on the source that every failure test makes; below it, what the tests of
// `--into` read of a live target (its mappings, which pages are present,
// its bytes) to prove it never reads zeros where the source had data.
import Foundation
import FerryTestSupport
@testable import FerryMigration

final class CLIHarness {
    /// One secret file per harness, removed with it.
    let secretPath = "/tmp/ferry-cli-secret-\(getpid())-\(UInt64.random(in: 0...UInt64.max))"

    init() throws {
        let secret = try PreSharedSecret.generate()
        FileManager.default.createFile(atPath: secretPath, contents: Data((secret.text + "\n").utf8),
                                       attributes: [.posixPermissions: 0o600])
    }

    deinit { try? FileManager.default.removeItem(atPath: secretPath) }

    /// Starts `seeder serve` and returns it with the address it listens on.
    func startSeeder(pid: Int32, _ extra: [String] = []) throws -> (ChildProcess, String) {
        let seeder = try ChildProcess(builtExecutable("seeder"),
                                      ["serve", "\(pid)", "--listen", "127.0.0.1:0", "--secret-file", secretPath,
                                       "--json"] + extra)
        let line = try seeder.expect("{\"event\":\"listening\"")
        guard let range = line.range(of: #"127\.0\.0\.1:\d+"#, options: .regularExpression) else {
            throw TestFailure("no address in \(line)")
        }
        return (seeder, String(line[range]))
    }

    func startLeecher(_ address: String, out: String, _ extra: [String] = []) throws -> ChildProcess {
        try ChildProcess(builtExecutable("leecher"),
                         ["pull", address, "--secret-file", secretPath, "--out", out, "--json"] + extra)
    }

    /// True when the workload does not answer within half a second: frozen.
    func isFrozen(_ child: Memwriter) -> Bool {
        child.send("count")
        return (try? child.expect("count", timeout: 0.5)) == nil
    }

    /// True when the workload's write counter moves: the process runs.
    func isRunning(_ child: Memwriter) throws -> Bool {
        child.send("count")
        let before = try child.expect("count")
        usleep(200_000)
        child.send("count")
        return try child.expect("count") != before
    }
}

// MARK: - A live target's memory, seen from outside (/proc)

/// A /proc file's text, read to its end (its size says 0).
func procText(_ path: String) -> String? {
    let fd = open(path, O_RDONLY)
    guard fd >= 0 else { return nil }
    defer { close(fd) }
    var data: [UInt8] = []
    var chunk = [UInt8](repeating: 0, count: 65536)
    while true {
        let n = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
        if n <= 0 { break }
        data += chunk[0..<n]
    }
    return String(decoding: data, as: UTF8.self)
}

/// One mapping of /proc/PID/smaps with its VmFlags ("um": userfaultfd missing mode).
struct SmapsEntry {
    var range: AddressRange
    var flags: [Substring]
}

func smaps(_ pid: Int32) -> [SmapsEntry] {
    guard let text = procText("/proc/\(pid)/smaps") else { return [] }
    var entries: [SmapsEntry] = []
    for line in text.split(separator: "\n") {
        if line.hasPrefix("VmFlags:") {
            if !entries.isEmpty { entries[entries.count - 1].flags = line.dropFirst(8).split(separator: " ") }
            continue
        }
        let first = line.split(separator: " ", maxSplits: 1).first ?? ""
        let bounds = first.split(separator: "-")
        if bounds.count == 2, let start = UInt64(bounds[0], radix: 16), let end = UInt64(bounds[1], radix: 16) {
            entries.append(SmapsEntry(range: AddressRange(start: start, end: end), flags: []))
        }
    }
    return entries
}

/// Whether the page at `address` of `pid` is in memory (bit 63 of its pagemap entry).
func isPresent(_ pid: Int32, _ address: UInt64) -> Bool? {
    let fd = open("/proc/\(pid)/pagemap", O_RDONLY)
    guard fd >= 0 else { return nil }
    defer { close(fd) }
    var entry: UInt64 = 0
    guard pread(fd, &entry, 8, off_t(address / 4096 * 8)) == 8 else { return nil }
    return entry & (1 << 63) != 0 || entry & (1 << 62) != 0
}

func bytes(_ pid: Int32, at address: UInt64, length: Int) -> [UInt8]? {
    let fd = open("/proc/\(pid)/mem", O_RDONLY)
    guard fd >= 0 else { return nil }
    defer { close(fd) }
    var out = [UInt8](repeating: 0, count: length)
    return out.withUnsafeMutableBytes({ pread(fd, $0.baseAddress, length, off_t(address)) }) == length ? out : nil
}

/// The children of `pid` named `name` (from /proc/PID/task/*/children).
func children(of pid: Int32, named name: String) -> [Int32] {
    let tasks = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/task")) ?? []
    var found: [Int32] = []
    for task in tasks {
        let list = procText("/proc/\(pid)/task/\(task)/children") ?? ""
        for child in list.split(separator: " ").compactMap({ Int32($0) }) {
            let comm = procText("/proc/\(child)/comm") ?? ""
            if comm.trimmingCharacters(in: .whitespacesAndNewlines) == name { found.append(child) }
        }
    }
    return found
}

/// True once `pid` is gone or a zombie, within `timeout` seconds.
func exits(_ pid: Int32, within timeout: Double) -> Bool {
    let deadline = ChildProcess.now() + timeout
    while ChildProcess.now() < deadline {
        let stat = procText("/proc/\(pid)/stat") ?? ""
        if stat.isEmpty || stat.contains(") Z ") { return true }
        usleep(20_000)
    }
    return false
}

/// Where `main` (the source's region `whole`) lies in `target`, as the
/// distance to add to a source address; nil while not mapped (or, with
/// `registered`, not registered for missing faults).
/// Mappings in `before` (the target's own, listed before the migration)
/// are not taken for the migrated region: a large reservation of the
/// target's (a malloc arena) can cover the source's addresses.
func placement(of main: AddressRange, whole: AddressRange, in target: Int32, registered: Bool,
               before: [AddressRange] = []) -> Int64? {
    let mappings = smaps(target).filter { (!registered || $0.flags.contains("um")) && !before.contains($0.range) }
    // At the source's addresses when free there (then merged with its neighbours), elsewhere otherwise.
    if mappings.contains(where: { $0.range.contains(main.start) && $0.range.contains(main.end - 1) }) { return 0 }
    if let moved = mappings.first(where: { $0.range.length == whole.length }) {
        return Int64(bitPattern: moved.range.start &- whole.start)
    }
    return nil
}
