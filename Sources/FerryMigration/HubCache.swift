// The hub's cached pages, behind one lock: what upstream sent, stored at
// the version each page had when it was asked for, and copied out into the
// parts leechers are sent. PageCache does the storing; this type owns it
// and its lock, and is the only one to touch it.
import Foundation
import Synchronization

final class HubCache: Sendable {
    /// Locking: no other lock is taken while this one is held, and callers
    /// take it holding none.
    private let cache: Mutex<PageCache>

    init(options: HubOptions) {
        cache = Mutex(PageCache(memoryLimit: options.memoryLimit, spillDirectory: options.spillDirectory))
    }

    /// The pages of `versions` not cached at the version given.
    func missing(_ versions: [UInt64: UInt32]) -> [UInt64] {
        cache.withLock { cache in
            versions.compactMap { page, version in cache.entry(page)?.version == version ? nil : page }
        }
    }

    /// Stores the pages of one upstream ReadAt reply, each at the version it
    /// was asked at (`asked`); returns the pages upstream answered unmapped.
    func store(_ parts: [[UInt8]], asked: [UInt64: UInt32]) throws -> [UInt64] {
        var unmapped: [UInt64] = []
        for part in parts where !part.isEmpty {
            let runs = try PagePart.parse(part)
            try part.withUnsafeBytes { bytes in
                try cache.withLock { cache in
                    for run in runs {
                        var page = run.range.start
                        while page < run.range.end {
                            guard let version = asked[page] else {
                                throw MigrationError.protocolViolation("upstream sent page 0x\(String(page, radix: 16)), not asked for")
                            }
                            switch run.kind {
                            case .data:
                                let offset = run.dataOffset + Int(page - run.range.start)
                                try cache.store(page, version: version,
                                                data: UnsafeRawBufferPointer(rebasing: bytes[offset..<offset + Int(pageSize)]))
                            case .zero:
                                try cache.store(page, version: version, data: nil)
                            case .hole:
                                try cache.store(page, version: version, data: nil, hole: true)
                            case .unmapped:
                                cache.forget(page)
                                unmapped.append(page)
                            }
                            page += pageSize
                        }
                    }
                }
            }
        }
        return unmapped
    }

    /// One ReadAt part's worth of pages, copied out of the cache.
    struct Copied {
        /// The chunk's pages as runs, and which of them are unmapped or holes.
        var ranges: [AddressRange] = []
        var unmapped: [AddressRange] = []
        var holes: [AddressRange] = []
        /// The pages served from the cache and the version each was cached at.
        var served: [(page: UInt64, version: UInt32)] = []
    }

    /// Copies `chunk` into `buffer` (page i at i * pageSize): cached pages of
    /// `inLayout` as cached, the others as zeros, answered unmapped.
    func copy(_ chunk: [UInt64], inLayout: Set<UInt64>, into buffer: UnsafeMutableRawBufferPointer) throws -> Copied {
        var copied = Copied()
        // SAFETY: the buffer holds at least chunk.count pages (the caller allocates pagesPerPart).
        guard let base = buffer.baseAddress, buffer.count >= chunk.count * Int(pageSize) else { return copied }
        try cache.withLock { cache in
            for (i, page) in chunk.enumerated() {
                let destination = base + i * Int(pageSize)
                let one = AddressRange(start: page, end: page + pageSize)
                if inLayout.contains(page), let entry = cache.entry(page) {
                    if try !cache.load(entry, into: destination) { memset(destination, 0, Int(pageSize)) }
                    if entry.hole { copied.holes.append(one) }
                    copied.served.append((page, entry.version))
                } else {
                    memset(destination, 0, Int(pageSize))
                    copied.unmapped.append(one)
                }
                // Runs follow the request's order, which need not be sorted:
                // only a page that continues the last run joins it (Ranges.append
                // would also fold in a page that goes back).
                if let last = copied.ranges.last, last.end == page {
                    copied.ranges[copied.ranges.count - 1].end = one.end
                } else {
                    copied.ranges.append(one)
                }
            }
        }
        return copied
    }

    /// Copies one cached page into `destination`; false when the cache holds
    /// no data for it.
    func load(_ page: UInt64, into destination: UnsafeMutableRawPointer) throws -> Bool {
        try cache.withLock { cache in try cache.entry(page).map { try cache.load($0, into: destination) } ?? false }
    }
}
