// Huge pages for tests: the kernel's hugetlb pool (vm.nr_hugepages) and the
// hugemem workload (Tools/hugemem) that maps memory from it.
import FerrySystem
import Glibc
import Synchronization

/// Grows the pool of 2 MiB huge pages for one test and puts it back after.
/// Tests of several suites may hold pools at once (they run in parallel in
/// one process): the first records `vm.nr_hugepages`, each grows it by what
/// it needs, the last puts the recorded value back.
public final class HugePagePool: Sendable {
    private static let control = "/proc/sys/vm/nr_hugepages"
    private static let holders = Mutex<(count: Int, original: Int)>((0, 0))
    private let held = Atomic<Bool>(false)
    /// Why the pool could not be had (nil when it is ready).
    public let unavailable: String?

    /// Makes at least `pages` free 2 MiB pages available, growing
    /// `vm.nr_hugepages` when needed (root only).
    public init(pages: Int) {
        guard geteuid() == 0 else {
            unavailable = "setting vm.nr_hugepages needs root"
            return
        }
        held.store(true, ordering: .relaxed)
        let now = Self.holders.withLock { holders -> Int in
            let current = Self.readInt(Self.control) ?? 0
            if holders.count == 0 { holders.original = current }
            holders.count += 1
            let free = Self.meminfo("HugePages_Free") ?? 0
            if free < pages { Self.write(Self.control, String(current + pages - free)) }
            return Self.meminfo("HugePages_Free") ?? 0
        }
        unavailable = now < pages
            ? "the kernel gave \(now) of \(pages) huge pages of 2 MiB (vm.nr_hugepages; memory too fragmented?)" : nil
    }

    /// Puts `vm.nr_hugepages` back as it was, once the last pool is done.
    public func restore() {
        guard held.exchange(false, ordering: .relaxed) else { return }
        Self.holders.withLock { holders in
            holders.count -= 1
            if holders.count == 0 && Self.readInt(Self.control) != holders.original {
                Self.write(Self.control, String(holders.original))
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
