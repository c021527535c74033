// Huge pages for tests: the kernel's hugetlb pools (vm.nr_hugepages, and the
// pool of each size in sysfs) and the hugemem workload (Tools/hugemem) that
// maps memory from them.
import FerrySystem
import Glibc
import Synchronization

/// Grows the pool of huge pages of one size (2 MiB unless told) for one
/// test and puts it back after. Tests of several suites may hold pools at
/// once (they run in parallel in one process): per size, the first records
/// the pool's size, each grows it by all it needs (not by what is free at
/// that moment: pages free then may be another holder's, not used yet),
/// the last puts the recorded value back.
public final class HugePagePool: Sendable {
    private static let holders = Mutex<[Int: (count: Int, original: Int)]>([:])
    private let held = Atomic<Bool>(false)
    private let pageKiB: Int
    /// Why the pool could not be had (nil when it is ready).
    public let unavailable: String?

    /// /sys/kernel/mm/hugepages/hugepages-<size>kB/ (its nr_hugepages is
    /// vm.nr_hugepages for the default size).
    private static func directory(_ kib: Int) -> String { "/sys/kernel/mm/hugepages/hugepages-\(kib)kB/" }

    /// Makes at least `pages` free huge pages of `pageKiB` KiB available,
    /// growing the pool when needed (root only).
    public init(pages: Int, pageKiB: Int = 2048) {
        self.pageKiB = pageKiB
        let size = pageKiB >= 1 << 20 ? "\(pageKiB >> 20) GiB" : "\(pageKiB >> 10) MiB"
        guard geteuid() == 0 else {
            unavailable = "setting the pool of \(size) huge pages needs root"
            return
        }
        let directory = Self.directory(pageKiB)
        guard Self.readInt(directory + "nr_hugepages") != nil else {
            unavailable = "this kernel has no huge pages of \(size) (\(directory))"
            return
        }
        held.store(true, ordering: .relaxed)
        let now = Self.holders.withLock { holders -> Int in
            let current = Self.readInt(directory + "nr_hugepages") ?? 0
            var holder = holders[pageKiB] ?? (0, current)
            if holder.count == 0 { holder.original = current }
            holder.count += 1
            holders[pageKiB] = holder
            Self.write(directory + "nr_hugepages", String(current + pages))
            return Self.readInt(directory + "free_hugepages") ?? 0
        }
        unavailable = now < pages
            ? "the kernel gave \(now) of \(pages) huge pages of \(size) (\(directory)nr_hugepages; memory too fragmented?)" : nil
    }

    /// Puts the pool back as it was, once the last holder of its size is done.
    public func restore() {
        guard held.exchange(false, ordering: .relaxed) else { return }
        let control = Self.directory(pageKiB) + "nr_hugepages"
        Self.holders.withLock { holders in
            guard var holder = holders[pageKiB] else { return }
            holder.count -= 1
            holders[pageKiB] = holder
            if holder.count == 0 && Self.readInt(control) != holder.original {
                Self.write(control, String(holder.original))
            }
        }
    }

    public static func meminfo(_ field: String) -> Int? {
        guard let text = readText("/proc/meminfo") else { return nil }
        for line in text.split(separator: "\n") where line.hasPrefix(field + ":") {
            return Int(line.dropFirst(field.count + 1).trimmingPrefix(while: { $0 == " " }).split(separator: " ").first ?? "")
        }
        return nil
    }

    private static func readInt(_ path: String) -> Int? {
        readText(path).flatMap { Int($0.trimmingPrefix(while: { $0 == " " }).split(separator: "\n").first ?? "") }
    }

    private static func readText(_ path: String) -> String? {
        guard let file = fopen(path, "r") else { return nil }
        defer { fclose(file) }
        var bytes: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 4096)
        while true {
            let n = fread(&buffer, 1, buffer.count, file)
            if n <= 0 { break }
            bytes += buffer[0..<n]
        }
        return String(decoding: bytes, as: UTF8.self)
    }

    private static func write(_ path: String, _ value: String) {
        guard let file = fopen(path, "w") else { return }
        fputs(value + "\n", file)
        fclose(file)
    }
}

/// A running hugemem child. Killed and reaped in `stop()` or deinit.
public final class Hugemem: @unchecked Sendable {
    // @unchecked: see ChildProcess; `regions` is written only in init.
    public let child: ChildProcess
    public var pid: Int32 { child.pid }
    /// `region <name> 0x<start> 0x<end>` lines, by name (private, shm, memfd).
    public private(set) var regions: [String: AddressRange] = [:]

    public static var executable: String { builtExecutable("hugemem") }

    /// Why hugemem could not map its memory (`nohuge` line), or nil.
    public private(set) var refused: String? = nil

    /// Starts hugemem with `arguments` and reads its start-up block.
    public init(_ arguments: [String]) throws {
        child = try ChildProcess(Self.executable, arguments)
        let block = try child.readStartupBlock("hugemem") { $0.hasPrefix("nohuge") }
        regions = block.regions
        refused = block.early
    }

    public func send(_ command: String) { child.send(command) }
    public func expect(_ prefix: String, timeout: Double = 20) throws -> String { try child.expect(prefix, timeout: timeout) }
    public func stop() { child.stop() }
}

/// The KernelPageSize, in KiB, of the mapping of `pid` that starts at
/// `start`, from /proc/PID/smaps (2048 for memory in 2 MiB huge pages); nil
/// when no mapping starts there.
public func kernelPageKiB(pid: Int32, start: UInt64) -> Int? {
    let fd = open("/proc/\(pid)/smaps", O_RDONLY | O_CLOEXEC)
    guard fd >= 0 else { return nil }
    defer { close(fd) }
    // A /proc file says its size is 0: read to its end.
    var bytes: [UInt8] = []
    var chunk = [UInt8](repeating: 0, count: 65536)
    while true {
        let n = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
        if n <= 0 { break }
        bytes += chunk[0..<n]
    }
    var inside = false
    for line in String(decoding: bytes, as: UTF8.self).split(separator: "\n") {
        let fields = line.split(separator: " ")
        let bounds = fields.first?.split(separator: "-") ?? []
        if bounds.count == 2, let first = UInt64(bounds[0], radix: 16), UInt64(bounds[1], radix: 16) != nil {
            inside = first == start
        } else if inside, fields.first == "KernelPageSize:", fields.count >= 2 {
            return Int(fields[1])
        }
    }
    return nil
}
