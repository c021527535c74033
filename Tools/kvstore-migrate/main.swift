// kvstore-migrate: the destination half of the post-copy demonstration.
// Migrates a running `kvstore` (Tools/kvstore) from `seeder serve` into live
// memory of this process, and answers key lookups against the migrated table
// the moment Finalize returns, while the rest of its memory streams in.
//
//   kvstore-migrate HOST:PORT --table 0xADDR [--bits B] [--keys N]
//                   [--secret-file F] [--finalize-at PCT] [--queries N]
//
// Every answer is checked: a value must be key*key + generation, the
// invariant kvstore keeps. See docs/postcopy.md.
import Foundation
import Glibc
import FerryMigration
import FerryWire

struct Options {
    var address = ""
    var table: UInt64 = 0
    var bits = 20
    var keys: UInt64 = 200_000
    var secretFile = (ProcessInfo.processInfo.environment["HOME"] ?? "/root") + "/.config/ferry/secret"
    var finalizeAt = 0.5
    var queries = 20
}

func usage(_ message: String) -> Never {
    FileHandle.standardError.write(("kvstore-migrate: \(message)\nusage: kvstore-migrate HOST:PORT --table 0xADDR [--bits B] "
        + "[--keys N] [--secret-file F] [--finalize-at PCT] [--queries N]\n").data(using: .utf8)!)
    exit(2)
}

func required<T>(_ value: T?, _ message: @autoclosure () -> String) -> T {
    guard let value else { usage(message()) }
    return value
}

var options = Options()
var arguments = CommandLine.arguments.dropFirst()
while let argument = arguments.popFirst() {
    func value() -> String { required(arguments.popFirst(), "\(argument) needs a value") }
    switch argument {
    case "--table":
        let text = value()
        options.table = required(UInt64(text.hasPrefix("0x") ? String(text.dropFirst(2)) : text, radix: 16), "bad --table \(text)")
    case "--bits": options.bits = required(Int(value()), "bad --bits")
    case "--keys": options.keys = required(UInt64(value()), "bad --keys")
    case "--secret-file": options.secretFile = value()
    case "--finalize-at": options.finalizeAt = (Double(value().replacingOccurrences(of: "%", with: "")) ?? 50) / 100
    case "--queries": options.queries = required(Int(value()), "bad --queries")
    default:
        if argument.hasPrefix("-") || !options.address.isEmpty { usage("unknown argument \(argument)") }
        options.address = argument
    }
}
guard !options.address.isEmpty, options.table != 0 else { usage("the seeder's address and --table are required") }

@Sendable func now() -> Double {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
}

/// kvstore's table, read through the migrated memory (see Tools/kvstore/main.c).
struct Table {
    let base: UnsafePointer<UInt64>
    let bits: Int

    /// (value, generation) of `key`, or nil when absent. Touches only the slots it probes.
    func lookup(_ key: UInt64) -> (UInt64, UInt64)? {
        let mask = (UInt64(1) << bits) - 1
        var slot = (key &* 0x9E37_79B9_7F4A_7C15) >> UInt64(64 - bits)
        while true {
            let entry = base + Int(slot) * 8 // 64-byte entries
            if entry[0] == key { return (entry[1], entry[2]) }
            if entry[0] == 0 { return nil }
            slot = (slot + 1) & mask
        }
    }
}

func run(_ options: Options) async throws {
    let secret = try PreSharedSecret.load(path: options.secretFile)
    let endpoint = try Endpoint(parsing: options.address)
    var leecherOptions = LeecherOptions()
    leecherOptions.policy = FinalizePolicy(cleanShare: options.finalizeAt, maxWaitSeconds: 30)
    let sink = try LiveMemorySink()
    let finalizedAt = LockedValue<Double>(0)
    let leecher = Leecher(connect: {
        let transport = try await Transports.connect(to: endpoint)
        return try await SecureChannel.client(over: transport, credentials: .preSharedSecret(secret))
    }, memory: sink, options: leecherOptions) { event in
        switch event {
        case .finalized(let downtime, _, let dirty, let remote):
            finalizedAt.set(now())
            print(String(format: "finalized: downtime %.2f ms, %llu dirty pages, %d pages still remote", downtime, dirty, remote))
        case .complete(let bytes, let seconds, let says):
            print(String(format: "complete: %.1f MB in %.2f s; seeder: %@", Double(bytes) / 1e6, seconds, says))
        default: break
        }
    }
    let migration = Task { try await leecher.run() }
    let memory = try await sink.migratedMemory()
    guard let local = memory.localAddress(of: options.table) else {
        throw MigrationError.image("the table address 0x\(String(options.table, radix: 16)) is in no migrated region")
    }
    let remote = memory.totalPages - memory.installedPages
    print("memory handed over: \(memory.mappings.count) regions, \(memory.totalPages) pages, \(remote) not here yet; "
          + "table at 0x\(String(local, radix: 16))\(local == options.table ? " (the source's address)" : "")")
    let queries = options.queries, keys = options.keys, bits = options.bits
    // Queries on a plain thread: a touch of a missing page blocks the thread that makes it.
    let answers: [String] = await withCheckedContinuation { continuation in
        Foundation.Thread.detachNewThread {
            let table = Table(base: UnsafePointer(bitPattern: UInt(local))!, bits: bits)
            var lines: [String] = []
            var generator = SystemRandomNumberGenerator()
            for _ in 0..<queries {
                let key = UInt64.random(in: 1...keys, using: &generator)
                let began = now()
                let answer = table.lookup(key)
                let micros = (now() - began) * 1e6
                let since = (now() - finalizedAt.get()) * 1000
                if let (value, generation) = answer {
                    let ok = value == key &* key &+ generation
                    lines.append(String(format: "get %llu -> %llu (generation %llu) %@ in %.0f us, %.1f ms after Finalize, %d pages still missing",
                                        key, value, generation, ok ? "ok" : "WRONG", micros, since,
                                        memory.totalPages - memory.installedPages))
                } else {
                    lines.append("get \(key) -> missing (WRONG: every key 1...\(keys) exists)")
                }
            }
            continuation.resume(returning: lines)
        }
    }
    for line in answers { print(line) }
    let summary = try await migration.value
    let stats = memory.statistics
    print("post-copy: \(stats.pagesCopied) pages copied, \(stats.pagesZeroed) zero, \(stats.faultCallbacks) fetched first on touch, "
          + "\(stats.pagesAlreadyInstalled) offered twice and skipped; image checked against the frozen source: "
          + "\(summary.manifest.regions.filter { $0.blake2b != nil }.count) regions match")
    if answers.contains(where: { $0.contains("WRONG") }) { exit(1) }
}

/// A value shared with the event callback.
final class LockedValue<T: Sendable>: @unchecked Sendable {
    // Invariant: `value` is only touched under `lock`.
    private let lock = NSLock()
    private var value: T
    init(_ value: T) { self.value = value }
    func get() -> T { lock.withLock { value } }
    func set(_ new: T) { lock.withLock { value = new } }
}

do {
    try await run(options)
} catch {
    FileHandle.standardError.write("kvstore-migrate: \(error)\n".data(using: .utf8)!)
    exit(1)
}
