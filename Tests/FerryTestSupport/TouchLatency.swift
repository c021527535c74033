// How the post-copy benchmarks time a program's first touch of a page that
// has not arrived: a plain load on a thread of its own, which the fault blocks.
import Foundation
import FerrySystem

/// Runs `body` on a new thread (its loads may block in a page fault for a
/// long while, which must not hold a cooperative-pool thread) and returns its result.
public func onThread<T: Sendable>(_ body: @escaping @Sendable () -> T) async -> T {
    await withCheckedContinuation { continuation in
        Foundation.Thread.detachNewThread { continuation.resume(returning: body()) }
    }
}

/// Touches up to `count` random pages of `memory`'s mappings of 1 MiB or more
/// that are not installed yet, `gap` seconds apart; the wall time of each
/// load (fault to data), in seconds.
public func touchRemotePages(_ memory: MissingFaultMemory, count: Int, gap: Double = 0) -> [Double] {
    var generator = SystemRandomNumberGenerator()
    var latencies: [Double] = []
    let mappings = memory.mappings.filter { $0.source.length >= 1 << 20 }
    guard !mappings.isEmpty else { return [] }
    var attempts = 0
    while latencies.count < count && attempts < count * 50 && !memory.isComplete {
        attempts += 1
        let mapping = mappings[Int.random(in: 0..<mappings.count, using: &generator)]
        let page = mapping.source.start + UInt64.random(in: 0..<mapping.source.pageCount, using: &generator) * 4096
        guard !memory.isInstalled(page), let local = memory.localAddress(of: page) else { continue }
        let pointer = UnsafePointer<UInt64>(bitPattern: UInt(local))!
        let began = now()
        // SAFETY: a page of the migrated memory; the load is the fault being measured.
        let value = pointer.pointee
        latencies.append(now() - began)
        if value == 0x0123_4567_89AB_CDEF { print("") } // keeps the load
        if gap > 0 { usleep(UInt32(gap * 1e6)) }
    }
    return latencies
}
